"""Time one UNet forward (as the PF-ODE calls it, no grad) on the GPU: fp32, bf16 autocast, bf16 + channels_last.

    python scripts/bench_unet.py --model checkpoints/random/ffhq256ddpm [--batch 10] [--gflop 388]

Prints the median milliseconds per batch and per image over 20 timed calls (CUDA events, after 5 warm-ups),
and, given --gflop (forward GFLOP per image; 388 for the ffhq256 ADM), the achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.models import build_model  # noqa: E402


def time_denoise(model, batch: int, reps: int = 20) -> float:
    x = torch.randn(batch, *model.in_shape, device="cuda")
    for _ in range(5):
        model.denoise(x, 1.0)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            model.denoise(x, 1.0)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[10])
    ap.add_argument("--gflop", type=float, default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    print("| variant | batch | ms / batch | ms / image | TFLOP/s |\n|---|---|---|---|---|")
    for name, kw in (("fp32", {}), ("bf16", {"dtype": "bfloat16"}),
                     ("bf16 + channels_last", {"dtype": "bfloat16", "channels_last": True})):
        model = build_model({"name": "diffusers", "path": args.model, **kw}, torch.device("cuda"))
        for b in args.batch:
            ms = time_denoise(model, b)
            tflops = f"{args.gflop * b / ms:.0f}" if args.gflop else "-"
            print(f"| {name} | {b} | {ms:.2f} | {ms / b:.2f} | {tflops} |")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
