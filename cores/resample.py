"""Hard data consistency (the plan's Phase 3, Exp 4; ReSample, Song et al., ICLR 2024, Algorithm 1 and eq. 9):
from DDPM time ``step`` on, after a level's MCMC, each particle's x (latent z, or pixels) is pulled onto its
measurement by AdamW, each particle on its own.

**Objective** per particle (``x_a``: the DAPS sample of the level, m measurement values, d state values)::

    J(x) = ||A(D(x)) - y||^2 / m  +  proximity * ||x - x_a||^2 / d

(ReSample's mean-squared measurement loss; the proximity term is the plan's "weak optimisation" and 0 by default;
``trust_radius`` instead projects x back onto the ball of RMS radius r around x_a after every step).

**Optimiser**: AdamW (Loshchilov & Hutter) with a step counter per particle, bias corrections per particle and
decoupled weight decay, as ``torch.optim.AdamW`` does for one tensor (tests/test_hard_dc.py checks that). Started at
the DAPS sample (``start: sample``, the plan's "current position") or at the level's x0hat (``start: x0hat``,
ReSample's unconditional x0 prediction).

**Stopping, per particle** (ReSample's two rules, which its official code applies to the mean over the batch): at
iteration i, before the update, the particle stops when J_i < ``tol`` (``stop: tol``; a particle already there takes 0
steps) or when J_i > J_{i - patience} (``stop: rise``); otherwise after ``max_iters`` updates (``stop: max``). A stopped
particle is frozen (state and moments); the others go on. Which particles are still active is read on the host every
:data:`CHECK_EVERY` iterations, and only those are computed; a particle's result does not depend on its batch.

**Result** (``iterate``): ``last``, the iterate where the particle stopped (ReSample's code), or ``best``, the iterate with
the lowest J seen (never worse than the start: AdamW's normalised steps of size ~lr jitter around a minimum, so
after a ``rise`` stop the last iterate can be worse than the DAPS sample it started from).

**Acceptance** (``accept``): ``always``; ``improved`` (only when ||A(x*) - y||^2 is below the DAPS sample's); ``never``
(a dry run: the optimisation is measured and recorded, the DAPS sample goes on).

**Map back** (``map_back``) to the next level sigma' (after the level sigma): ``continue`` goes on as DAPS does from
x0 = x*: x' = x* + sigma' n. ``resample`` is ReSample's stochastic resampling (eq. 9): with x_u = x_a + sigma' n_u
(what DAPS alone would go on from) it draws from the product of N(x*, sigma'^2) and N(x_u, g I), where g is ReSample's
variance 40 (1 - abar') / (1 - abar) (1 - abar / abar') written in the variance-exploding units of the loop
(abar = 1 / (1 + sigma^2)): g = c sigma'^2 (1 - sigma'^2 / sigma^2), c = ``resample_scale`` (40)::

    x' = (g x* + sigma'^2 x_u) / (g + sigma'^2) + sqrt(g sigma'^2 / (g + sigma'^2)) n.

After the last level there is no noise: both give x*. A next level not below this one (a K2 reheat) has g = 0, which
would discard x*: there the map back is ``continue``. Repulsion is off from ``step`` on (the plan's Phase 3).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from utils.config import SubConfig
from utils.device import index_tensor, synchronize, to_host

CHECK_EVERY = 10  # iterations between the host reads of the active set
BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's defaults (as ReSample uses them)
STOPS = ("tol", "rise", "max")
# ReSample's official settings: latent / pixel
DEFAULT_LR = {True: 5e-3, False: 1e-2}
DEFAULT_ITERS = {True: 500, False: 2000}


class DCResult(NamedTuple):
    """One level's optimisation: the optimised states and, per particle, the data loss ||A(x) - y||^2 before (the DAPS
    sample's) and after, the updates taken, the stopping rule (index into :data:`STOPS`), and the wall time of the
    batch's optimisation until the particle stopped (read at the host checks); ``sec``: the whole optimisation."""

    x: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    steps: torch.Tensor
    stop: torch.Tensor
    particle_sec: torch.Tensor
    sec: float


