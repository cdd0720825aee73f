"""Check the MCMC kernels and the DAPS loop against exact posteriors.

Prior: a 3-component isotropic Gaussian mixture on 4x4 one-channel images (d = 16), whose denoiser is
exact at every sigma. With a linear operator (random inpainting, or a dense Gaussian matrix) and
Gaussian noise the posterior is a Gaussian mixture in closed form (cores/gmm.py); the ground truth sits
between two components, so the posterior has two modes of comparable weight. The problems, exact
conditionals, error measures and the exact-draw kernel live in cores/exact.py; this script builds and
runs the DAPS samplers and prints three tables:

A. kernel stationarity: chains start at exact draws of one DAPS level's conditional p(x_0 | x_t, y)
   (also a closed-form mixture) and make ``--budget`` exact evaluations of the data term (gradients; for
   'da_hmc' one gradient and losses, cores/exact.py:mcmc_dict). An exact kernel keeps that distribution, so
   its error stays at the Monte Carlo floor; ULA ('langevin') and the damped 'hmc' drift to their biased
   stationary laws. 'da_hmc' (delayed acceptance) also shows its first-stage pass rate ('DA1').
B. DAPS end to end (prior_solver=exact, so each level's target is the true conditional) against
   p(x_0 | y), with ``--level-budget`` gradient evaluations per level. The 'exact conditional' row
   replaces MCMC by exact draws of each level's conditional: it isolates the loop (levels, noise
   injection, no noise after the last level), which must sit at the floor; the MCMC rows add the
   error of mixing within a level. 'separated' uses a prior whose components are far apart: the
   per-level MCMC cannot move between them, so DAPS keeps the modes its unconditional ODE start
   picked (a limitation of DAPS with local kernels, shown rather than hidden). The 'gaussian' rows
   use the official approximation p(x_0 | x_t) ~ N(x0hat, sigma_t^2 I). Tables B and C leave out
   'da_hmc': it needs a step far below their shared DAPS_LR (cores/exact.py, STATIONARY_LR).
C. phase retrieval on 4x4 images: prior = one image and its 180-degree twin. Both have the same
   likelihood, so the exact posterior (by importance sampling) weighs them equally; DAPS must find
   both, each with its exact within-mode mean.

Errors: mean = ||m_hat - m|| / sqrt(tr C); cov = ||C_hat - C||_F / ||C||_F; modes = total variation
between the fractions of samples assigned to each posterior component and the same fractions for
exact samples. The 'exact draws' rows are the floor: the errors of as many exact samples.

    python scripts/validate_posterior.py [--particles 1000] [--seed 0]   (about 10 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.exact import (KERNELS, NOISE, PR_NOISE, PROBLEMS, SHAPE, STATIONARY_SIGMA, ExactConditional,  # noqa: E402
                         Problem, TwinProblem, errors, floor, make_problem, make_twin_problem, mcmc_dict,
                         reference_freq, stationary_run, twin_scores)
from cores.mcmc import Kernel  # noqa: E402
from cores.noise import SharedNoise  # noqa: E402
from sampler import DAPS, build_sampler  # noqa: E402

DAPS_LR = 1e-2  # first-level step of tables B (decays to 2e-4); ULA diverges on 'dense' from about 1.4e-2
DAPS_KERNELS = tuple(k for k in KERNELS if k != "da_hmc")  # the kernels of tables B and C (module docstring)


def daps_sampler(mc: dict, levels: int = 40, kernel: Kernel | None = None) -> DAPS:
    """DAPS with ``levels`` levels sigma 20 -> 0.02 and the kernel of ``mc`` (or ``kernel``, e.g. exact draws)."""
    s = build_sampler({"annealing_scheduler_config": {"name": "edm", "num_steps": levels, "sigma_max": 20.0,
                                                      "sigma_min": 0.02},
                       "diffusion_scheduler_config": {"name": "edm", "num_steps": 5, "sigma_min": 0.01}}, mc)
    return s if kernel is None else DAPS(s.schedule, s.ode, kernel, s.target, s.latent)


def daps_run(p: Problem, sampler: DAPS, n: int, seed: int) -> torch.Tensor:
    noise = SharedNoise(seed + 11, n)
    ys = p.y.expand(n, *p.y.shape[1:])
    return sampler.sample(p.prior, p.operator, sampler.particles(ys, noise, SHAPE, torch.device("cpu"))).x


def table_a(n: int, budget: int, seed: int) -> list[dict]:
    rows = []
    for kind in ("inpainting", "dense"):
        p = make_problem(kind, seed)
        fl = None
        for kernel in KERNELS:
            out, cond = stationary_run(p, kernel, n, budget, seed)
            ref = reference_freq(cond, seed)
            fl = fl or floor(cond, ref, n, seed)
            rows.append({"problem": kind, "kernel": kernel, "acceptance": rate(out.acceptance),
                         "stage1": rate(out.stage1_acceptance), **errors(out.x, cond, ref)})
        rows.append({"problem": kind, "kernel": "exact draws", "acceptance": math.nan, "stage1": math.nan, **fl})
    return rows


def rate(per_chain: torch.Tensor | None) -> float:
    """Mean of per-chain rates (NaN for a kernel without them)."""
    return math.nan if per_chain is None else float(per_chain.mean())


def table_b(n: int, budget: int, seed: int, kernels=DAPS_KERNELS, problems=tuple(PROBLEMS)) -> list[dict]:
    rows = []
    for kind in problems:
        p = make_problem(kind, seed)
        ref = reference_freq(p.exact, seed)
        exact_loop = daps_sampler(mcmc_dict("mala", 1.0, 1, "exact", NOISE), levels=20,
                                  kernel=ExactConditional(p, seed + 5))
        rows.append({"problem": kind, "kernel": "exact conditional", "prior_solver": "exact",
                     **errors(daps_run(p, exact_loop, n, seed), p.exact, ref)})
        for kernel in kernels:
            sampler = daps_sampler(mcmc_dict(kernel, DAPS_LR, budget, "exact", NOISE, 0.02))
            rows.append({"problem": kind, "kernel": kernel, "prior_solver": "exact",
                         **errors(daps_run(p, sampler, n, seed), p.exact, ref)})
        for kernel in [k for k in ("langevin", "mala") if k in kernels]:
            sampler = daps_sampler(mcmc_dict(kernel, DAPS_LR, budget, "gaussian", NOISE, 0.02))
            rows.append({"problem": kind, "kernel": kernel, "prior_solver": "gaussian",
                         **errors(daps_run(p, sampler, n, seed), p.exact, ref)})
        rows.append({"problem": kind, "kernel": "exact draws", "prior_solver": "-", **floor(p.exact, ref, n, seed)})
    return rows


def twin_run(tp: TwinProblem, kernel: str, n: int, budget: int, seed: int) -> dict:
    """Table C: DAPS (exact prior solver) on the twin problem: fractions per mode and within-mode mean errors."""
    sampler = daps_sampler(mcmc_dict(kernel, 2e-3, budget, "exact", PR_NOISE, 0.05))
    noise = SharedNoise(seed + 31, n)
    ys = tp.y.expand(n, *tp.y.shape[1:])
    x = sampler.sample(tp.prior, tp.operator, sampler.particles(ys, noise, SHAPE, torch.device("cpu"))).x
    return {"kernel": kernel, **twin_scores(tp, x)}


def fmt(v: float) -> str:
    return "  -  " if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=40, help="exact data-term evaluations per chain in table A")
    ap.add_argument("--level-budget", type=int, default=200, help="gradient evaluations per level in tables B, C")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, s = args.particles, args.seed
    print(f"A. kernel stationarity at one DAPS level (sigma_t = {STATIONARY_SIGMA}), {n} chains started at exact "
          f"draws, {args.budget} exact evaluations each")
    print("| problem | kernel | acceptance | mean err | cov err | modes TV |\n|---|---|---|---|---|---|")
    for r in table_a(n, args.budget, s):
        acc = fmt(r["acceptance"]) + ("" if math.isnan(r["stage1"]) else f" (DA1 {fmt(r['stage1'])})")
        print(f"| {r['problem']} | {r['kernel']} | {acc} | {fmt(r['mean'])} | {fmt(r['cov'])} | {fmt(r['modes'])} |")
    print(f"\nB. DAPS (40 levels, sigma 20 -> 0.02, {args.level_budget} gradient evaluations per level) vs the exact "
          f"p(x0|y), {n} particles")
    print("| problem | kernel | prior_solver | mean err | cov err | modes TV | NaN particles |\n"
          "|---|---|---|---|---|---|---|")
    for r in table_b(n, args.level_budget, s):
        print(f"| {r['problem']} | {r['kernel']} | {r['prior_solver']} | {fmt(r['mean'])} | {fmt(r['cov'])} | "
              f"{fmt(r['modes'])} | {r.get('nonfinite', '-')} |")
    tp = make_twin_problem(s)
    print(f"\nC. phase retrieval, 4x4 images, prior = an image and its 180-degree twin; exact posterior by importance "
          f"sampling (ESS >= {tp.ess:.0f}): weights true {tp.weights[0]:.3f}, twin {tp.weights[1]:.3f}; "
          f"{n} particles, {args.level_budget} gradient evaluations per level")
    print("| kernel | fraction true | fraction twin | mean err (true) | mean err (twin) |\n|---|---|---|---|---|")
    for kernel in DAPS_KERNELS:
        r = twin_run(tp, kernel, n, args.level_budget, s)
        print(f"| {kernel} | {fmt(r['true'])} | {fmt(r['twin'])} | {fmt(r['mean_err_true'])} | "
              f"{fmt(r['mean_err_twin'])} |")


if __name__ == "__main__":
    main()
