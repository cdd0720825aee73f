"""A random-weight model folder with the architecture of an official checkpoint (for benchmarks and pipeline checks).

    python scripts/make_random_model.py --config configs/model/ffhq256ddpm.yaml --out checkpoints/random/ffhq256ddpm

The UNet's output convolution is zero, as guided-diffusion / openaimodel initialise it, so eps = 0 and the denoiser
is the identity: the sampler does all of its work and stays finite. The folder loads with
+model.name=diffusers +model.path=<out>.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.convert import build_unet, build_vq, unet_spec, vq_spec  # noqa: E402


def main() -> None:
    from diffusers import DDPMScheduler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    arch = cfg["architecture"]
    torch.manual_seed(args.seed)
    if cfg["name"] == "adm":
        spec = unet_spec(arch)
        meta = {"kind": "pixel", "image_shape": [3, spec["sample_size"], spec["sample_size"]], "sigma_mapping": "vp",
                "eps_channels": 3}
        sched = DDPMScheduler(beta_schedule="linear")
        modules = {"unet": build_unet(spec)}
    else:
        spec, vspec = unet_spec(arch["unet_config"]), vq_spec(arch["first_stage_config"])
        meta = {"kind": "latent", "image_shape": [3, vspec["resolution"], vspec["resolution"]],
                "sigma_mapping": "schedule", "autoencoder": "vq", "latent_scale": 1.0}
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
        modules = {"unet": build_unet(spec), "vqvae": build_vq(vspec)}
    with torch.no_grad():
        modules["unet"].conv_out.weight.zero_()
        modules["unet"].conv_out.bias.zero_()
    for sub, module in modules.items():
        module.save_pretrained(args.out / sub, safe_serialization=True)
        print(f"{sub}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters")
    sched.save_pretrained(args.out / "scheduler")
    (args.out / "denoiser.json").write_text(json.dumps({**meta, "random_weights": True}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