@dataclass
class HardDC(SubConfig):
    """``sampler.hard_dc`` (``step`` -1: off); the module docstring says what each key does."""

    where = "sampler.hard_dc"

    step: float = -1
    every: int = 1
    lr: float | None = None
    max_iters: int | None = None
    tol: float = 1e-6
    patience: int = 200
    weight_decay: float = 0.01
    start: str = "sample"
    proximity: float = 0.0
    trust_radius: float | None = None
    accept: str = "always"
    map_back: str = "resample"
    resample_scale: float = 40.0
    warm_start: bool = False
    iterate: str = "last"

    def validate(self) -> None:
        where = self.where
        if self.step != -1 and not 0 <= self.step <= 1000:
            raise ValueError(f"{where}.step (optimization_step) must be a DDPM time in [0, 1000] or -1 (off), "
                             f"got {self.step}")
        for key in ("every", "patience") + (("max_iters",) if self.max_iters is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "max_iters" else 1):
                raise ValueError(f"{where}.{key} must be an integer >= {0 if key == 'max_iters' else 1}, got {value!r}")
        if not self.resample_scale > 0:
            raise ValueError(f"{where}.resample_scale must be > 0 (0 would discard every optimisation), got "
                             f"{self.resample_scale!r}; map_back=continue uses the optimised state as it is")
        for key in ("tol", "weight_decay", "proximity") + (("lr",) if self.lr is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{where}.{key} must be a finite number >= 0, got {value!r}")
        if self.trust_radius is not None and not self.trust_radius > 0:
            raise ValueError(f"{where}.trust_radius must be null (none) or > 0, got {self.trust_radius!r}")
        for key, allowed in (("start", ("sample", "x0hat")), ("accept", ("always", "improved", "never")),
                             ("map_back", ("resample", "continue")), ("iterate", ("last", "best"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{where}.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"{where}.warm_start must be true or false, got {self.warm_start!r}")

    @property
    def on(self) -> bool:
        return self.step != -1

    def settings(self, latent: bool) -> dict[str, float | int]:
        """lr and max_iters, ReSample's per space where left null."""
        return {"lr": DEFAULT_LR[latent] if self.lr is None else self.lr,
                "max_iters": DEFAULT_ITERS[latent] if self.max_iters is None else self.max_iters}

    def due(self, step: int, first: int) -> bool:
        """Whether the level ``step`` optimises, ``first`` being the first level at or below the start time."""
        return (step - first) % self.every == 0

    def resample_variance(self, sigma: float, next_sigma: float) -> float:
        """ReSample's g in variance-exploding units, c sigma'^2 (1 - sigma'^2 / sigma^2) (module docstring)."""
        return self.resample_scale * next_sigma ** 2 * max(0.0, 1.0 - next_sigma ** 2 / sigma ** 2)

    def optimise(self, data_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                 anchor: torch.Tensor, measurements: int, latent: bool,
                 moments: dict[str, torch.Tensor] | None = None) -> DCResult:
        """Minimise J per particle (module docstring). ``data_loss(x_rows, rows)``: ||A(x) - y||^2 of the particles
        ``rows`` (a long tensor) at ``x_rows``; ``anchor``: the DAPS samples x_a (``x_start`` may be the same tensor);
        ``moments`` (``warm_start``): per-particle AdamW state {m, v, t} carried between levels, updated in place."""
        cfg = self.settings(latent)
        lr, iters, wd = cfg["lr"], cfg["max_iters"], self.weight_decay
        n, dev = x_start.shape[0], x_start.device
        x = x_start.detach().clone()
        m = moments["m"].clone() if moments else torch.zeros_like(x)
        v = moments["v"].clone() if moments else torch.zeros_like(x)
        t = moments["t"].clone() if moments else torch.zeros(n, device=dev, dtype=torch.float32)
        d = x[0].numel()
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        stop = torch.full((n,), -1, dtype=torch.long, device=dev)
        rows = index_tensor(list(range(n)), dev)
        before = None
        if x_start is not anchor:
            with torch.no_grad():
                before = data_loss(anchor, rows).detach()
        after = torch.zeros(n, device=dev, dtype=x.dtype)
        particle_sec = torch.zeros(n, dtype=torch.float64)
        history = torch.zeros(n, self.patience, device=dev, dtype=x.dtype)
        best = torch.full((n,), math.inf, device=dev, dtype=x.dtype) if self.iterate == "best" else None
        best_x = x.clone() if best is not None else None
        active = list(range(n))
        synchronize(dev)
        t0 = time.perf_counter()
        for i in range(iters + 1):
            if i % CHECK_EVERY == 0 and i:  # the host learns who is still active; only they are computed
                running = to_host(stop[rows] < 0)
                done = [r for r, go in zip(active, running) if not go]
                particle_sec[done] = time.perf_counter() - t0
                active = [r for r, go in zip(active, running) if go]
                if not active:
                    break
                if done:
                    rows = index_tensor(active, dev)
            xr = x[rows].requires_grad_(True)
            with torch.enable_grad():
                data = data_loss(xr, rows)
                objective = data / measurements + self.proximity * (xr - anchor[rows]).pow(2).flatten(1).sum(1) / d
                (grad,) = torch.autograd.grad(objective.sum(), xr)
            objective, data = objective.detach(), data.detach()
            if before is None:
                before = data.clone()
            live = stop[rows] < 0
            # stopping rules, before the update (ReSample): tolerance, a rise over `patience` iterations, the budget
            reason = torch.where(objective < self.tol, 0, -1)
            if i >= self.patience:
                reason = torch.where((reason < 0) & (objective > history[rows, i % self.patience]), 1, reason)
            if i == iters:
                reason = torch.where(reason < 0, 2, reason)
            newly = live & (reason >= 0)
            stop[rows] = torch.where(newly, reason, stop[rows])
            # the result so far: the current iterate (evaluated before its update), or the lowest J seen (best)
            take = live if best is None else live & (objective < best[rows])
            after[rows] = torch.where(take, data, after[rows])
            if best is not None:
                best[rows] = torch.where(take, objective, best[rows])
                best_x[rows] = torch.where(take.view(-1, *([1] * (x.dim() - 1))), xr.detach(), best_x[rows])
            history[rows, i % self.patience] = objective
            move = live & ~newly
            # AdamW (decoupled weight decay), per-particle step counts and bias corrections
            mk = move.view(-1, *([1] * (x.dim() - 1)))
            tr = t[rows] + move.to(t.dtype)
            mr = torch.where(mk, BETAS[0] * m[rows] + (1 - BETAS[0]) * grad, m[rows])
            vr = torch.where(mk, BETAS[1] * v[rows] + (1 - BETAS[1]) * grad * grad, v[rows])
            tb = tr.clamp_min(1).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            step_x = (mr / (1 - BETAS[0] ** tb)) / ((vr / (1 - BETAS[1] ** tb)).sqrt() + EPS)
            xn = xr.detach() * (1 - lr * wd) - lr * step_x
            if self.trust_radius is not None:
                off = xn - anchor[rows]
                rms = off.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-30).view(-1, *([1] * (x.dim() - 1)))
                xn = anchor[rows] + off * (self.trust_radius / rms).clamp(max=1.0)
            x[rows] = torch.where(mk, xn, xr.detach())
            m[rows], v[rows], t[rows] = mr, vr, tr
            steps[rows] += move.long()
        synchronize(dev)
        sec = time.perf_counter() - t0
        particle_sec[active] = sec
        if moments is not None:
            moments.update(m=m, v=v, t=t)
        if best_x is not None:
            x = best_x
        return DCResult(x, before, after, steps, stop, particle_sec, sec)

    def accepted(self, result: DCResult) -> torch.Tensor:
        """Per particle: whether its optimised state replaces the DAPS sample (``accept``)."""
        if self.accept == "always":
            return torch.ones_like(result.steps, dtype=torch.bool)
        if self.accept == "never":
            return torch.zeros_like(result.steps, dtype=torch.bool)
        return result.loss_after < result.loss_before

    def map_to(self, x0: torch.Tensor, x_daps: torch.Tensor, take: torch.Tensor, sigma: float,
               next_sigma: float | None, randn_like: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The state at the next level (module docstring, ``map_back``) from ``x0`` (x* where ``take``, else the DAPS
        sample ``x_daps``); after the last level (``next_sigma`` None) x0 itself. The dry run (``accept: never``)
        draws what DAPS alone draws, so its trajectory is DAPS's."""
        if next_sigma is None:
            return x0
        g, s2 = self.resample_variance(sigma, next_sigma), next_sigma ** 2
        if self.map_back == "continue" or self.accept == "never" or g == 0:  # g = 0: a level not below the last
            return x0 + next_sigma * randn_like(x0)
        view = take.view(-1, *([1] * (x0.dim() - 1)))
        x_u = x_daps + next_sigma * randn_like(x_daps)
        blended = (g * x0 + s2 * x_u) / (g + s2) + math.sqrt(g * s2 / (g + s2)) * randn_like(x_u)
        return torch.where(view, blended, x_u)

    def describe(self) -> dict:
        return {**super().describe(), "check_every": CHECK_EVERY}

