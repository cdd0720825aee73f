"""Repulsion against independent particles on exact twin-mode Gaussian-mixture posteriors (issue 12, Exp 1).

The problems (cores/exact.py ``make_twin_linear_problem``): a dense 8 x 16 Gaussian operator A (noise 0.2) and a
Gaussian-mixture prior on 4x4 images whose components differ only by offsets in the null space of A, so that no
measurement can tell them apart (the linear analogue of phase retrieval's image and its 180-degree twin). For every
measurement y the exact posterior (cores/gmm.py ``linear_posterior``) has the prior's weights and components that
are shifted copies of one Gaussian, well separated (``--separation`` 4 = 8 prior stds):

* ``twins 1:1``: two twins, weights 0.5 / 0.5;
* ``twins 4:1``: two twins, weights 0.8 / 0.2 (unequal: here a force that splits the particles must bias the
  weights, since equal weights would hide that bias in the pooled frequencies);
* ``quad``: four twins at the corners of a square, 0.25 each (run only with n >= 4 particles: fewer cannot cover it).

Each seed draws its own problem (operator, prior, ``--measurements`` ground truths from the prior and their y) and
its own noise; all settings of one seed share the noise stream (common random numbers: the same start x_T). The
sampler is the full DAPS loop of scripts/validate_posterior.py's table B (EDM levels sigma 20 -> 0.02, 5 Euler ODE
steps, ``prior_solver: exact``, ULA by default, step 1e-2 decaying to 2 %, ``--level-budget`` gradients per level)
with n particles per measurement, all measurements in one batch (repulsion couples only the particles of one
measurement), and ``sampler.repulsion`` = {scale, units: ratio, bandwidth: median, decay: linear, until_sigma}:
``scale`` 0 is the independent run; with ``units: ratio`` the scale is ||force|| / ||data gradient|| of each
particle at the first level, decaying linearly in log sigma to 0 at ``--until-sigma``.

Per setting (mean +- standard deviation over the seeds):

* coverage: the fraction of measurements whose n particles found every component of exact posterior weight >=
  0.05 (a particle's mode: its most responsible exact posterior component, ``FullMixture.assign``); ``iid``: the
  same probability for n independent exact draws (``coverage_probability``, the value an exact sampler reaches);
* mode TV: total variation between the particles' pooled mode frequencies (over all measurements) and the exact
  posterior weights (pooled the same way); ``modes found``: the pooled frequencies themselves;
* pair dist: the mean distance between two final particles of one measurement (RMS per coordinate);
* spread: the mean over particles of ||x - m_k||^2 / tr(C_k) for its mode k (exact: 1; above 1: particles pushed
  away from their mode's posterior, below: collapsed);
* force ratio: the level event's ``repulsion.force_ratio`` (median over particles of ||force|| / ||data gradient||
  at the level's start), at the first level and averaged over the levels where the force is on;
* levels, denoiser evaluations per particle (SampleResult.particle_network_evals / particles: ODE and prior-score
  calls), data-gradient evaluations per particle (the kernel's steps per level, plus one per level while the force
  is on: ``level_tilt`` evaluates the data gradient at the anchors to set gamma).

The ``exact draws`` rows draw n exact posterior samples per measurement: their coverage, TV, pair distance and spread
are the Monte Carlo reference of a sampler that is exact.

    python scripts/particles_exact_table.py                 (docs/particles_exact.md; about 8 minutes on 2 cores)
    python scripts/particles_exact_table.py --quick         (a few seconds: the size tests/test_particles_exact.py runs)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.exact import (NOISE, SHAPE, TwinLinearProblem, coverage_probability,  # noqa: E402
                         make_twin_linear_problem, mcmc_dict)
from cores.noise import SharedNoise  # noqa: E402
from sampler import DAPS, ParticleId, build_sampler, start_particles  # noqa: E402

PROBLEMS = {"twins 1:1": (0.5, 0.5), "twins 4:1": (0.8, 0.2), "quad": (0.25, 0.25, 0.25, 0.25)}
THRESHOLD = 0.05  # a mode counts for coverage when its exact posterior weight is at least this
LR, LR_MIN_RATIO = 1e-2, 0.02  # as table B of validate_posterior.py
FULL = {"measurements": 200, "seeds": 3, "particles": [2, 4], "scales": [0.0, 0.03, 0.1, 0.3, 1.0, 3.0],
        "problems": list(PROBLEMS), "levels": 40, "level_budget": 50}
QUICK = {"measurements": 6, "seeds": 2, "particles": [2, 4], "scales": [0.0, 1.0], "problems": ["twins 4:1"],
         "levels": 6, "level_budget": 4}


def make_sampler(scale: float, levels: int, budget: int, kernel: str, until_sigma: float) -> DAPS:
    """DAPS as table B of validate_posterior.py (sigma 20 -> 0.02), with the repulsion of ``scale`` (0: off)."""
    return build_sampler({"annealing_scheduler_config": {"name": "edm", "num_steps": levels, "sigma_max": 20.0,
                                                         "sigma_min": 0.02},
                          "diffusion_scheduler_config": {"name": "edm", "num_steps": 5, "sigma_min": 0.01},
                          "repulsion": {"scale": scale, "units": "ratio", "bandwidth": "median", "decay": "linear",
                                        "until_sigma": until_sigma, "until_t": None}},
                         mcmc_dict(kernel, LR, budget, "exact", NOISE, LR_MIN_RATIO))


def measure(p: TwinLinearProblem, x: torch.Tensor, n: int) -> dict[str, Any]:
    """Coverage, pooled mode frequencies and their TV to the exact weights, pair distance and within-mode spread of
    ``x`` (n rows per measurement, in measurement order; NaN rows, stopped particles, are left out and counted)."""
    m = len(p.exact)
    x = x.double().flatten(1).view(m, n, -1)
    weights = p.weights
    found = torch.zeros_like(weights)
    covered, spread, dist, pairs, nonfinite = 0, [], 0.0, 0, 0
    for g, e in enumerate(p.exact):
        rows = x[g][torch.isfinite(x[g]).all(1)]
        nonfinite += n - len(rows)
        if not len(rows):
            continue
        lab = e.assign(rows)
        found[g] = torch.bincount(lab, minlength=len(e.weights)).double()
        covered += bool((found[g][e.weights >= THRESHOLD] > 0).all())
        spread += [float((r - e.means[k]).pow(2).sum() / e.covs[k].trace()) for r, k in zip(rows, lab)]
        if len(rows) > 1:
            d = torch.pdist(rows) / math.sqrt(rows.shape[1])
            dist, pairs = dist + float(d.sum()), pairs + len(d)
    freq = found.sum(0) / found.sum()
    ref = weights.mean(0)
    return {"coverage": covered / m, "tv": float(0.5 * (freq - ref).abs().sum()), "freq": freq.tolist(),
            "pair_dist": dist / max(pairs, 1), "spread": statistics.fmean(spread) if spread else math.nan,
            "nonfinite": nonfinite}


def run_setting(p: TwinLinearProblem, n: int, scale: float, seed: int, cfg: dict) -> dict[str, Any]:
    """One DAPS run of all measurements of ``p`` with n particles each; the noise stream depends on the seed only."""
    sampler = make_sampler(scale, cfg["levels"], cfg["level_budget"], cfg["kernel"], cfg["until_sigma"])
    m = len(p.exact)
    group = [g for g in range(m) for _ in range(n)]
    noise = SharedNoise(1000 * seed + 11, m * n)
    particles = start_particles([ParticleId(g, 0, k) for k, g in enumerate(group)], p.y[group], group, noise,
                                sampler.initial_state(noise, SHAPE, torch.device("cpu")))
    events: list[dict] = []
    res = sampler.sample(p.prior, p.operator, particles, callback=events.append)
    levels = [e for e in events if e["event"] == "level"]
    ratios = [e["repulsion"]["force_ratio"] for e in levels if e["repulsion"]["strength"] > 0]
    on = len(ratios)
    return {**measure(p, res.x, n), "levels": res.used_levels,
            "denoiser_evals": res.particle_network_evals / (m * n),
            "grad_evals": res.used_levels * sampler.kernel.num_steps + on,
            "ratio_first": ratios[0] if ratios else math.nan,
            "ratio_mean": statistics.fmean(ratios) if ratios else math.nan, "levels_on": on}


def exact_draws(p: TwinLinearProblem, n: int, seed: int) -> dict[str, Any]:
    """The reference: n exact posterior draws per measurement, measured like the sampler's particles."""
    g = torch.Generator().manual_seed(1000 * seed + 77)
    x = torch.cat([e.sample(n, g)[0] for e in p.exact])
    return {**measure(p, x, n), "levels": math.nan, "denoiser_evals": math.nan, "grad_evals": math.nan,
            "ratio_first": math.nan, "ratio_mean": math.nan, "levels_on": 0}


