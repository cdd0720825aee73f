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
* da_hmc:   delayed-acceptance HMC: hmc_mh's trajectory on a cheap surrogate pi~, a first MH test on pi~ and
            the exact second test only for proposals that pass it (below);
* mh:       random walk x' = x + sqrt(2 lr) n with MH test.

MH kernels return the acceptance rate of each particle over the level's steps.

Delayed acceptance (da_hmc): the two-stage test of Christen & Fox 2005 (see Sherlock, Thiery & Golightly on its
efficiency), with HMC trajectories on the surrogate as in Rasmussen 2003. The surrogate keeps the prior factor of
pi and replaces the data term by its first-order expansion at a per-particle anchor a, the level's x0hat
(``Target.anchor``):

    log pi~(x) = -w L~(x) + log p(x),   L~(x) = L(a) + <grad L(a), x - a>,                        (DA0)

fixed for the whole level: a is known before the chain starts and does not depend on its state, so each step
below is reversible with respect to pi. One step from x draws p ~ N(0, I), runs hmc_mh's leapfrog on
H~(x, p) = -log pi~(x) + |p|^2 / 2 to (x', p'), and accepts x' with probability

    alpha_1 = min(1, exp(H~(x, p) - H~(x', p')))                                                  (DA1)
    alpha_2 = min(1, pi(x') pi~(x) / (pi(x) pi~(x')))
            = min(1, exp(-w [(L - L~)(x') - (L - L~)(x)]))                                          (DA2)

in turn, the second test only if the first passed. On (x, p) the leapfrog map followed by a momentum flip is a
volume-preserving involution, so DA1 is the MH test of pi~(x) N(p; 0, I) and DA2 the delayed-acceptance correction
[pi / pi~](x') over [pi / pi~](x) (the momenta cancel): alpha_1 alpha_2 satisfies detailed balance with respect to
pi(x) N(p; 0, I), and the kernel is exact however bad the surrogate is; a bad one costs acceptance, not bias.

Cost per level (L = leapfrog_steps, N = num_steps): da_hmc evaluates one exact gradient (at a), one exact loss
(at the chain's start) and, per step, one exact loss without gradient for the particles that passed DA1 only;
its trajectory needs only pi~'s gradient, -w grad L(a) plus the prior's (elementwise work on stored tensors for
the Gaussian prior solvers; with prior_solver=exact the model's score and log-density, cheap for the analytic
mixture). hmc_mh evaluates N L + 1 exact gradients. The operator (and the decoder of latent models) runs only
in those exact evaluations; for a batch the second stage evaluates only the rows that passed (``Target.loss_rows``
when the caller provides it), which costs one host synchronisation per step (which rows passed).

The first-order surrogate ignores the data term's curvature 2 w J^T J (J the Jacobian of A, through the decoder
for latent models). Where that curvature dominates the prior's 1 / r^2, as in DAPS with a small tau, DA1 passes
almost every trajectory and DA2 rejects any step longer than the conditional's narrowest std: on the mixture
level of docs/validation.md (table A) da_hmc needs a step 500 times smaller than hmc_mh. A Gauss-Newton surrogate
||A(a) + J (x - a) - y||^2 would keep that curvature, but its gradient needs a Jacobian-vector and a
vector-Jacobian product through A (and the decoder) at every leapfrog step, as much as an exact gradient, and
``Target`` only sees the scalar loss, not the residual A(x) - y it would linearise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from cores.noise import ParticleNoise, SharedNoise
from utils.config import check_keys
from utils.device import allow_sync, end_step, fused

log = logging.getLogger(__name__)
Noise = ParticleNoise | SharedNoise
PRIOR_SOLVERS = ("gaussian", "score-t", "score-min", "exact")
LIKELIHOODS = {"official": 1.0, "gaussian": 0.5}


@dataclass
class Target:
    """log pi(x) = -w L(x) - ||x - prior_mean||^2 / (2 r^2)  [+ log p_{s_min}(x) - ||x - x_t||^2 / (2 r^2) when exact].

    ``loss(x)`` is the per-particle ||A(x) - y||^2. For the exact solver, ``prior_score`` (and, for MH
    kernels, ``prior_log_prob``) of the model at sigma_min replace the Gaussian around prior_mean.
    ``tilt`` (cores/repulsion.py ``Tilt``) adds the repulsion's -gamma U_i(x) to the prior part, so MH tests and
    da_hmc's surrogate (which keeps the prior part exact) see it. ``anchor`` is the level's x0hat, where da_hmc
    linearises L (eq. DA0); ``loss_rows(x_rows, rows)``, when given,
    is the loss of the particles ``rows`` (a long tensor of batch indices) at their states ``x_rows``, so that
    da_hmc evaluates only the proposals that passed its first test (:meth:`loss_of`). ``gradient(x, with_loss)``, when
    given, returns (grad L(x), L(x)) in one call (the operator's closed form: ``Operator.gradient``) instead of
    autograd, with None for L(x) where ``with_loss`` is False and the operator can skip it.
    """

    loss: Callable[[torch.Tensor], torch.Tensor]
    data_weight: float
    r: float
    prior_mean: torch.Tensor
    prior_score: Callable[[torch.Tensor], torch.Tensor] | None = None
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None
    anchor: torch.Tensor | None = None
    loss_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    tilt: Any = None
    gradient: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def loss_grad(self, x: torch.Tensor, with_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(grad L(x), L(x)) per particle; L(x) may be None where ``with_loss`` is False (:attr:`gradient`)."""
        if self.gradient is not None:
            return self.gradient(x, with_loss=with_loss)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            loss = self.loss(xg)
            (g,) = torch.autograd.grad(loss.sum(), xg)
        return g, loss.detach()

    def grad(self, x: torch.Tensor, with_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(grad log pi(x), L(x)) per particle: :func:`gaussian_log_pi_grad`, plus the prior's score and the tilt's
        gradient where the target has them; ``with_loss=False``: L(x) may be None (:meth:`loss_grad`)."""
        g_loss, loss = self.loss_grad(x, with_loss)
        if x is self.prior_mean:  # a chain's start, where the Gaussian term is 0: -w grad L exactly, without a second
            # trace of the compiled function for x aliasing prior_mean
            g = -self.data_weight * g_loss
        else:
            g = fused(gaussian_log_pi_grad, x.device)(x, self.prior_mean, g_loss, 1.0 / self.r**2, self.data_weight)
        if self.prior_score is not None:
            g = g + self.prior_score(x)
        if self.tilt is not None:
            g = g + self.tilt.grad(x)
        return g, loss

    def loss_of(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """L of the particles ``rows`` of the batch ``x``, shape (len(rows),), without gradients: only those rows
        are evaluated when the target has ``loss_rows``, the whole batch otherwise."""
        with torch.no_grad():
            return self.loss(x)[rows] if self.loss_rows is None else self.loss_rows(x[rows], rows)

    def linearised(self) -> "Target":
        """da_hmc's surrogate pi~ (eq. DA0): L replaced by its first-order expansion at ``anchor`` (one exact
        gradient), the prior factor unchanged. Its ``loss`` is L~, whose gradient is the stored grad L(a)."""
        if self.anchor is None:
            raise ValueError("the surrogate needs the level's anchor x0hat (make_target sets it)")
        a = self.anchor
        g, loss_a = self.loss_grad(a)
        return replace(self, loss=lambda x: loss_a + ((x - a) * g).flatten(1).sum(1), loss_rows=None,
                       gradient=None)

    def _log_prob(self, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        logp = -self.data_weight * loss - (x - self.prior_mean).pow(2).flatten(1).sum(1) / (2 * self.r**2)
        if self.prior_score is not None:
            if self.prior_log_prob is None:
                raise ValueError("this kernel needs the prior's log-density, which the model does not provide")
            logp = logp + self.prior_log_prob(x)
        if self.tilt is not None:
            logp = logp + self.tilt.log_value(x)
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
    """A level's final states and losses per particle; MH kernels add each particle's acceptance rate, da_hmc also
    the rate at which its proposals passed the first (surrogate) test."""

    x: torch.Tensor
    loss: torch.Tensor
    acceptance: torch.Tensor | None = None
    stage1_acceptance: torch.Tensor | None = None


# The fused functions below take every scalar as a multiplier computed by the caller: with r * r and a division by it
# inside gaussian_log_pi_grad, torch 2.11's compile on CUDA held r as a constant, one compile per MCMC level inside
# the sampling clock (docs/benchmarks.md, "Eighth session"; tests/test_gpu.py counts the traces); the updates follow the
# same rule.


def gaussian_log_pi_grad(x: torch.Tensor, prior_mean: torch.Tensor, loss_grad: torch.Tensor, precision: float,
                         w: float) -> torch.Tensor:
    """grad log pi(x) = (prior_mean - x) / r^2 - w grad L(x), ``precision`` = 1 / r^2: the data term and the
    Gaussian around prior_mean (:class:`Target`), one kernel on CUDA (:func:`utils.device.fused`)."""
    return (prior_mean - x) * precision - w * loss_grad


def langevin_update(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, lr: float, noise_std: float) -> torch.Tensor:
    """One ULA step x + lr grad log pi + sqrt(2 lr) z, ``noise_std`` = sqrt(2 lr) (:class:`Langevin`), one kernel on
    CUDA."""
    return x + lr * g + noise_std * z


def damped_hmc_update(x: torch.Tensor, v: torch.Tensor, g: torch.Tensor, z: torch.Tensor, m: float, h: float,
                      noise_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the official damped 'hmc' (:class:`DampedHMC`): v' = m v + h grad log pi + sqrt(2 (1 - m)) z,
    x' = x + h v' with h = sqrt(lr) and ``noise_std`` = sqrt(2 (1 - m)); (x', v'), one kernel on CUDA."""
    v = m * v + h * g + noise_std * z
    return x + h * v, v


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).flatten(1).sum(1)


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _mh_accept(noise: Noise, log_alpha: torch.Tensor, state: tuple[torch.Tensor, ...],
               proposal: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Metropolis-Hastings test per particle: keep each proposal with probability min(1, exp(log_alpha)).

    Returns the new state (every per-particle tensor of ``state`` replaced where accepted) and the accept mask.
    """
    acc = _mh_test(noise, log_alpha)
    return tuple(torch.where(_bcast(acc, s), p, s) for s, p in zip(state, proposal, strict=True)), acc


def _mh_test(noise: Noise, log_alpha: torch.Tensor) -> torch.Tensor:
    """True with probability min(1, exp(log_alpha)) per particle (one uniform of each particle's stream)."""
    return noise.rand(log_alpha.dtype).log() < log_alpha


def _leapfrog(target: Target, state: tuple[torch.Tensor, ...], p: torch.Tensor, h: float, steps: int
              ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``steps`` leapfrog steps of size h (unit mass; Neal 2011) from ``state`` = (x, log pi, grad log pi, L)
    with momentum p: p += h/2 grad, then x += h p and p += h grad, the last momentum update a half step.

    Returns the end state (same layout) and log alpha = H(x, p) - H(x', p'), H = -log pi + |p|^2 / 2.
    """
    xn, logp, gn, _ = state
    pn = p + 0.5 * h * gn
    for i in range(steps):
        xn = xn + h * pn
        proposal = (xn, *target.log_prob_and_grad(xn))
        pn = pn + (h if i < steps - 1 else 0.5 * h) * proposal[2]
    return proposal, (-logp + 0.5 * _sqnorm(p)) - (-proposal[1] + 0.5 * _sqnorm(pn))


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
        update, noise_std = fused(langevin_update, x.device), math.sqrt(2 * lr)
        loss = None
        for i in range(self.num_steps):
            g, loss = target.grad(x, with_loss=i == self.num_steps - 1)  # the level reports the last step's loss
            x = update(x, g, noise.randn_like(x), lr, noise_std)
            end_step(x, loss)
        return KernelOutput(x, loss)


@dataclass
class DampedHMC(Kernel):
    """The official DAPS 'hmc': underdamped Langevin with momentum m, no Metropolis test."""

    name = "hmc"

    momentum: float = 0.9

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        update = fused(damped_hmc_update, x.device)
        h, noise_std = math.sqrt(lr), math.sqrt(2 * (1 - self.momentum))
        v = noise.randn_like(x)
        loss = None
        for i in range(self.num_steps):
            g, loss = target.grad(x, with_loss=i == self.num_steps - 1)  # the level reports the last step's loss
            x, v = update(x, v, g, noise.randn_like(x), self.momentum, h, noise_std)
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
            proposal, log_alpha = _leapfrog(target, state, noise.randn_like(x), h, self.leapfrog_steps)
            state, acc = _mh_accept(noise, log_alpha, state, proposal)
            accepted = accepted + acc.to(accepted.dtype)
            end_step(*state, accepted)
        return KernelOutput(state[0], state[3], accepted / self.num_steps)

    def grad_evals(self) -> int:
        return self.num_steps * self.leapfrog_steps + 1


@dataclass
class DelayedAcceptanceHMC(LeapfrogHMC):
    """Delayed-acceptance HMC (module docstring, eqs. DA0-DA2): hmc_mh's trajectory on the linearised surrogate,
    its MH test (DA1), then the exact test (DA2) for the proposals that passed, the only ones whose exact loss
    is evaluated."""

    name = "da_hmc"

    def run(self, target: Target, x: torch.Tensor, noise: Noise, lr: float) -> KernelOutput:
        h = math.sqrt(2 * lr)
        surrogate = target.linearised()
        with torch.no_grad():
            state = (x, *surrogate.log_prob_and_grad(x), target.loss(x))  # x, log pi~, grad log pi~, L~, L
        passed = torch.zeros_like(state[1])
        accepted = torch.zeros_like(state[1])
        for _ in range(self.num_steps):
            proposal, log_alpha = _leapfrog(surrogate, state[:4], noise.randn_like(x), h, self.leapfrog_steps)
            stage1 = _mh_test(noise, log_alpha)  # DA1
            with allow_sync():  # which rows pass decides which rows the exact loss evaluates
                rows = stage1.nonzero().squeeze(1)
            loss = state[4].clone()  # a placeholder where DA1 rejected: DA2 is not taken there
            if len(rows):
                loss[rows] = target.loss_of(proposal[0], rows)
            log_alpha2 = -target.data_weight * ((loss - proposal[3]) - (state[4] - state[3]))  # DA2
            state, acc = _mh_accept(noise, log_alpha2.masked_fill(~stage1, -math.inf), state, (*proposal, loss))
            passed = passed + stage1.to(passed.dtype)
            accepted = accepted + acc.to(accepted.dtype)
            end_step(*state, passed, accepted)
        return KernelOutput(state[0], state[4], accepted / self.num_steps, passed / self.num_steps)

    def grad_evals(self) -> int:
        """Exact gradients per level: one, at the anchor (the trajectory uses the surrogate's)."""
        return 1

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "surrogate": "data term linearised at x0hat (first order), prior exact",
                "max_loss_evals_per_level": self.num_steps + 1}


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


KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (Langevin, DampedHMC, MALA, LeapfrogHMC, DelayedAcceptanceHMC,
                                                         RandomWalkMH)}
KERNEL_ONLY_KEYS = {"momentum": ("hmc",), "leapfrog_steps": ("hmc_mh", "da_hmc")}


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
            if self.mc_algo in KERNEL_ONLY_KEYS[key]:
                kwargs[key] = value
            else:
                log.warning("mcmc_sampler_config.%s is used only by mc_algo=%s; ignored by %s",
                            key, " / ".join(KERNEL_ONLY_KEYS[key]), self.mc_algo)
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
                x0hat: torch.Tensor, sigma: float,
                loss_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, tilt: Any = None,
                gradient: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> Target:
    """The level's target pi for the configured prior solver (r = sigma_t, as the official DAPS), anchored at x0hat
    (da_hmc's linearisation point); ``loss_rows``, ``tilt`` (the repulsion) and ``gradient`` as in :class:`Target`."""
    w, r = cfg.data_weight, sigma
    extra = {"anchor": x0hat, "loss_rows": loss_rows, "tilt": tilt, "gradient": gradient}
    if cfg.prior_solver == "gaussian":
        return Target(loss, w, r, x0hat, **extra)
    with torch.no_grad():
        if cfg.prior_solver == "score-t":
            return Target(loss, w, r, denoiser.denoise(xt, sigma), **extra)
        if cfg.prior_solver == "score-min":
            return Target(loss, w, r, xt + r**2 * denoiser.score(x0hat, cfg.prior_sigma_min), **extra)
    s_min = cfg.prior_sigma_min

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return denoiser.score(x, s_min)

    log_prob = (lambda x: denoiser.log_prob(x, s_min)) if denoiser.has_log_prob else None
    return Target(loss, w, r, xt, score, log_prob, **extra)
