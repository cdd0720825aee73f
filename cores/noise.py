"""Random streams for particles.

A sampler never calls ``torch.randn`` itself: it asks a noise source for noise shaped like its
particle batch. :class:`ParticleNoise` keeps one ``torch.Generator`` per particle, so a particle's
draws depend only on its own seed and on how many draws it has made: 4 particles in one batch give
the same numbers as 4 runs of one particle. :class:`SharedNoise` draws the whole batch from a single
generator; it is faster for large statistical runs (validation) where that invariance is not needed.
Both save and restore their generators' positions (``state_dict`` / ``load_state_dict``: a checkpoint continues
every stream where it was).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from utils.device import allow_sync, compiled, eager_device


def _derived_seed(entropy: int, key: tuple[int, int]) -> int:
    state = np.random.SeedSequence(entropy=entropy, spawn_key=key).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def particle_seed(seed: int, image_index: int, sample_index: int) -> int:
    """A 63-bit seed for one particle, derived from the run seed, its image and its sample number."""
    return _derived_seed(seed, (image_index, sample_index))


def branch_seed(parent_seed: int, generation: int) -> int:
    """The seed of a clone's fresh stream, derived from the seed of the particle whose slot it takes."""
    return _derived_seed(parent_seed, (2**32 - 2, generation))


def measurement_seed(seed: int, image_index: int) -> int:
    """Seed of the measurement noise of one image (shared by all its particles)."""
    return particle_seed(seed, image_index, 2**32 - 1)


