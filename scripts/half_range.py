#!/usr/bin/env python3
"""Whether a model's networks can run in float16 (`model.dtype=float16`): they run under float16 autocast as the
sampler runs them, and every float16 value they produce is checked against float16's largest value (65504); their
outputs are compared with a float32 run of the same inputs.

    python scripts/half_range.py --model configs/model/imagenet256ldm.yaml [--images DIR] [--n 4] [--gpu 0]
    python scripts/half_range.py --model checkpoints/fmnist32_ldm

Run it from the repository root. ``--model`` is a model config (configs/model/*.yaml: an official checkpoint is
converted as a run converts it; a class-conditional UNet is conditioned on the config's ``class_label``) or a model
folder (cores.models.diffusers_model). At each noise level of ``--sigmas`` (default 10, 1, 0.1, 0.01: the annealing
levels and the ODE's small steps) the UNet denoises the first ``--n`` images of ``--images`` (a latent model's:
their latents) plus sigma times Gaussian noise. A latent model's autoencoder then decodes the float32 run's estimate
x0hat (where the MCMC's chains start) and its decoder pulls phase retrieval's gradient back to the latents
(cores.operators.LatentOperator.gradient's steps; the images' own measurements, with the operator of
configs/task/phase_retrieval.yaml's ldm group). A torch dispatch mode sees every operation inside the networks,
forward and backward (convolutions, attention scores, residual sums, activations), and keeps per network and pass
the largest |value| of those that ran in float16, with the operation and, in the forward, the innermost module; a
non-finite value of any dtype counts as the peak. On CUDA the autocast is the
model's own (`model.dtype=float16`); on the CPU, where the model runs no autocast, torch's CPU autocast around the
same calls, which also runs the convolutions and matrix products in float16.

Per network and pass the table gives that peak, 65504 / peak, the relative L2 error of the output (x0hat, the
decoded image, the latents' gradient) against float32 at the worst sigma, and for the backward the share of its
nonzero float16 entries below 6.1e-5, float16's smallest normal, where they keep fewer mantissa bits (an autocast
backward has no loss scaling). A peak within 65504 / ``--margin`` (default 16) or a non-finite value flags the network:
run that model in bfloat16 or float32 (exit status 1). The states are the sampler's typical ones, not its extremes: a
margin, not a guarantee.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode  # the mechanism of torch.utils.flop_counter
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cores.models import Denoiser, build_model  # noqa: E402
from cores.operators import Operator, build_operator  # noqa: E402
from utils.data import image_folder  # noqa: E402
from utils.device import get_device  # noqa: E402

FP16_MAX, FP16_TINY = 65504.0, 6.103515625e-05  # float16's largest finite value and smallest normal
UNINITIALISED = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
TASK = ROOT / "configs" / "task" / "phase_retrieval.yaml"  # the operator of its ldm group (the official LatentDAPS)
DEFAULT_IMAGES = {1: ROOT / "dataset" / "test-fmnist", 3: ROOT / "dataset" / "demo-natural"}
OUTPUTS = (("unet", "forward"), ("decoder", "forward"), ("decoder", "backward"))


class Peaks(TorchDispatchMode):
    """Inside a scope (network, pass, module): the largest |value| of each operation's float16 outputs (or a
    non-finite output of any dtype) per (network, pass), with the operation and module; in a backward, its float16
    entries below float16's normal range counted."""

    def __init__(self) -> None:
        super().__init__()
        self.scope: list[tuple[str, str, str]] = []
        self.peak: dict[tuple[str, str], tuple[float, str, str]] = {}
        self.tiny: dict[str, list[int]] = {}
        self.sigma = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.scope and func.__name__.split(".")[0] not in UNINITIALISED:
            network, kind, module = self.scope[-1]
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    self.record((network, kind), f"{func.__name__} in {module}" if module else func.__name__, t)
        return out

    def record(self, key: tuple[str, str], where: str, value: torch.Tensor) -> None:
        a = value.detach().abs()
        finite = bool(torch.isfinite(a).all())
        if value.dtype != torch.float16 and finite:
            return
        top = a.max().item() if finite else math.nan
        held = self.peak.get(key, (-1.0,))[0]
        if not math.isnan(held) and (math.isnan(top) or top > held):  # the first non-finite value stays the peak
            self.peak[key] = (top, where, f"{self.sigma:g}")
        if key[1] == "backward" and value.dtype == torch.float16:
            counts = self.tiny.setdefault(key[0], [0, 0])
            nonzero = a > 0
            counts[0] += int((nonzero & (a < FP16_TINY)).sum())
            counts[1] += int(nonzero.sum())

    @contextlib.contextmanager
    def within(self, network: str, kind: str, module: str = "") -> Iterator[None]:
        self.scope.append((network, kind, module))
        try:
            yield
        finally:
            self.scope.pop()

    def hook(self, network: str, root: torch.nn.Module) -> list:
        """Forward scopes for every module of ``root``: its operations count for ``network``, named by the module."""
        def leave(module: torch.nn.Module, args: tuple, out: object) -> None:  # None: the output stays as it is
            self.scope.pop()

        handles = []
        for name, module in root.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: self.scope.append((network, "forward", name))))
            handles.append(module.register_forward_hook(leave))
        return handles


