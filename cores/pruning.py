"""Pruning (the plan's Phase 2, Exp 2): at one level, keep the promising particles of each measurement and drop the
rest from memory; optionally refill by cloning the survivors (``branch``: the plan's "copy the good one", TDP's
child expansion).

**When**: at the first level with sigma <= the model's sigma at DDPM time ``step`` (on the 1000-step scale,
``Denoiser.sigma_at_time``), after that level's MCMC.

**Which** (the plan's diversity-aware rule), per measurement, from each particle's measurement loss L_i of the
level's result and the RMS distance (per coordinate, in image space: latents are decoded) d_ij between results:

1. the particle with the lowest loss is kept;
2. then, among the particles far from every kept one (d_ij > ``close``: a close pair keeps only its lower loss,
   local refinement) whose loss is within the tolerance of the best (L_i <= (1 + ``loss_tol``) L_best: a far pair
   keeps both, global exploration), one more is kept until ``keep`` are kept: the lowest loss (``order: loss``), or
   the one farthest from the kept ones (``order: distance``, the largest distance to its nearest kept particle: with
   twins of equal loss, the other mode rather than a second draw of the same one);
3. ``fill: true`` (default) tops up to ``keep`` with the lowest-loss particles left, so that every measurement
   goes on with exactly ``keep`` (Exp 2 vs Exp 3 compare equal particle counts); ``fill: false`` may keep fewer.

Dropped particles end with status ``pruned`` at that level; their x0hat there is kept for the results. With
``branch: true`` each measurement is refilled to its count before the prune by clones of its survivors, in loss
order, each with a fresh random stream derived from the particle it replaces (so a clone's draws are reproducible
and differ from its parent's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from utils.config import SubConfig


def choose(losses: Sequence[float], dist: Sequence[Sequence[float]], keep: int, close: float, loss_tol: float,
           fill: bool = True, order: str = "loss") -> list[int]:
    """The positions kept by the rule of the module docstring (non-finite losses are never kept), in loss order."""
    ranked = sorted((i for i, v in enumerate(losses) if math.isfinite(v)), key=lambda i: losses[i])
    if not ranked:
        return []
    kept = [ranked[0]]
    within = [i for i in ranked[1:] if losses[i] <= (1 + loss_tol) * losses[ranked[0]]]
    while len(kept) < keep:
        far = [i for i in within if i not in kept and all(dist[i][j] > close for j in kept)]
        if not far:
            break
        kept.append(far[0] if order == "loss" else max(far, key=lambda i: min(dist[i][j] for j in kept)))
    if fill:
        kept += [i for i in ranked if i not in kept][:keep - len(kept)]
    return sorted(kept, key=lambda i: losses[i])


@dataclass
class Pruning(SubConfig):
    """``sampler.pruning`` (``step`` -1: off)."""

    where = "sampler.pruning"

    step: float = -1
    keep: int = 2
    close: float = 0.1
    loss_tol: float = 0.5
    fill: bool = True
    branch: bool = False
    order: str = "loss"

    def validate(self) -> None:
        where = self.where
        if self.step != -1 and not 0 <= self.step <= 1000:
            raise ValueError(f"{where}.step (pruning_step) must be a DDPM time in [0, 1000] or -1 (off), got {self.step}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"{where}.keep must be an integer >= 1, got {self.keep!r}")
        if not self.close >= 0 or not self.loss_tol >= 0:
            raise ValueError(f"{where}.close and loss_tol must be >= 0, got {self.close}, {self.loss_tol}")
        if self.order not in ("loss", "distance"):
            raise ValueError(f"{where}.order must be loss or distance, got {self.order!r}")
        for key in ("fill", "branch"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{where}.{key} must be true or false, got {getattr(self, key)!r}")

    @property
    def on(self) -> bool:
        return self.step != -1