class ParticleNoise:
    """One generator per particle; draws are stacked along the batch dimension.

    On XLA the generators live on the CPU and each draw is transferred to the device.
    """

    fused = False  # whether draws run a compiled kernel (CounterNoise with fused=True)

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.gen_device = eager_device(self.device)
        self.seeds = list(seeds)
        self.generators = [torch.Generator(device=self.gen_device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape (num_particles, *shape)."""
        out = torch.empty((len(self), *shape), device=self.gen_device, dtype=dtype)
        for row, gen in zip(out, self.generators):
            torch.randn(tuple(shape), generator=gen, out=row)
        return out.to(self.device)

    def rand(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One uniform number in [0, 1) per particle, shape (num_particles,)."""
        out = torch.empty(len(self), device=self.gen_device, dtype=dtype)
        for row, gen in zip(out.view(-1, 1), self.generators):
            torch.rand((1,), generator=gen, out=row)
        return out.to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)

    def state_dict(self) -> dict:
        """Every generator's position (host byte tensors), with the seeds and the generators' device type."""
        return {"device": self.gen_device.type, "seeds": list(self.seeds),
                "states": [gen.get_state() for gen in self.generators]}

    def load_state_dict(self, saved: dict) -> None:
        """Put every generator where :meth:`state_dict` found it (the same particles, generators on the same kind
        of device: a CUDA generator's state does not fit a CPU one)."""
        if saved["seeds"] != self.seeds or saved["device"] != self.gen_device.type:
            raise ValueError(f"noise state of other particles or another device ({saved['device']}, now "
                             f"{self.gen_device.type})")
        for gen, state in zip(self.generators, saved["states"], strict=True):
            gen.set_state(state)

    def select(self, keep: Sequence[int]) -> "ParticleNoise":
        """The streams of the kept particles, continuing where they were."""
        new = ParticleNoise.__new__(ParticleNoise)
        new.device, new.gen_device = self.device, self.gen_device
        new.seeds = [self.seeds[i] for i in keep]
        new.generators = [self.generators[i] for i in keep]
        return new

    def reseed(self, seeds: dict[int, int]) -> "ParticleNoise":
        """These streams with the particles at the given positions on fresh generators of the given seeds (clones
        of a particle must not repeat its draws)."""
        new = self.select(range(len(self)))
        for pos, seed in seeds.items():
            new.seeds[pos] = seed
            new.generators[pos] = torch.Generator(device=self.gen_device).manual_seed(seed)
        return new


MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant m, in two 16-bit halves (no int64 overflow)."""
    return (x * (m & 0xFFFF) + ((x * (m >> 16)) & 0xFFFF) * 65536) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer mixer (a bijection of [0, 2^32)) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(halves: torch.Tensor, count: torch.Tensor, elements: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The draw of :class:`CounterNoise` for every particle at once: per particle (rows of ``halves``, the seeds'
    32-bit halves, and ``count``, the draw counters) one uniform in (0, 1) per entry of ``elements`` (the hashed
    element indices h(j)): 23-bit values centred in their cells, (k + 1/2) / 2^23, exact in float32 and float64."""
    k1 = hash32(halves[:, 0] ^ hash32(count))
    k2 = hash32(halves[:, 1] ^ hash32(k1))
    h = hash32(hash32(k1[:, None] ^ elements[None, :]) ^ k2[:, None])
    return ((h >> 9).to(dtype) + 0.5) / 2**23


def counter_normals(halves: torch.Tensor, count: torch.Tensor, elements: torch.Tensor, n: int,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` standard normals per particle by Box-Muller from :func:`counter_uniform` (``elements``: an even number
    >= n of hashed indices), computed in float64 for float64 draws and in float32 otherwise (on an H100 the fused
    Box-Muller kernel for 40 x 3 x 256 x 256 normals took 135 us in float64, 70 us in float32), cast to ``dtype``.
    The largest |z| is sqrt(2 ln 2^24) = 5.77.

    ``noise: counter-fused`` runs it compiled (:func:`utils.device.compiled`: a few fused kernels instead of about 40
    elementwise ones per draw) on the CPU and for float64 draws; on CUDA float32 and narrower draws come from the
    Triton kernel :func:`cores.counter_kernel.counter_normals_kernel`, the same streams. The compiled draws agree
    with the eager function's to the last bits of float32 (the uniforms are the same; the compiled logarithm and
    sines may round differently: tests/test_noise.py). Dynamic sizes, so that a prune or a smaller last batch reuses the compile (a static compile took 23 s per particle count
    on 2 CPU cores, about 15 s on an H100); a draw size of the other parity (odd / even values) compiles once more."""
    u = counter_uniform(halves, count, elements, torch.float64 if dtype == torch.float64 else torch.float32)
    half = elements.shape[0] // 2
    r, theta = torch.sqrt(-2.0 * torch.log(u[:, :half])), 2.0 * np.pi * u[:, half:]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n].to(dtype)


class CounterNoise(ParticleNoise):
    """Counter-based streams: particle i's k-th draw is a hash of (seed_i, k, element index), computed for every
    particle at once (one set of elementwise kernels per draw, whatever the batch size, instead of one generator call
    per particle). Like :class:`ParticleNoise`, a particle's draws depend only on its seed and on how many draws it has
    made, so its results do not depend on its batch; the numbers differ from ParticleNoise's.

    Per draw: per particle two 32-bit keys k1 = h(s_lo ^ h(c)), k2 = h(s_hi ^ h(k1)) from the seed's halves and the
    draw counter c; per element j, u_j = (the top 23 bits of h(h(k1 ^ h(j)) ^ k2) + 1/2) / 2^23 (centred in its cell,
    so never 0 or 1); normals by Box-Muller from (u_m, u_m+N/2) for a draw of N values, with h the lowbias32 mixer
    (:func:`hash32`). tests/test_noise.py checks the moments, normality, uniformity and independence across particles
    and draws. ``fused`` (``noise: counter-fused``): on CUDA, float32 and narrower draws come from one Triton kernel
    (:mod:`cores.counter_kernel`); float64 and CPU draws from :func:`counter_normals` compiled by inductor; the same
    streams to float32 rounding.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu",
                 counters: Sequence[int] | None = None, fused: bool = False):
        self.device = torch.device(device)
        if fused and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"noise=counter-fused compiles its draw with torch.compile, which needs a CPU or CUDA "
                             f"device, not {self.device.type}: use noise=counter there")
        self.fused = fused
        self.seeds = [int(s) for s in seeds]
        # every counter advances by one per draw: the host keeps the start values and the number of draws since
        self._start = [0] * len(self.seeds) if counters is None else [int(c) for c in counters]
        self._draws = 0
        self._last = max(self._start, default=0)
        # on the device once: the seeds' halves and the counters, so that a draw needs no host-to-device copy
        with allow_sync():
            halves = torch.tensor([[s & MASK32, (s >> 32) & MASK32] for s in self.seeds], dtype=torch.int64)
            self._halves = halves.reshape(-1, 2).to(self.device)
            self._count = torch.tensor(self._start, dtype=torch.int64).to(self.device)
        self._elements: dict[int, torch.Tensor] = {}

    @property
    def counters(self) -> list[int]:
        """Each particle's number of draws so far (its next draw's counter)."""
        return [c + self._draws for c in self._start]

    def __len__(self) -> int:
        return len(self.seeds)

    def _draw(self) -> torch.Tensor:
        """The counters of the next draw (on the device); advances every counter."""
        if self._last + self._draws >= 2**32:
            raise RuntimeError("CounterNoise: a particle made 2^32 draws; its stream would repeat")
        count_now = self._count
        self._count = self._count + 1
        self._draws += 1
        return count_now

    def _hashed(self, size: int) -> torch.Tensor:
        """h(j) of the element indices j < ``size``, once per draw size."""
        if size not in self._elements:
            self._elements[size] = hash32(torch.arange(size, dtype=torch.int64, device=self.device))
        return self._elements[size]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape (num_particles, *shape). Fused on CUDA: float32 and narrower draws come from
        :func:`cores.counter_kernel.counter_normals_kernel` (one Triton kernel), float64 ones from the compiled
        :func:`counter_normals`, as fused draws everywhere else."""
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        count = self._draw()
        if self.fused and self.device.type == "cuda" and dtype != torch.float64:
            from cores.counter_kernel import counter_normals_kernel  # here: Triton is imported only where it runs

            return counter_normals_kernel(self._halves, count, n, dtype).reshape(len(self), *shape)
        normals = compiled(counter_normals) if self.fused else counter_normals
        return normals(self._halves, count, self._hashed(2 * ((n + 1) // 2)), n, dtype).reshape(len(self), *shape)

    def rand(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One uniform number in (0, 1) per particle, shape (num_particles,)."""
        return counter_uniform(self._halves, self._draw(), self._hashed(1))[:, 0].to(dtype)

    def state_dict(self) -> dict:
        return {"device": "counter", "seeds": list(self.seeds), "counters": list(self.counters)}

    def load_state_dict(self, saved: dict) -> None:
        if saved["seeds"] != self.seeds or saved["device"] != "counter":
            raise ValueError("noise state of other particles or of another kind of stream")
        self.__init__(self.seeds, self.device, saved["counters"], self.fused)

    def select(self, keep: Sequence[int]) -> "CounterNoise":
        return CounterNoise([self.seeds[i] for i in keep], self.device, [self.counters[i] for i in keep], self.fused)

    def reseed(self, seeds: dict[int, int]) -> "CounterNoise":
        new_seeds, counters = list(self.seeds), list(self.counters)
        for pos, seed in seeds.items():
            new_seeds[pos], counters[pos] = int(seed), 0
        return CounterNoise(new_seeds, self.device, counters, self.fused)


NOISE = {"generator": ParticleNoise, "counter": CounterNoise,
         "counter-fused": lambda seeds, device: CounterNoise(seeds, device, fused=True)}


def auto_kind(device: torch.device | str) -> str:
    """What ``noise: auto`` means on ``device``: counter-fused on CUDA, where one fused draw replaces a ``randn``
    launch per particle (H100, 400 particles of 32 x 32: 0.138 vs 6.08 ms per draw, docs/benchmarks.md); generator
    elsewhere: on the CPU the compile (about 35 s per shape) costs the demo and the tests more than it saves, and
    torch_xla has no fused draw."""
    return "counter-fused" if torch.device(device).type == "cuda" else "generator"


def particle_noise(kind: str, seeds: Sequence[int], device: torch.device | str) -> ParticleNoise:
    """The per-particle streams of ``kind`` (``noise`` in configs/default.yaml): generator (one torch.Generator per
    particle), counter (:class:`CounterNoise`) or counter-fused (the same streams, drawn by fused kernels: a Triton
    kernel on CUDA, an inductor-compiled one elsewhere)."""
    if kind not in NOISE:
        raise ValueError(f"noise must be one of {', '.join(NOISE)}, got {kind!r}")
    return NOISE[kind](seeds, device)


class SharedNoise:
    """All particles drawn from one generator (not batch-invariant; for large statistical runs)."""

    def __init__(self, seed: int, num_particles: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.num_particles = num_particles
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return self.num_particles

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn((self.num_particles, *shape), generator=self.generator, device=self.device, dtype=dtype)

    def rand(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(self.num_particles, generator=self.generator, device=self.device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)

    def state_dict(self) -> dict:
        return {"device": self.device.type, "states": [self.generator.get_state()]}

    def load_state_dict(self, saved: dict) -> None:
        if saved["device"] != self.device.type:
            raise ValueError(f"noise state of another device ({saved['device']}, now {self.device.type})")
        self.generator.set_state(saved["states"][0])

    def select(self, keep: Sequence[int]) -> "SharedNoise":
        new = SharedNoise.__new__(SharedNoise)
        new.device, new.num_particles, new.generator = self.device, len(keep), self.generator
        return new

    def reseed(self, seeds: dict[int, int]) -> "SharedNoise":
        """One shared generator: clones draw new numbers anyway."""
        return self
