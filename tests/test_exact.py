"""The exact-posterior machinery of cores/exact.py: closed forms, Bayes' rule, error measures, exact-draw kernel."""
import math

import pytest
import torch

from cores.exact import (DIM, MH_KERNELS, NOISE, SHAPE, ExactConditional, KERNELS, Problem, errors, floor,
                         level_conditional, make_problem, make_twin_problem, mcmc_dict, mixture64, reference_freq,
                         twin_scores)
from cores.gmm import IsotropicMixture, linear_posterior
from cores.mcmc import MCMCConfig, Target
from cores.models import GaussianMixtureDenoiser
from cores.operators import DenseGaussian, linear_matrix


def one_gaussian_problem(std: float = 0.7) -> tuple[Problem, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(1, DIM, generator=g)
    prior = GaussianMixtureDenoiser(IsotropicMixture(torch.ones(1), mu, torch.tensor([std])), SHAPE)
    op = DenseGaussian(num_measurements=8, dim=DIM, sigma=NOISE, seed=4)
    matrix = linear_matrix(op, SHAPE)
    y = torch.randn(1, 8, generator=g)
    return Problem("one", prior, op, y, matrix, linear_posterior(mixture64(prior), matrix, y, NOISE)), mu[0].double()


def test_level_conditional_of_one_gaussian_is_the_closed_form():
    """p(x_0 | x_t, y) for p(x_0) = N(mu, s^2 I): precision I/s^2 + A^T A / n^2 + I/sigma^2 (PRML 2.116)."""
    s, sigma = 0.7, 0.3
    p, mu = one_gaussian_problem(s)
    xt = torch.randn(DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, y, eye = p.matrix, p.y.double().flatten(), torch.eye(DIM, dtype=torch.float64)
    cov = torch.linalg.inv(eye / s**2 + a.T @ a / NOISE**2 + eye / sigma**2)
    mean = cov @ (mu / s**2 + a.T @ y / NOISE**2 + xt / sigma**2)
    cond = level_conditional(p, xt, sigma)
    assert cond.weights.tolist() == [1.0]
    torch.testing.assert_close(cond.covs[0], cov)
    torch.testing.assert_close(cond.means[0], mean)


@pytest.mark.parametrize("kind", ["inpainting", "dense"])
def test_level_conditional_is_bayes_rule(kind):
    """log q(x) - log[p(x) N(y; A x, n^2 I) N(x_t; x, sigma^2 I)] is the same constant at every x.

    Up to 1e-5: the noise stds reach the closed form rounded to float32 (and y is stored in float32).
    """
    p = make_problem(kind, 0)
    sigma = 0.5
    g = torch.Generator().manual_seed(6)
    xt = p.exact.sample(1, g)[0][0] + sigma * torch.randn(DIM, generator=g, dtype=torch.float64)
    cond = level_conditional(p, xt, sigma)
    x = torch.cat([cond.sample(50, g)[0], p.exact.sample(50, g)[0]])
    log_q = torch.logsumexp(cond.log_resp(x), 1)
    log_target = (mixture64(p.prior).log_prob(x) - (x @ p.matrix.T - p.y.double().flatten()).pow(2).sum(1)
                  / (2 * NOISE**2) - (xt - x).pow(2).sum(1) / (2 * sigma**2))
    diff = log_q - log_target
    assert float(diff.max() - diff.min()) < 1e-5


def test_problem_exact_posterior_is_bayes_rule():
    p = make_problem("separated", 0)
    x = p.exact.sample(100, torch.Generator().manual_seed(7))[0]
    log_target = mixture64(p.prior).log_prob(x) - (x @ p.matrix.T - p.y.double().flatten()).pow(2).sum(1) / (
        2 * NOISE**2)
    diff = torch.logsumexp(p.exact.log_resp(x), 1) - log_target
    assert float(diff.max() - diff.min()) < 1e-5


def test_errors_of_exact_draws_are_at_the_floor_and_nan_rows_are_counted():
    p = make_problem("dense", 0)
    ref = reference_freq(p.exact, 0, n=20_000)
    fl = floor(p.exact, ref, 500, 0)
    draws = p.exact.sample(500, torch.Generator().manual_seed(8))[0]
    err = errors(torch.cat([draws, torch.full((3, DIM), math.nan)]), p.exact, ref)
    assert err["nonfinite"] == 3
    for key in ("mean", "cov", "modes"):
        assert err[key] <= 2 * fl[key] + 0.01, (key, err, fl)
    prior = mixture64(p.prior).sample(500, torch.Generator().manual_seed(9))[0]
    wrong = errors(prior, p.exact, ref)
    assert wrong["mean"] > 5 * fl["mean"] and wrong["cov"] > 5 * fl["cov"], (wrong, fl)
    assert errors(draws[:1], p.exact, ref)["nonfinite"] == 0 and math.isnan(errors(draws[:1], p.exact, ref)["mean"])


def test_exact_conditional_kernel_draws_the_level_conditional():
    p = make_problem("inpainting", 0)
    sigma, n = 0.4, 400
    xt = p.exact.sample(1, torch.Generator().manual_seed(10))[0][0]
    rows = xt.float().view(1, *SHAPE).expand(n, *SHAPE)
    target = Target(lambda x: torch.zeros(len(x)), 0.5, sigma, rows)
    out = ExactConditional(p, 11).run(target, torch.zeros(n, *SHAPE), None, 1.0)
    cond = level_conditional(p, xt, sigma)
    ref = reference_freq(cond, 0, n=20_000)
    err, fl = errors(out.x, cond, ref), floor(cond, ref, n, 0)
    for key in ("mean", "cov", "modes"):
        assert err[key] <= 2 * fl[key] + 0.01, (key, err, fl)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mcmc_dict_fits_the_budget(kernel):
    kern = MCMCConfig.from_dict(mcmc_dict(kernel, 1e-2, 40, "exact", NOISE)).kernel()
    assert kern.grad_evals() <= 40
    assert kern.needs_log_prob == (kernel in MH_KERNELS)


def test_twin_problem_weighs_the_twins_equally_and_scores_samples():
    tp = make_twin_problem(0, draws=20_000)
    assert abs(float(tp.weights[0]) - 0.5) < 0.1  # the twin has the same likelihood
    assert tp.weights.sum().item() == pytest.approx(1.0)
    x = torch.cat([tp.mode_means[0].expand(30, DIM), tp.mode_means[1].expand(70, DIM)]).view(100, *SHAPE)
    r = twin_scores(tp, x)
    assert (r["true"], r["twin"]) == pytest.approx((0.3, 0.7))
    assert r["mean_err_true"] == pytest.approx(0.0, abs=1e-6) and r["mean_err_twin"] == pytest.approx(0.0, abs=1e-6)
    assert twin_scores(tp, x[:30])["mean_err_twin"] == math.inf
