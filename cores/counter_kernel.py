"""The counter-based normals of :class:`cores.noise.CounterNoise` as one Triton kernel, for CUDA.

Compiled by inductor, :func:`cores.noise.counter_normals` became two kernels (an H100, 40 x 3 x 256 x 256 normals,
docs/benchmarks.md): the hash (35 us; 32-bit products emulated in int64) wrote the uniforms, and Box-Muller (70 us)
read them back, evaluating both the cosine and the sine for every output of its ``cat``. Here each program takes a
block of pairs of one particle: the keys once, then per pair (m, m + N/2) the two uniforms in native uint32
arithmetic, one logarithm, one square root, one cosine and one sine, and the two outputs.

The numbers are :func:`cores.noise.counter_normals`' (the uniforms exactly; the normals to float32 rounding of the
transcendental functions): tests/test_noise.py runs this kernel in Triton's interpreter on the CPU against the torch
function, and tests/test_gpu.py on CUDA.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024  # pairs per program


@triton.jit
def _lowbias32(x):
    """Wellons' lowbias32 mixer on uint32 (:func:`cores.noise.hash32`)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _uniform(k1, k2, j):
    """u_j = (top 23 bits of h(h(k1 ^ h(j)) ^ k2) + 1/2) / 2^23, exact in float32."""
    bits = _lowbias32(_lowbias32(k1 ^ _lowbias32(j)) ^ k2) >> 9
    return (bits.to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _counter_normals(halves, counts, out, n, half, BLOCK: tl.constexpr):
    p = tl.program_id(1)
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.load(halves + 2 * p).to(tl.uint32)
    hi = tl.load(halves + 2 * p + 1).to(tl.uint32)
    c = tl.load(counts + p).to(tl.uint32)
    k1 = _lowbias32(lo ^ _lowbias32(c))
    k2 = _lowbias32(hi ^ _lowbias32(k1))
    pair = m < half
    r = tl.sqrt_rn(-2.0 * tl.log(_uniform(k1, k2, m.to(tl.uint32))))
    theta = 6.283185307179586 * _uniform(k1, k2, (m + half).to(tl.uint32))
    row = out + p.to(tl.int64) * n
    tl.store(row + m, (r * tl.cos(theta)).to(out.dtype.element_ty), mask=pair)
    tl.store(row + half + m, (r * tl.sin(theta)).to(out.dtype.element_ty), mask=pair & (half + m < n))


def counter_normals_kernel(halves: torch.Tensor, count: torch.Tensor, n: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` standard normals per particle, shape (particles, n), computed in float32 and stored as ``dtype``: the
    values of :func:`cores.noise.counter_normals` (``halves``: the seeds' 32-bit halves, (P, 2) int64; ``count``: the
    draw counters, (P,) int64), from one kernel launch and no other allocation than the output."""
    if dtype == torch.float64:
        raise ValueError("counter_normals_kernel draws in float32; float64 draws go through cores.noise.counter_normals")
    out = torch.empty((halves.shape[0], n), dtype=dtype, device=halves.device)
    half = (n + 1) // 2
    if out.numel():
        _counter_normals[(math.ceil(half / BLOCK), halves.shape[0])](halves, count, out, n, half, BLOCK=BLOCK)
    return out
