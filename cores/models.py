"""Denoisers D(x, sigma) = E[x_0 | x_0 + sigma n = x], with encode/decode for latent models.

* :class:`GaussianMixtureDenoiser`: an analytic prior with the exact denoiser at every sigma;
* :class:`VPEpsDenoiser`: a diffusers ``UNet2DModel`` trained for DDPM epsilon prediction, behind
  VP preconditioning (EDM table 1): D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma));
* :class:`LatentDenoiser`: such a UNet on the latents of a diffusers ``VQModel`` or ``AutoencoderKL``.

t(sigma) maps a noise level to the network's timestep: :class:`ScheduleTimesteps` inverts the
checkpoint's own discrete schedule, :class:`VPTimesteps` is the continuous VP map of the official
pixel checkpoints, t = (M - 1) t_vp(sigma) (also what the official LatentDAPS uses for its LDMs).
Models are built by name from the model config through :func:`build_model`.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cores.gmm import IsotropicMixture, mixture_from_config
from cores.scheduler import vp_sigma

log = logging.getLogger(__name__)
MODELS: dict[str, Callable[..., "Denoiser"]] = {}


class Denoiser(torch.nn.Module):
    """Base class of the denoiser role. ``in_shape`` is one particle's state, ``image_shape`` its image."""

    latent = False
    in_shape: tuple[int, ...]
    image_shape: tuple[int, ...]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError

    def score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
        return (self.denoise(x, sigma) - x) / sigma**2

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no log-density (only analytic priors do)")

    @property
    def has_log_prob(self) -> bool:
        return type(self).log_prob is not Denoiser.log_prob

    def sigma_at_time(self, t: float) -> float:
        """Noise level of diffusion time t on the 1000-step DDPM scale (t=1000 noise, t=0 clean)."""
        return float(vp_sigma(torch.tensor(t / 1000.0, dtype=torch.float64)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


def register(name: str) -> Callable[[Callable[..., Denoiser]], Callable[..., Denoiser]]:
    def wrap(fn: Callable[..., Denoiser]) -> Callable[..., Denoiser]:
        MODELS[name] = fn
        return fn
    return wrap


class GaussianMixtureDenoiser(Denoiser):
    """Exact denoiser of an isotropic Gaussian mixture over images of any shape."""

    def __init__(self, mixture: IsotropicMixture, shape: Sequence[int]):
        super().__init__()
        if math.prod(shape) != mixture.dim:
            raise ValueError(f"mixture has dimension {mixture.dim}, shape {tuple(shape)} has {math.prod(shape)}")
        self.in_shape = self.image_shape = tuple(int(s) for s in shape)
        self.register_buffer("weights", mixture.weights.float())
        self.register_buffer("means", mixture.means.float())
        self.register_buffer("stds", mixture.stds.float())

    @property
    def mixture(self) -> IsotropicMixture:
        return IsotropicMixture(self.weights, self.means, self.stds)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.mixture.denoise(x.flatten(1), sigma).view_as(x)

    def score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.mixture.score(x.flatten(1), sigma).view_as(x)

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.mixture.log_prob(x.flatten(1), sigma)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mix = IsotropicMixture(self.weights.cpu().double(), self.means.cpu().double(), self.stds.cpu().double())
        x, labels = mix.sample(n, generator)
        return x.float().view(n, *self.in_shape), labels


@register("gmm")
def gmm_model(shape: Sequence[int], weights: Any = None, means: Any = None, stds: Any = None,
              num_components: int | None = None, component_std: float | None = None, twins: bool | None = None,
              seed: int | None = None, **unused: Any) -> GaussianMixtureDenoiser:
    """Analytic mixture prior: an explicit mixture (weights, means, stds) or generated blob images and their
    180-degree twins (num_components, twins, seed, component_std); see :func:`cores.gmm.mixture_from_config`."""
    if unused:
        raise ValueError(f"unknown gmm model keys: {sorted(unused)}")
    mix = mixture_from_config(shape, weights, means, stds, num_components, twins, seed, component_std)
    return GaussianMixtureDenoiser(mix, shape)


class ScheduleTimesteps:
    """sigma <-> timestep of a DDPM schedule: sigma_t = sqrt((1 - abar_t) / abar_t), log-linear between steps."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_sigmas = 0.5 * torch.log((1 - alphas_cumprod.double()) / alphas_cumprod.double())
        self.num_train_timesteps = len(self.log_sigmas)
        self.log_list = self.log_sigmas.tolist()
        self.sigma_max = float(self.log_sigmas[-1].exp())
        self.sigma_min = float(self.log_sigmas[0].exp())

    def timestep(self, sigma: float) -> float:
        s = math.log(min(max(float(sigma), self.sigma_min), self.sigma_max))
        idx = min(max(bisect.bisect_left(self.log_list, s), 1), len(self.log_list) - 1)
        lo, hi = self.log_list[idx - 1], self.log_list[idx]
        return idx - 1 + (s - lo) / (hi - lo)

    def sigma(self, t: float) -> float:
        t = min(max(float(t), 0.0), len(self.log_sigmas) - 1.0)
        lo = int(math.floor(t))
        hi = min(lo + 1, len(self.log_sigmas) - 1)
        return float(((1 - (t - lo)) * self.log_sigmas[lo] + (t - lo) * self.log_sigmas[hi]).exp())


class VPTimesteps:
    """The continuous VP map of the official ADM checkpoints: t = (M - 1) t_vp(sigma), beta 0.1 / 19.9, M = 1000."""

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, num_train_timesteps: int = 1000):
        self.beta_min, self.beta_d, self.num_train_timesteps = beta_min, beta_d, num_train_timesteps
        self.sigma_max = float(vp_sigma(torch.tensor(1.0, dtype=torch.float64), beta_min, beta_d))
        self.sigma_min = 0.0

    def timestep(self, sigma: float) -> float:
        t_vp = (math.sqrt(self.beta_min**2 + 2 * self.beta_d * math.log1p(sigma**2)) - self.beta_min) / self.beta_d
        return (self.num_train_timesteps - 1) * t_vp

    def sigma(self, t: float) -> float:
        t_vp = torch.tensor(t / (self.num_train_timesteps - 1), dtype=torch.float64)
        return float(vp_sigma(t_vp, self.beta_min, self.beta_d))


SIGMA_MAPPINGS = ("schedule", "vp", "daps_official")


def timestep_map(mapping: str, alphas_cumprod: torch.Tensor | None) -> ScheduleTimesteps | VPTimesteps:
    if mapping == "schedule":
        if alphas_cumprod is None:
            raise ValueError("sigma_mapping 'schedule' needs the checkpoint's noise schedule")
        return ScheduleTimesteps(alphas_cumprod)
    if mapping in ("vp", "daps_official"):
        return VPTimesteps()
    raise ValueError(f"unknown sigma_mapping {mapping!r}: choose one of {', '.join(SIGMA_MAPPINGS)}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(dtype: torch.dtype, device: torch.device):
    """bfloat16 / float16 autocast on CUDA; a no-op context for float32 or other devices."""
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda")


class VPEpsDenoiser(Denoiser):
    """D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) for an epsilon-prediction UNet.

    ``eps_channels`` keeps the first channels of the output (ADM's learned-sigma nets output 2C).
    ``dtype`` runs the network under autocast on CUDA (bfloat16/float16); the ODE stays in float32.
    ``channels_last`` stores the weights in NHWC (faster convolutions on tensor cores).
    """

    def __init__(self, net: torch.nn.Module, timesteps: ScheduleTimesteps | VPTimesteps, shape: Sequence[int],
                 eps_channels: int | None = None, dtype: str = "float32", channels_last: bool = False):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net, self.timesteps = net.eval().requires_grad_(False), timesteps
        self.in_shape = self.image_shape = tuple(int(s) for s in shape)
        self.eps_channels = eps_channels or self.in_shape[0]
        self.dtype = DTYPES[dtype]

    def eps(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x_in, t)
        return (out.sample if hasattr(out, "sample") else out)[:, : self.eps_channels]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timesteps.timestep(float(sigma)), device=x.device)
        x_in = x / math.sqrt(1.0 + float(sigma) ** 2)
        with autocast(self.dtype, x.device):
            eps = self.eps(x_in, t)
        return x - float(sigma) * eps.float()

    def sigma_at_time(self, t: float) -> float:
        return self.timesteps.sigma(t * (self.timesteps.num_train_timesteps - 1) / 1000.0)


class LatentDenoiser(Denoiser):
    """A latent-space denoiser with an autoencoder: x = decode(z) = AE.decode(z / latent_scale)."""

    latent = True

    def __init__(self, unet: VPEpsDenoiser, autoencoder: torch.nn.Module, image_shape: Sequence[int],
                 latent_scale: float = 1.0, quantize: bool = True):
        super().__init__()
        self.unet, self.autoencoder = unet, autoencoder.eval().requires_grad_(False)
        self.in_shape = unet.in_shape
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_scale, self.quantize = float(latent_scale), bool(quantize)
        self.is_vq = hasattr(autoencoder, "quantize")

    def denoise(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.unet.denoise(z, sigma)

    def sigma_at_time(self, t: float) -> float:
        return self.unet.sigma_at_time(t)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image of a latent (float32); VQ latents snap to the nearest codebook vector with a straight-through
        gradient. Runs under the UNet's autocast dtype."""
        h = z / self.latent_scale
        with autocast(self.unet.dtype, z.device):
            if self.is_vq:
                x = self.autoencoder.decode(h, force_not_quantize=not self.quantize).sample
            else:
                x = self.autoencoder.decode(h).sample
        return x.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.autoencoder.encode(x)
        h = enc.latents if self.is_vq else enc.latent_dist.mode()
        return h * self.latent_scale


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: {path.resolve()}. Train a prior with scripts/train_prior.py, convert an official "
        f"checkpoint with scripts/convert_checkpoint.py, or point model.path at an existing folder.")


@register("diffusers")
def diffusers_model(path: str, sigma_mapping: str | None = None, dtype: str = "float32", quantize: bool = True,
                    channels_last: bool = False, **unused: Any) -> Denoiser:
    """A pixel or latent model folder: ``denoiser.json``, ``unet/``, ``scheduler/`` (+ ``vqvae/`` or ``vae/``).

    ``denoiser.json`` holds kind ('pixel' | 'latent'), image_shape, the default sigma_mapping and, for
    latent models, autoencoder ('vq' | 'kl') and latent_scale; ``scheduler/`` is the diffusers
    DDPMScheduler the UNet was trained with (its alphas_cumprod map sigma to the timestep).
    """
    if unused:
        raise ValueError(f"unknown diffusers model keys: {sorted(unused)}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel, VQModel

    root = Path(path)
    meta_path = root / "denoiser.json"
    if not meta_path.is_file():
        raise _missing(meta_path, "model folder (denoiser.json)")
    meta = json.loads(meta_path.read_text())
    unet = UNet2DModel.from_pretrained(str(root / "unet"), use_safetensors=True)
    abar = DDPMScheduler.from_pretrained(str(root / "scheduler")).alphas_cumprod
    mapping = timestep_map(sigma_mapping or meta.get("sigma_mapping", "schedule"), abar)
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    eps_net = VPEpsDenoiser(unet, mapping, latent_shape, eps_channels=meta.get("eps_channels"), dtype=dtype,
                            channels_last=channels_last)
    if meta["kind"] == "pixel":
        return eps_net
    if meta["kind"] != "latent":
        raise ValueError(f"{meta_path}: kind must be 'pixel' or 'latent', got {meta['kind']!r}")
    ae_cls, sub = (VQModel, "vqvae") if meta["autoencoder"] == "vq" else (AutoencoderKL, "vae")
    ae = ae_cls.from_pretrained(str(root / sub), use_safetensors=True)
    return LatentDenoiser(eps_net, ae, meta["image_shape"], meta.get("latent_scale", 1.0), quantize)


def _official(kind: str, checkpoint: str, architecture: dict, converted: str, download: str = "",
              allow_unsafe_pickle: bool = False, **kwargs: Any) -> Denoiser:
    from cores.convert import cached_conversion

    try:
        folder = cached_conversion(kind, Path(checkpoint), architecture, Path(converted), allow_unsafe_pickle)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. {download}".strip()) from err
    return diffusers_model(str(folder), **kwargs)


@register("adm")
def adm_model(checkpoint: str, architecture: dict, converted: str, sigma_mapping: str | None = "vp",
              **kwargs: Any) -> Denoiser:
    """An official ADM pixel checkpoint (guided-diffusion), converted on first use into ``converted``."""
    return _official("adm", checkpoint, architecture, converted, sigma_mapping=sigma_mapping, **kwargs)


@register("ldm")
def ldm_model(checkpoint: str, architecture: dict, converted: str, sigma_mapping: str | None = "schedule",
              **kwargs: Any) -> Denoiser:
    """An official LDM checkpoint (UNet + VQ-f4), converted on first use; sigma_mapping 'schedule' uses the
    checkpoint's sqrt-linear betas, 'daps_official' the pixel VP map of the official LatentDAPS."""
    return _official("ldm", checkpoint, architecture, converted, sigma_mapping=sigma_mapping, **kwargs)


def build_model(cfg: dict, device: torch.device | str = "cpu") -> Denoiser:
    """Model from its config: ``name`` picks the builder, the other keys are its arguments."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    model = MODELS[name](**cfg)
    return model.to(device)

