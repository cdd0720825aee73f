"""A random-weight model folder with the architecture of an official checkpoint (for benchmarks and pipeline checks).

    python scripts/make_random_model.py --config configs/model/ffhq256ddpm.yaml --out checkpoints/random/ffhq256ddpm
    python scripts/make_random_model.py --config configs/model/imagenet256ldm.yaml --out checkpoints/random/imagenet256ldm

The cin256 (imagenet256ldm) has a 400.9M-parameter UNet2DConditionModel, the 55.3M VQ-f4 and a 1001 x 512 class
embedding (1.8 GB on disk).

The UNet's output convolution is zero, as guided-diffusion / openaimodel initialise it, so eps = 0 and the denoiser
is the identity: the sampler does all of its work and stays finite. The folder loads with
+model.name=diffusers +model.path=<out>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.convert import PARTS, write_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a model config of kind adm or ldm")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    if cfg["name"] not in PARTS:
        raise SystemExit(f"{args.config}: name must be adm or ldm, got {cfg['name']!r}")
    torch.manual_seed(args.seed)
    modules, sched, meta = PARTS[cfg["name"]](cfg["architecture"])
    with torch.no_grad():
        modules["unet"].conv_out.weight.zero_()
        modules["unet"].conv_out.bias.zero_()
    for sub, module in modules.items():
        print(f"{sub}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters")
    write_folder(args.out, modules, sched, {**meta, "random_weights": True})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