KEYS = ("coverage", "tv", "pair_dist", "spread", "levels", "denoiser_evals", "grad_evals", "ratio_first",
        "ratio_mean", "nonfinite")


def collect(cfg: dict, log: Any = None) -> list[dict[str, Any]]:
    """One row per (problem, n, setting) with per-seed lists of every measure in KEYS and of ``freq``."""
    rows: dict[tuple, dict[str, Any]] = {}
    for seed in range(cfg["seeds"]):
        for name in cfg["problems"]:
            weights = PROBLEMS[name]
            p = make_twin_linear_problem(cfg["measurements"], weights, cfg["separation"], seed=seed)
            for n in cfg["particles"]:
                if n < len(weights):
                    continue  # fewer particles than modes: coverage is impossible
                settings = [("exact draws", None)] + [("independent" if s == 0 else f"repulsion {s:g}", s)
                                                      for s in cfg["scales"]]
                for label, scale in settings:
                    t0 = time.time()
                    r = exact_draws(p, n, seed) if scale is None else run_setting(p, n, scale, seed, cfg)
                    row = rows.setdefault((name, n, label), {
                        "problem": name, "n": n, "setting": label, "scale": scale, "weights": list(weights),
                        "iid_coverage": coverage_probability(torch.tensor(weights), n, THRESHOLD),
                        "freq": [], **{k: [] for k in KEYS}})
                    for k in KEYS:
                        row[k].append(r[k])
                    row["freq"].append(r["freq"])
                    if log:
                        log(f"seed {seed} {name} n={n} {label}: coverage {r['coverage']:.3f} tv {r['tv']:.3f} "
                            f"({time.time() - t0:.1f}s)")
    return list(rows.values())


