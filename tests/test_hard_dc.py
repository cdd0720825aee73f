"""Hard data consistency (cores/resample.py): the batched per-particle AdamW is torch's AdamW, converges to the
least-squares point of a linear operator, stops each particle by ReSample's rules on its own (a particle's result is
the same alone and in a batch); in the loop the dry run leaves the trajectory unchanged, repulsion is off from the
start time on, a measurement's result does not depend on its batch, and pruning slices the optimiser state."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cores.noise import ParticleNoise
from cores.operators import DenseGaussian, PhaseRetrieval
from cores.resample import STOPS, HardDC
from sampler import ParticleId, build_sampler, start_particles

ANNEAL = {"name": "edm", "num_steps": 8, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": "hmc", "momentum": 0.5}
SHAPE = (1, 4, 4)


def linear_problem(n=3, seed=0):
    """A dense Gaussian operator on 4x4 images (32 measurements of 16 values), its least-squares points, starts."""
    g = torch.Generator().manual_seed(seed)
    op = DenseGaussian(32, 16, seed=seed).double()
    truth = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    y = op(truth) + 0.05 * torch.randn(n, 32, generator=g, dtype=torch.float64)
    lsq = torch.linalg.lstsq(op.matrix, y.T).solution.T.reshape(n, *SHAPE)
    start = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return op, y, lsq, start


def rows_loss(op, y):
    return lambda x, rows: op.loss(x, y[rows])


def test_each_particles_update_is_torch_adamw():
    op, y, _, start = linear_problem(1)
    rule = HardDC(step=200, lr=0.05, max_iters=25, tol=0.0, patience=1000, weight_decay=0.01)
    res = rule.optimise(rows_loss(op, y), start, start, 32, latent=False)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=0.05, weight_decay=0.01)
    for _ in range(25):
        opt.zero_grad()
        (op.loss(x, y) / 32).sum().backward()
        opt.step()
    assert res.steps.tolist() == [25] and STOPS[int(res.stop)] == "max"
    torch.testing.assert_close(res.x, x.detach(), rtol=1e-10, atol=1e-12)


def test_converges_to_the_least_squares_point_of_a_linear_operator():
    op, y, lsq, start = linear_problem(3)
    rule = HardDC(step=200, lr=0.02, max_iters=4000, tol=0.0, patience=4000, weight_decay=0.0)
    res = rule.optimise(rows_loss(op, y), start, start, 32, latent=False)
    assert (res.x - lsq).abs().max() < 1e-3
    assert (res.loss_after < res.loss_before).all()
    assert torch.allclose(res.loss_after, op.loss(lsq, y), rtol=1e-4)


def test_a_particle_below_the_tolerance_takes_no_step_while_the_others_go_on():
    op, _, _, start = linear_problem(3)
    y = op(start)  # noise-free: every start has its own zero-loss point ...
    x0 = start.clone()
    x0[1:] += 0.5  # ... but only particle 0 starts on it
    rule = HardDC(step=200, lr=0.01, max_iters=50, tol=1e-6, patience=200)
    res = rule.optimise(rows_loss(op, y), x0, x0, 32, latent=False)
    assert res.steps.tolist()[0] == 0 and STOPS[int(res.stop[0])] == "tol" and torch.equal(res.x[0], x0[0])
    assert all(s > 0 for s in res.steps.tolist()[1:]) and res.particle_sec[0] < res.sec


def test_stopping_rules_fire_as_specified():
    """Scripted objectives (zero gradient): J_i per particle and iteration; tol 0.5, patience 2, at most 6 updates."""
    script = torch.tensor([[5.0, 4, 3, 2, 3, 4, 5, 6],     # rises above J_{i-2} at i=5 (4 > 2): 5 updates
                           [5.0, 4, 3, 0.4, 0.3, 0, 0, 0],  # below tol at i=3: 3 updates
                           [9.0, 8, 7, 6, 5, 4, 3, 2]])     # never: stops at the budget after 6 updates
    calls = []

    def scripted(x, rows):
        calls.append(rows.tolist())
        return script[rows, len(calls) - 1] * 32 + 0.0 * x.flatten(1).sum(1)

    x = torch.zeros(3, *SHAPE, dtype=torch.float32)
    res = HardDC(step=200, lr=0.1, max_iters=6, tol=0.5, patience=2).optimise(scripted, x, x, 32, latent=False)
    assert [STOPS[int(s)] for s in res.stop] == ["rise", "tol", "max"]
    assert res.steps.tolist() == [5, 3, 6]
    assert res.loss_after.tolist() == pytest.approx([4 * 32, 0.4 * 32, 3 * 32])


def test_iterate_best_returns_the_lowest_objective_seen_and_last_where_it_stopped():
    """A linear objective pushed too far: J falls, then rises (a quadratic in x along the gradient); ``best`` keeps the
    minimum, ``last`` the iterate where the rise rule stopped it, which is worse."""
    op, y, _, start = linear_problem(2)
    last = HardDC(step=200, lr=0.5, max_iters=300, tol=0.0, patience=5, weight_decay=0.0)
    best = replace(last, iterate="best")
    r_last = last.optimise(rows_loss(op, y), start, start, 32, latent=False)
    r_best = best.optimise(rows_loss(op, y), start, start, 32, latent=False)
    assert [STOPS[int(s)] for s in r_last.stop] == ["rise", "rise"] and torch.equal(r_last.steps, r_best.steps)
    torch.testing.assert_close(r_best.loss_after, op.loss(r_best.x, y))  # the loss it reports is of the state returned
    torch.testing.assert_close(r_last.loss_after, op.loss(r_last.x, y))
    assert (r_best.loss_after < r_last.loss_after).all() and (r_best.loss_after <= r_best.loss_before).all()
    trace = [op.loss(start, y)]  # the best iterate is the minimum over the whole trajectory (replayed step by step)
    for k in range(1, int(r_last.steps.max()) + 1):
        trace.append(replace(last, max_iters=k, patience=1000).optimise(rows_loss(op, y), start, start, 32,
                                                                        latent=False).loss_after)
    trace = torch.stack(trace)
    for k, n in enumerate(r_last.steps.tolist()):
        assert r_best.loss_after[k].item() == pytest.approx(trace[:n + 1, k].min().item(), rel=1e-9)
        assert r_last.loss_after[k].item() == pytest.approx(trace[n, k].item(), rel=1e-9)


def test_a_particles_result_is_the_same_alone_and_in_a_batch():
    op, y, _, start = linear_problem(4)
    rule = HardDC(step=200, lr=0.05, max_iters=300, tol=0.0026, patience=20)
    batch = rule.optimise(rows_loss(op, y), start, start, 32, latent=False)
    assert len(set(batch.steps.tolist())) > 1  # they stop at different iterations
    for k in range(4):
        alone = rule.optimise(rows_loss(op, y[k:k + 1]), start[k:k + 1], start[k:k + 1], 32, latent=False)
        assert alone.steps[0] == batch.steps[k] and alone.stop[0] == batch.stop[k]
        torch.testing.assert_close(alone.x[0], batch.x[k], rtol=1e-10, atol=1e-12)  # BLAS rounding by batch size only


def test_proximity_and_trust_region_keep_it_near_the_daps_sample():
    op, y, lsq, start = linear_problem(2)
    free = HardDC(step=200, lr=0.02, max_iters=2000, tol=0.0, patience=4000, weight_decay=0.0)
    far = free.optimise(rows_loss(op, y), start, start, 32, latent=False).x
    near = replace(free, proximity=1.0).optimise(rows_loss(op, y), start, start, 32, latent=False).x
    boxed = replace(free, trust_radius=0.05).optimise(rows_loss(op, y), start, start, 32, latent=False).x
    rms = lambda a: (a - start).flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    assert (rms(near) < rms(far)).all()
    assert (rms(boxed) <= 0.05 + 1e-9).all() and (rms(far) > 0.05).all()


def test_resample_variance_is_resamples_in_variance_exploding_units():
    """ReSample's g = c (1 - abar') / (1 - abar) (1 - abar / abar') on x_t = sqrt(abar) x: divided by abar' it is
    our c sigma'^2 (1 - sigma'^2 / sigma^2) with abar = 1 / (1 + sigma^2)."""
    rule = HardDC(step=200)
    for s, s1 in ((5.0, 4.0), (0.8, 0.5), (0.12, 0.1)):
        a, a1 = 1 / (1 + s * s), 1 / (1 + s1 * s1)
        g_vp = 40 * (1 - a1) / (1 - a) * (1 - a / a1)
        assert rule.resample_variance(s, s1) == pytest.approx(g_vp / a1, rel=1e-12)


def test_map_back():
    rule = HardDC(step=200, map_back="resample")
    take = torch.tensor([True, False])
    x_daps = torch.zeros(2, *SHAPE)
    x_opt = torch.where(take.view(-1, 1, 1, 1), torch.ones(2, *SHAPE), x_daps)
    unit = lambda t: torch.ones_like(t)  # noqa: E731 - every noise draw is 1
    out = rule.map_to(x_opt, x_daps, take, 1.0, 0.5, unit)
    g, s2 = rule.resample_variance(1.0, 0.5), 0.25
    expect = (g * 1 + s2 * (0 + 0.5)) / (g + s2) + math.sqrt(g * s2 / (g + s2))
    assert torch.allclose(out[0], torch.full(SHAPE, expect)) and torch.allclose(out[1], torch.full(SHAPE, 0.5))
    assert torch.equal(HardDC(step=200, map_back="continue").map_to(x_opt, x_daps, take, 1.0, 0.5, unit)[0],
                       torch.full(SHAPE, 1.5))
    assert torch.equal(rule.map_to(x_opt, x_daps, take, 1.0, None, unit), x_opt)


# the loop -----------------------------------------------------------------------------------------------------------

def make(hard_dc=None, repulsion=None, pruning=None):
    return build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                          "hard_dc": hard_dc, "repulsion": repulsion, "pruning": pruning}, MCMC)


def run(d, s, y, groups, events=None, checkpoint=None):
    noise = ParticleNoise([100 * g + k for k, g in enumerate(groups)])
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    ps = start_particles([ParticleId(g, 0, k) for k, g in enumerate(groups)], y[groups], groups, noise, x0)
    return s.sample(d, PhaseRetrieval(), ps, callback=None if events is None else events.append, checkpoint=checkpoint)


DC = {"step": 600, "max_iters": 20, "patience": 5, "lr": 0.01}


def test_dry_run_measures_without_changing_the_trajectory(gmm):
    d, y = gmm
    events = []
    dry = run(d, make({**DC, "accept": "never"}), y, [0, 0, 1], events)
    plain = run(d, make(), y, [0, 0, 1])
    assert torch.equal(dry.x, plain.x)
    dc = [e["hard_dc"] for e in events if e["event"] == "level" and "hard_dc" in e]
    assert dc and all(a == 0 for e in dc for a in e["accepted"])
    assert all(after < before for e in dc for before, after in zip(e["loss_before"], e["loss_after"]))
    assert all(r["levels"] == len(dc) and r["accepted"] == 0 for r in dry.hard_dc.values()) and dry.hard_dc_sec > 0


def test_dry_run_with_pruning_at_its_start_level_prunes_as_daps(gmm):
    d, y = gmm
    prune = {"step": 600, "keep": 2}
    dry = run(d, make({**DC, "accept": "never"}, pruning=prune), y, [0, 0, 0, 1, 1, 1])
    plain = run(d, make(pruning=prune), y, [0, 0, 0, 1, 1, 1])
    assert dry.status == plain.status and dry.status.count("pruned") == 2
    assert torch.equal(dry.x.nan_to_num(), plain.x.nan_to_num())


def test_optimize_phase_turns_repulsion_off_and_lowers_the_loss(gmm):
    d, y = gmm
    events = []
    rep = {"scale": 1.0, "until_t": 10, "until_sigma": None}  # repulsion would go on to the last level
    res = run(d, make({**DC, "every": 2}, repulsion=rep), y, [0, 0, 1, 1], events)
    levels = [e for e in events if e["event"] == "level"]
    phases = [(e["phase"], e["step"]) for e in events if e["event"] == "phase"]
    first = next(e["step"] for e in levels if e["sigma"] <= d.sigma_at_time(600))
    assert phases == [("explore", 0), ("optimize", first), (None, len(levels))]
    assert all((e["repulsion"]["strength"] > 0) == (e["step"] < first) for e in levels)
    assert [e["step"] for e in levels if "hard_dc" in e] == list(range(first, len(levels), 2))
    assert all(r["levels"] == len(range(first, len(levels), 2)) for r in res.hard_dc.values())
    assert all(s in STOPS for e in levels if "hard_dc" in e for s in e["hard_dc"]["stop"])


def test_a_measurements_result_does_not_depend_on_its_batch(gmm):
    d, y = gmm
    s = make({**DC, "accept": "improved", "map_back": "resample"})
    both = run(d, s, y, [0, 0, 1, 1])
    alone = run(d, s, y, [0, 0])
    torch.testing.assert_close(both.x[:2], alone.x, rtol=1e-5, atol=1e-6)
    assert [both.hard_dc[k]["steps"] for k in (0, 1)] == [alone.hard_dc[k]["steps"] for k in (0, 1)]


def test_pruning_slices_the_optimiser_state(gmm):
    d, y = gmm
    dc = {**DC, "warm_start": True}
    full, pruned = [], []
    run(d, make(dc), y, [0, 0, 0, 1, 1, 1], checkpoint=lambda st: full.append(st()))
    events = []
    run(d, make(dc, pruning={"step": 600, "keep": 2}), y, [0, 0, 0, 1, 1, 1], events, checkpoint=lambda st: pruned.append(st()))
    (prune,) = [e for e in events if e["event"] == "prune"]
    k = prune["step"]
    survivors = pruned[k]["row"]
    assert len(survivors) == 4 and set(pruned[k]["state"]) == {"hard_dc_m", "hard_dc_v", "hard_dc_t"}
    for key in ("hard_dc_m", "hard_dc_v", "hard_dc_t"):
        assert pruned[k]["state"][key].shape[0] == 4
        assert torch.equal(pruned[k]["state"][key], full[k]["state"][key][survivors])
    assert (pruned[k]["state"]["hard_dc_t"] > 0).all()
