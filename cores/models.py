"""Denoisers D(x, sigma) = E[x_0 | x_0 + sigma n = x], with encode/decode for latent models.

* :class:`GaussianMixtureDenoiser`: an analytic prior with the exact denoiser at every sigma;
* :class:`VPEpsDenoiser`: a diffusers ``UNet2DModel`` trained for DDPM epsilon prediction, behind
  VP preconditioning (EDM table 1): D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma));
* :class:`ClassConditionalEps`: the same for a cross-attention ``UNet2DConditionModel`` whose context is a
  class embedding (the ImageNet LDM cin256), with per-particle class labels;
* :class:`LatentDenoiser`: such a UNet on the latents of a diffusers ``VQModel`` or ``AutoencoderKL``.

t(sigma) maps a noise level to the network's timestep: :class:`ScheduleTimesteps` inverts the
checkpoint's own discrete schedule, :class:`VPTimesteps` is the continuous VP map of the official
pixel checkpoints, t = (M - 1) t_vp(sigma) (also what the official LatentDAPS uses for its LDMs).
Models are built by name from the model config through :func:`build_model`.
"""
from __future__ import annotations

import bisect
import csv
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
    class_conditional = False
    in_shape: tuple[int, ...]
    image_shape: tuple[int, ...]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        raise NotImplementedError

    def condition(self, labels: int | Sequence[int] | torch.Tensor | None) -> None:
        """Class labels of the following denoise calls (class-conditional models: see ClassConditionalEps)."""
        raise TypeError(f"{type(self).__name__} is not class-conditional")

    def image_labels(self, indices: Sequence[int], names: Sequence[str]) -> torch.Tensor:
        """The class label of each image (class-conditional models: see ClassConditionalEps)."""
        raise TypeError(f"{type(self).__name__} is not class-conditional")

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

    compiled = "none"

    def networks(self) -> list[torch.nn.Module]:
        """The networks that :meth:`compile_networks` compiles (none for analytic priors)."""
        return []

    def compile_networks(self, mode: str) -> None:
        """torch.compile each of :meth:`networks` in place (``nn.Module.compile``: the weights and state_dict keys stay
        as they are) in ``mode``, one of :data:`COMPILE_MODES` ("default": torch.compile's default mode); the first
        call per input shape compiles (:meth:`warm_up` does it before the sampling clock starts)."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"model compile must be auto or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        if mode == "none":
            return
        for net in self.networks():
            net.compile(mode=None if mode == "default" else mode)
        self.compiled = mode

    def warm_up(self, batch: int) -> None:
        """Run compiled networks once on ``batch`` particles as the sampler does, so that their compiles happen now:
        the denoiser without gradient and, for latent models, the decoder without and with its backward (the MCMC
        steps). Nothing to do for uncompiled models."""
        if self.compiled == "none":
            return
        x = torch.zeros(batch, *self.in_shape, device=self.device)
        with torch.no_grad():
            self.denoise(x, 1.0)
            if self.latent:
                self.decode(x)
        if self.latent:
            with torch.enable_grad():
                z = x.requires_grad_(True)
                torch.autograd.grad(self.decode(z).sum(), z)

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
    """The continuous VP map of the official ADM checkpoints: t = (M - 1) t_vp(sigma), beta 0.1 / 19.9, M = 1000,
    t_vp(sigma) = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d (EDM's VPPrecond.sigma_inv).

    ``float32``: evaluate it as the official DAPS VPPrecond does, in float32 with log(1 + sigma^2) (bit for bit;
    float64 differs by 1.5e-5 relative at sigma 0.05, and more below, where 1 + sigma^2 rounds in float32)."""

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, num_train_timesteps: int = 1000,
                 float32: bool = False):
        self.beta_min, self.beta_d, self.num_train_timesteps = beta_min, beta_d, num_train_timesteps
        self.float32 = float32
        self.sigma_max = float(vp_sigma(torch.tensor(1.0, dtype=torch.float64), beta_min, beta_d))
        self.sigma_min = 0.0

    def timestep(self, sigma: float) -> float:
        if self.float32:
            s = torch.tensor(float(sigma), dtype=torch.float32)
            t32 = ((self.beta_min**2 + 2 * self.beta_d * (1 + s**2).log()).sqrt() - self.beta_min) / self.beta_d
            return float((self.num_train_timesteps - 1) * t32)
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
    if mapping == "vp":
        return VPTimesteps()
    if mapping == "daps_official":
        return VPTimesteps(float32=True)
    raise ValueError(f"unknown sigma_mapping {mapping!r}: choose one of {', '.join(SIGMA_MAPPINGS)}")


COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")  # the model config's ``compile``
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(dtype: torch.dtype, device: torch.device):
    """bfloat16 / float16 autocast on CUDA; a no-op context for float32 or other devices."""
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda")


class VPEpsDenoiser(Denoiser):
    """D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) for an epsilon-prediction UNet.

    ``eps_channels`` keeps the first channels of the output (ADM's learned-sigma nets output 2C).
    ``dtype`` runs the network under autocast on CUDA (bfloat16/float16); the ODE stays in float32.
    ``channels_last`` stores the weights in NHWC (faster convolutions on tensor cores) and keeps the activations NHWC
    through the group norms and upsamplers (:func:`cores.layout.keep_channels_last`).
    """

    def __init__(self, net: torch.nn.Module, timesteps: ScheduleTimesteps | VPTimesteps, shape: Sequence[int],
                 eps_channels: int | None = None, dtype: str = "float32", channels_last: bool = False):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if channels_last:
            from cores.layout import keep_channels_last

            net = keep_channels_last(net)
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

    def networks(self) -> list[torch.nn.Module]:
        return [self.net]


def read_class_labels(path: str | Path) -> dict[str, int]:
    """Class labels per image from a JSON object {key: label} or a CSV file of rows ``key,label`` (a first row
    whose label is not an integer is a header). A key is an image's file name, its file stem or its index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class labels file not found: {path.resolve()}")
    if path.suffix.lower() == ".json":
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError(f"{path}: expected a JSON object {{image index or file name: class label}}")
        rows = list(table.items())
    else:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r]
        if rows and not rows[0][-1].strip().lstrip("-").isdigit():
            rows = rows[1:]
        if any(len(r) != 2 for r in rows):
            raise ValueError(f"{path}: expected two columns per row, image (index or file name) and class label")
    try:
        return {str(k).strip(): int(v) for k, v in rows}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: class labels must be integers ({err})") from err