def load_model(spec: str, device: torch.device) -> Denoiser:
    """A model from a config file or a model folder, in float32, uncompiled, in NCHW (the networks as written)."""
    path = Path(spec)
    if path.is_dir():
        cfg = {"name": "diffusers", "path": str(path)}
    elif path.is_file():
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("name") not in ("diffusers", "adm", "ldm"):
            raise SystemExit(f"--model {spec}: a {cfg.get('name')!r} prior has no networks to check")
    else:
        raise SystemExit(f"--model {spec}: neither a model config (.yaml) nor a model folder")
    return build_model({**cfg, "dtype": "float32", "compile": "none", "channels_last": False}, device)


def eps_net(model: Denoiser) -> torch.nn.Module:
    """The part of ``model`` whose ``dtype`` sets the autocast of its networks (cores.models.VPEpsDenoiser)."""
    return model.unet if model.latent else model


def outputs(model: Denoiser, noisy: torch.Tensor, sigma: float, op: Operator, y: torch.Tensor,
            z: torch.Tensor | None, half: bool, peaks: Peaks | None) -> dict[tuple[str, str], torch.Tensor]:
    """x0hat = D(noisy, sigma); for a latent model the image decoded from ``z`` (default: x0hat) and the latents'
    gradient of phase retrieval's loss (cores.operators.LatentOperator.gradient's steps). The networks run under
    float16 autocast when ``half``; the operator and the backward outside it, as in the sampler. On CUDA the model's
    own autocast does it (its dtype set as ``model.dtype=float16`` sets it); on the CPU, where the model's autocast is
    off, torch's CPU autocast around the same calls."""
    eps_net(model).dtype = torch.float16 if half else torch.float32
    cast = torch.autocast("cpu", dtype=torch.float16, enabled=half and noisy.device.type == "cpu")
    with peaks if peaks is not None else contextlib.nullcontext():
        with torch.no_grad(), cast:
            x0hat = model.denoise(noisy, sigma)
        if not model.latent:
            return {OUTPUTS[0]: x0hat}
        z = (x0hat if z is None else z).detach().requires_grad_(True)
        with cast:
            x = model.decode(z)
        gx, _ = op.gradient(x.detach().float(), y)
        with peaks.within(*OUTPUTS[2]) if peaks is not None else contextlib.nullcontext():
            (dz,) = torch.autograd.grad(x, z, gx)
    return {OUTPUTS[0]: x0hat, OUTPUTS[1]: x.detach(), OUTPUTS[2]: dz}


