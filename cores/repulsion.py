"""Particle repulsion (particle guidance; the plan's Phase 1, Exp 1): the particles of one measurement push each
other apart early in the annealing, and the force decays to zero by a cut-off so the final phase is repulsion-free.

**The tilted target.** At a level, every particle i of measurement g gets its own target

    log pi_i(x) = log pi_k(x) - gamma(sigma) U_i(x),   U_i(x) = sum_{j != i, group(j) = g} exp(-||x - a_j||^2 / h_i),

with a_j the other particles' states at the level's start (x0hat, before the MCMC), frozen for the level: each
particle's update is conditioned on the others' state at the level's start. So pi_i is one fixed density for the
whole level and an MH kernel's test sees it exactly (``Target.log_prob`` adds -gamma U_i); unadjusted kernels follow
its gradient

    grad log pi_i(x) = grad log pi_k(x) + (2 gamma / h_i) sum_j exp(-||x - a_j||^2 / h_i) (x - a_j),

which points away from the others (the RBF kernel of particle guidance, Corso et al. 2023, and of SVGD's
repulsive term, Liu & Wang 2016). Particles of other measurements never enter (the sum runs over one group).

**Bandwidth** h_i: ``median``: median_j ||a_i - a_j||^2 / log(n - 1) over the n particles of the measurement (the
median rule of SVGD with n - 1 neighbours; for n = 2, where log 1 = 0, log 2 is used); or a fixed number.

**Strength** gamma(sigma) = ``scale`` w(s) (``units: absolute``) or, by default (``units: ratio``), per particle
gamma_i = ``scale`` w(s) ||data gradient_i|| / ||grad U_i|| at the level's start, so that ``scale`` is the ratio
||force|| / ||data gradient|| the user tunes by (the absolute scale that makes a force felt depends on the state's
dimension and the likelihood's weight: on the 32x32 prior an absolute 10 gives a ratio of about 1e-5); s = log(sigma_max / sigma) / log(sigma_max / sigma_off) in [0, 1] the
progress from the first level to the cut-off: w = 1 - s (``linear``), (1 + cos(pi s)) / 2 (``cosine``), 1
(``constant``); w = 0 below the cut-off sigma_off (``until_sigma`` when set, else ``until_t``, a DDPM time on the
1000-step scale converted with the model's own schedule, ``Denoiser.sigma_at_time``).

**Logged per level** (the level event's ``repulsion``): per measurement the mean and min pairwise distance of the
particles' results (RMS per coordinate), the median bandwidth, gamma, and ||force|| / ||data gradient|| (median over
particles, at the level's start: the ratio the user tuned by).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cores.pairwise import pairwise_sq, rms_distances, same_group_pairs
from utils.config import SubConfig

DECAYS = ("linear", "cosine", "constant")
UNITS = ("ratio", "absolute")


def median_bandwidth(anchors: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """h_i = median_j ||a_i - a_j||^2 / log(n - 1) over the particle's measurement (log 2 for n = 2); NaN alone."""
    pairs = same_group_pairs(group)
    d2 = pairwise_sq(anchors, anchors).masked_fill(~pairs, float("nan"))
    n = pairs.sum(1) + 1
    denom = torch.log((n - 1).clamp_min(2).to(anchors.dtype))
    return d2.nanmedian(1).values / denom


def repulsion_potential(x: torch.Tensor, anchors: torch.Tensor, group: torch.Tensor, h: torch.Tensor,
                        pairs: torch.Tensor | None = None) -> torch.Tensor:
    """U_i(x_i) = sum_{j != i, same measurement} exp(-||x_i - a_j||^2 / h_i) (module docstring); ``pairs``: the
    mask of :func:`same_group_pairs` when already built."""
    k = torch.exp(-pairwise_sq(x, anchors) / h[:, None])
    return (k * (same_group_pairs(group) if pairs is None else pairs)).sum(1)


def repulsion_grad(x: torch.Tensor, anchors: torch.Tensor, group: torch.Tensor, h: torch.Tensor,
                   pairs: torch.Tensor | None = None) -> torch.Tensor:
    """-grad U_i(x_i) = (2 / h_i) sum_j exp(-||x_i - a_j||^2 / h_i) (x_i - a_j): the repulsive direction per unit gamma."""
    k = torch.exp(-pairwise_sq(x, anchors) / h[:, None]) * (same_group_pairs(group) if pairs is None else pairs)
    xf, af = x.flatten(1), anchors.flatten(1)
    push = k.sum(1, keepdim=True) * xf - k @ af
    return (2 / h[:, None] * push).view_as(x)


