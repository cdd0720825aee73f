"""MCMC kernels for the per-level conditional of DAPS (Zhang et al. 2025, eq. 9):

    pi(x_0) proportional to exp(-w ||A(x_0) - y||^2) p(x_0 | x_t),

with the prior factor chosen by ``prior_solver``:

* gaussian  (DAPS default): p(x_0 | x_t) ~ N(x0hat, r^2 I), x0hat from the PF-ODE, r = sigma_t;
* score-t:  N(D(x_t, sigma_t), r^2 I);
* score-min: grad log p = s(x0hat, sigma_min) + (x_t - x_0) / r^2, i.e. N(x_t + r^2 s(x0hat, sigma_min), r^2 I);
* exact:    p_{sigma_min}(x_0) N(x_t; x_0, r^2 I), the true conditional (score of the prior at each step).

The data weight w is 1 / tau^2 with ``likelihood: official`` (the official DAPS gradient
-grad ||A x - y||^2 / tau^2, i.e. Gaussian noise of std tau / sqrt(2)) and 1 / (2 tau^2) with
``likelihood: gaussian`` (noise of std tau). Every kernel targets the same pi for the same config.

Kernels (``mc_algo``) share one step-size meaning, ``lr``: the Langevin step, proposal noise std sqrt(2 lr):

* langevin: unadjusted Langevin (ULA), x += lr grad log pi + sqrt(2 lr) n  (biased, no MH test);
* hmc:      the official damped Langevin "HMC" (no MH test), kept to reproduce DAPS:
            v = m v + sqrt(lr) grad + sqrt(2 (1 - m)) n, x += sqrt(lr) v, v ~ N(0, I) at each level;
* mala:     Langevin proposal + Metropolis-Hastings test (Roberts & Tweedie 1996);
* hmc_mh:   L leapfrog steps of size sqrt(2 lr), full momentum refresh, MH test (Neal 2011);
* mh:       random walk x' = x + sqrt(2 lr) n with MH test.

MH kernels return the acceptance rate of each particle over the level's steps.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cores.noise import ParticleNoise, SharedNoise
from utils.config import check_keys
from utils.device import end_step

log = logging.getLogger(__name__)
Noise = ParticleNoise | SharedNoise
PRIOR_SOLVERS = ("gaussian", "score-t", "score-min", "exact")
LIKELIHOODS = {"official": 1.0, "gaussian": 0.5}


@dataclass
class Target:
    """log pi(x) = -w L(x) - ||x - prior_mean||^2 / (2 r^2)  [+ log p_{s_min}(x) - ||x - x_t||^2 / (2 r^2) when exact].

    ``loss(x)`` is the per-particle ||A(x) - y||^2. For the exact solver, ``prior_score`` (and, for MH
    kernels, ``prior_log_prob``) of the model at sigma_min replace the Gaussian around prior_mean.
    """

    loss: Callable[[torch.Tensor], torch.Tensor]
    data_weight: float
    r: float
    prior_mean: torch.Tensor
    prior_score: Callable[[torch.Tensor], torch.Tensor] | None = None
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _prior_grad(self, x: torch.Tensor) -> torch.Tensor:
        g = (self.prior_mean - x) / self.r**2
        if self.prior_score is not None:
            g = g + self.prior_score(x)
        return g

    def grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad log pi(x), L(x)) per particle."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            loss = self.loss(xg)
            (g,) = torch.autograd.grad(loss.sum(), xg)
        return self._prior_grad(x) - self.data_weight * g, loss.detach()

    def _log_prob(self, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        logp = -self.data_weight * loss - (x - self.prior_mean).pow(2).flatten(1).sum(1) / (2 * self.r**2)
        if self.prior_score is not None:
            if self.prior_log_prob is None:
                raise ValueError("this kernel needs the prior's log-density, which the model does not provide")
            logp = logp + self.prior_log_prob(x)
        return logp

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(x) up to a constant, L(x)) per particle, without gradients."""
        with torch.no_grad():
            loss = self.loss(x)
            return self._log_prob(x, loss), loss

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi(x) up to a constant, its gradient, L(x)) per particle."""
        g, loss = self.grad(x)
        return self._log_prob(x, loss), g, loss


@dataclass
class KernelOutput:
    x: torch.Tensor
    loss: torch.Tensor
    acceptance: torch.Tensor | None = None


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).flatten(1).sum(1)


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _mh_accept(noise: Noise, log_alpha: torch.Tensor, state: tuple[torch.Tensor, ...],
               proposal: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Metropolis-Hastings test per particle: keep each proposal with probability min(1, exp(log_alpha)).

    Returns the new state (every per-particle tensor of ``state`` replaced where accepted) and the accept mask.
    """
    acc = noise.rand(log_alpha.dtype).log() < log_alpha
    return tuple(torch.where(_bcast(acc, s), p, s) for s, p in zip(state, proposal, strict=True)), acc


