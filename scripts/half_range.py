#!/usr/bin/env python3
"""Whether a model's networks fit float16 (`model.dtype=float16`): the largest |value| their layers produce, run in
float32, against float16's largest value (65504), and the share of the decoder's gradient below its smallest normal.

    python scripts/half_range.py --model configs/model/imagenet256ldm.yaml [--images DIR] [--n 4] [--gpu 0]
    python scripts/half_range.py --model checkpoints/fmnist32_ldm

``--model`` is a model config (configs/model/*.yaml: an official checkpoint is converted as a run converts it) or a
model folder (cores.models.diffusers_model). At each noise level of ``--sigmas`` the UNet denoises the first ``--n``
images of ``--images`` (a latent model's: their latents) plus sigma times Gaussian noise, and a latent model's decoder
runs the latent MCMC's gradient at those latents: phase retrieval's loss pulled back through it by one vector-Jacobian
product (cores.operators.LatentOperator.gradient; the images' own measurements, the task's default operator). Hooks
on every convolution, linear layer and group norm record the largest |output| and, in the backward, the largest
|gradient| and how many nonzero gradient entries lie below 6.1e-5, where float16 keeps fewer mantissa bits (below
6e-8: none; an autocast backward has no loss scaling). The noisiest latents are further from the prior than any
sampler state, so the check errs on the safe side.

A network whose peak exceeds 65504 / ``--margin`` (default 16) is flagged: run that model in bfloat16 or float32. The
exit status is 1 when one is flagged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.models import Denoiser, build_model  # noqa: E402
from cores.operators import LatentOperator, build_operator  # noqa: E402
from utils.data import fit_to, load_image  # noqa: E402

FP16_MAX, FP16_TINY = 65504.0, 6.103515625e-05  # float16's largest finite value and smallest normal
HOOKED = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)
DEFAULT_IMAGES = {1: "dataset/test-fmnist", 3: "dataset/demo-natural"}


class Peaks:
    """Largest |value| (and the layer where it was) per (network, pass); gradient entries counted for the backward."""

    def __init__(self) -> None:
        self.peak: dict[tuple[str, str], tuple[float, str, float]] = {}
        self.tiny: dict[str, list[int]] = {}
        self.sigma = 0.0

    def record(self, key: tuple[str, str], layer: str, value: torch.Tensor) -> None:
        top = value.detach().abs().max().item()
        if key not in self.peak or top > self.peak[key][0]:
            self.peak[key] = (top, layer, self.sigma)

    def hook(self, name: str, net: torch.nn.Module) -> None:
        for layer, module in net.named_modules():
            if isinstance(module, HOOKED):
                module.register_forward_hook(lambda m, i, out, layer=layer: self.record((name, "forward"), layer, out))
                module.register_full_backward_hook(lambda m, gi, go, layer=layer: self.backward(name, layer, go[0]))

    def backward(self, name: str, layer: str, grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        self.record((name, "backward"), layer, grad)
        g = grad.detach().abs()
        counts = self.tiny.setdefault(name, [0, 0])
        counts[0] += int(((g > 0) & (g < FP16_TINY)).sum())
        counts[1] += int((g > 0).sum())


def load_model(spec: str, device: torch.device) -> Denoiser:
    """A model from a config file or a model folder, in float32, uncompiled (hooks see eager layers)."""
    path = Path(spec)
    if path.is_dir():
        cfg = {"name": "diffusers", "path": str(path)}
    elif path.is_file():
        cfg = yaml.safe_load(path.read_text())
    else:
        raise SystemExit(f"--model {spec}: neither a model config (.yaml) nor a model folder")
    return build_model({**cfg, "dtype": "float32", "compile": "none", "channels_last": False}, device)


def measure(model: Denoiser, images: torch.Tensor, sigmas: list[float], seed: int = 0) -> Peaks:
    """Run the networks as the sampler does at each sigma, with :class:`Peaks` hooked on them."""
    peaks = Peaks()
    names = ["unet", "decoder"][: len(model.networks())]
    for name, net in zip(names, model.networks()):
        peaks.hook(name, net)
    op = build_operator({"name": "phase_retrieval", "oversample": 2.0, "sigma": 0.05})
    y = op(images)
    with torch.no_grad():
        clean = model.encode(images) if model.latent else images
    g = torch.Generator(device=images.device).manual_seed(seed)
    for sigma in sigmas:
        peaks.sigma = sigma
        noisy = clean + sigma * torch.randn(clean.shape, generator=g, device=images.device)
        with torch.no_grad():
            model.denoise(noisy, sigma)
        if model.latent:
            LatentOperator(op, model.decode).gradient(noisy, y)
    return peaks


def report(peaks: Peaks, margin: float) -> tuple[str, bool]:
    """The table, and whether a network is flagged."""
    rows = ["| network | pass | largest abs value | layer | at sigma | 65504 / it | gradient entries below 6.1e-5 |",
            "|---|---|---|---|---|---|---|"]
    flagged = False
    for (name, kind), (top, layer, sigma) in sorted(peaks.peak.items()):
        tiny = peaks.tiny.get(name) if kind == "backward" else None
        share = f"{tiny[0] / tiny[1]:.2%} of {tiny[1]:,}" if tiny and tiny[1] else "-"
        room = FP16_MAX / top if top else float("inf")
        flagged |= room < margin
        rows.append(f"| {name} | {kind} | {top:.4g} | {layer} | {sigma:g} | {room:.4g}{' (flagged)' * (room < margin)}"
                    f" | {share} |")
    verdict = (f"float16: a network's values come within {margin:g}x of 65504: run this model in bfloat16 or float32"
               if flagged else f"float16: every peak is more than {margin:g}x below 65504")
    return "\n".join(rows) + "\n\n" + verdict, flagged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model config (.yaml) or a model folder")
    ap.add_argument("--images", help="an image folder (default: dataset/test-fmnist for 1 channel, demo-natural for 3)")
    ap.add_argument("--n", type=int, default=4, help="images (default 4)")
    ap.add_argument("--sigmas", default="10,1,0.1", help="noise levels (default 10,1,0.1)")
    ap.add_argument("--margin", type=float, default=16.0, help="flag a peak within this factor of 65504 (default 16)")
    ap.add_argument("--gpu", type=int, default=-1, help="CUDA device index; -1 (default): the CPU")
    args = ap.parse_args()
    device = torch.device("cpu" if args.gpu < 0 else f"cuda:{args.gpu}")
    model = load_model(args.model, device)
    channels, size = model.image_shape[0], model.image_shape[-1]
    folder = Path(args.images or DEFAULT_IMAGES.get(channels, ""))
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.n]
    if not files:
        raise SystemExit(f"no png/jpg images in {folder.resolve()}: give --images")
    images = torch.stack([fit_to(load_image(f, channels), size, f.name) for f in files]).to(device)
    table, flagged = report(measure(model, images, [float(s) for s in args.sigmas.split(",")]), args.margin)
    print(f"{args.model}: {len(files)} image(s) of {folder}, sigmas {args.sigmas}, float32 on {device}\n\n{table}")
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
