"""K2-DAPS (cores/k2.py): CESS limits, bisection, the schedule's bounds, warm-up, early stop, the no-op profile, config,
and the batch property that replaces batch invariance with K2 on.

Batch property: K2's batch median makes one sigma sequence for the whole batch, so a particle's result depends on
the other measurements in its batch. What holds instead, and is tested: the particles interact only through that
sequence. Replaying the sigma sequence of a K2 run as a preset schedule, one measurement's particles run alone
reproduce their results in the K2 batch.
"""
import json
import math

import pytest
import torch

from cores.k2 import K2Schedule, cess, cess_step, incremental_log_weights, k2_settings, preset_position
from cores.models import build_model
from cores.noise import ParticleNoise
from cores.operators import PhaseRetrieval
from cores.scheduler import PresetSchedule, sigma_schedule
from sampler import DAPS, ParticleId, build_sampler, start_particles

ANNEAL = {"name": "edm", "num_steps": 12, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": "hmc", "momentum": 0.5}
FAST = {"target_cess": 0.9, "max_step_factor": 3.0, "ema_alpha": 0.2, "warm_steps": 2, "min_sigma": 0.05}
NOOP = {"name": "k2", "target_cess": 1.0, "max_step_factor": 1.0, "ema_alpha": 0.0, "min_sigma": 0.05}


def make(k2, anneal=ANNEAL, **mcmc) -> DAPS:
    return build_sampler({"annealing_scheduler_config": anneal, "diffusion_scheduler_config": ODE,
                          "k2_scheduler_config": k2}, {**MCMC, **mcmc})


def run(d, s, y, groups, seeds=None, events=None):
    """Particles of measurements ``groups`` (one entry per particle: its row of y), particle k seeded with seeds[k]."""
    seeds = seeds or list(range(len(groups)))
    noise = ParticleNoise(seeds)
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    ps = start_particles([ParticleId(g, 0, k) for k, g in enumerate(groups)], y[groups], groups, noise, x0)
    return s.sample(d, PhaseRetrieval(), ps, callback=None if events is None else events.append)


def levels_of(events):
    return [e for e in events if e["event"] == "level"]


def decisions(events):
    """K2's decision record of each level (``event: k2``, not ``mode: used``), in level order."""
    return [e for e in events if e["event"] == "k2" and e["mode"] != "used"]


def test_cess_is_one_for_equal_weights_and_one_over_n_for_one_dominant_weight():
    assert cess([0.3] * 5) == pytest.approx(1.0)
    assert cess([0.0, -1e4, -1e4, -1e4, -1e4]) == pytest.approx(1 / 5)
    assert cess([0.0, -math.inf, -math.inf]) == pytest.approx(1 / 3)
    assert cess([1.0, 2.0, 3.0]) == pytest.approx(cess([101.0, 102.0, 103.0]))  # scale of w cancels
    # with previous weights W, particles of zero weight do not count; all weight on one particle: CESS 1
    assert cess([0.0, -5.0, 3.0], [math.log(0.5), math.log(0.5), -math.inf]) == \
        pytest.approx(cess([0.0, -5.0]))
    assert cess([0.0, -5.0, 3.0], [0.0, -math.inf, -math.inf]) == pytest.approx(1.0)


def test_bisection_hits_the_target_and_respects_the_cap():
    r = [0.2, 1.0, 1.7, 3.1, 0.05, 2.2]
    for target in (0.5, 0.8, 0.95):
        delta = cess_step(r, target, 1e6)
        assert cess(incremental_log_weights(r, delta)) == pytest.approx(target, abs=1e-9)
        assert cess(incremental_log_weights(r, delta)) >= target
    deltas = [0.0, 0.1, 0.5, 1.0, 3.0, 10.0]
    values = [cess(incremental_log_weights(r, d)) for d in deltas]
    assert all(b <= a for a, b in zip(values, values[1:])) and values[0] == 1.0  # CESS falls with the step
    assert cess_step(r, 0.5, 0.01) == 0.01  # the cap decides when CESS stays above the target
    assert cess_step([1.0] * 4, 0.99, 8.0) == 8.0  # equal residuals: CESS is 1 at any step
    assert cess_step(r, 1.0, 8.0) < 1e-6 and cess_step(r, 0.5, 0.0) == 0.0  # (CESS rounds to 1 below ~1e-8)


def test_preset_position_and_progress():
    levels = sigma_schedule("edm", 12, 10.0, 0.1).tolist()
    assert [preset_position(levels, s) for s in levels] == list(range(12))
    assert 3 < preset_position(levels, math.sqrt(levels[3] * levels[4])) < 4
    assert preset_position(levels, 20.0) == 0.0 and preset_position(levels, 0.01) == 11.0
    sched = K2Schedule(PresetSchedule(levels))
    assert [sched.progress(k, s) for k, s in enumerate(levels)] == [PresetSchedule(levels).progress(k, s)
                                                                    for k, s in enumerate(levels)]


def stats(r_per_group, sigma):
    """Host statistics whose normalised residuals are ``r_per_group`` (one list per measurement)."""
    shift = [r * (sigma**2 + 1e-8) for rs in r_per_group for r in rs]
    group = [float(g) for g, rs in enumerate(r_per_group) for _ in rs]
    return {"x0_shift": shift, "group": group, "finite": [1.0] * len(shift), "loss": [0.0] * len(shift),
            "acceptance": None}


def walk(sched, r_per_group):
    """The levels a schedule visits for fixed normalised residuals, and its reports."""
    sigma, step, out, reports = sched.start(), 0, [], []
    while sigma is not None:
        out.append(sigma)
        nxt = sched.next(step, sigma, stats(r_per_group, sigma))
        reports.append(sched.events()[0])
        sigma, step = nxt, step + 1
    return out, reports


def test_warm_up_floor_monotone_and_min_sigma_hold():
    preset = PresetSchedule.from_config({**ANNEAL, "num_steps": 30})
    spread = [[0.5, 1.0, 1.5, 2.0], [1.0, 1.1, 0.9, 1.2], [0.1, 3.0, 1.0, 1.0]]
    for kw in ({"max_step_factor": 3.0}, {"max_step_factor": 1.01}, {"target_cess": 0.6, "ema_alpha": 0.5},
               {"max_step_factor": 5.0, "min_sigma": 0.5}, {"max_step_factor": 5.0, "min_sigma": 0.5,
                                                              "early_stop": True}):
        sched = K2Schedule(preset, warm_steps=4, **kw)
        visited, reports = walk(sched, spread)
        assert visited[:5] == preset.levels[:5] and [r["mode"] for r in reports[:4]] == ["warm"] * 4
        assert len(visited) <= len(preset.levels)
        for k, (a, b) in enumerate(zip(visited, visited[1:])):
            assert b <= a, "sigma never increases"
            assert b <= max(preset.levels[k + 1], sched.threshold), "never slower than the preset (to min_sigma)"
            assert b >= sched.threshold
        assert visited[-1] >= sched.threshold
    # the floor acts when K2's cap is smaller than the preset's step
    _, reports = walk(K2Schedule(preset, warm_steps=0, max_step_factor=1.01), spread)
    assert all(r["floor"] for r in reports if r["mode"] == "cess")
    # min_sigma stops the descent; without early stop the remaining levels stay there (log section 15)
    visited, reports = walk(K2Schedule(preset, warm_steps=0, max_step_factor=5.0, min_sigma=0.5), spread)
    assert len(visited) == 30 and visited[-10:] == [0.5] * 10 and any(r["min_sigma"] for r in reports)
    # the monotone clamp: the warm-up (the preset) took sigma below min_sigma; K2 does not raise it back
    visited, reports = walk(K2Schedule(preset, warm_steps=27, min_sigma=1.0), spread)
    assert visited[28] == visited[27] < 1.0 and reports[27]["clamp"]
    # the CESS rule itself binds for a small target: the step of each measurement keeps its CESS at the target
    _, reports = walk(K2Schedule(preset, warm_steps=0, target_cess=0.3, max_step_factor=100.0, ema_alpha=0.0),
                      [[0.5, 1.0, 1.5, 2.0]])
    first = reports[0]
    assert first["capped"] == 0 and not first["floor"] and first["cess"]["groups"][0] == pytest.approx(0.3, abs=1e-6)
    json.dumps(reports)  # events.jsonl needs plain JSON


def test_measurements_with_one_particle_carry_no_cess():
    preset = PresetSchedule.from_config(ANNEAL)
    sched = K2Schedule(preset, warm_steps=0)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        sched.check_particles(1)
    sched.check_particles(2)
    K2Schedule(preset, max_step_factor=1.0).check_particles(1)  # the no-op profile is the preset: one particle will do
    visited, reports = walk(sched, [[1.0], [2.0]])  # every measurement down to one particle: the preset decides
    assert visited == preset.levels and reports[0]["cess"] == {"groups": [None, None], "median": None}


def test_warm_up_levels_equal_the_preset(gmm):
    d, y = gmm
    s = make({**FAST, "warm_steps": 4})
    events = []
    res = run(d, s, y, [0, 0, 1, 1], events=events)
    levels = levels_of(events)
    assert res.levels[:5] == s.schedule.preset.levels[:5] == [e["sigma"] for e in levels][:5]
    k2s = decisions(events)
    assert [e["mode"] for e in k2s[:4]] == ["warm"] * 4 and k2s[4]["mode"] == "cess"
    assert res.levels[5] < s.schedule.preset.levels[5]  # K2 took over (its cap: 3x per level)
    k2 = k2s[4]
    used = [e for e in events if e["event"] == "k2" and e["mode"] == "used"]
    assert [e["sigma_used"] for e in used] == res.levels and [e["step"] for e in k2s] == list(range(len(levels)))
    assert k2["sigma"] == k2["sigma_used"] == levels[4]["sigma"] and k2["next_sigma"] == levels[4]["next_sigma"]
    assert len(k2["cess"]["groups"]) == 2 and k2["dgamma"] == pytest.approx(1 / k2["next_sigma"]**2 - 1 / k2["sigma"]**2)


def test_early_stop_ends_at_the_threshold_without_noise(gmm):
    d, y = gmm
    s = make({**FAST, "early_stop": True})
    events = []
    res = run(d, s, y, [0, 0, 1, 1], events=events)
    levels = levels_of(events)
    assert res.used_levels < ANNEAL["num_steps"] and res.levels[-1] == FAST["min_sigma"]
    k2s = decisions(events)
    assert levels[-1]["next_sigma"] == 0.0 and k2s[-1]["mode"] == "stop" and k2s[-1]["early_stop"]
    assert k2s[-2]["min_sigma"] and levels[-2]["next_sigma"] == FAST["min_sigma"]
    torch.testing.assert_close(res.x, levels[-1]["x0y"], rtol=0, atol=0)
    # without early stop K2 visits as many levels as the preset and stays at the threshold
    res = run(d, make(FAST), y, [0, 0, 1, 1])
    assert res.used_levels == ANNEAL["num_steps"] and res.levels[-1] == FAST["min_sigma"]


def test_noop_profile_is_the_preset_bit_for_bit(pixel_model_dir):
    d = build_model({"name": "diffusers", "path": str(pixel_model_dir)})
    y = PhaseRetrieval()(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    anneal = {**ANNEAL, "num_steps": 5}
    preset = run(d, make(None, anneal), y, [0, 0, 1, 1])
    for warm in (0, 2):
        events = []
        noop = run(d, make({**NOOP, "warm_steps": warm}, anneal), y, [0, 0, 1, 1], events=events)
        assert noop.levels == preset.levels and torch.equal(noop.x, preset.x)
        assert all(e["floor"] for e in decisions(events)[warm:-1])


def test_enabled_false_or_null_runs_the_preset():
    for k2 in (None, {"enabled": False}, {"enabled": False, "name": "k2", "target_cess": 0.5}):
        assert type(make(k2).schedule) is PresetSchedule
    s = make({"name": "k2", "enabled": True})
    assert isinstance(s.schedule, K2Schedule) and s.schedule.warm_steps == 10 and not s.schedule.early_stop


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"sampler.k2_scheduler_config.target_ces \(did you mean target_cess\?\)"):
        make({"name": "k2", "target_ces": 0.9})
    with pytest.raises(ValueError, match=r"k2_scheduler_config.warmup_steps \(did you mean warm_steps\?\)"):
        make({"enabled": False, "warmup_steps": 3})  # a typo fails even when K2 is off
    for bad, match in (({"name": "pid"}, "name must be 'k2'"), ({"target_cess": 1.5}, "target_cess"),
                       ({"max_step_factor": 0.5}, "max_step_factor"), ({"ema_alpha": 1.0}, "ema_alpha"),
                       ({"min_sigma": 20.0}, "min_sigma"), ({"warm_steps": -1}, "warm_steps"),
                       ({"early_stop": "yes"}, "early_stop"), ({"enabled": "no"}, "enabled")):
        with pytest.raises(ValueError, match=match):
            make(bad)
    assert k2_settings({"name": "k2", "target_cess": 0.9}) == {"target_cess": 0.9}


def test_one_particle_per_measurement_is_refused_before_compute(gmm):
    d, y = gmm
    s = make(FAST)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        s.check(d, particles_per_measurement=1)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        run(d, s, y, [0, 1])
    s.check(d, particles_per_measurement=2)
    make(None).check(d, particles_per_measurement=1)


def test_describe_says_k2_couples_the_batch():
    info = make({**FAST, "early_stop": True}).describe()
    assert info["schedule"]["name"] == "k2" and info["schedule"]["anneal_steps"] == ANNEAL["num_steps"]
    assert info["schedule"]["threshold"] == 0.05 and "whole batch" in info["couples"]
    assert "none" in make(None).describe()["couples"]


def test_particles_interact_only_through_the_sigma_sequence(gmm):
    """The property that replaces batch invariance (module docstring): replaying the K2 batch's sigma sequence as a
    preset, measurement 0's particles alone reproduce their results in the batch (constant step size, so that the
    replay's progress ratio does not matter)."""
    d, y = gmm
    s = make({**FAST, "early_stop": True}, lr_min_ratio=1.0)
    batch = run(d, s, y, [0, 0, 0, 1, 1, 1])
    assert batch.levels != s.schedule.preset.levels[:batch.used_levels]
    replay = DAPS(PresetSchedule(batch.levels), s.ode, s.kernel, s.target)
    alone = run(d, replay, y, [0, 0, 0], seeds=[0, 1, 2])
    torch.testing.assert_close(alone.x, batch.x[:3], rtol=1e-4, atol=1e-5)
    again = run(d, s, y, [0, 0, 0, 1, 1, 1])
    assert again.levels == batch.levels and torch.equal(again.x, batch.x)  # deterministic given the batch



def test_statistic_sum_is_the_exact_weight_and_the_mcmc_displacement_keeps_cess_near_one(gmm):
    """``statistic: sum`` weighs the sum over the D coordinates (the exact tempering weight), ``mean`` (the log's) its
    1/D share. Either way the statistic is the MCMC's displacement from the level's mean over sigma^2, which a few
    small MCMC steps keep far below 1 at every level above the noise: the weights are nearly equal, CESS stays near 1
    and max_step_factor decides (the finding docs/k2.md reports)."""
    d, y = gmm
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = type("T", (), {"prior_mean": torch.zeros_like(x)})()
    group = torch.zeros(3, dtype=torch.long)
    mean = make(FAST).schedule.level_stats(target, x, group)["x0_shift"]
    total = make({**FAST, "statistic": "sum"}).schedule.level_stats(target, x, group)["x0_shift"]
    torch.testing.assert_close(total, 64 * mean)
    for stat in ("mean", "sum"):
        events = []
        run(d, make({**FAST, "statistic": stat, "ema_alpha": 0.0}), y, [0, 0, 1, 1], events=events)
        free = [e for e in decisions(events) if e["mode"] == "cess" and not e["min_sigma"]]
        assert free and all(e["capped"] == 2 and e["cess"]["median"] > 0.98 for e in free), stat
    with pytest.raises(ValueError, match="statistic must be one of"):
        make({**FAST, "statistic": "median"})
