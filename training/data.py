"""Training data: Fashion-MNIST from its IDX files, and synthetic 2-D cosmology-like random fields.

Everything is returned as a float tensor (N, C, H, W) in roughly [-1, 1].

Fields: a Gaussian random field with power spectrum P(k) = k^(-n) (k in integer wavenumbers, P(0) = 0)
is white noise filtered in Fourier space, x = IFFT(sqrt(P) FFT(w)) with orthonormal FFTs, so that
E|FFT(x)(k)|^2 = P(k). A lognormal field is exp(s g - s^2 / 2) - 1 of a unit-variance Gaussian field g.
Fields are divided by ``norm`` (their theoretical std times 2 for Gaussian fields) to sit in [-1, 1].
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (Y. LeCun's MNIST format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train", root: str = FMNIST_ROOT, pad_to: int = 32) -> torch.Tensor:
    """Fashion-MNIST images (N, 1, pad_to, pad_to) in [-1, 1]; 28x28 zero-padded (background -1) to pad_to."""
    folder = Path(root)
    candidates = [folder / (FMNIST_FILES[split] + ext) for ext in (".gz", "")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} images not found: looked for {candidates[0]} and {candidates[1]}. Install them "
            f"with 'apt-get install dataset-fashion-mnist' (Debian) or set data.root to a folder holding the IDX files.")
    x = torch.from_numpy(read_idx(path).astype(np.float32) / 127.5 - 1.0)[:, None]
    pad = (pad_to - x.shape[-1]) // 2
    if pad < 0:
        raise ValueError(f"pad_to={pad_to} is smaller than the 28 px images")
    return torch.nn.functional.pad(x, (pad, pad_to - 28 - pad, pad, pad_to - 28 - pad), value=-1.0)


def wavenumbers(size: int) -> torch.Tensor:
    """|k| on the FFT grid, in integer wavenumbers (cycles per box)."""
    f = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def power_law(size: int, index: float) -> torch.Tensor:
    """P(k) = k^(-index) on the FFT grid, with P(0) = 0."""
    k = wavenumbers(size)
    return torch.where(k > 0, k.clamp_min(1e-12) ** (-index), torch.zeros_like(k))


def gaussian_fields(n: int, size: int, index: float, generator: torch.Generator) -> torch.Tensor:
    """n Gaussian fields (n, 1, size, size) whose expected power spectrum is exactly :func:`power_law`."""
    white = torch.randn(n, size, size, generator=generator, dtype=torch.float64)
    spec = torch.fft.fft2(white, norm="ortho") * power_law(size, index).sqrt()
    return torch.fft.ifft2(spec, norm="ortho").real[:, None]


def random_fields(n: int, size: int = 32, kind: str = "gaussian", index: float = 2.0, lognormal_sigma: float = 1.0,
                  seed: int = 0) -> torch.Tensor:
    """Training fields in [-1, 1] (mostly): Gaussian or lognormal, normalised as in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    fields = gaussian_fields(n, size, index, g)
    std = math.sqrt(float(power_law(size, index).mean()))
    if kind == "gaussian":
        return (fields / (2.5 * std)).float()
    if kind == "lognormal":
        s = lognormal_sigma
        ln = torch.exp(s * fields / std - s * s / 2) - 1
        return (ln / (2.5 * math.sqrt(math.expm1(s * s)))).clamp(-1, 1).float()
    raise ValueError(f"unknown field kind {kind!r}: choose gaussian or lognormal")


def radial_power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |FFT(x)|^2 (orthonormal) over fields and over rings of integer |k| = 1 .. size/2: (k, P(k))."""
    size = x.shape[-1]
    power = torch.fft.fft2(x.double().flatten(0, -3), norm="ortho").abs().pow(2).mean(0)
    k = wavenumbers(size).round().long()
    kmax = size // 2
    ks = torch.arange(1, kmax + 1)
    spectrum = torch.stack([power[k == i].mean() for i in ks])
    return ks.double(), spectrum


def spectrum_mismatch(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over k of |log10 P_generated(k) - log10 P_reference(k)| (0 = identical spectra)."""
    _, pg = radial_power_spectrum(generated)
    _, pr = radial_power_spectrum(reference)
    return float((pg.log10() - pr.log10()).abs().mean())


def build_training_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) tensors from the ``data`` section of a training config."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    val_fraction = cfg.pop("val_fraction", 0.05)
    if name == "fashion_mnist":
        x = fashion_mnist("train", cfg.pop("root", FMNIST_ROOT), cfg.pop("pad_to", 32))
        limit = cfg.pop("limit", None)
        if cfg:
            raise ValueError(f"unknown fashion_mnist keys: {sorted(cfg)}")
        if limit:
            x = x[:limit]
    elif name == "fields":
        x = random_fields(**cfg)
    else:
        raise ValueError(f"unknown training data {name!r}: choose fashion_mnist or fields")
    n_val = max(1, int(len(x) * val_fraction))
    return x[n_val:], x[:n_val]
