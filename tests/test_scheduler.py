"""Schedules and PF-ODE solvers."""
import math

import pytest
import torch

from cores.models import GaussianMixtureDenoiser
from cores.gmm import IsotropicMixture
from cores.scheduler import PFODE, edm_sigmas, sigma_schedule, step_ratio, vp_sigma, vp_time


def test_edm_levels_match_eq5():
    s = edm_sigmas(200, 100.0, 0.1, "poly-7")
    assert len(s) == 200 and s[0] == pytest.approx(100.0) and s[-1] == pytest.approx(0.1)
    assert torch.all(s[1:] < s[:-1])
    r = 17 / 199
    assert s[17] == pytest.approx((100 ** (1 / 7) + r * (0.1 ** (1 / 7) - 100 ** (1 / 7))) ** 7)


@pytest.mark.parametrize("name", ["edm", "ve", "vp"])
def test_schedules_are_decreasing_with_endpoints(name):
    s = sigma_schedule(name, 30, 80.0, 0.02)
    assert s[0] == pytest.approx(80.0, rel=1e-6) and s[-1] == pytest.approx(0.02, rel=1e-6)
    assert torch.all(s[1:] < s[:-1])


def test_vp_time_inverts_vp_sigma():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_time(vp_sigma(t)), t)


def test_step_ratio_reaches_one_at_the_last_level():
    assert step_ratio(0, 200) == 0 and step_ratio(199, 200) == 1 and step_ratio(0, 1) == 0


def exact_gaussian_flow(x, s0, s1, var):
    """PF-ODE of N(0, var I) in closed form: x(s) = x(s0) sqrt((var + s^2) / (var + s0^2))."""
    return x * math.sqrt((var + s1**2) / (var + s0**2))


def test_solvers_converge_with_their_order():
    var = 0.25
    prior = GaussianMixtureDenoiser(IsotropicMixture(torch.ones(1), torch.zeros(1, 4), torch.full((1,), var**0.5)),
                                    (1, 2, 2))
    x = torch.randn(64, 1, 2, 2, dtype=torch.float64) * 3
    prior = prior.double()
    errs = {}
    for solver in ("euler", "heun", "rk4"):
        errs[solver] = [float((PFODE(n, 0.01, solver=solver).solve(prior.denoise, x, 3.0)
                               - exact_gaussian_flow(x, 3.0, 0.01, var)).abs().max()) for n in (4, 8)]
    assert errs["euler"][1] < errs["euler"][0] and errs["rk4"][1] < errs["heun"][1] < errs["euler"][1]
    assert errs["euler"][0] / errs["euler"][1] > 1.5  # first order
    assert errs["heun"][0] / errs["heun"][1] > 3.0  # second order


def test_ode_below_its_floor_returns_the_input():
    ode = PFODE(5, 0.01)
    x = torch.randn(2, 3)
    assert ode.solve(lambda v, s: v * 0, x, 0.005) is x
    assert ode.network_evals(0.005) == 0 and ode.network_evals(1.0) == 5
    assert PFODE(5, 0.01, solver="heun").network_evals(1.0) == 10


def test_bad_solver_is_refused():
    with pytest.raises(ValueError, match="unknown ODE solver"):
        PFODE(5, 0.01, solver="rk5")