@dataclass
class Kernel:
    """Base of the kernel role: ``num_steps`` updates per level with step lr (1 + ratio (lr_min_ratio - 1))."""

    num_steps: int
    lr: float
    lr_min_ratio: float = 1.0
    needs_log_prob = False
    name = "kernel"

    def lr_at(self, ratio: float) -> float:
        return self.lr * (1.0 + ratio * (self.lr_min_ratio - 1.0))

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        raise NotImplementedError

    def grad_evals(self) -> int:
        return self.num_steps

    def describe(self) -> dict[str, Any]:
        """The kernel's settings, for the results header and timing.json."""
        return {"mc_algo": self.name, "mcmc_steps": self.num_steps, **{
            k: v for k, v in vars(self).items() if k != "num_steps"}, "grad_evals_per_level": self.grad_evals()}


@dataclass
class Langevin(Kernel):
    """Unadjusted Langevin algorithm."""

    name = "langevin"

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        loss = None
        for _ in range(self.num_steps):
            g, loss = target.grad(x)
            x = x + lr * g + math.sqrt(2 * lr) * noise.randn_like(x)
            end_step(x, loss)
        return KernelOutput(x, loss)


@dataclass
class DampedHMC(Kernel):
    """The official DAPS 'hmc': underdamped Langevin with momentum m, no Metropolis test."""

    name = "hmc"

    momentum: float = 0.9

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        m, h = self.momentum, math.sqrt(lr)
        v = noise.randn_like(x)
        loss = None
        for _ in range(self.num_steps):
            g, loss = target.grad(x)
            v = m * v + h * g + math.sqrt(2 * (1 - m)) * noise.randn_like(x)
            x = x + h * v
            end_step(x, v, loss)
        return KernelOutput(x, loss)


@dataclass
class MALA(Kernel):
    """Metropolis-adjusted Langevin: proposal N(x + lr g, 2 lr I), MH test with the reverse proposal."""

    name = "mala"

    needs_log_prob = True

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        state = (x, *target.log_prob_and_grad(x))  # x, log pi, grad, loss
        accepted = torch.zeros_like(state[1])
        for _ in range(self.num_steps):
            x, logp, g, _ = state
            eps = noise.randn_like(x)
            prop = x + lr * g + math.sqrt(2 * lr) * eps
            proposal = (prop, *target.log_prob_and_grad(prop))
            log_q_back = -_sqnorm(x - prop - lr * proposal[2]) / (4 * lr)
            log_alpha = proposal[1] - logp + log_q_back + 0.5 * _sqnorm(eps)
            state, acc = _mh_accept(noise, log_alpha, state, proposal)
            accepted = accepted + acc.to(accepted.dtype)
            end_step(*state, accepted)
        return KernelOutput(state[0], state[3], accepted / self.num_steps)


@dataclass
class LeapfrogHMC(Kernel):
    """HMC with ``leapfrog_steps`` leapfrog steps of size sqrt(2 lr), unit mass, full momentum refresh, MH test."""

    name = "hmc_mh"

    leapfrog_steps: int = 5
    needs_log_prob = True

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        h = math.sqrt(2 * lr)
        state = (x, *target.log_prob_and_grad(x))  # x, log pi, grad, loss
        accepted = torch.zeros_like(state[1])
        for _ in range(self.num_steps):
            xn, logp, gn, _ = state
            p = noise.randn_like(xn)
            pn = p + 0.5 * h * gn
            for i in range(self.leapfrog_steps):
                xn = xn + h * pn
                proposal = (xn, *target.log_prob_and_grad(xn))
                pn = pn + (h if i < self.leapfrog_steps - 1 else 0.5 * h) * proposal[2]
            log_alpha = (-logp + 0.5 * _sqnorm(p)) - (-proposal[1] + 0.5 * _sqnorm(pn))  # H(x, p) - H(x', p')
            state, acc = _mh_accept(noise, log_alpha, state, proposal)
            accepted = accepted + acc.to(accepted.dtype)
            end_step(*state, accepted)
        return KernelOutput(state[0], state[3], accepted / self.num_steps)

    def grad_evals(self) -> int:
        return self.num_steps * self.leapfrog_steps + 1


