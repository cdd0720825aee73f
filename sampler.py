"""The DAPS / LatentDAPS loop (Zhang et al., CVPR 2025, Algorithm 1).

For annealing levels sigma_0 > ... > sigma_{T-1}:

1. x0hat = PF-ODE(x_t) from sigma_k down to the ODE's sigma_min (no grad);
2. x0y ~ pi_k(x_0) by ``num_steps`` MCMC updates started at x0hat (cores/mcmc.py);
3. x_{k+1} = x0y + sigma_{k+1} n, and no noise after the last level.

LatentDAPS is the same loop on latents z, with A(decode(z)) in the likelihood and decode at the end.

Per-particle state (x, its measurement copy, its random stream, its index) lives in
:class:`Particles`, so removing particles (a NaN, later pruning) slices all of it at once. The loop
keeps no state between calls. It makes one host synchronisation per level: the per-particle
statistics of the level (loss, acceptance, finiteness) are copied to the host in one transfer and
handed to the callback.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cores.mcmc import Kernel, MCMCConfig, make_target
from cores.models import Denoiser
from cores.noise import ParticleNoise, SharedNoise
from cores.operators import LatentOperator, Operator
from cores.scheduler import PFODE, sigma_schedule, step_ratio
from utils.device import index_tensor, to_host

log = logging.getLogger(__name__)
Callback = Callable[[dict[str, Any]], None]
NOT_IMPLEMENTED = "not implemented yet"


@dataclass
class Particles:
    """Everything that belongs to one particle, sliced together."""

    x: torch.Tensor
    y: torch.Tensor
    noise: ParticleNoise | SharedNoise
    index: list[int]

    def select(self, keep: list[int]) -> "Particles":
        idx = index_tensor(keep, self.x.device)
        return Particles(self.x.index_select(0, idx), self.y.index_select(0, idx), self.noise.select(keep),
                         [self.index[i] for i in keep])


@dataclass
class SampleResult:
    """Final states of all particles (rows of stopped particles are NaN) and what happened to each."""

    x: torch.Tensor
    status: list[str]
    stopped_at: list[int | None]
    used_levels: int
    levels: list[float] = field(default_factory=list)


class DAPS:
    """DAPS with a preset annealing schedule; ``latent`` runs LatentDAPS.

    Built from the sampler config (``annealing_scheduler_config``, ``diffusion_scheduler_config``,
    ``k2_scheduler_config``) and the task group's ``mcmc_sampler_config``.
    """

    def __init__(self, annealing_scheduler_config: dict, diffusion_scheduler_config: dict,
                 mcmc_sampler_config: dict, latent: bool = False, k2_scheduler_config: dict | None = None):
        if k2_scheduler_config is not None:
            raise NotImplementedError(f"sampler.k2_scheduler_config (K2-DAPS) is {NOT_IMPLEMENTED}; "
                                      "set sampler.k2_scheduler_config=null")
        ann = dict(annealing_scheduler_config)
        self.levels = sigma_schedule(**ann).tolist()
        self.ode = PFODE(**dict(diffusion_scheduler_config))
        self.mcmc = MCMCConfig.from_dict(mcmc_sampler_config)
        self.kernel: Kernel = self.mcmc.kernel()
        self.latent = bool(latent)

    def check(self, denoiser: Denoiser) -> None:
        """Refuse combinations that cannot run, before any compute."""
        if denoiser.latent != self.latent:
            kind = "latent" if denoiser.latent else "pixel"
            raise ValueError(f"model is a {kind} model but the sampler has latent={self.latent}: use "
                             f"+sampler={'latent_edm_daps' if denoiser.latent else 'edm_daps'}")
        if self.kernel.needs_log_prob and self.mcmc.prior_solver == "exact" and not denoiser.has_log_prob:
            raise ValueError(f"mc_algo={self.mcmc.mc_algo} with prior_solver=exact needs the prior's log-density, "
                             "which only analytic models (gmm) have; use prior_solver=gaussian")

    def network_evals_per_particle(self) -> int:
        return sum(self.ode.network_evals(s) for s in self.levels)

    def initial_state(self, noise: ParticleNoise | SharedNoise, shape: tuple[int, ...], device: torch.device
                      ) -> torch.Tensor:
        return (noise.randn(shape) * self.levels[0]).to(device)

    def sample(self, denoiser: Denoiser, operator: Operator, y: torch.Tensor, x_start: torch.Tensor,
               noise: ParticleNoise | SharedNoise, callback: Callback | None = None,
               progress: Callable[[int], Any] | None = None) -> SampleResult:
        """Run the loop for a batch of particles; ``y`` holds each particle's own copy of its measurement.

        ``callback`` receives, once per level, a dict with the level's host-side statistics and the
        device tensors ``x0hat``, ``x0y`` and ``index`` (the original particle numbers still running).
        """
        op = LatentOperator(operator, denoiser.decode) if self.latent else operator
        total = x_start.shape[0]
        state = Particles(x_start, y, noise, list(range(total)))
        status, stopped_at = ["ok"] * total, [None] * total
        T = len(self.levels)
        bar = progress(T) if progress else None
        for step, sigma in enumerate(self.levels):
            x0hat = self.ode.solve(denoiser.denoise, state.x, sigma)
            target = make_target(self.mcmc, denoiser, lambda x, yy=state.y: op.loss(x, yy), state.x, x0hat, sigma)
            res = self.kernel.run(target, x0hat, state.noise, self.kernel.lr_at(step_ratio(step, T)))
            next_sigma = self.levels[step + 1] if step + 1 < T else 0.0
            x_next = res.x + next_sigma * state.noise.randn_like(res.x) if step + 1 < T else res.x
            finite = torch.isfinite(x_next).flatten(1).all(1)
            acc = res.acceptance if res.acceptance is not None else torch.full_like(res.loss, math.nan)
            loss, acceptance, ok = to_host(torch.stack([res.loss.float(), acc.float(), finite.float()]))
            event = {"step": step, "sigma": sigma, "next_sigma": next_sigma, "index": list(state.index),
                     "loss": loss, "acceptance": acceptance if res.acceptance is not None else None,
                     "finite": [bool(v) for v in ok], "x0hat": x0hat, "x0y": res.x}
            if callback:
                callback(event)
            keep = [i for i, v in enumerate(ok) if v]
            dead = [state.index[i] for i, v in enumerate(ok) if not v]
            for p in dead:
                status[p], stopped_at[p] = "nonfinite", step
            if dead:
                log.warning("%d particle(s) produced NaN/Inf at level %d (sigma=%.4g) and were stopped: %s%s",
                            len(dead), step, sigma, dead[:8], " ..." if len(dead) > 8 else "")
            state.x = x_next
            if len(keep) < len(ok):
                state = state.select(keep)
            if bar is not None:
                finite_loss = [v for v, f in zip(loss, ok) if f]
                bar.set_postfix(sigma=f"{sigma:.3g}", loss=f"{min(finite_loss) if finite_loss else math.nan:.3g}")
                bar.update(1)
            if not state.index:
                break
        if bar is not None:
            bar.close()
        out = torch.full((total, *denoiser.image_shape), math.nan, device=x_start.device)
        if state.index:
            with torch.no_grad():
                final = denoiser.decode(state.x) if self.latent else state.x
            out[index_tensor(state.index, out.device)] = final.detach().to(out.dtype)
        return SampleResult(out, status, stopped_at, used_levels=step + 1, levels=self.levels[: step + 1])


def build_sampler(sampler_cfg: dict, mcmc_cfg: dict) -> DAPS:
    """The sampler of ``cfg.sampler`` with the task group's MCMC config."""
    cfg = dict(sampler_cfg)
    latent = cfg.pop("latent", False)
    allowed = {"annealing_scheduler_config", "diffusion_scheduler_config", "k2_scheduler_config"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown sampler keys {unknown}; known: {sorted(allowed | {'latent'})}")
    return DAPS(mcmc_sampler_config=mcmc_cfg, latent=latent, **cfg)
