"""K2-DAPS: the next annealing level by the conditional ESS (K2 experiment log, sections 2.2, 4, 14).

**Targets the weights belong to.** A DAPS level k samples (Zhang et al. 2025, eq. 9; cores/mcmc.py)

    pi_k(x_0) proportional to exp(-w ||A(x_0) - y||^2) exp(-gamma_k ||x_0 - m_k||^2 / 2),   gamma_k = 1 / sigma_k^2,

with m_k the level's Gaussian mean (x0hat for ``prior_solver: gaussian``; ``Target.prior_mean`` in general) and
r_k = sigma_k. The only factor that the noise level changes at a fixed mean is the Gaussian one, so K2 looks at
the tempered sequence pi_gamma (gamma increasing, m_k held fixed) and asks how far gamma may move from gamma_k
before the particles x_i that the MCMC left at pi_{gamma_k} stop representing pi_{gamma_k + dgamma}. The
incremental weight of particle i is the ratio of successive unnormalised targets at the particle
(Del Moral, Doucet & Jasra 2006, incremental weight of a tempering SMC sampler with an MCMC move that keeps
pi_{gamma_k}):

    w_i = pi_{gamma_k + dgamma}(x_i) / pi_{gamma_k}(x_i) = exp(-dgamma ||x_i - m_i||^2 / 2)        (exact)

(the normalising constants, (1 + dgamma / gamma_k)^(D/2), are one factor for all particles and cancel in the
CESS). What this ignores: at the next level m changes (a new PF-ODE from x_{k+1} = x0y + sigma_{k+1} n), and
DAPS never reweights or resamples its particles. The CESS here is therefore a step-size rule (how unequally the
next level's Gaussian factor would weigh the current particles), not the ESS of a valid SMC sampler.

**The log's normalisation** (section 2.2: "sum -> mean", then "r /= sigma^2 + 1e-8"): the statistic is

    r_i = mean_j (x_ij - m_ij)^2 / (sigma_k^2 + 1e-8),    log w_i = -delta r_i / 2,    delta = dgamma / gamma_k,

i.e. the exact log-weight with the sum over the D coordinates replaced by their mean (the per-coordinate
geometric-mean weight w_i^(1/D)), and dgamma measured relative to gamma_k (sigma_{k+1} = sigma_k / sqrt(1 + delta)).
The exact weights in D = 196,608 dimensions would allow only steps delta of order 1 / sqrt(D); with the mean,
target_cess binds only when the particles' normalised residuals r_i differ by order one, and otherwise the
max_step_factor cap decides (each level's event says which: ``capped``).

**CESS** (Zhou, Johansen & Aston 2016, the conditional ESS of an adaptive SMC sampler), as a fraction of N:

    CESS = (sum_i W_i w_i)^2 / sum_i W_i w_i^2,

with the particles' normalised weights W_i. DAPS carries no weights, so W_i = 1 / N within a measurement and
CESS reduces to the ESS of the incremental weights over N; it is 1 for equal w_i and 1/N for one dominant w_i,
and computed here in log space with log-sum-exp. For w_i = exp(-delta r_i / 2) the CESS does not increase with
delta (log CESS = 2 K(-delta/2) - K(-delta), K the cumulant generating function of r under W, which is convex),
so the largest delta with CESS >= target_cess is found by bisection.

**The schedule** (:class:`K2Schedule`). Each measurement (group of particles of one y) with at least two finite
particles proposes its own log-step u_g = log(sigma / sigma_g) = log(1 + delta_g) / 2 with delta_g capped at
max_step_factor^2 - 1 (sigma falls at most by max_step_factor per level). Then, in this order:

1. one sigma for the batch: the median of u_g over the measurements;
2. EMA smoothing of the log-step: u_bar = ema_alpha u_bar_prev + (1 - ema_alpha) u (0 = off; the first K2 level
   starts from its own u); it smooths the rate of descent, not sigma itself, which would lag;
3. floor: never slower than the preset, sigma_next <= the preset's level k+1;
4. lower bound: sigma_next >= min_sigma (or the preset's sigma_min when min_sigma is null), the threshold;
5. monotone clamp: sigma_next <= sigma (the lower bound can act only downwards from the current level);
6. early stop (``early_stop: true``): the level at the threshold is the last (``next`` returns None: no noise after
   it). Without it, K2 visits as many levels as the preset, staying at the threshold once there (log section 15);
7. reheating (``reheat``, off by default; cores/reheat.py): when its triggers fire, the next level is
   sigma * factor instead, at most the preset's level k+1, so 3. still holds and the clamp 5. is lifted for that
   level only (the ``reheat`` event says so; scripts/check_events.py accepts a rise only right after one).

K2 runs the preset for ``warm_steps`` levels first; it never visits more levels than the preset. The per-particle
numbers come from the level's one host transfer (:meth:`K2Schedule.level_stats`: ``x0_shift`` = mean_j (or sum_j)
(x0y_ij - m_ij)^2; sampler.py: ``group``, ``finite``); the rule runs on host floats.

``statistic: sum`` (not in the log) keeps the sum over the D coordinates, i.e. the exact incremental weight above;
then target_cess binds at small steps (of order 1 / sqrt(D) relative), where with ``mean`` max_step_factor decides.

**Batch invariance.** Step 1 makes one sigma sequence for the whole batch: a particle's result depends on the other
measurements in its batch (results record batch_size; ``DAPS.describe()`` says ``couples``). What still holds: the
particles interact only through the sigma sequence (given it, each particle is independent of its batch:
tests/test_k2.py replays a batch's sequence as a preset), and the median lets no single measurement move the
batch's sigma past the middle measurement's proposal.
"""
from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Sequence