@dataclass
class Repulsion(SubConfig):
    """``sampler.repulsion``: the force of the module docstring (``scale`` 0: off)."""

    where = "sampler.repulsion"

    scale: float = 0.0
    units: str = "ratio"
    bandwidth: Any = "median"
    decay: str = "linear"
    until_sigma: float | None = None
    until_t: float | None = 200.0

    def validate(self) -> None:
        where = self.where
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"{where}.scale (repulsion_scale) must be a number >= 0, got {self.scale!r}")
        if self.bandwidth != "median" and not (isinstance(self.bandwidth, (int, float)) and self.bandwidth > 0):
            raise ValueError(f"{where}.bandwidth must be 'median' or a positive number, got {self.bandwidth!r}")
        if self.units not in UNITS:
            raise ValueError(f"{where}.units must be one of {list(UNITS)}, got {self.units!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"{where}.decay must be one of {list(DECAYS)}, got {self.decay!r}")
        if self.until_sigma is None and self.until_t is None and self.on:
            raise ValueError(f"{where}: give a cut-off, until_sigma (a noise level, used when set) or until_t (a DDPM "
                             "time on the 1000-step scale): the final phase must be repulsion-free")
        if self.until_t is not None and not 0 < self.until_t <= 1000:
            raise ValueError(f"{where}.until_t must be a DDPM time in (0, 1000] (the final phase must be repulsion-"
                             f"free; t = 0 is no noise), got {self.until_t}")
        if self.until_sigma is not None and not self.until_sigma > 0:
            raise ValueError(f"{where}.until_sigma must be > 0, got {self.until_sigma}")

    @property
    def on(self) -> bool:
        return self.scale > 0

    def cutoff(self, denoiser: Any) -> float:
        """sigma_off: until_sigma, or the model's sigma at DDPM time until_t."""
        return float(self.until_sigma) if self.until_sigma is not None else denoiser.sigma_at_time(self.until_t)

    def strength(self, sigma: float, sigma_max: float, sigma_off: float) -> float:
        """gamma(sigma): scale times the decay weight; 0 below the cut-off."""
        if not self.on or sigma < sigma_off:
            return 0.0
        s = 0.0 if sigma_max <= sigma_off else min(1.0, math.log(sigma_max / sigma) / math.log(sigma_max / sigma_off))
        w = {"linear": 1 - s, "cosine": 0.5 * (1 + math.cos(math.pi * s)), "constant": 1.0}[self.decay]
        return self.scale * w

    def bandwidths(self, anchors: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        if self.bandwidth == "median":
            return median_bandwidth(anchors, group)
        return torch.full((len(group),), float(self.bandwidth), dtype=anchors.dtype, device=anchors.device)


@dataclass
class Tilt:
    """-gamma_i U_i of one level, for ``cores.mcmc.Target``: its value (added to log pi) and gradient per particle
    (``gamma``: a number, or one per particle)."""

    anchors: torch.Tensor
    group: torch.Tensor
    h: torch.Tensor
    gamma: float | torch.Tensor

    def __post_init__(self) -> None:
        self.pairs = same_group_pairs(self.group)  # built once per level, used at every MCMC step

    def _gamma(self, like: torch.Tensor) -> float | torch.Tensor:
        g = self.gamma
        return g.view(-1, *([1] * (like.dim() - 1))) if isinstance(g, torch.Tensor) else g

    def log_value(self, x: torch.Tensor) -> torch.Tensor:
        return -self.gamma * repulsion_potential(x, self.anchors, self.group, self.h, self.pairs)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self._gamma(x) * repulsion_grad(x, self.anchors, self.group, self.h, self.pairs)


def level_tilt(rule: "Repulsion", strength: float, anchors: torch.Tensor, group: torch.Tensor, loss: Any,
               data_weight: float) -> tuple[Tilt, torch.Tensor]:
    """The level's tilt and each particle's ||force|| / ||data gradient|| at the anchors (one more gradient of the
    data term). ``units: ratio``: gamma_i = strength ||data gradient_i|| / ||grad U_i||, so that the ratio is the
    decayed ``scale`` itself at the level's start (the knob the user tuned by); ``absolute``: gamma = strength."""
    h = rule.bandwidths(anchors, group)
    with torch.enable_grad():
        xg = anchors.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(xg).sum(), xg)
    data = (data_weight * g).flatten(1).norm(dim=1)
    unit = repulsion_grad(anchors, anchors, group, h).flatten(1).norm(dim=1)
    tiny = torch.finfo(data.dtype).tiny
    if rule.units == "ratio":
        gamma = torch.where(unit > 0, strength * data / unit.clamp_min(tiny), torch.zeros_like(unit))
    else:
        gamma = torch.full_like(unit, strength)
    return Tilt(anchors, group, h, gamma), gamma * unit / data.clamp_min(tiny)


def distance_stats(x: torch.Tensor, group: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per particle: mean and min RMS distance (per coordinate) to the other particles of its measurement."""
    pairs = same_group_pairs(group)
    d = rms_distances(x)
    mean = (d * pairs).sum(1) / pairs.sum(1).clamp_min(1)
    mins = d.masked_fill(~pairs, float("inf")).min(1).values
    return {"pair_dist_mean": mean, "pair_dist_min": mins}


def _median(values: list | None) -> float | None:
    finite = sorted(v for v in values or [] if math.isfinite(v))
    return finite[len(finite) // 2] if finite else None


def repulsion_report(host: dict[str, list | None], strength: float) -> dict[str, Any]:
    """The level event's ``repulsion`` from the level's host statistics: the decayed scale (``strength``), the median
    gamma, bandwidth and force ratio (upper median over particles), and per measurement (by its index in the batch)
    the mean and min pairwise distance of its particles."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(host["group"]):
        by_group.setdefault(int(g), []).append(i)
    per = {g: {"mean": sum(host["pair_dist_mean"][i] for i in rows) / len(rows),
               "min": min(host["pair_dist_min"][i] for i in rows)} for g, rows in by_group.items() if len(rows) > 1}
    return {"strength": strength, "gamma": _median(host.get("gamma")), "bandwidth": _median(host.get("bandwidth")),
            "force_ratio": _median(host.get("force_ratio")), "pair_dist": {str(g): v for g, v in per.items()}}
