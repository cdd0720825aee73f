"""How precise is phase retrieval's matrix-product DFT (the XLA path, cores.fourier) at TPU matmul precisions?

A TPU multiplies float32 matrices at torch_xla's default precision in one bfloat16 pass (operands rounded to
bfloat16, products accumulated in float32); 'high' uses three passes. This emulates both on the CPU (the
rounding done explicitly, the accumulation in float32) and prints the error of |F(pad(x))| against float64
torch.fft for random images, next to the measurement noise sigma. It measures the arithmetic, not a TPU.

    python scripts/dft_precision.py --resolution 256 --images 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cores.fourier import centred_fft2, dft_matrix  # noqa: E402
from cores.operators import PhaseRetrieval, safe_magnitude  # noqa: E402


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def matmul_passes(a: torch.Tensor, b: torch.Tensor, passes: int) -> torch.Tensor:
    """a @ b with bfloat16-rounded operands: 1 pass (hi hi) or 3 passes (hi hi + lo hi + hi lo)."""
    ah, bh = bf16(a), bf16(b)
    out = ah @ bh
    if passes == 3:
        out = out + bf16(a - ah) @ bh + ah @ bf16(b - bh)
    return out


def dft_magnitude(x: torch.Tensor, passes: int) -> torch.Tensor:
    n = x.shape[-1]
    c, s = dft_matrix(n, x.device, torch.float32)
    a, b = matmul_passes(c, x, passes), matmul_passes(s, x, passes)
    re = matmul_passes(a, c.mT, passes) - matmul_passes(b, s.mT, passes)
    im = matmul_passes(a, s.mT, passes) + matmul_passes(b, c.mT, passes)
    return safe_magnitude(re, im)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    op = PhaseRetrieval()
    x = torch.rand(args.images, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(args.seed))
    p = op.pad(args.resolution)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    exact = safe_magnitude(*centred_fft2(padded.double()))
    print(f"| precision | rms error | max error | rms of y | noise sigma |  ({args.images} images, "
          f"{args.resolution} px padded to {padded.shape[-1]})")
    print("|---|---|---|---|---|")
    for passes, name in ((1, "default (1 bf16 pass)"), (3, "high (3 bf16 passes)")):
        err = dft_magnitude(padded, passes).double() - exact
        print(f"| {name} | {err.pow(2).mean().sqrt():.2e} | {err.abs().max():.2e} | "
              f"{exact.pow(2).mean().sqrt():.3f} | {op.sigma} |")


if __name__ == "__main__":
    main()
