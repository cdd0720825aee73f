"""K2 reheating (K2 experiment log, section 8: phase 3): raise sigma again when the particles stop improving.

After each K2 level (not during the warm-up) :class:`Reheat` looks at three signals of the level, each a trigger the
user can switch on (``triggers``) with its threshold:

* ``ksd_plateau``: the batch's kernel Stein discrepancy (median over measurements of KSD^2 of the level's target,
  IMQ kernel, cores/stein.py) decreased by less than ``ksd_tol`` (relative) over the last ``ksd_window`` levels;
* ``low_acceptance``: the median MH acceptance of the level's particles is below ``min_acceptance`` (MH kernels
  only: mala, hmc_mh, mh, da_hmc; the sampler refuses this trigger with a kernel that has no MH test);
* ``low_cess``: the median CESS of the step K2 is about to take is below ``min_cess`` (the floor forced a step
  the particles' weights do not support).

It reheats when ``require`` of the switched-on triggers fire (``any`` or ``all``): the next level is
sigma * ``factor`` instead of K2's proposal, bounded by the preset's next level so that K2 stays never slower
than the preset and never visits more levels (a reheat spends levels K2 saved earlier; with none saved it is
recorded as skipped). At most ``max_reheats`` per ``sample()`` call; the KSD history restarts after each reheat,
which also spaces reheats by at least ``ksd_window`` levels when the plateau trigger is on.

Cost: the KSD needs each particle's score of the level's target at its final state, one more gradient of the data
term per level (the MCMC makes ``num_steps`` of them), plus O(N^2 D) for the Gram matrices; it is computed only when
``ksd_plateau`` is switched on.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from utils.config import SubConfig

TRIGGERS = ("ksd_plateau", "low_acceptance", "low_cess")


@dataclass
class Reheat(SubConfig):
    """The reheating rule of the module docstring (``sampler.k2_scheduler_config.reheat``)."""

    where = "sampler.k2_scheduler_config.reheat"

    enabled: bool = False
    triggers: list[str] = field(default_factory=lambda: list(TRIGGERS))
    require: str = "any"
    factor: float = 2.0
    max_reheats: int = 2
    ksd_window: int = 5
    ksd_tol: float = 0.05
    min_acceptance: float = 0.3
    min_cess: float = 0.5
    imq_c: float = 1.0
    imq_beta: float = -0.5

    def __post_init__(self) -> None:
        self.triggers = list(self.triggers)  # an OmegaConf ListConfig from the command line
        self.start()

    def validate(self) -> None:
        where = self.where
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{where}.enabled must be true or false, got {self.enabled!r}")
        unknown = [t for t in self.triggers if t not in TRIGGERS]
        if unknown or (self.enabled and not self.triggers):
            raise ValueError(f"{where}.triggers must be a non-empty list of {list(TRIGGERS)}, got {self.triggers}")
        if self.require not in ("any", "all"):
            raise ValueError(f"{where}.require must be 'any' or 'all' (of the triggers), got {self.require!r}")
        if not self.factor > 1:
            raise ValueError(f"{where}.factor must be > 1 (sigma is multiplied by it), got {self.factor}")
        if isinstance(self.max_reheats, bool) or not isinstance(self.max_reheats, int) or self.max_reheats < 0:
            raise ValueError(f"{where}.max_reheats must be an integer >= 0, got {self.max_reheats!r}")
        if isinstance(self.ksd_window, bool) or not isinstance(self.ksd_window, int) or self.ksd_window < 1:
            raise ValueError(f"{where}.ksd_window must be an integer >= 1, got {self.ksd_window!r}")
        for key in ("ksd_tol", "min_acceptance", "min_cess"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{where}.{key} must be in [0, 1], got {getattr(self, key)}")

    @property
    def needs_ksd(self) -> bool:
        return self.enabled and "ksd_plateau" in self.triggers

    @property
    def needs_acceptance(self) -> bool:
        return self.enabled and "low_acceptance" in self.triggers

    def start(self) -> None:
        self.count, self.ksd_history = 0, []

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ksd_history": list(self.ksd_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.ksd_history = state["count"], list(state["ksd_history"])

    def signals(self, stats: dict[str, list | None], cess_median: float | None) -> dict[str, Any]:
        """The level's signals and which triggers fire (a signal that could not be measured does not fire)."""
        fired, out = [], {}
        if self.needs_ksd:
            by_group: dict[int, list[float]] = {}
            for row, g, ok in zip(stats["ksd"], stats["group"], stats["finite"], strict=True):
                by_group.setdefault(int(g), []).append(row if ok else math.nan)
            ksd = [statistics.fmean(rows) for rows in by_group.values() if all(map(math.isfinite, rows))]
            out["ksd"] = statistics.median(ksd) if ksd else None
            if out["ksd"] is not None:
                self.ksd_history.append(out["ksd"])
            w = self.ksd_window
            if len(self.ksd_history) > w:
                old, new = self.ksd_history[-1 - w], self.ksd_history[-1]
                out["ksd_decrease"] = (old - new) / abs(old) if old else 0.0
                if out["ksd_decrease"] < self.ksd_tol:
                    fired.append("ksd_plateau")
        if self.needs_acceptance:
            acc = [a for a, ok in zip(stats["acceptance"] or [], stats["finite"]) if ok and math.isfinite(a)]
            out["acceptance"] = statistics.median(acc) if acc else None
            if acc and out["acceptance"] < self.min_acceptance:
                fired.append("low_acceptance")
        if self.enabled and "low_cess" in self.triggers:
            out["cess"] = cess_median
            if cess_median is not None and cess_median < self.min_cess:
                fired.append("low_cess")
        out["fired"] = fired
        return out

    def decide(self, signals: dict[str, Any]) -> bool:
        """Whether the fired triggers call for a reheat (``require``), within ``max_reheats``."""
        fired = signals["fired"]
        wanted = bool(fired) if self.require == "any" else set(fired) == set(self.triggers)
        return self.enabled and wanted and self.count < self.max_reheats

    def apply(self, sigma: float, bound: float) -> float | None:
        """The reheated level: sigma * factor, at most ``bound`` (the preset's next level); None when that is not
        above sigma (no levels saved to spend). Counts the reheat and restarts the KSD history."""
        raised = min(sigma * self.factor, bound)
        if raised <= sigma:
            return None
        self.count += 1
        self.ksd_history = []
        return raised
