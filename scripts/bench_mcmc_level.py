"""Time one level of the MCMC as the sampler runs it on CUDA (``DampedHMC`` of ``task_group=pixel_hmc``: 62 steps,
phase retrieval with its closed-form gradient, ``noise: counter-fused``), and the same level replayed as one CUDA
graph: whether the level is bound by the host (Python, dispatch and launches) or by the GPU's work.

    python scripts/bench_mcmc_level.py [--shape 40 3 256 256] [--steps 62] [--reps 5] [--static-kernels] [--profile]

``--static-kernels`` compiles the fused kernels (``utils.device.compiled``) with torch.compile's default automatic
dynamic shapes instead of ``dynamic=True``: sizes as constants in the kernels until a second size is seen.

``--profile`` also prints torch.profiler's table of one more eager level by GPU time (top 25): which kernels a
step runs, and how long each takes.

Prints, per level (median of --reps after a warm-up level that compiles the fused kernels): the host's time to
enqueue the level (until ``run`` returns), the wall time until the GPU has finished it, and the wall time of a replay
of the level captured once as a CUDA graph (``torch.cuda.CUDAGraph``: the same kernels, no host work between them).
The graph replays the captured level's numbers (its noise counters and step size are fixed at the capture): a timing
of the floor the GPU's work sets, not a sampler.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.mcmc import DampedHMC, TargetSpec, make_target  # noqa: E402
from cores.noise import CounterNoise  # noqa: E402
from cores.operators import PhaseRetrieval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, default=[40, 3, 256, 256], metavar=("N", "C", "H", "W"))
    ap.add_argument("--steps", type=int, default=62)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--static-kernels", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.static_kernels:
        import cores.noise
        import utils.device

        static = lru_cache(maxsize=None)(torch.compile)
        utils.device.compiled = cores.noise.compiled = static
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    op = PhaseRetrieval().to(dev)
    x0hat = torch.rand(*args.shape, device=dev, generator=gen) * 2 - 1
    y = op(torch.rand(*args.shape, device=dev, generator=gen) * 2 - 1)
    kernel = DampedHMC(num_steps=args.steps, lr=9.75e-6, lr_min_ratio=0.019, momentum=0.73)
    noise = CounterNoise(range(args.shape[0]), dev, fused=True)
    target = make_target(TargetSpec(1e4), None, lambda x: op.loss(x, y), x0hat, x0hat, 1.0,
                         gradient=partial(op.gradient, y=y))

    def level() -> torch.Tensor:
        return kernel.run(target, x0hat, noise, kernel.lr).x

    level()  # compiles
    torch.cuda.synchronize()
    enqueue, wall = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        level()
        enqueue.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        level()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        level()
    torch.cuda.synchronize()
    replay = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replay.append(time.perf_counter() - t0)
    n = args.steps
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | shape {args.shape} | {n} steps per level | "
          f"kernels compiled {'static' if args.static_kernels else 'dynamic'}")
    print("| | ms per level | ms per step |\n|---|---|---|")
    for name, times in (("host enqueue (eager)", enqueue), ("wall (eager)", wall), ("wall (CUDA graph replay)", replay)):
        ms = statistics.median(times) * 1e3
        print(f"| {name} | {ms:.2f} | {ms / n:.3f} |")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            level()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
