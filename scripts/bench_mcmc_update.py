"""Time the damped-HMC update of one MCMC step (cores/mcmc.py ``DampedHMC`` with the Gaussian prior term) as the
sampler runs it, eagerly, against one compiled function of the same arithmetic: the candidate lever "a fused MCMC
update" of issue 15 (the third session's ADM profile counted about ten elementwise passes per step).

    python scripts/bench_mcmc_update.py [--shapes 40x3x256 400x1x32]     (CUDA)

Per step, with g_L the phase-retrieval loss gradient and z the step's noise (both given):
    g = (prior_mean - x) / r^2 - w g_L;   v = m v + h g + sqrt(2 (1 - m)) z;   x = x + h v.
The fused side takes r, w, m and h as 0-d tensors, so that a new level's values do not recompile it (the script
checks: three levels' values, one compile). Prints the median ms per step of each (CUDA events, 20 calls after 5
warm-ups), the ratio, the bytes the fused side must move per ms, and the largest difference between the two.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.mcmc import gaussian_log_pi_grad  # noqa: E402
from scripts.bench_unet import cuda_ms  # noqa: E402


def eager_update(x, v, grad_loss, prior_mean, z, r: float, w: float, m: float, h: float):
    """The update eagerly (one kernel per operation): cores.mcmc's posterior gradient called directly (not through
    ``utils.device.fused``, which compiles it on CUDA), then the damped-HMC momentum and position."""
    g = gaussian_log_pi_grad(x, prior_mean, grad_loss, r, w)
    v = m * v + h * g + math.sqrt(2 * (1 - m)) * z
    return x + h * v, v


def fused_arithmetic(x, v, grad_loss, prior_mean, z, r, w, m, h):
    """The same arithmetic with the scalars as 0-d tensors (compiled into one kernel)."""
    v = m * v + h * ((prior_mean - x) / (r * r) - w * grad_loss) + torch.sqrt(2 * (1 - m)) * z
    return x + h * v, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["40x3x256", "400x1x32"], help="N x C x H (square images)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    fused = torch.compile(fused_arithmetic, dynamic=False)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print("| N x C x H | eager ms / step | fused ms / step | fused / eager | fused GB/s (7 tensors) | max abs diff "
          "| graphs compiled |\n|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    for spec in args.shapes:
        n, c, size = (int(s) for s in spec.split("x"))
        x, v, grad_loss, prior_mean, z = (torch.randn(n, c, size, size, device=dev, generator=gen) for _ in range(5))
        levels = [(0.5, 1e4, 0.9, 0.01), (0.2, 1e4, 0.9, 0.008), (0.05, 1e4, 0.9, 0.005)]
        torch._dynamo.utils.counters.clear()
        for r, w, m, h in levels:  # three levels' values: one compile
            scalars = [torch.tensor(s, device=dev) for s in (r, w, m, h)]
            fused(x, v, grad_loss, prior_mean, z, *scalars)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        r, w, m, h = levels[-1]
        scalars = [torch.tensor(s, device=dev) for s in (r, w, m, h)]
        _, eager_ms = cuda_ms(lambda: eager_update(x, v, grad_loss, prior_mean, z, r, w, m, h))
        _, fused_ms = cuda_ms(lambda: fused(x, v, grad_loss, prior_mean, z, *scalars))
        ref = eager_update(x, v, grad_loss, prior_mean, z, r, w, m, h)
        out = fused(x, v, grad_loss, prior_mean, z, *scalars)
        diff = max((a - b).abs().max().item() for a, b in zip(out, ref))
        traffic = 7 * x.numel() * x.element_size()
        print(f"| {spec} | {eager_ms:.3f} | {fused_ms:.3f} | {fused_ms / eager_ms:.2f} | {traffic / fused_ms / 1e6:.0f} "
              f"| {diff:.2e} | {frames} |", flush=True)


if __name__ == "__main__":
    main()