def pm(values: Sequence[float], digits: int = 3) -> str:
    """mean +- sd over seeds ('-' when not a number)."""
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| problem | n | setting | force ratio (first level / mean while on) | coverage | iid coverage | "
           "mode TV | modes found | pair dist | spread | levels | denoiser evals / particle | "
           "data-grad evals / particle |", "|" + "---|" * 13]
    for r in rows:
        freq = "/".join(f"{statistics.fmean(f[k] for f in r['freq']):.2f}" for k in range(len(r["weights"])))
        ratio = "-" if not r["scale"] else f"{pm(r['ratio_first'], 2)} / {pm(r['ratio_mean'], 2)}"
        evals = [pm(r[k], 0) for k in ("levels", "denoiser_evals", "grad_evals")]
        out.append(f"| {r['problem']} | {r['n']} | {r['setting']} | {ratio} | {pm(r['coverage'])} | "
                   f"{r['iid_coverage']:.3f} | {pm(r['tv'])} | {freq} | {pm(r['pair_dist'])} | {pm(r['spread'], 2)} | "
                   + " | ".join(evals) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="test size: " + str(QUICK))
    ap.add_argument("--measurements", type=int, help=f"measurements per problem and seed ({FULL['measurements']})")
    ap.add_argument("--seeds", type=int, help=f"seeds 0 .. seeds-1 ({FULL['seeds']})")
    ap.add_argument("--particles", type=int, nargs="+", help=f"particles per measurement ({FULL['particles']})")
    ap.add_argument("--scales", type=float, nargs="+", help=f"repulsion scales, 0 = independent ({FULL['scales']})")
    ap.add_argument("--problems", nargs="+", choices=list(PROBLEMS), help="problems (all)")
    ap.add_argument("--levels", type=int, help=f"annealing levels ({FULL['levels']})")
    ap.add_argument("--level-budget", type=int, help=f"gradient evaluations per level ({FULL['level_budget']})")
    ap.add_argument("--kernel", default="langevin", help="mc_algo (langevin)")
    ap.add_argument("--until-sigma", type=float, default=0.5, help="repulsion cut-off sigma (0.5)")
    ap.add_argument("--separation", type=float, default=4.0, help="distance between twin means (4.0 = 8 prior stds)")
    ap.add_argument("--verbose", action="store_true", help="one line per run on stderr")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("measurements", "seeds", "particles", "scales", "problems", "levels", "level_budget"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(kernel=args.kernel, until_sigma=args.until_sigma, separation=args.separation)
    t0 = time.time()
    rows = collect(cfg, (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None)
    print(f"Twin-mode posteriors (cores/exact.py make_twin_linear_problem, separation {cfg['separation']:g}); DAPS "
          f"{cfg['levels']} levels, {cfg['kernel']}, {cfg['level_budget']} gradient evaluations per level, repulsion "
          f"cut-off sigma {cfg['until_sigma']:g}; {cfg['measurements']} measurements x {cfg['seeds']} seeds; "
          f"mean ± sd over seeds ({time.time() - t0:.0f} s)\n")
    print(table(rows))
    bad = sum(sum(r["nonfinite"]) for r in rows)
    if bad:
        print(f"\n{bad} particle(s) ended NaN/Inf and were left out (counted per row in 'nonfinite')")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # d = 16: more threads only add overhead
    main()