class ClassConditionalEps(VPEpsDenoiser):
    """VPEpsDenoiser of a cross-attention UNet (``UNet2DConditionModel``) conditioned on a class label, as the
    ImageNet LDM cin256: eps(x, t, context) with context = embedding(label)[:, None, :] (latent-diffusion
    ClassEmbedder, ``conditioning_key: crossattn``), shape (B, 1, embed_dim).

    Labels: every row of x gets ``class_label`` (the official DAPS: 1000, the unconditional class of cin256) unless
    :meth:`condition` set one label per row. The run conditions each batch of particles once, before sampling it:
    ``model.condition(model.image_labels(indices, names).repeat_interleave(particles_per_image))`` (labels in the
    order of the particle batch), and ``model.condition(None)`` after it; a batch that shrinks (pruning) must be
    conditioned again with the labels of the rows it keeps. ``image_labels`` reads ``label_table`` (the model
    config's ``class_labels_file``, see :func:`read_class_labels`) and gives ``class_label`` without one.
    """

    class_conditional = True

    def __init__(self, net: torch.nn.Module, embedding: torch.nn.Embedding, timesteps: ScheduleTimesteps | VPTimesteps,
                 shape: Sequence[int], class_label: int, label_table: dict[str, int] | None = None, **kwargs: Any):
        super().__init__(net, timesteps, shape, **kwargs)
        self.embedding = embedding.eval().requires_grad_(False)
        self.num_classes = embedding.num_embeddings
        self.class_label = self._check(torch.tensor([int(class_label)]), "class_label").item()
        self.label_table = dict(label_table or {})
        self._check(torch.tensor(list(self.label_table.values()), dtype=torch.long), "class_labels_file")
        self.labels: torch.Tensor | None = None

    def _check(self, labels: torch.Tensor, what: str) -> torch.Tensor:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{what}: class labels must lie in [0, {self.num_classes - 1}], got "
                             f"{sorted(set(labels.tolist()))[:8]}")
        return labels

    def condition(self, labels: int | Sequence[int] | torch.Tensor | None) -> None:
        """None: ``class_label`` for every row; an int: that label for every row; a 1-D sequence / tensor: one
        label per row of the x that the following denoise calls receive."""
        if labels is None:
            self.labels = None
            return
        t = torch.as_tensor(labels, dtype=torch.long)
        if t.dim() > 1:
            raise ValueError(f"condition() takes an int or one label per row, got shape {tuple(t.shape)}")
        self.labels = self._check(t.cpu(), "condition").to(self.device)

    def image_labels(self, indices: Sequence[int], names: Sequence[str]) -> torch.Tensor:
        """Label of each image (its global index and file name): the label table's entry for its file name, else
        its file stem, else its index; ``class_label`` for every image without a table. An image the table
        misses is an error."""
        if not self.label_table:
            return torch.full((len(indices),), self.class_label, dtype=torch.long)
        out = []
        for i, name in zip(indices, names, strict=True):
            key = next((k for k in (name, Path(name).stem, str(int(i))) if k in self.label_table), None)
            if key is None:
                raise KeyError(f"class_labels_file has no label for image {i} ({name}): give it a row")
            out.append(self.label_table[key])
        return torch.tensor(out, dtype=torch.long)

    def context(self, batch: int) -> torch.Tensor:
        """The cross-attention context (batch, 1, embed_dim) of the current labels."""
        if self.labels is None or self.labels.dim() == 0:
            label = self.class_label if self.labels is None else self.labels
            # contiguous, as the per-row labels' context below: a compiled UNet traced on one would retrace on the other
            return self.embedding.weight[label].expand(batch, 1, -1).contiguous()
        if self.labels.shape[0] != batch:
            raise ValueError(f"condition() set {self.labels.shape[0]} class labels but the batch has {batch} rows: "
                             f"condition the model again after the batch changes")
        return self.embedding(self.labels)[:, None, :]

    def eps(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x_in, t, encoder_hidden_states=self.context(x_in.shape[0]))
        return out.sample[:, : self.eps_channels]


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

    @property
    def class_conditional(self) -> bool:
        return self.unet.class_conditional

    def condition(self, labels: int | Sequence[int] | torch.Tensor | None) -> None:
        self.unet.condition(labels)

    def image_labels(self, indices: Sequence[int], names: Sequence[str]) -> torch.Tensor:
        return self.unet.image_labels(indices, names)

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

    def networks(self) -> list[torch.nn.Module]:
        """The UNet and the decoder's convolution stack (the MCMC steps run its forward and backward)."""
        return [*self.unet.networks(), self.autoencoder.decoder]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.autoencoder.encode(x)
        h = enc.latents if self.is_vq else enc.latent_dist.mode()
        return h * self.latent_scale


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: {path.resolve()}. Train a prior with scripts/train_prior.py, convert an official "
        f"checkpoint with scripts/convert_checkpoint.py, or point model.path at an existing folder.")


