"""Particle exploration (cores/repulsion.py, cores/pruning.py): the force is the gradient of the kernel sum, stays
within a measurement and ends at its cut-off; a measurement's result does not depend on the others in its batch;
pruning keeps the survivors' states unchanged, slices every per-particle field, records what it dropped; branching
is reproducible."""
from __future__ import annotations

import math

import pytest
import torch

from cores.noise import ParticleNoise
from cores.operators import PhaseRetrieval
from cores.pruning import Pruning, choose
from cores.repulsion import Repulsion, Tilt, median_bandwidth, repulsion_grad, repulsion_potential
from sampler import ParticleId, build_sampler, start_particles

ANNEAL = {"name": "edm", "num_steps": 10, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 4, "lr": 1e-3, "tau": 0.05, "lr_min_ratio": 1.0, "mc_algo": "langevin"}


def make(repulsion=None, pruning=None, **mcmc):
    return build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                          "repulsion": repulsion, "pruning": pruning}, {**MCMC, **mcmc})


def run(d, s, y, groups, seeds=None, events=None):
    seeds = seeds or [100 * g + k for k, g in enumerate(groups)]
    noise = ParticleNoise(seeds)
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    ps = start_particles([ParticleId(g, 0, k) for k, g in enumerate(groups)], y[groups], groups, noise, x0)
    return s.sample(d, PhaseRetrieval(), ps, callback=None if events is None else events.append)


