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

from utils.device import eager_device


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
