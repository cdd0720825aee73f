"""K2-DAPS against the preset schedule on the exact Gaussian-mixture posteriors (issue 11).

The problems, exact posteriors, error measures and Monte Carlo floor are those of cores/exact.py, and the DAPS
sampler is the one of scripts/validate_posterior.py's table B (EDM levels sigma 20 -> 0.02, 5 Euler ODE steps,
``prior_solver: exact``, the first-level step DAPS_LR decaying to 2 % of it, ``--level-budget`` gradient
evaluations per level). For each problem and each of ``--runs`` noise seeds (particles' start and MCMC noise; the
problem itself is fixed by ``--seed``), the rows are:

* ``preset T``: the preset at its level count T (``--levels``);
* ``K2 <profile>``: K2Schedule on that preset, ``early_stop: true``, ``ema_alpha`` 0.2, ``min_sigma`` null (the
  preset's sigma_min, so that K2 ends where the preset ends), ``warm_steps`` = max(1, round(T / 20)) (the log's 10
  of 200 levels), and the log's profiles: quality (target_cess 0.95, max_step_factor 2) and speed (0.90, 3);
* ``preset at K2's count``: the preset with as many levels as that K2 run used (per seed), the same-cost run;
* ``exact draws``: the floor (errors of as many exact samples, cores/exact.py's ``floor``).

The problems are inpainting and dense; ``separated`` (``--problems``) is left out by default: no local kernel
reweights its far-apart modes (docs/validation.md, table B: modes TV 0.39-0.40 with every kernel), so its errors
would not measure the schedule.

Measurements. cores/exact.py has one measurement y per problem. K2 takes the median over measurements of each
measurement's CESS proposal, so K2 is run with the particles split into ``--measurements`` equal groups, each
group a copy of the one y (``1``: one measurement with all particles; ``250`` of 1000 particles: 4 particles per
measurement, as in the log's runs). All groups have the same exact posterior, so the errors are over all particles;
the split changes only K2's decisions (the preset ignores it).

Errors (cores/exact.py ``errors``; docs/validation.md): mean = ||m_hat - m|| / sqrt(tr C),
cov = ||C_hat - C||_F / ||C||_F, modes = total variation of the fractions of samples per posterior component
against exact samples; each cell is the mean +- standard deviation over the runs. Network evaluations are the
sampler's count (SampleResult.network_evals: batched denoiser and score calls; the exact prior's log-density of
the MH test is not a network call).

K2's decisions (second table, per run on average, from its ``k2`` events). Each K2 level is one of: ``warm`` (a
preset level of the warm-up), ``cess`` (target_cess set the median measurement's step), ``cap`` (the median
measurement's step hit max_step_factor), ``floor`` (the preset's next level was lower: never slower than the
preset), ``bound`` (the min_sigma threshold stopped the descent), ``stop`` (the last level, at the threshold).
``meas. capped``: the share of measurement proposals that hit the cap; ``CESS``: the median over measurements of
the CESS of the step actually taken, averaged over the cess/cap levels.

    python scripts/k2_exact_table.py [--particles 1000] [--runs 4] [--measurements 1 250]   (docs/k2_exact.md)
    python scripts/k2_exact_table.py --quick    (a few seconds: the size tests/test_k2_exact.py runs)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.exact import NOISE, SHAPE, Problem, errors, floor, make_problem, mcmc_dict, reference_freq  # noqa: E402
from cores.k2 import K2Schedule  # noqa: E402
from cores.noise import SharedNoise  # noqa: E402
from sampler import DAPS, SampleResult  # noqa: E402
from scripts.validate_posterior import DAPS_LR, daps_sampler  # noqa: E402

PROFILES = {"quality": {"target_cess": 0.95, "max_step_factor": 2.0},  # the log's profiles (section 14)
            "speed": {"target_cess": 0.90, "max_step_factor": 3.0}}
EMA_ALPHA = 0.2
LR_MIN_RATIO = 0.02  # as table B of validate_posterior.py
METRICS = ("mean", "cov", "modes")
DECISIONS = ("warm", "cess", "cap", "floor", "bound", "stop")
FULL = {"problems": ["inpainting", "dense"], "particles": 1000, "levels": 40, "level_budget": 200, "runs": 4,
        "measurements": [1, 250], "kernel": "hmc_mh", "seed": 0}
QUICK = {**FULL, "problems": ["inpainting"], "particles": 16, "levels": 20, "level_budget": 5, "runs": 2,
         "measurements": [1, 4]}


def warm_steps(levels: int) -> int:
    """The log's warm-up, 10 of 200 levels, scaled to ``levels`` (at least one preset level)."""
    return max(1, round(levels / 20))