def test_force_is_the_gradient_of_the_kernel_sum_and_stays_in_its_measurement():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    x = (a + 0.3 * torch.randn(5, 2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    group = torch.tensor([0, 0, 0, 1, 1])
    h = median_bandwidth(a, group)
    (auto,) = torch.autograd.grad(-repulsion_potential(x, a, group, h).sum(), x)
    torch.testing.assert_close(repulsion_grad(x.detach(), a, group, h), auto, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: repulsion_potential(v, a, group, h), (x,))
    # another measurement's particles do not enter; a particle alone in its measurement feels nothing
    moved = a.clone()
    moved[3:] += 5.0
    torch.testing.assert_close(repulsion_grad(x.detach(), moved, group, h)[:3], auto[:3])
    alone = torch.tensor([0, 1, 2, 3, 4])
    assert repulsion_grad(x.detach(), a, alone, torch.ones(5, dtype=torch.float64)).abs().max() == 0
    # the median rule: n = 3 -> log 2 in the denominator; n = 2 -> log 2 too (log 1 = 0)
    d2 = ((a[0] - a[1]).pow(2).sum(), (a[0] - a[2]).pow(2).sum())
    assert h[0].item() == pytest.approx(float(torch.stack(d2).median()) / math.log(2))
    assert h[3].item() == pytest.approx(float((a[3] - a[4]).pow(2).sum()) / math.log(2))


def test_strength_decays_to_zero_at_the_cut_off():
    for decay in ("linear", "cosine", "constant"):
        rule = Repulsion(scale=4.0, decay=decay, until_sigma=1.0, until_t=None)
        assert rule.strength(10.0, 10.0, 1.0) == 4.0
        assert rule.strength(0.99, 10.0, 1.0) == 0.0
        mid = rule.strength(math.sqrt(10.0), 10.0, 1.0)
        assert mid == pytest.approx({"linear": 2.0, "cosine": 2.0, "constant": 4.0}[decay])
    assert Repulsion().strength(10.0, 10.0, 1.0) == 0.0  # scale 0: off
    with pytest.raises(ValueError, match="did you mean scale"):
        Repulsion.from_config({"scael": 1.0})
    with pytest.raises(ValueError, match="repulsion-free"):
        Repulsion.from_config({"scale": 1.0, "until_t": None, "until_sigma": None})


def test_mh_kernels_see_the_tilt():
    from cores.mcmc import Target
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    group = torch.tensor([0, 0, 0])
    tilt = Tilt(a, group, median_bandwidth(a, group), 2.0)
    loss = lambda v: v.pow(2).sum(1)  # noqa: E731
    plain, tilted = Target(loss, 1.0, 0.5, a), Target(loss, 1.0, 0.5, a, tilt=tilt)
    torch.testing.assert_close(tilted.log_prob(x)[0] - plain.log_prob(x)[0], tilt.log_value(x))
    torch.testing.assert_close(tilted.grad(x)[0] - plain.grad(x)[0], tilt.grad(x))


def test_repulsion_logs_and_a_measurement_does_not_depend_on_its_batch(gmm):
    d, y = gmm
    s = make({"scale": 5.0, "until_sigma": 1.0, "until_t": None})
    events = []
    batch = run(d, s, y, [0, 0, 0, 1, 1], events=events)
    alone = run(d, s, y, [0, 0, 0], seeds=[0, 1, 2])
    torch.testing.assert_close(alone.x, batch.x[:3], rtol=1e-5, atol=1e-6)
    levels = [e for e in events if e["event"] == "level"]
    on = [e["repulsion"] for e in levels if e["sigma"] >= 1.0]
    off = [e["repulsion"] for e in levels if e["sigma"] < 1.0]
    assert on and off and all(r["gamma"] > 0 and r["bandwidth"] > 0 for r in on)
    assert all(r["force_ratio"] == pytest.approx(r["strength"], rel=1e-4) for r in on)  # units: ratio
    assert all(r["strength"] == 0 and r["gamma"] is None and r["force_ratio"] is None for r in off)
    assert set(levels[0]["repulsion"]["pair_dist"]) == {"0", "1"}
    assert levels[0]["repulsion"]["pair_dist"]["0"]["min"] <= levels[0]["repulsion"]["pair_dist"]["0"]["mean"]
    free = run(d, make(), y, [0, 0, 0, 1, 1])
    assert not torch.equal(free.x, batch.x)  # the force acted
    events = []
    run(d, make({"scale": 5.0, "units": "absolute", "until_sigma": 1.0, "until_t": None}), y, [0, 0], events=events)
    first = events[1]["repulsion"]
    assert first["gamma"] == pytest.approx(5.0) and first["force_ratio"] != pytest.approx(5.0)


def test_choose_keeps_the_best_a_far_good_one_and_drops_a_close_one():
    losses = [1.0, 1.1, 1.2, 5.0]
    dist = [[0, 0.01, 0.5, 0.5], [0.01, 0, 0.5, 0.5], [0.5, 0.5, 0, 0.5], [0.5, 0.5, 0.5, 0]]
    assert choose(losses, dist, keep=2, close=0.1, loss_tol=0.5) == [0, 2]     # 1 is close to 0; 2 far and good
    assert choose(losses, dist, keep=2, close=0.1, loss_tol=0.1, fill=False) == [0]  # 2 is beyond the tolerance
    assert choose(losses, dist, keep=2, close=0.1, loss_tol=0.1) == [0, 1]     # filled by loss
    assert choose([math.nan, 2.0], [[0, 1], [1, 0]], keep=2, close=0.1, loss_tol=1.0) == [1]


def test_choose_by_distance_keeps_the_other_twin():
    """Twins of equal loss: 0 and 1 are two draws of one mode (0.7 apart), 2 the 180-degree twin (1.5 from 0)."""
    losses, dist = [1.0, 1.01, 1.02], [[0, 0.7, 1.5], [0.7, 0, 1.4], [1.5, 1.4, 0]]
    assert choose(losses, dist, keep=2, close=0.1, loss_tol=0.5) == [0, 1]  # by loss: both of one mode
    assert choose(losses, dist, keep=2, close=0.1, loss_tol=0.5, order="distance") == [0, 2]
    with pytest.raises(ValueError, match="order must be loss or distance"):
        Pruning.from_config({"step": 200, "order": "random"})
    with pytest.raises(ValueError, match="pruning_step"):
        Pruning.from_config({"step": 2000})


def test_pruning_keeps_survivors_unchanged_and_records_the_dropped(gmm):
    d, y = gmm
    prune = {"step": 500, "keep": 2}
    events = []
    pruned = run(d, make(pruning=prune), y, [0, 0, 0, 0, 1, 1, 1], events=events)
    full = run(d, make(), y, [0, 0, 0, 0, 1, 1, 1])
    (ev,) = [e for e in events if e["event"] == "prune"]
    assert [p for p in events if p["event"] == "phase"][1] == {"event": "phase", "phase": "refine",
                                                               "step": ev["step"] + 1}
    assert d.sigma_at_time(500) >= ev["sigma"] and all(len(m["kept"]) == 2 for m in ev["measurements"])
    kept = [k for k, st in enumerate(pruned.status) if st == "ok"]
    gone = [k for k, st in enumerate(pruned.status) if st == "pruned"]
    assert len(kept) == 4 and len(gone) == 3 and set(pruned.pruned) == set(gone)
    assert all(pruned.stopped_at[k] == ev["step"] for k in gone) and pruned.x[gone].isnan().all()
    torch.testing.assert_close(pruned.x[kept], full.x[kept], rtol=0, atol=0)
    assert all(pruned.pruned[k].shape == tuple(d.image_shape) for k in gone)
    # fewer particles after the prune: fewer particle evaluations of the denoiser
    assert pruned.particle_network_evals < full.particle_network_evals


def test_branching_refills_reproducibly_with_fresh_streams(gmm):
    d, y = gmm
    s = make(pruning={"step": 500, "keep": 1, "branch": True})
    events = []
    a = run(d, s, y, [0, 0, 0], events=events)
    b = run(d, s, y, [0, 0, 0])
    assert torch.equal(a.x, b.x) and a.status == ["ok"] * 3 and len(a.parents) == 2 and len(a.pruned) == 2
    (ev,) = [e for e in events if e["event"] == "prune"]
    parent = ev["measurements"][0]["kept"][0]
    assert set(ev["branched"].values()) == {parent}
    rows = sorted(a.parents)
    assert not torch.equal(a.x[rows[0]], a.x[rows[1]])  # clones draw from their own streams