import torch

from cores.reheat import Reheat
from cores.scheduler import PresetSchedule, Schedule
from cores.stein import imq_ksd_rows
from utils.config import check_keys

log = logging.getLogger(__name__)

K2_KEYS = ("name", "enabled", "target_cess", "max_step_factor", "ema_alpha", "min_sigma", "warm_steps", "early_stop",
           "statistic", "reheat")
STATISTICS = ("mean", "sum")  # over the coordinates of (x0y - m)^2: the log's normalisation, or the exact weight
DEFAULT_PARTICLES = 4  # num_samples: null with K2 on (the log's 4 runs, as one batch)
SIGMA_EPS = 1e-8  # the log's r /= sigma^2 + 1e-8
BISECTION_STEPS = 60


def log_sum_exp(values: Sequence[float]) -> float:
    """log sum_i exp(v_i), stable for large and -inf entries."""
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def incremental_log_weights(r: Sequence[float], delta: float) -> list[float]:
    """log w_i = -delta r_i / 2: the tempering weight of the module docstring for the relative step delta."""
    return [-0.5 * delta * ri for ri in r]


def cess(log_w: Sequence[float], log_W: Sequence[float] | None = None) -> float:
    """CESS / N = (sum_i W_i w_i)^2 / sum_i W_i w_i^2 (Zhou, Johansen & Aston 2016) from log-weights, in [1/N, 1].

    ``log_W``: the particles' normalised log-weights (sum_i W_i = 1); None for equal weights W_i = 1/N.
    """
    if log_W is None:
        log_W = [-math.log(len(log_w))] * len(log_w)
    num = 2 * log_sum_exp([a + b for a, b in zip(log_W, log_w, strict=True)])
    den = log_sum_exp([a + 2 * b for a, b in zip(log_W, log_w, strict=True)])
    return math.exp(num - den)


def cess_step(r: Sequence[float], target: float, max_delta: float) -> float:
    """The largest relative step delta in [0, max_delta] with CESS(delta) >= target, by bisection.

    CESS of w_i = exp(-delta r_i / 2) does not increase with delta (module docstring), so bisection on
    [0, max_delta] brackets the crossing; the returned end keeps CESS >= target.
    """
    if max_delta <= 0 or cess(incremental_log_weights(r, max_delta)) >= target:
        return max(max_delta, 0.0)
    lo, hi = 0.0, max_delta
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if cess(incremental_log_weights(r, mid)) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def normalised_residuals(stats: dict[str, list | None], sigma: float) -> dict[int, list[float]]:
    """r_i = x0_shift_i / (sigma^2 + 1e-8) of the finite particles, by measurement group (log section 2.2)."""
    groups: dict[int, list[float]] = {}
    for shift, group, ok in zip(stats["x0_shift"], stats["group"], stats["finite"], strict=True):
        r = shift / (sigma**2 + SIGMA_EPS)
        if ok and math.isfinite(r):
            groups.setdefault(int(group), []).append(r)
    return groups


