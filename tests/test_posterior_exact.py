"""Kernels and the DAPS loop against exact posteriors (the tables of scripts/validate_posterior.py, smaller).

The problems and error measures come from cores/exact.py; the script builds and runs the DAPS samplers.

Tolerances are set against the Monte Carlo floor (errors of as many exact draws) measured in the
same test; the DAPS-with-MCMC tolerance also allows for mixing within 100 gradient evaluations per level.
"""
import pytest

import cores.exact as E
import scripts.validate_posterior as V


@pytest.fixture(scope="module")
def dense():
    p = E.make_problem("dense", 0)
    return p, E.reference_freq(p.exact, 0)


def test_mh_kernels_keep_the_level_conditional_and_ula_is_biased(dense):
    """The MH kernels, delayed-acceptance HMC (da_hmc) included, stay at the floor; ULA does not."""
    p, _ = dense
    n, budget = 1000, 40
    results = {}
    for kernel in ("langevin", *E.MH_KERNELS):
        out, cond = E.stationary_run(p, kernel, n, budget, 0)
        ref = E.reference_freq(cond, 0)
        results[kernel] = (E.errors(out.x, cond, ref), out.acceptance)
    fl = E.floor(cond, ref, n, 0)
    for kernel in E.MH_KERNELS:
        err, acc = results[kernel][0], float(results[kernel][1].mean())
        assert 0.2 < acc < 0.95, (kernel, acc)
        assert err["mean"] <= 1.5 * fl["mean"] + 0.02, (kernel, err, fl)
        assert err["cov"] <= 1.5 * fl["cov"] + 0.02, (kernel, err, fl)
        assert err["modes"] <= fl["modes"] + 0.03, (kernel, err, fl)
    ula = results["langevin"][0]
    assert ula["cov"] >= 1.4 * fl["cov"], ("ULA's stationary bias should show in the covariance", ula, fl)


def test_daps_loop_with_exact_conditionals_is_exact(dense):
    p, ref = dense
    n = 400
    loop = V.daps_sampler(E.mcmc_dict("mala", 1.0, 1, "exact", E.NOISE), levels=20, kernel=E.ExactConditional(p, 5))
    err = E.errors(V.daps_run(p, loop, n, 0), p.exact, ref)
    fl = E.floor(p.exact, ref, n, 0)
    for key in ("mean", "cov", "modes"):
        assert err[key] <= 1.6 * fl[key] + 0.01, (key, err, fl)


@pytest.mark.parametrize("kernel", ["mala", "hmc_mh"])
def test_daps_with_mh_kernels_matches_the_exact_posterior(dense, kernel):
    p, ref = dense
    sampler = V.daps_sampler(E.mcmc_dict(kernel, V.DAPS_LR, 100, "exact", E.NOISE, 0.02))
    err = E.errors(V.daps_run(p, sampler, 400, 0), p.exact, ref)
    assert err["nonfinite"] == 0
    assert err["mean"] <= 0.10 and err["cov"] <= 0.20 and err["modes"] <= 0.08, err


def test_phase_retrieval_finds_both_twins():
    tp = E.make_twin_problem(0, draws=100_000)
    assert tp.ess > 100
    assert abs(float(tp.weights[0]) - 0.5) < 0.05  # the twin has the same likelihood
    r = V.twin_run(tp, "mala", 400, 100, 0)
    assert r["true"] + r["twin"] == pytest.approx(1.0)
    assert abs(r["true"] - float(tp.weights[0])) <= 0.1, r
    assert min(r["true"], r["twin"]) >= 0.35, r
    assert r["mean_err_true"] <= 0.12 and r["mean_err_twin"] <= 0.12, r
