"""The centred orthonormal 2-D DFT of a real image, returned as (real, imaginary) parts.

    F(x) = fftshift(fft2(ifftshift(x), norm="ortho"))   over the last two dimensions.

CUDA and CPU use torch.fft. torch_xla has no lowering for the FFT (``aten::_fft_c2c`` runs on the host:
every call copies the tensor off the device and back, a host synchronisation inside each MCMC step), so on
XLA the transform is two matrix products, Y = M_H X M_W^T with M_n the n x n centred DFT matrix, split
into real and imaginary parts (X is real): Re Y = C_H X C_W^T - S_H X S_W^T, Im Y = C_H X S_W^T + S_H X C_W^T
with M = C + iS. That costs O(n^3) per channel instead of O(n^2 log n), which matrix units absorb.
"""
from __future__ import annotations

from functools import lru_cache

import torch

NATIVE_FFT_DEVICES = ("cpu", "cuda")


@lru_cache(maxsize=16)
def dft_matrix(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S): real and imaginary parts of the centred orthonormal DFT matrix M_n, column j = F(e_j),
    formed in float64 on the host by torch.fft itself, so both paths share one definition of F."""
    eye = torch.eye(n, dtype=torch.float64)
    m = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(eye, dim=0), dim=0, norm="ortho"), dim=0)
    return m.real.to(device, dtype), m.imag.to(device, dtype)


def dft2_matmul(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F(x) of a real x (..., H, W) by matrix products (module docstring)."""
    ch, sh = dft_matrix(x.shape[-2], x.device, x.dtype)
    cw, sw = dft_matrix(x.shape[-1], x.device, x.dtype)
    a, b = ch @ x, sh @ x
    return a @ cw.mT - b @ sw.mT, a @ sw.mT + b @ cw.mT


def centred_fft2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re F(x), Im F(x)) of a real x (..., H, W): torch.fft where the device has it, matrix products elsewhere."""
    if x.device.type not in NATIVE_FFT_DEVICES:
        return dft2_matmul(x)
    spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    return spec.real, spec.imag
