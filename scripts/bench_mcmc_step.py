#!/usr/bin/env python3
"""One level of the pixel MCMC on phase retrieval, eager against ``compile.mcmc=default`` (cores/mcmc.py
compiled_step), with the same per-particle streams on both sides:

    python scripts/bench_mcmc_step.py [--kernel langevin|hmc] [--steps 100] [--batch 400] [--size 32] [--channels 1]

Prints the median milliseconds per step over 5 timed levels (after 2 warm-up levels, the first of which compiles)
and the largest difference of the level's end state between the two. ``--kernel langevin --steps 100 --batch 400
--size 32`` is the Fashion-MNIST prior's level (fmnist_pixel, 100 images x 4); ``--kernel hmc --steps 62 --batch 40
--size 256 --channels 3`` DAPS-1K's pixel_hmc level at FFHQ size (10 images x 4).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cores.mcmc import DampedHMC, Langevin, Target  # noqa: E402
from cores.noise import particle_noise  # noqa: E402
from cores.operators import PhaseRetrieval  # noqa: E402


def level_ms(kernel, target_at, x0: torch.Tensor, seeds: list[int], reps: int = 5) -> tuple[list[float], torch.Tensor]:
    """Per-step milliseconds of ``reps`` levels (after 2 warm-ups) and the last level's end state."""
    times, out = [], None
    for rep in range(reps + 2):
        noise = particle_noise("counter-fused" if x0.is_cuda else "counter", seeds, x0.device)
        if x0.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = kernel.run(target_at(rep), x0, noise, kernel.lr).x
        if x0.is_cuda:
            torch.cuda.synchronize()
        if rep >= 2:
            times.append((time.perf_counter() - start) * 1e3 / kernel.num_steps)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernel", choices=("langevin", "hmc"), default="langevin")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    op = PhaseRetrieval()
    y = op(torch.rand(shape, generator=g) * 2 - 1).to(dev)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(dev)
    seeds = list(range(1000, 1000 + args.batch))

    def target_at(rep: int) -> Target:  # a new Target and closures per level, r varying, as in the sampler
        return Target(lambda x: op.loss(x, y), 1e4, 0.5 / (1 + rep), x0, gradient=lambda x: op.gradient(x, y))

    results = {}
    for mode in ("none", "default"):
        kernel = (Langevin(args.steps, 1e-4, compile=mode) if args.kernel == "langevin"
                  else DampedHMC(args.steps, 9.75e-6, compile=mode, momentum=0.73))
        results[mode] = level_ms(kernel, target_at, x0, seeds)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, {args.kernel} x {args.steps} steps, x {tuple(shape)}, torch {torch.__version__}")
    for mode, (times, _) in results.items():
        print(f"compile.mcmc={mode:8s} {statistics.median(times):8.3f} ms per step (levels: "
              f"{', '.join(f'{t:.3f}' for t in times)})")
    diff = (results["default"][1] - results["none"][1]).abs().max().item()
    ratio = statistics.median(results["default"][0]) / statistics.median(results["none"][0])
    print(f"default / none {ratio:.3f}; max |end state difference| {diff:.2e}")


if __name__ == "__main__":
    main()