def matmul_attention(module: torch.nn.Module) -> None:
    """Route the diffusers attention layers of ``module`` through explicit matrix products (diffusers'
    ``AttnProcessor``) instead of ``scaled_dot_product_attention``. An autoencoder's attention has one head of 512
    channels (LDM-FFHQ's decoder: 64 x 64 positions), more than the 256 of SDPA's flash kernels, so SDPA takes its
    memory-efficient kernel, whose backward alone was 34% of the GPU time of a LatentDAPS level's MCMC on an H100
    (docs/benchmarks.md). The products give the same values (the softmax in float32) but keep each image's 4096 x
    4096 attention probabilities for the backward: about 64 MiB per image and layer in float32, 2.5 GiB at 40
    particles (``decoder_attention: sdpa`` keeps SDPA for batches that do not fit)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.set_processor(AttnProcessor())


@register("diffusers")
def diffusers_model(path: str, sigma_mapping: str | None = None, dtype: str = "float32", quantize: bool = True,
                    channels_last: bool = False, class_label: int | None = None, class_labels_file: str | None = None,
                    compile: str = "none", decoder_attention: str = "matmul", **unused: Any) -> Denoiser:
    """A pixel or latent model folder: ``denoiser.json``, ``unet/``, ``scheduler/`` (+ ``vqvae/`` or ``vae/``,
    + ``class_embedding.safetensors`` for a class-conditional UNet).

    ``denoiser.json`` holds kind ('pixel' | 'latent'), image_shape, the default sigma_mapping and, for
    latent models, autoencoder ('vq' | 'kl') and latent_scale; ``scheduler/`` is the diffusers
    DDPMScheduler the UNet was trained with (its alphas_cumprod map sigma to the timestep). With
    ``class_conditional`` ({num_classes, unconditional_class}) the UNet is a UNet2DConditionModel behind
    :class:`ClassConditionalEps`: ``class_label`` (default: the unconditional class) and ``class_labels_file``
    (per-image labels, :func:`read_class_labels`) set its labels; for other models they are errors. ``compile``
    compiles the UNet and the decoder (:meth:`Denoiser.compile_networks`); ``channels_last`` applies to both (their
    group norms and upsamplers then keep NHWC, the decoder's in its backward too:
    :func:`cores.layout.keep_channels_last`).
    ``decoder_attention``: 'matmul' runs the decoder's attention as matrix products (:func:`matmul_attention`),
    'sdpa' keeps diffusers' scaled_dot_product_attention (less memory for large batches, slower backward).
    """
    if unused:
        raise ValueError(f"unknown diffusers model keys: {sorted(unused)}")
    if decoder_attention not in ("matmul", "sdpa"):
        raise ValueError(f"model decoder_attention must be 'matmul' or 'sdpa', got {decoder_attention!r}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel

    root = Path(path)
    meta_path = root / "denoiser.json"
    if not meta_path.is_file():
        raise _missing(meta_path, "model folder (denoiser.json)")
    meta = json.loads(meta_path.read_text())
    cond = meta.get("class_conditional")
    # low_cpu_mem_usage=False: diffusers' default wants the accelerate package and prints a 5-line notice without it;
    # our models are small enough to load the plain way (identical weights)
    unet = (UNet2DConditionModel if cond else UNet2DModel).from_pretrained(str(root / "unet"), use_safetensors=True,
                                                                           low_cpu_mem_usage=False)
    abar = DDPMScheduler.from_pretrained(str(root / "scheduler")).alphas_cumprod
    mapping = timestep_map(sigma_mapping or meta.get("sigma_mapping", "schedule"), abar)
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    kwargs = dict(eps_channels=meta.get("eps_channels"), dtype=dtype, channels_last=channels_last)
    if cond:
        from safetensors.torch import load_file

        embedding = torch.nn.Embedding.from_pretrained(load_file(root / "class_embedding.safetensors")["weight"])
        eps_net: VPEpsDenoiser = ClassConditionalEps(
            unet, embedding, mapping, latent_shape,
            class_label=cond["unconditional_class"] if class_label is None else class_label,
            label_table=read_class_labels(class_labels_file) if class_labels_file else None, **kwargs)
    elif class_label is not None or class_labels_file:
        raise ValueError(f"{root} is not class-conditional: class_label / class_labels_file do not apply")
    else:
        eps_net = VPEpsDenoiser(unet, mapping, latent_shape, **kwargs)
    if meta["kind"] not in ("pixel", "latent"):
        raise ValueError(f"{meta_path}: kind must be 'pixel' or 'latent', got {meta['kind']!r}")
    model: Denoiser = eps_net
    if meta["kind"] == "latent":
        ae_cls, sub = (VQModel, "vqvae") if meta["autoencoder"] == "vq" else (AutoencoderKL, "vae")
        ae = ae_cls.from_pretrained(str(root / sub), use_safetensors=True, low_cpu_mem_usage=False)
        if decoder_attention == "matmul":
            matmul_attention(ae.decoder)
        if channels_last:
            from cores.layout import keep_channels_last

            keep_channels_last(ae.decoder)
        model = LatentDenoiser(eps_net, ae, meta["image_shape"], meta.get("latent_scale", 1.0), quantize)
    model.compile_networks(compile)
    return model


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
    checkpoint's sqrt-linear betas, 'daps_official' the pixel VP map of the official LatentDAPS. A class-conditional
    one (the ImageNet cin256, ``cond_stage_config`` in the architecture) also takes ``class_label`` and
    ``class_labels_file`` (see :func:`diffusers_model`)."""
    return _official("ldm", checkpoint, architecture, converted, sigma_mapping=sigma_mapping, **kwargs)


def build_model(cfg: dict, device: torch.device | str = "cpu") -> Denoiser:
    """Model from its config: ``name`` picks the builder, the other keys are its arguments. ``compile: auto`` is
    "default" on CUDA and "none" elsewhere (the CPU pays a compile of a minute or more; torch_xla compiles its own)."""
    cfg = dict(cfg)
    name, kind = cfg.pop("name", None), torch.device(device).type
    if cfg.get("compile") == "auto":
        cfg["compile"] = "default" if kind == "cuda" else "none"
    if cfg.get("compile", "none") != "none" and kind == "xla":
        raise ValueError(f"model.compile={cfg['compile']} runs torch.compile's inductor, which does not serve XLA "
                         f"devices (torch_xla compiles its own graphs): set model.compile=none or auto")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    model = MODELS[name](**cfg)
    return model.to(device)

