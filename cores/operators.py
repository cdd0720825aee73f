"""Forward operators y = A(x) + noise, batched over (B, C, H, W) with no loop over the batch.

Images live in [-1, 1]. ``loss`` is the per-element squared residual ||A(x) - y||^2 (shape (B,));
``gradient`` differentiates its sum by autograd (elements are independent, so each row of the
gradient is that element's own gradient). Operators are built by name from the task config
(``task.<group>.operator``) through :func:`build_operator`.
"""
from __future__ import annotations

import copy
import inspect
import math
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from cores.fourier import NATIVE_FFT_DEVICES, centred_fft2
from utils.device import fused

OPERATORS: dict[str, type["Operator"]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        OPERATORS[name] = cls
        cls.name = name
        return cls
    return wrap


class Operator(torch.nn.Module):
    """Base class: subclasses implement ``forward``; noise, loss and gradient come from here."""

    name = "operator"
    linear = False
    has_twin = False  # True: x rotated by 180 degrees is measured as x; such an operator has pad(size) (utils/twins.py)

    def __init__(self, sigma: float = 0.05):
        super().__init__()
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"operator sigma (the measurement noise std) must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def measure(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """y = A(x) + sigma * n, with each image's noise drawn from its own generator."""
        y0 = self(x)
        noise = torch.stack([torch.randn(tuple(y0.shape[1:]), generator=g, device=g.device, dtype=y0.dtype)
                             for g in generators]).to(y0.device)
        return y0 + self.sigma * noise

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """||A(x) - y||^2 per batch element."""
        return (self(x) - y).pow(2).flatten(1).sum(-1)

    def gradient(self, x: torch.Tensor, y: torch.Tensor, with_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / dx, loss), per element, by autograd (the loss comes with the gradient, so ``with_loss``, which
        lets operators with a closed form skip it, changes nothing here)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = self.loss(x, y)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return grad, loss.detach()

    def view(self, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """A picture of the measurement in [-1, 1] with the image's (C, H, W), for grids."""
        if tuple(y.shape[1:]) == tuple(shape):
            return y.clamp(-1, 1)
        v = F.interpolate(y.float(), size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
        if v.shape[1] != shape[0]:
            v = v.mean(1, keepdim=True).expand(-1, shape[0], -1, -1)
        return _normalise(v)

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise ValueError when images of this (C, H, W) cannot be measured by this operator."""


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [-1, 1] (display only)."""
    flat = v.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (v - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1


def safe_magnitude(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """sqrt(re^2 + im^2) with gradient 0 at the origin (as torch's complex abs); no complex autodiff needed."""
    sq = re * re + im * im
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def spectral_residual(spec: torch.Tensor, ybar: torch.Tensor, weight: torch.Tensor, c: float, with_loss: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spectrum side of :meth:`PhaseRetrieval.gradient`: from the unnormalised half spectrum S of 2 u
    (``torch.view_as_real``, last dimension (re, im)), whose orthonormal spectrum is U = c S / 2, and the symmetrised
    measurement ybar on it, the back-projection c r S / |S| with r = |U| - ybar (0 where S = 0) in the same layout (the
    input of an unnormalised inverse transform whose result is the orthonormal inverse of r U / |U|), and, with
    ``with_loss``, sum_k weight_k r_k^2 per row (summed along the rows' last axis first: many short sums, then one
    per row), else None.

    c r / |S| = c (c / 2 - ybar / |S|) takes one reciprocal square root. Compiled (CUDA), the scale is computed
    inside the kernel that writes the back-projection: it reads four inputs (S's two parts, ybar, c); with a fifth
    (separate scales for |U| and the back-projection) torch 2.11's inductor stored it in a buffer of its own and
    took two kernels (its ``realize_reads_threshold`` is 4; H100, docs/benchmarks.md, "Eighth session")."""
    re, im = spec.unbind(-1)
    sq = re * re + im * im
    scale = torch.where(sq > 0, c * (0.5 * c - ybar * torch.rsqrt(sq)), 0.0)  # c r / |S|; rsqrt(0) = inf is masked
    back = torch.stack((re * scale, im * scale), -1)
    if not with_loss:
        return back, None
    r = 0.5 * c * torch.sqrt(sq) - ybar
    return back, (weight * r * r).sum(-1).flatten(1).sum(-1)


@lru_cache(maxsize=4)
def _pad_buffer(shape: torch.Size, p: int, device: torch.device, dtype: torch.dtype, inference: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero tensor of ``shape`` padded by p on each side of its last two dimensions, and its window (a view); one
    per ``inference`` mode (a tensor made under ``torch.inference_mode`` cannot be written outside it)."""
    padded = torch.zeros(*shape[:-2], shape[-2] + 2 * p, shape[-1] + 2 * p, device=device, dtype=dtype)
    return padded, padded[..., p:p + shape[-2], p:p + shape[-1]]


def padded_plus_one(x: torch.Tensor, p: int) -> torch.Tensor:
    """pad(x + 1) by p zeros on each side of the last two dimensions, written into the window of a buffer kept per
    shape, device and dtype (the last four kept) whose border is never written, so that it stays 0: one kernel per
    call instead of a fill, a copy and the shift. The result is overwritten by the next call of that shape: use it at
    once, in one thread (the operator's FFT reads it before the next call's write on the same stream)."""
    padded, window = _pad_buffer(x.shape, p, x.device, x.dtype, torch.is_inference_mode_enabled())
    torch.add(x, 1.0, out=window)
    return padded


_HALF_MEASUREMENTS = WeakTensorKeyDictionary()  # measurement tensor -> (its version, half_measurement's result)


def half_measurement(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ybar on the half spectrum of rfft2, the columns' loss weights, ||y - ybar||^2 per row) for
    :meth:`PhaseRetrieval.gradient`: the centred measurement y taken to the uncentred frame of an FFT,
    y0[k] = y[k + n/2] (``ifftshift``; even sizes), and symmetrised, ybar[k] = (y0[k] + y0[-k]) / 2 (indices mod n).
    Kept per measurement tensor (a level's MCMC steps all measure against the same one) while it lives and its version
    counter is unchanged; writes that bypass the counter (``y.data``, numpy views) are not seen. Inference tensors are
    not kept."""
    cached = None if y.is_inference() else _HALF_MEASUREMENTS.get(y)
    if cached is not None and cached[0] == y._version:
        return cached[1]
    y0 = torch.roll(y, shifts=(y.shape[-2] // 2, y.shape[-1] // 2), dims=(-2, -1))
    mirrored = torch.roll(torch.flip(y0, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))  # y0[-k]
    ybar = (y0 + mirrored) * 0.5
    offset = (y0 - ybar).pow(2).flatten(1).sum(-1)
    cols = y.shape[-1] // 2 + 1
    col = torch.arange(cols, device=y.device)  # on the device: no host copy, which would synchronise a CUDA stream
    weight = torch.where((col == 0) | (col == cols - 1), 1.0, 2.0).to(y.dtype)  # columns 0 and n/2 hold k and -k
    half = (ybar[..., :cols].contiguous(), weight, offset)
    if not y.is_inference():
        _HALF_MEASUREMENTS[y] = (y._version, half)
    return half


@register("phase_retrieval")
class PhaseRetrieval(Operator):
    """Fourier phase retrieval as in DAPS: |F(pad(x/2 + 1/2))| with a centred orthonormal 2-D FFT.

    The image is zero-padded by int(oversample / 8 * H) pixels on each side (64 for 256 px at
    oversample 2). The magnitude is formed from real and imaginary parts (XLA has no autodiff for
    ``abs`` of a complex tensor); on XLA the DFT is matrix products (:mod:`cores.fourier`).
    ``resolution`` is accepted for config compatibility; the padding follows the size of the image
    actually measured. The rotated image x[::-1, ::-1] (the twin) and the shifts that keep the image inside the
    padded window give the same measurement: :mod:`utils.twins` scores particles against both modes.
    """

    has_twin = True

    def __init__(self, oversample: float = 2.0, sigma: float = 0.05, resolution: int | None = None):
        super().__init__(sigma)
        self.oversample = float(oversample)
        self.resolution = resolution

    def pad(self, size: int) -> int:
        return int(self.oversample / 8.0 * size)

    def check_input(self, shape: Sequence[int]) -> None:
        if shape[-1] != shape[-2]:
            raise ValueError(f"phase_retrieval needs square images, got {tuple(shape)}")
        if self.resolution is not None and self.resolution != shape[-1]:
            raise ValueError(f"phase_retrieval operator.resolution={self.resolution} but images are "
                             f"{shape[-1]} px: set task.<group>.operator.resolution={shape[-1]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad(x.shape[-1])
        x = F.pad(x * 0.5 + 0.5, (p, p, p, p))
        return safe_magnitude(*centred_fft2(x))

    def gradient(self, x: torch.Tensor, y: torch.Tensor, with_loss: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d loss / dx, loss) in closed form: with u = pad(x/2 + 1/2), U = F(u) and r = |U| - y, L = ||r||^2 and,
        F being unitary, dL/du = 2 Re F^-1(r U / |U|) (0 where U = 0, as :func:`safe_magnitude`), dL/dx =
        crop(dL/du) / 2: one FFT and one inverse FFT, no autograd graph.

        The centring only relabels the frequencies: for an even padded size n, fftshift(fft(ifftshift(u)))[k] =
        (-1)^(k1 + k2 + n) FFT(u)[k - n/2] per axis pair, so |U|[k] = |FFT(u)|[k + n/2] (mod n) and L is the same
        sum over the uncentred spectrum against y0[k] = y[k + n/2], whose gradient is dL/du = 2 Re FFT^-1(r0 U0 / |U0|),
        U0 = FFT(u), r0 = |U0| - y0 (no sign pattern on either side).

        u is real, so U0 is Hermitian (U0[-k] = conj U0[k]) and |U0| even; the noisy y0 is not. With the symmetrised
        measurement ybar[k] = (y0[k] + y0[-k]) / 2, L = ||m - ybar||^2 + ||y0 - ybar||^2 (the cross term cancels
        between k and -k), and r U0 / |U0| with r = |U0| - ybar is Hermitian, so Re FFT^-1 is the inverse real FFT of
        its half spectrum: one rfft2 and one irfft2 (half the transform and spectrum work of fft2 / ifft2), the half's
        columns 1 .. n/2 - 1 weighted 2 in the loss (:func:`half_measurement`). The transform reads pad(x + 1) = 2 u
        (:func:`padded_plus_one`, one kernel), both transforms run unnormalised (torch scales an orthonormal
        transform's result in a pass of its own) and the spectrum's kernel applies the scales (:func:`spectral_residual`;
        one compiled kernel on CUDA, :func:`utils.device.fused`); the result is the window of the inverse transform,
        a view (its consumer reads it in place of a copy). ``with_loss=False`` skips the loss's reduction and returns
        None for it. Odd padded sizes, and devices without torch.fft (XLA), take autograd's gradient."""
        p = self.pad(x.shape[-1])
        h, w = x.shape[-2] + 2 * p, x.shape[-1] + 2 * p
        if x.device.type not in NATIVE_FFT_DEVICES or h % 2 or w % 2:
            return super().gradient(x, y, with_loss)
        with torch.no_grad():  # one grad mode for every caller, so that the compiled kernels are traced once
            ybar, weight, offset = half_measurement(y)
            spec = torch.view_as_real(torch.fft.rfft2(padded_plus_one(x, p), norm="backward"))  # FFT(2 u), unscaled
            c = 1.0 / math.sqrt(h * w)
            back, loss = fused(spectral_residual, x.device)(spec, ybar, weight, c, with_loss)
            du = torch.fft.irfft2(torch.view_as_complex(back), s=(h, w), norm="forward")  # unscaled
        return du[..., p:p + x.shape[-2], p:p + x.shape[-1]], None if loss is None else loss + offset

    def view(self, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Log-magnitude spectrum, resized to the image."""
        return super().view(torch.log1p(y.clamp_min(0)), shape)


@register("inpainting")
class Inpainting(Operator):
    """y = m * x with one fixed mask (generated from ``seed``) shared by every image, as in DAPS.

    mask_type 'box': a zero square of side drawn from mask_len_range, away from a margin of
    resolution/8; 'random': each pixel dropped with probability drawn from mask_prob_range (the same
    pixels in every channel).
    """

    linear = True

    def __init__(self, mask_type: str = "box", resolution: int = 256, mask_len_range: Sequence[int] | None = None,
                 mask_prob_range: Sequence[float] | None = None, sigma: float = 0.05, seed: int = 0):
        super().__init__(sigma)
        g = torch.Generator().manual_seed(int(seed))
        mask = torch.ones(1, 1, resolution, resolution)
        if mask_type == "box":
            lo, hi = mask_len_range if mask_len_range is not None else (resolution // 2, resolution // 2 + 1)
            h, w = (int(torch.randint(int(lo), int(hi), (1,), generator=g)) for _ in range(2))
            margin = resolution // 8
            if h > resolution - 2 * margin or w > resolution - 2 * margin:
                raise ValueError(f"box of {h}x{w} does not fit a {resolution} px image with margin {margin}")
            top = int(torch.randint(margin, resolution - margin - h + 1, (1,), generator=g))
            left = int(torch.randint(margin, resolution - margin - w + 1, (1,), generator=g))
            mask[..., top:top + h, left:left + w] = 0
        elif mask_type == "random":
            lo, hi = mask_prob_range if mask_prob_range is not None else (0.7, 0.71)
            prob = float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))
            dropped = torch.randperm(resolution * resolution, generator=g)[: int(resolution * resolution * prob)]
            mask.view(-1)[dropped] = 0
        else:
            raise ValueError(f"mask_type must be 'box' or 'random', got {mask_type!r}")
        self.mask_type, self.resolution = mask_type, resolution
        self.register_buffer("mask", mask)

    def check_input(self, shape: Sequence[int]) -> None:
        if tuple(shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"inpainting mask is {self.resolution} px but images are {tuple(shape[-2:])}: "
                             f"set task.<group>.operator.resolution={shape[-1]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


@register("down_sampling")
class DownSampling(Operator):
    """Bicubic anti-aliased downsampling by an integer factor (torch ``interpolate``)."""

    linear = True

    def __init__(self, scale_factor: int = 4, sigma: float = 0.05, resolution: int | None = None):
        super().__init__(sigma)
        self.scale_factor, self.resolution = int(scale_factor), resolution

    def check_input(self, shape: Sequence[int]) -> None:
        if shape[-1] % self.scale_factor or shape[-2] % self.scale_factor:
            raise ValueError(f"image size {tuple(shape[-2:])} is not divisible by scale_factor={self.scale_factor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.scale_factor, x.shape[-1] // self.scale_factor)
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


@register("gaussian_blur")
class GaussianBlur(Operator):
    """Depthwise Gaussian blur with reflection padding; the kernel is truncated at 4 std (as scipy's)."""

    linear = True

    def __init__(self, kernel_size: int = 61, intensity: float = 3.0, sigma: float = 0.05):
        super().__init__(sigma)
        radius = min(kernel_size // 2, int(4.0 * intensity + 0.5))
        ax = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k1 = torch.exp(-0.5 * (ax / intensity) ** 2)
        k2 = torch.outer(k1, k1)
        self.kernel_size, self.intensity = kernel_size, intensity
        self.register_buffer("kernel", (k2 / k2.sum()).float()[None, None])

    def check_input(self, shape: Sequence[int]) -> None:
        r = self.kernel.shape[-1] // 2
        if min(shape[-2:]) <= r:
            raise ValueError(f"images of {tuple(shape[-2:])} px are too small for a blur of radius {r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.kernel.shape[-1] // 2
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, -1, -1)
        return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k, groups=c)


@register("dense_gaussian")
class DenseGaussian(Operator):
    """y = A vec(x) with a fixed dense matrix of i.i.d. N(0, 1/m) entries (m = num_measurements)."""

    linear = True

    def __init__(self, num_measurements: int, dim: int, sigma: float = 0.05, seed: int = 0):
        super().__init__(sigma)
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("matrix", torch.randn(num_measurements, dim, generator=g) / math.sqrt(num_measurements))

    def check_input(self, shape: Sequence[int]) -> None:
        if math.prod(shape) != self.matrix.shape[1]:
            raise ValueError(f"dense_gaussian expects {self.matrix.shape[1]} values per image, got {tuple(shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.to(x.dtype).T


def linear_matrix(op: Operator, shape: Sequence[int]) -> torch.Tensor:
    """The dense matrix of a linear operator on images of ``shape`` (small shapes only; for exact posteriors)."""
    if not op.linear:
        raise ValueError(f"{op.name} is not linear")
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    with torch.no_grad():
        return copy.deepcopy(op).double()(basis).flatten(1).T.contiguous()


class LatentOperator(Operator):
    """A(decode(z)): a pixel-space operator seen from the latent space of an autoencoder."""

    def __init__(self, op: Operator, decode: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(op.sigma)
        self.op, self.decode = op, decode

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.op(self.decode(z))

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.op.loss(self.decode(z).float(), y)

    def gradient(self, z: torch.Tensor, y: torch.Tensor, with_loss: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d loss / dz, loss): the pixel operator's own gradient (closed form where it has one) pulled back through
        the decoder by one vector-Jacobian product."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x = self.decode(z)
            gx, loss = self.op.gradient(x.detach().float(), y, with_loss)
            (grad,) = torch.autograd.grad(x, z, gx.to(x.dtype))
        return grad, loss


def build_operator(cfg: dict, seed: int = 0) -> Operator:
    """Operator from its config dict: ``name`` picks the class, the other keys are its arguments."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}: choose one of {', '.join(sorted(OPERATORS))}")
    cls = OPERATORS[name]
    if "seed" in inspect.signature(cls).parameters and "seed" not in cfg:
        cfg["seed"] = seed
    try:
        return cls(**cfg)
    except TypeError as err:
        raise ValueError(f"bad arguments for operator {name!r}: {err}") from err