def preset_position(levels: Sequence[float], sigma: float) -> float:
    """The fractional index of ``sigma`` on decreasing ``levels``: j at levels[j], linear in log sigma between
    levels, 0 above the first and len - 1 below the last."""
    if sigma >= levels[0]:
        return 0.0
    if sigma <= levels[-1]:
        return float(len(levels) - 1)
    j = max(i for i, s in enumerate(levels) if s >= sigma)
    if levels[j] == sigma:
        return float(j)
    return j + math.log(levels[j] / sigma) / math.log(levels[j] / levels[j + 1])


class K2Schedule(Schedule):
    """The preset's levels for ``warm_steps`` levels, then the CESS rule of the module docstring.

    State (the EMA of the log-step, whether the no-information warning was given, the last decision) lives for one
    ``sample()`` call and is reset by :meth:`start`; :meth:`state_dict` / :meth:`load_state_dict` carry it over a
    checkpoint.

    ``progress`` (the MCMC step-size decay) is sigma's position on the preset's levels over T - 1
    (:func:`preset_position`): a level gets the step size the preset would use at its noise level, so a faster
    schedule decays the step size by noise level, not by level count; on the preset's own levels it is the preset's
    step / (T - 1) exactly.

    :meth:`events` (written to events.jsonl as ``event: k2``, the records the log's diagnostics read): ``mode``
    (``warm``: a preset level of the warm-up; ``cess``: K2 chose ``next_sigma``; ``reheat``: the reheating rule raised
    it, with ``reheat_signals``; ``stop``: this level is the last, ``early_stop`` true when the threshold ended it
    rather than the preset's level count, with the ``threshold``), ``step``, ``sigma`` and ``sigma_used``,
    ``next_sigma`` (0 after the last level) and, for ``cess``: ``proposed`` (K2's sigma before floor and bounds), ``dgamma``
    (1/next_sigma^2 - 1/sigma^2), ``log_step`` (median over measurements of log(sigma / sigma_g)), ``ema`` (its
    smoothed value), ``cess`` (``groups``: each measurement's CESS for the step actually taken, by its index in the
    batch, null with fewer than 2 finite particles; ``median``), ``capped`` (measurements whose step hit
    max_step_factor), and whether the ``floor``, the ``min_sigma`` bound or the monotone ``clamp`` acted; then a
    ``mode: used`` record with ``sigma_used`` for every level, and an ``event: reheat`` with its ``trigger`` list.
    """

    couples = ("the whole batch: K2's batch median of the measurements' CESS proposals sets one sigma sequence "
               "for all particles, so a particle's result depends on the other measurements in its batch")

    def __init__(self, preset: PresetSchedule, target_cess: float = 0.90, max_step_factor: float = 3.0,
                 ema_alpha: float = 0.2, min_sigma: float | None = None, warm_steps: int = 10,
                 early_stop: bool = False, statistic: str = "mean", reheat: dict | None = None):
        if not 0 < target_cess <= 1:
            raise ValueError(f"k2_scheduler_config.target_cess must be in (0, 1], got {target_cess}")
        if not max_step_factor >= 1:
            raise ValueError(f"k2_scheduler_config.max_step_factor must be >= 1 (1: no faster than the preset), "
                             f"got {max_step_factor}")
        if not 0 <= ema_alpha < 1:
            raise ValueError(f"k2_scheduler_config.ema_alpha must be in [0, 1) (0: no smoothing), got {ema_alpha}")
        if min_sigma is not None and not 0 < min_sigma < preset.levels[0]:
            raise ValueError(f"k2_scheduler_config.min_sigma must be in (0, sigma_max={preset.levels[0]:g}) or null "
                             f"(the preset's sigma_min), got {min_sigma}")
        if isinstance(warm_steps, bool) or not isinstance(warm_steps, int) or warm_steps < 0:
            raise ValueError(f"k2_scheduler_config.warm_steps must be an integer >= 0, got {warm_steps!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"k2_scheduler_config.statistic must be one of {list(STATISTICS)} (mean: the log's "
                             f"normalisation; sum: the exact tempering weight), got {statistic!r}")
        if not isinstance(early_stop, bool):
            raise ValueError(f"k2_scheduler_config.early_stop must be true or false, got {early_stop!r}")
        self.preset, self.target_cess, self.max_step_factor = preset, float(target_cess), float(max_step_factor)
        self.ema_alpha, self.min_sigma, self.warm_steps, self.early_stop = float(ema_alpha), min_sigma, warm_steps, \
            early_stop
        self.threshold = float(min_sigma) if min_sigma is not None else preset.levels[-1]
        self.max_delta = self.max_step_factor**2 - 1
        self.statistic = statistic
        self.reheat = Reheat.from_config(reheat)
        self.start()

    def start(self) -> float:
        self.ema: float | None = None
        self.warned = False
        self.record: dict[str, Any] = {}
        self.reheated: dict[str, Any] | None = None
        self.reheat.start()
        return self.preset.start()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "warned": self.warned, "record": self.record, "reheated": self.reheated,
                "reheat": self.reheat.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.warned, self.record = state["ema"], state["warned"], dict(state["record"])
        self.reheated = state["reheated"]
        self.reheat.load_state_dict(state["reheat"])

    @property
    def needs_acceptance(self) -> bool:
        return self.reheat.needs_acceptance

    @property
    def default_particles(self) -> int:
        return DEFAULT_PARTICLES

    def level_stats(self, target: Any, x: torch.Tensor, group: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x0_shift``: the mean (or sum) over coordinates of (x0y - m)^2, m the level's Gaussian mean (the factor K2
        weighs); ``ksd``: each particle's row of the IMQ KSD^2 of the level's target (cores/stein.py), for the
        reheating rule's plateau trigger (one more gradient of the target per level; only when that trigger is on)."""
        sq = (x - target.prior_mean).pow(2).flatten(1)
        out = {"x0_shift": sq.mean(1) if self.statistic == "mean" else sq.sum(1)}
        if self.reheat.needs_ksd:
            score, _ = target.grad(x)
            out["ksd"] = imq_ksd_rows(x, score, group, self.reheat.imq_c, self.reheat.imq_beta)
        return out

    def check_particles(self, per_measurement: int) -> None:
        """K2 needs 2 particles of one measurement, unless max_step_factor = 1 makes it the preset (the log's no-op)."""
        if per_measurement < 2 and self.max_delta > 0:
            raise ValueError("K2-DAPS needs at least 2 particles of one measurement to measure a CESS (with one, "
                             "CESS is 1 at every step and K2 would take max_step_factor steps blindly): set "
                             "num_samples >= 2 (or max_step_factor=1: the preset)")

    def next(self, step: int, sigma: float, stats: dict[str, list]) -> float | None:
        preset_next = self.preset.next(step, sigma, stats)
        self.reheated = None
        if step < self.warm_steps:
            self.record = {"mode": "warm", "step": step, "sigma": sigma, "sigma_used": sigma,
                           "next_sigma": preset_next or 0.0}
            return preset_next
        if preset_next is None or (self.early_stop and sigma <= self.threshold):
            self.record = {"mode": "stop", "step": step, "sigma": sigma, "sigma_used": sigma, "next_sigma": 0.0,
                           "early_stop": preset_next is not None, "threshold": self.threshold}
            return None
        groups = normalised_residuals(stats, sigma)
        deltas = {g: cess_step(r, self.target_cess, self.max_delta) for g, r in groups.items() if len(r) >= 2}
        if deltas:  # 1. the batch's log-step: median over measurements; 2. its EMA
            u = statistics.median(0.5 * math.log1p(d) for d in deltas.values())
            self.ema = u if self.ema is None else self.ema_alpha * self.ema + (1 - self.ema_alpha) * u
            proposed = sigma * math.exp(-self.ema)
        else:  # every measurement is down to one finite particle: no CESS, the preset's step
            u, proposed = None, sigma
            if not self.warned:
                log.warning("K2: no measurement has 2 finite particles at level %d: the preset decides from here", step)
                self.warned = True
        floored = min(proposed, preset_next)        # 3. never slower than the preset
        bounded = max(floored, self.threshold)      # 4. not below the threshold
        out = min(bounded, sigma)                   # 5. never above the current level
        taken = (sigma / out) ** 2 - 1
        per_group = [None] * (1 + max(groups, default=-1))
        for g, r in groups.items():
            if len(r) >= 2:
                per_group[g] = cess(incremental_log_weights(r, taken))
        known = [c for c in per_group if c is not None]
        cess_median = statistics.median(known) if known else None
        self.record = {"mode": "cess", "step": step, "sigma": sigma, "sigma_used": sigma, "proposed": proposed,
                       "next_sigma": out, "dgamma": 1 / out**2 - 1 / sigma**2, "log_step": u, "ema": self.ema,
                       "cess": {"groups": per_group, "median": cess_median},
                       "capped": sum(d >= self.max_delta for d in deltas.values()), "floor": floored < proposed,
                       "min_sigma": bounded > floored, "clamp": out < bounded}
        return self._maybe_reheat(step, sigma, out, preset_next, stats, cess_median)

    def _maybe_reheat(self, step: int, sigma: float, out: float, preset_next: float, stats: dict[str, list],
                      cess_median: float | None) -> float:
        """The reheating rule (cores/reheat.py) after K2's decision ``out``: sigma * factor, at most the preset's next
        level, when its triggers fire."""
        if not self.reheat.enabled:
            return out
        signals = self.reheat.signals(stats, cess_median)
        self.record["reheat_signals"] = signals
        if not self.reheat.decide(signals):
            return out
        raised = self.reheat.apply(sigma, preset_next)
        if raised is None:
            self.record["reheat_skipped"] = "no levels saved: the preset's next level is not above sigma"
            return out
        self.record.update(mode="reheat", next_sigma=raised, dgamma=1 / raised**2 - 1 / sigma**2)
        self.reheated = {"event": "reheat", "step": step, "sigma": sigma, "next_sigma": raised,
                         "trigger": signals["fired"], "reheats": self.reheat.count, "k2_next_sigma": out,
                         **{k: v for k, v in signals.items() if k != "fired"}}
        return raised

    def events(self) -> list[dict[str, Any]]:
        """The log's diagnostics records of the last level (K2 experiment log, sections 2.1, 2.2, 6): its decision
        (``mode`` warm / cess / reheat / stop), ``mode: used`` with ``sigma_used``, and a ``reheat`` event."""
        used = {"event": "k2", "mode": "used", "step": self.record["step"], "sigma_used": self.record["sigma_used"]}
        return [{"event": "k2", **self.record}, used] + ([self.reheated] if self.reheated else [])

    def progress(self, step: int, sigma: float) -> float:
        levels = self.preset.levels
        return preset_position(levels, sigma) / (len(levels) - 1) if len(levels) > 1 else 0.0

    @property
    def planned_levels(self) -> int:
        return self.preset.planned_levels

    def describe(self) -> dict:
        """The preset's description (anneal_steps: the most levels K2 visits) with K2's settings."""
        return {**self.preset.describe(), "name": "k2", "target_cess": self.target_cess,
                "max_step_factor": self.max_step_factor, "ema_alpha": self.ema_alpha, "min_sigma": self.min_sigma,
                "statistic": self.statistic,
                "threshold": self.threshold, "warm_steps": self.warm_steps, "early_stop": self.early_stop,
                "reheat": self.reheat.describe(), "progress": "sigma's position on the preset's levels"}


def k2_settings(cfg: dict | None) -> dict | None:
    """``sampler.k2_scheduler_config`` as K2Schedule's keyword arguments, or None when K2 is off (null, or
    ``enabled: false``). Unknown keys fail even when off, naming the nearest valid key."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    check_keys(cfg, K2_KEYS, "sampler.k2_scheduler_config")
    enabled = cfg.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"sampler.k2_scheduler_config.enabled must be true or false, got {enabled!r}")
    name = cfg.pop("name", "k2")
    if not enabled:
        return None
    if name != "k2":
        raise ValueError(f"sampler.k2_scheduler_config.name must be 'k2' (the CESS rule), got {name!r}")
    return cfg