@dataclass
class RandomWalkMH(Kernel):
    """Random-walk Metropolis: x' = x + sqrt(2 lr) n."""

    name = "mh"

    needs_log_prob = True

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        state = (x, *target.log_prob(x))  # x, log pi, loss
        accepted = torch.zeros_like(state[1])
        for _ in range(self.num_steps):
            prop = state[0] + math.sqrt(2 * lr) * noise.randn_like(state[0])
            proposal = (prop, *target.log_prob(prop))
            state, acc = _mh_accept(noise, proposal[1] - state[1], state, proposal)
            accepted = accepted + acc.to(accepted.dtype)
            end_step(*state, accepted)
        return KernelOutput(state[0], state[2], accepted / self.num_steps)


KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (Langevin, DampedHMC, MALA, LeapfrogHMC, RandomWalkMH)}
KERNEL_ONLY_KEYS = {"momentum": "hmc", "leapfrog_steps": "hmc_mh"}


@dataclass
class MCMCConfig:
    """``task.<group>.mcmc_sampler_config``: the kernel and the conditional it targets."""

    num_steps: int
    lr: float
    tau: float = 0.01
    lr_min_ratio: float = 0.01
    mc_algo: str = "langevin"
    prior_solver: str = "gaussian"
    prior_sigma_min: float = 0.01
    likelihood: str = "official"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def known_keys(cls) -> list[str]:
        return sorted(set(cls.__dataclass_fields__) - {"extra"}) + sorted(KERNEL_ONLY_KEYS)

    @classmethod
    def from_dict(cls, cfg: dict) -> "MCMCConfig":
        cfg = dict(cfg)
        try:
            check_keys(cfg, cls.known_keys(), "mcmc_sampler_config")
        except ValueError as err:
            raise ValueError(f"unknown mcmc_sampler_config keys {sorted(set(cfg) - set(cls.known_keys()))}: "
                             f"{err}") from None
        known = {k: cfg.pop(k) for k in list(cfg) if k in cls.__dataclass_fields__}
        out = cls(**known, extra=cfg)
        out.validate()
        return out

    def validate(self) -> None:
        if self.mc_algo not in KERNELS:
            raise ValueError(f"unknown mc_algo {self.mc_algo!r}: choose one of {', '.join(KERNELS)}")
        if self.prior_solver not in PRIOR_SOLVERS:
            raise ValueError(f"unknown prior_solver {self.prior_solver!r}: choose one of {', '.join(PRIOR_SOLVERS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
        if self.num_steps < 1 or self.lr <= 0 or self.tau <= 0:
            raise ValueError(f"need num_steps >= 1, lr > 0, tau > 0; got {self.num_steps}, {self.lr}, {self.tau}")

    @property
    def data_weight(self) -> float:
        """w in exp(-w ||A(x) - y||^2)."""
        return LIKELIHOODS[self.likelihood] / self.tau**2

    def target_spec(self) -> "TargetSpec":
        return TargetSpec(self.data_weight, self.prior_solver, self.prior_sigma_min, self.likelihood)

    def kernel(self) -> Kernel:
        kwargs = {}
        for key, value in self.extra.items():
            if KERNEL_ONLY_KEYS[key] == self.mc_algo:
                kwargs[key] = value
            else:
                log.warning("mcmc_sampler_config.%s is used only by mc_algo=%s; ignored by %s",
                            key, KERNEL_ONLY_KEYS[key], self.mc_algo)
        return KERNELS[self.mc_algo](num_steps=self.num_steps, lr=self.lr, lr_min_ratio=self.lr_min_ratio, **kwargs)


@dataclass(frozen=True)
class TargetSpec:
    """What each level's conditional pi looks like (module docstring): data weight w and prior solver."""

    data_weight: float
    prior_solver: str = "gaussian"
    prior_sigma_min: float = 0.01
    likelihood: str = "official"

    def describe(self) -> dict[str, Any]:
        return {"prior_solver": self.prior_solver, "likelihood": self.likelihood, "data_weight": self.data_weight}


def make_target(cfg: MCMCConfig | TargetSpec, denoiser: Any, loss: Callable[[torch.Tensor], torch.Tensor], xt: torch.Tensor,
                x0hat: torch.Tensor, sigma: float) -> Target:
    """The level's target pi for the configured prior solver (r = sigma_t, as the official DAPS)."""
    w, r = cfg.data_weight, sigma
    if cfg.prior_solver == "gaussian":
        return Target(loss, w, r, x0hat)
    with torch.no_grad():
        if cfg.prior_solver == "score-t":
            return Target(loss, w, r, denoiser.denoise(xt, sigma))
        if cfg.prior_solver == "score-min":
            return Target(loss, w, r, xt + r**2 * denoiser.score(x0hat, cfg.prior_sigma_min))
    s_min = cfg.prior_sigma_min

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return denoiser.score(x, s_min)

    log_prob = (lambda x: denoiser.log_prob(x, s_min)) if denoiser.has_log_prob else None
    return Target(loss, w, r, xt, score, log_prob)
