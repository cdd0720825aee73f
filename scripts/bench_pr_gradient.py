#!/usr/bin/env python3
"""The phase-retrieval data gradient, closed form (``PhaseRetrieval.gradient``: one rfft2, one irfft2) against
autograd of the loss (``Operator.gradient``, what every MCMC step used before), on one device:

    python scripts/bench_pr_gradient.py [--device cuda|cpu] [--batch 400] [--size 32] [--channels 1] [--dtype float32]

Prints the median time per call of each (torch.utils.benchmark, which synchronises CUDA), the ratio, and the largest
difference between the two gradients relative to the largest gradient entry. Batch 400 and size 32 are the
Fashion-MNIST prior's 100 images x 4 particles; ``--size 256 --channels 3 --batch 40`` is FFHQ's 10 x 4.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cores.operators import Operator, PhaseRetrieval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds each timing runs at least")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    op = PhaseRetrieval().to(dev, dtype)
    x = (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1).to(dev)
    clean = op((torch.rand(shape, generator=g, dtype=dtype) * 2 - 1).to(dev))
    y = clean + op.sigma * torch.randn(clean.shape, generator=g, dtype=dtype).to(dev)  # noisy, as measured
    closed, auto = op.gradient(x, y)[0], Operator.gradient(op, x, y)[0]
    rel = ((closed - auto).abs().max() / auto.abs().max()).item()
    times = {}
    for name, stmt in (("autograd", "Operator.gradient(op, x, y)"), ("closed form", "op.gradient(x, y)")):
        t = benchmark.Timer(stmt, globals={"Operator": Operator, "op": op, "x": x, "y": y})
        times[name] = t.blocked_autorange(min_run_time=args.min_run_time).median
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, x {tuple(shape)} {args.dtype}, torch {torch.__version__}")
    for k, v in times.items():
        print(f"{k:12s} {v * 1e6:10.1f} us per call")
    print(f"closed form / autograd {times['closed form'] / times['autograd']:.3f}; "
          f"max |difference| / max |gradient| {rel:.2e}")


if __name__ == "__main__":
    main()
