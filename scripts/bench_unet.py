"""Time the networks of a model as the sampler calls them, on the GPU, in several variants: the UNet's forward (the
PF-ODE, no grad) and, for latent models, the decoder's forward and backward (every MCMC step of LatentDAPS).

    python scripts/bench_unet.py --model checkpoints/random/ffhq256ddpm [--batch 10 40] [--gflop 388] [--variants ...]

Variants (``--variants``, default all, run in this order): fp32, fp32+bench, bf16, bf16+cl+bench, compile+bench,
compile+bf16+cl, compile+bf16+cl+bench, where ``bf16`` is the model's ``dtype: bfloat16`` (autocast), ``cl`` its
``channels_last``, ``bench`` ``torch.backends.cudnn.benchmark`` (the sampler leaves it off) and ``compile`` the
model's ``compile: default``.
cuDNN keeps the plans it chose for the process, so a variant without ``bench`` after one with it may reuse benchmarked
plans: each no-bench variant comes before its bench twin (or run one variant per process).
Prints the median milliseconds per batch and per image over 20 timed calls (CUDA events, after 5 warm-ups; a
compiled variant's first call, the compile, is printed as well), the largest difference of the output from fp32's,
and given --gflop (forward GFLOP per image; 388 for the ffhq256 ADM), the achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
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
    "compile+bf16+cl": ({"dtype": "bfloat16", "channels_last": True, "compile": "default"}, False),
    "compile+bf16+cl+bench": ({"dtype": "bfloat16", "channels_last": True, "compile": "default"}, True),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[10])
    ap.add_argument("--gflop", type=float, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