def measure(model: Denoiser, images: torch.Tensor, sigmas: list[float], seed: int = 0
            ) -> tuple[Peaks, dict[tuple[str, str], float]]:
    """At each sigma a float32 run, then a float16 run recorded by :class:`Peaks` on the same inputs (the decoder on
    the float32 run's x0hat); the float16 outputs' relative L2 error against float32, the worst over the sigmas."""
    peaks, errors = Peaks(), {}
    op = build_operator(yaml.safe_load(TASK.read_text())["ldm"]["operator"])
    y = op(images)
    with torch.no_grad():
        clean = model.encode(images) if model.latent else images
    g = torch.Generator(device=images.device).manual_seed(seed)
    handles, built = peaks.hook("unet", model.networks()[0]), eps_net(model).dtype
    if model.latent:
        handles += peaks.hook("decoder", model.autoencoder)
    try:
        for sigma in sigmas:
            noisy = clean + sigma * torch.randn(clean.shape, generator=g, device=clean.device)
            ref = outputs(model, noisy, sigma, op, y, None, False, None)
            peaks.sigma = sigma
            half = outputs(model, noisy, sigma, op, y, ref[OUTPUTS[0]], True, peaks)
            for key, value in half.items():
                err = ((value.float() - ref[key]).norm() / ref[key].norm()).item()
                errors[key] = err if math.isnan(err) else max(errors.get(key, 0.0), err)
    finally:
        eps_net(model).dtype = built
        for h in handles:
            h.remove()
    return peaks, errors


def report(peaks: Peaks, errors: dict[tuple[str, str], float], margin: float) -> tuple[str, bool]:
    """The table, and whether a network is flagged (a float16 peak within ``margin`` of 65504, or not finite)."""
    rows = ["| network | pass | largest abs float16 value | where | at sigma | 65504 / it | error against float32 "
            "(relative L2, worst sigma) | backward's float16 entries below 6.1e-5 |", "|---|---|---|---|---|---|---|---|"]
    flagged = False
    for key in OUTPUTS:
        if key not in errors:
            continue
        top, where, sigma = peaks.peak.get(key, (0.0, "no float16 operation", "-"))
        counts = peaks.tiny.get(key[0]) if key[1] == "backward" else None
        share = f"{counts[0] / counts[1]:.2%} of {counts[1]:,}" if counts and counts[1] else "-"
        room = FP16_MAX / top if top else math.inf
        bad = not room >= margin or math.isnan(errors[key])
        flagged |= bad
        rows.append(f"| {key[0]} | {key[1]} | {top:.4g} | {where} | {sigma} | {room:.4g}{' (flagged)' * bad} | "
                    f"{errors[key]:.2e} | {share} |")
    verdict = (f"float16: a network's values come within {margin:g}x of 65504 or are not finite: run this model in "
               f"bfloat16 or float32" if flagged else f"float16: every peak is more than {margin:g}x below 65504")
    return "\n".join(rows) + "\n\n" + verdict, flagged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model config (.yaml) or a model folder")
    ap.add_argument("--images", help="an image folder (default: dataset/test-fmnist for 1 channel, demo-natural for 3)")
    ap.add_argument("--n", type=int, default=4, help="images (default 4)")
    ap.add_argument("--sigmas", default="10,1,0.1,0.01", help="noise levels (default 10,1,0.1,0.01)")
    ap.add_argument("--margin", type=float, default=16.0, help="flag a peak within this factor of 65504 (default 16)")
    ap.add_argument("--gpu", type=int, default=-1, help="CUDA device index; -1 (default): the CPU")
    args = ap.parse_args()
    device = get_device(args.gpu)
    model = load_model(args.model, device)
    channels, size = model.image_shape[0], model.image_shape[-1]
    folder = Path(args.images) if args.images else DEFAULT_IMAGES.get(channels, Path("."))
    try:
        items = image_folder(str(folder), size, end_id=args.n, channels=channels)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--images: {err}") from None
    images = torch.stack([it.image for it in items]).to(device)
    table, flagged = report(*measure(model, images, [float(s) for s in args.sigmas.split(",")]), args.margin)
    print(f"{args.model}: {len(items)} image(s) of {folder}, sigmas {args.sigmas}, float16 autocast against float32 "
          f"on {device}\n\n{table}")
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
