"""scripts/particles_exact_table.py --quick: the structure of the repulsion vs independent table on exact twin-mode
posteriors (issue 12), and the twin problem of cores/exact.py it rests on.

The numbers at the quick size are noise; what is tested is what the table claims about its rows: every (problem, n,
setting) row is there for every seed, coverage and TV are fractions, the repulsion rows log a positive force ratio
(the first level's equals the scale: units ratio) while independent rows log none and make one data gradient per
level fewer, and the twins' exact posterior weights are the prior's for every measurement.
"""
import math

import pytest
import torch

import scripts.particles_exact_table as T
from cores.exact import coverage_probability, make_twin_linear_problem


@pytest.fixture(scope="module")
def quick(one_thread):
    return T.main(["--quick"])


def test_every_row_is_present_for_every_seed(quick):
    cfg = T.QUICK
    settings = ["exact draws"] + ["independent" if s == 0 else f"repulsion {s:g}" for s in cfg["scales"]]
    expected = {(p, n, s) for p in cfg["problems"] for n in cfg["particles"] if n >= len(T.PROBLEMS[p])
                for s in settings}
    assert {(r["problem"], r["n"], r["setting"]) for r in quick} == expected
    for r in quick:
        assert all(len(r[k]) == cfg["seeds"] for k in T.KEYS) and len(r["freq"]) == cfg["seeds"]


def test_fractions_are_fractions_and_runs_are_finite(quick):
    for r in quick:
        assert all(0 <= c <= 1 for c in r["coverage"]) and all(0 <= v <= 1 for v in r["tv"])
        assert all(abs(sum(f) - 1) < 1e-9 for f in r["freq"]) and 0 < r["iid_coverage"] < 1
        assert all(d > 0 for d in r["pair_dist"]) and all(s > 0 for s in r["spread"])
        if r["setting"] != "exact draws":
            assert r["nonfinite"] == [0] * T.QUICK["seeds"] and r["levels"] == [T.QUICK["levels"]] * T.QUICK["seeds"]


def test_repulsion_rows_report_a_positive_force_ratio_and_its_extra_gradient(quick):
    cfg = T.QUICK
    for r in quick:
        if r["setting"] == "exact draws":
            continue
        free = r["scale"] == 0
        assert all(math.isnan(v) for v in r["ratio_first"]) == free
        if not free:
            assert all(v > 0 for v in r["ratio_mean"])
            assert r["ratio_first"] == pytest.approx([r["scale"]] * cfg["seeds"], rel=1e-4)  # units: ratio
        # each level costs the kernel's gradients, plus one while the force is on (level_tilt)
        base = cfg["levels"] * cfg["level_budget"]
        assert all((g == base) if free else (base < g <= base + cfg["levels"]) for g in r["grad_evals"])


def test_twins_have_the_prior_weights_for_every_measurement():
    p = make_twin_linear_problem(4, (0.8, 0.2), seed=3)
    torch.testing.assert_close(p.weights, torch.tensor([[0.8, 0.2]] * 4, dtype=torch.float64))
    diff = (p.prior.means[0] - p.prior.means[1]).double()
    assert float(diff.norm()) == pytest.approx(4.0, rel=1e-5)
    assert float((p.matrix @ diff).abs().max()) < 1e-5  # the twins' difference is in the null space of A
    assert coverage_probability(torch.tensor([0.5, 0.5]), 2) == pytest.approx(0.5)
    assert coverage_probability(torch.full((4,), 0.25), 4) == pytest.approx(24 / 256)