def k2_sampler(preset: DAPS, profile: str, levels: int) -> DAPS:
    """``preset``'s sampler with K2 on its schedule (the settings of the module docstring)."""
    schedule = K2Schedule(preset.schedule, **PROFILES[profile], ema_alpha=EMA_ALPHA, min_sigma=None,
                          warm_steps=warm_steps(levels), early_stop=True)
    return DAPS(schedule, preset.ode, preset.kernel, preset.target)


def run(p: Problem, sampler: DAPS, n: int, measurements: int, seed: int,
        callback: Callable[[dict], Any] | None = None) -> SampleResult:
    """n particles of ``p`` in ``measurements`` equal groups, each a copy of p's one measurement."""
    if n % measurements or n // measurements < 2:
        raise ValueError(f"{n} particles do not split into {measurements} measurements of >= 2 particles each")
    noise = SharedNoise(seed + 11, n)
    group = [k * measurements // n for k in range(n)]
    ys = p.y.expand(n, *p.y.shape[1:])
    return sampler.sample(p.prior, p.operator, sampler.particles(ys, noise, SHAPE, torch.device("cpu"), group),
                          callback)


def decision(record: dict, max_step_factor: float) -> str:
    """What set the next level of one K2 decision record (categories: module docstring)."""
    if record["mode"] != "cess":
        return record["mode"]
    if record["min_sigma"]:
        return "bound"
    if record["floor"]:
        return "floor"
    return "cap" if record["log_step"] >= math.log(max_step_factor) - 1e-12 else "cess"


def decisions(events: list[dict], max_step_factor: float) -> dict[str, float]:
    """Counts of :func:`decision` over one K2 run's decision records (its ``k2`` events but the ``used`` ones), the
    share of measurement proposals capped and the mean over the cess/cap levels of the median CESS of the step taken."""
    records = [e for e in events if e["event"] == "k2" and e["mode"] != "used"]
    kinds = [decision(r, max_step_factor) for r in records]
    counts: dict[str, float] = {k: kinds.count(k) for k in DECISIONS}
    steps = [r for r, k in zip(records, kinds) if k in ("cess", "cap")]
    known = sum(sum(c is not None for c in r["cess"]["groups"]) for r in steps)
    counts["capped_share"] = sum(r["capped"] for r in steps) / known if known else math.nan
    counts["cess_median"] = statistics.fmean(r["cess"]["median"] for r in steps) if steps else math.nan
    return counts


def scored(res: SampleResult, p: Problem, ref: torch.Tensor) -> dict[str, float]:
    return {"levels": res.used_levels, "network_evals": res.network_evals, **errors(res.x, p.exact, ref)}


def problem_rows(kind: str, particles: int, levels: int, level_budget: int, runs: int, measurements: Sequence[int],
                 kernel: str, seed: int) -> list[dict]:
    """The rows of one problem: each a dict of per-run lists (``runs`` entries) under its label."""
    p = make_problem(kind, seed)
    ref = reference_freq(p.exact, seed)
    mc = mcmc_dict(kernel, DAPS_LR, level_budget, "exact", NOISE, LR_MIN_RATIO)
    preset = daps_sampler(mc, levels)
    rows: dict[tuple[str, str], list[dict]] = {("preset T", "-"): []}
    for r in range(runs):
        rows[("preset T", "-")].append(scored(run(p, preset, particles, 1, seed + r), p, ref))
        for profile in PROFILES:
            for m in measurements:
                events: list[dict] = []
                k2 = run(p, k2_sampler(preset, profile, levels), particles, m, seed + r, events.append)
                same = run(p, daps_sampler(mc, k2.used_levels), particles, 1, seed + r)
                rows.setdefault((f"K2 {profile}", str(m)), []).append(
                    {**scored(k2, p, ref), **decisions(events, PROFILES[profile]["max_step_factor"])})
                rows.setdefault((f"preset at K2 {profile}'s count", str(m)), []).append(scored(same, p, ref))
    out = [{"problem": kind, "schedule": s, "measurements": m, **{k: [d[k] for d in ds] for k in ds[0]}}
           for (s, m), ds in rows.items()]
    fl = floor(p.exact, ref, particles, seed)
    out.append({"problem": kind, "schedule": "exact draws", "measurements": "-", "levels": [], "network_evals": [],
                **{k: [fl[k]] for k in METRICS}})
    return out


def spread(values: list[float]) -> str:
    """mean +- standard deviation over runs (the mean alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def count(values: list[int]) -> str:
    """A per-run count: the value when the runs agree, else its range."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def markdown(rows: list[dict], cfg: dict) -> str:
    """The two tables (errors; K2's decisions) of the module docstring."""
    lines = [f"Errors vs the exact p(x0|y): {cfg['particles']} particles, kernel {cfg['kernel']}, "
             f"{cfg['level_budget']} gradient evaluations per level, preset T = {cfg['levels']} (EDM 20 -> 0.02), "
             f"K2 warm_steps {warm_steps(cfg['levels'])}; mean ± std over {cfg['runs']} runs (noise seeds "
             f"{cfg['seed']}..{cfg['seed'] + cfg['runs'] - 1}); measurements: copies of the one y the particles are "
             f"split into (K2 only)", "",
             "| problem | schedule | measurements | levels | network evals | mean err | cov err | modes TV |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['problem']} | {r['schedule']} | {r['measurements']} | {count(r['levels'])} | "
              f"{count(r['network_evals'])} | " + " | ".join(spread(r[k]) for k in METRICS) + " |" for r in rows]
    lines += ["", "K2's decisions per level (mean per run): what set each next level", "",
              "| problem | schedule | measurements | levels | " + " | ".join(DECISIONS) + " | meas. capped | CESS |",
              "|---|---|---|---|" + "---|" * (len(DECISIONS) + 2)]
    lines += [f"| {r['problem']} | {r['schedule']} | {r['measurements']} | {count(r['levels'])} | "
              + " | ".join(f"{statistics.fmean(r[k]):.1f}" for k in DECISIONS)
              + f" | {statistics.fmean(r['capped_share']):.2f} | {statistics.fmean(r['cess_median']):.3f} |"
              for r in rows if "cess" in r]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Print the tables; returns their rows (per-run lists) for tests."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"the test's size, ignoring the other options: {QUICK}")
    ap.add_argument("--problems", nargs="+", choices=["inpainting", "dense", "separated"], default=FULL["problems"])
    ap.add_argument("--particles", type=int, default=FULL["particles"])
    ap.add_argument("--levels", type=int, default=FULL["levels"], help="the preset's level count T")
    ap.add_argument("--level-budget", type=int, default=FULL["level_budget"], help="gradient evaluations per level")
    ap.add_argument("--runs", type=int, default=FULL["runs"], help="noise seeds seed, seed + 1, ...")
    ap.add_argument("--measurements", type=int, nargs="+", default=FULL["measurements"],
                    help="K2 runs: the particles split into this many copies of the measurement")
    ap.add_argument("--kernel", choices=["mala", "hmc_mh"], default=FULL["kernel"])
    ap.add_argument("--seed", type=int, default=FULL["seed"], help="the problem's seed and the first noise seed")
    args = vars(ap.parse_args(argv))
    cfg = QUICK if args.pop("quick") else args
    rows = [row for kind in cfg["problems"] for row in problem_rows(kind, **{k: v for k, v in cfg.items()
                                                                            if k != "problems"})]
    print(markdown(rows, cfg))
    return rows


if __name__ == "__main__":
    main()
