#!/usr/bin/env python3
"""One MCMC step's noise draw for a particle batch, per stream kind (``noise`` in configs/default.yaml), on one device:

    python scripts/bench_noise.py [--device cuda|cpu] [--batch 400] [--shape 1 32 32] [--kinds generator counter ...]

Prints the median time per draw of ``randn`` for each kind (torch.utils.benchmark, which synchronises CUDA) and its
ratio to the first kind. The fused kind is compiled before it is timed (the compile time is printed apart). Batch
400 and shape 1 x 32 x 32 are the Fashion-MNIST prior's 100 images x 4 particles; ``--batch 40 --shape 3 256 256``
is FFHQ's 10 x 4.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cores.noise import NOISE, particle_noise, particle_seed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 32, 32])
    ap.add_argument("--kinds", nargs="+", default=list(NOISE), choices=list(NOISE))
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds each timing runs at least")
    args = ap.parse_args()
    dev, shape = torch.device(args.device), tuple(args.shape)
    seeds = [particle_seed(0, i // 4, i % 4) for i in range(args.batch)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, {args.batch} particles x {shape}, torch {torch.__version__}")
    first = None
    for kind in args.kinds:
        noise = particle_noise(kind, seeds, dev)
        t0 = time.perf_counter()
        noise.randn(shape)  # the first draw: compiles the fused kind
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        warm = time.perf_counter() - t0
        t = benchmark.Timer("noise.randn(shape)", globals={"noise": noise, "shape": shape})
        sec = t.blocked_autorange(min_run_time=args.min_run_time).median
        first = first or sec
        print(f"{kind:14s} {sec * 1e3:9.3f} ms per draw  ({sec / first:.3f}x the first; first draw {warm:.1f} s)")


if __name__ == "__main__":
    main()
