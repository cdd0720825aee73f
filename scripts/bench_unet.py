"""Time the networks of a model as the sampler calls them, on the GPU, in several variants: the UNet's forward (the
PF-ODE, no grad) and, for latent models, the decoder's forward and backward (every MCMC step of LatentDAPS).

    python scripts/bench_unet.py --model checkpoints/random/ffhq256ddpm [--batch 10 40] [--gflop 388] [--variants ...]

Variants (``--variants``, default all, run in this order): fp32, fp32+bench, bf16, bf16+cl+bench, compile+bench,
compile+bf16, compile+bf16+cl, compile+bf16+cl+bench, autotune+bf16+cl, where ``bf16`` is the model's ``dtype: bfloat16`` (autocast),
``cl`` its ``channels_last``, ``bench`` ``torch.backends.cudnn.benchmark`` (the sampler leaves it off) and
``compile`` the model's ``compile: default`` and ``autotune`` its ``compile: max-autotune-no-cudagraphs`` (inductor
times Triton templates against cuBLAS / cuDNN for each convolution and matrix product: a compile of minutes).
cuDNN keeps the plans it chose for the process, so a variant without ``bench`` after one with it may reuse benchmarked
plans: each no-bench variant comes before its bench twin (or run one variant per process).
Prints the median milliseconds per batch and per image over 20 timed calls (CUDA events, after 5 warm-ups; a
compiled variant's first call, the compile, is printed as well), the largest difference of the output from fp32's,
and given --gflop (forward GFLOP per image; 388 for the ffhq256 ADM), the achieved TFLOP/s.

``--profile`` then records 3 calls of each network and variant (torch.profiler) and prints the kernels with the most
GPU time and the tensor copies (``aten::copy_``) per call, grouped by the operator that made them, the shape, the
source and destination strides and dtypes: layout conversions around convolutions show up there.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.models import build_model  # noqa: E402

VARIANTS = {  # name: (model options, cudnn.benchmark)
    "fp32": ({}, False),
    "fp32+bench": ({}, True),
    "bf16": ({"dtype": "bfloat16"}, False),
    "bf16+cl+bench": ({"dtype": "bfloat16", "channels_last": True}, True),
    "compile+bench": ({"compile": "default"}, True),
    "compile+bf16": ({"dtype": "bfloat16", "compile": "default"}, False),
    "compile+bf16+cl": ({"dtype": "bfloat16", "channels_last": True, "compile": "default"}, False),
    "compile+bf16+cl+bench": ({"dtype": "bfloat16", "channels_last": True, "compile": "default"}, True),
    "autotune+bf16+cl": ({"dtype": "bfloat16", "channels_last": True, "compile": "max-autotune-no-cudagraphs"}, False),
}


def cuda_ms(fn: Callable[[], torch.Tensor], reps: int = 20) -> tuple[float, float]:
    """(first call's seconds, median ms of ``reps`` calls after 5 warm-ups)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(4):
        fn()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return first, statistics.median(times)


def decode_backward(model, z: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        zz = z.detach().requires_grad_(True)
        return torch.autograd.grad(model.decode(zz).sum(), zz)[0]
    return run


def enclosing_ops(events: list[dict], depth: int = 3) -> dict[int, str]:
    """For each CPU operator event (index into ``events``), the operators that enclose it on its thread, the
    ``depth`` innermost as "outer > inner" ("-" at top level): the trace's events nest by time."""
    parents: dict[int, str] = {}
    by_thread: dict[object, list[int]] = collections.defaultdict(list)
    for i, e in enumerate(events):
        if e.get("cat") == "cpu_op":
            by_thread[e.get("tid")].append(i)
    for ids in by_thread.values():
        stack: list[int] = []
        for i in sorted(ids, key=lambda k: (events[k]["ts"], -events[k].get("dur", 0))):
            e = events[i]
            while stack and events[stack[-1]]["ts"] + events[stack[-1]].get("dur", 0) <= e["ts"]:
                stack.pop()
            parents[i] = " > ".join(events[k]["name"] for k in stack[-depth:]) or "-"
            stack.append(i)
    return parents


def profile_calls(call: Callable[[], torch.Tensor], reps: int = 3, top: int = 12) -> None:
    """Print the ``top`` kernels by GPU time and the copies per call of ``reps`` calls of ``call``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    parents = enclosing_ops(events)
    copies: collections.Counter = collections.Counter()
    for i, parent in parents.items():
        e = events[i]
        if e["name"] == "aten::copy_":
            args = e.get("args", {})
            dims, strides, types = (args.get(k, []) for k in ("Input Dims", "Input Strides", "Input type"))
            copies[(parent, str(dims[:1]), str(strides[:2]), str(types[:2]))] += 1
    print(f"copies per call (aten::copy_), {sum(copies.values()) / reps:.0f} in all:")
    print("| per call | inside | shape | dst, src strides | dst, src dtypes |\n|---|---|---|---|---|")
    for (parent, dims, strides, types), n in copies.most_common(top):
        print(f"| {n / reps:g} | {parent} | {dims} | {strides} | {types} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[10])
    ap.add_argument("--gflop", type=float, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="profile each network and variant (see above)")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    print("| network | variant | batch | ms / batch | ms / image | TFLOP/s | first call s | max abs diff vs fp32 |\n"
          "|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs: dict[int, torch.Tensor] = {}
    reference: dict[tuple[str, int], torch.Tensor] = {}  # the first variant's outputs
    for name in args.variants:
        options, bench = VARIANTS[name]
        torch.backends.cudnn.benchmark = bench
        model = build_model({"name": "diffusers", "path": args.model, **options}, torch.device("cuda"))
        for b in args.batch:
            x = inputs.setdefault(b, torch.randn(b, *model.in_shape, device="cuda", generator=gen))
            calls = {"unet": torch.no_grad()(lambda: model.denoise(x, 1.0))}
            if model.latent:
                calls["decoder fwd+bwd"] = decode_backward(model, x)
            for net, call in calls.items():
                first, ms = cuda_ms(call)
                out = call().float()
                diff = (out - reference.setdefault((net, b), out)).abs().max().item()
                tflops = f"{args.gflop * b / ms:.0f}" if args.gflop and net == "unet" else "-"
                print(f"| {net} | {name} | {b} | {ms:.2f} | {ms / b:.3f} | {tflops} | {first:.1f} | {diff:.2e} |",
                      flush=True)
                if args.profile:
                    print(f"\n== profile: {net}, {name}, batch {b}")
                    profile_calls(call)
                    print(flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
