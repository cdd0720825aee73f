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

import torch
import triton
import triton.language as tl

from utils.device import launch_on

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
    """Program (p, b): particle p's keys, then pairs m in [b BLOCK, (b + 1) BLOCK) below half: out[p, m] = r cos theta
    and out[p, half + m] = r sin theta (the latter only below n), r from u_m and theta from u_{m + half}."""
    p = tl.program_id(0)
    m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # the particle's two keys, from its seed's halves and its draw counter
    lo = tl.load(halves + 2 * p).to(tl.uint32)
    hi = tl.load(halves + 2 * p + 1).to(tl.uint32)
    c = tl.load(counts + p).to(tl.uint32)
    k1 = _lowbias32(lo ^ _lowbias32(c))
    k2 = _lowbias32(hi ^ _lowbias32(k1))
    # Box-Muller on the pair (u_m, u_{m + half})
    pair = m < half
    r = tl.sqrt_rn(-2.0 * tl.log(_uniform(k1, k2, m.to(tl.uint32))))
    theta = 6.283185307179586 * _uniform(k1, k2, (m + half).to(tl.uint32))
    row = out + p.to(tl.int64) * n
    tl.store(row + m, (r * tl.cos(theta)).to(out.dtype.element_ty), mask=pair)
    tl.store(row + half + m, (r * tl.sin(theta)).to(out.dtype.element_ty), mask=pair & (half + m < n))


MAX_BLOCKS = 65535  # CUDA's limit on a grid's second axis


def counter_normals_kernel(halves: torch.Tensor, count: torch.Tensor, n: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` standard normals per particle, shape (particles, n), computed in float32 and stored as ``dtype``
    (rounded to nearest): the values of :func:`cores.noise.counter_normals`, from one kernel launch on ``halves``'
    device and no other allocation than the output. ``halves``: the seeds' 32-bit halves, contiguous (P, 2) int64;
    ``count``: the draw counters, contiguous (P,) int64 (as :class:`cores.noise.CounterNoise` keeps them)."""
    if dtype == torch.float64:
        raise ValueError("counter_normals_kernel draws in float32: float64 draws go through "
                         "cores.noise.counter_normals")
    if not (halves.is_contiguous() and count.is_contiguous()):
        raise ValueError("counter_normals_kernel needs contiguous seed halves and counters")
    half = (n + 1) // 2
    blocks = triton.cdiv(half, BLOCK)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"a draw of {n} values per particle exceeds the kernel's {2 * BLOCK * MAX_BLOCKS}: "
                         "use noise=counter (the torch function) for draws this large")
    out = torch.empty((halves.shape[0], n), dtype=dtype, device=halves.device)
    if out.numel():
        with launch_on(halves.device):
            _counter_normals[(halves.shape[0], blocks)](halves, count, out, n, half, BLOCK=BLOCK)
    return out
