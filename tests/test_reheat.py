"""K2 reheating (cores/reheat.py) and its signal, the IMQ kernel Stein discrepancy (cores/stein.py): the KSD formula
against autograd, its limits, the rule's triggers and bounds, a forced reheat end to end that check_events accepts,
and a rise without a reheat event that it refuses."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from cores.k2 import K2Schedule
from cores.reheat import Reheat
from cores.scheduler import PresetSchedule
from cores.stein import imq_ksd_rows
from tests.test_cli import ROOT, cli
from tests.test_k2 import ANNEAL, FAST, make, run, walk


def u_autograd(x, y, sx, sy, c=1.0, beta=-0.5):
    """The Stein kernel u(x, y) with the IMQ kernel's derivatives taken by autograd (the definition, term by term)."""
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    k = (c**2 + (x - y).pow(2).sum()).pow(beta)
    gx, gy = torch.autograd.grad(k, (x, y), create_graph=True)
    trace = sum(torch.autograd.grad(gy[a], x, retain_graph=True)[0][a] for a in range(len(x)))
    return (k * sx @ sy + sx @ gy + gx @ sy + trace).item()


def test_ksd_rows_match_the_definition_and_keep_measurements_apart():
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 2])
    rows = imq_ksd_rows(x, s, group)
    expect0 = (u_autograd(x[0], x[1], s[0], s[1]) + u_autograd(x[0], x[2], s[0], s[2])) / 2
    assert rows[0].item() == pytest.approx(expect0, rel=1e-10)
    assert rows[3].isnan() and rows[4].isnan()  # alone in their measurement: no pair, no KSD
    # another measurement's particles do not enter a row
    moved = x.clone()
    moved[3] += 100
    torch.testing.assert_close(imq_ksd_rows(moved, s, group)[:3], rows[:3])


def test_ksd_is_near_zero_for_draws_of_the_target_and_grows_for_biased_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)  # N(0, I), score -x
    group = torch.zeros(400, dtype=torch.long)
    exact = imq_ksd_rows(x, -x, group).mean().item()
    biased = imq_ksd_rows(x + 1.0, -(x + 1.0), group).mean().item()  # draws of N(1, I) scored under N(0, I)
    shrunk = imq_ksd_rows(0.3 * x, -0.3 * x, group).mean().item()     # stuck particles: too little spread
    assert abs(exact) < 0.02 * biased and biased > 0 and shrunk > 10 * abs(exact)


def test_reheat_rule_triggers_require_and_cap():
    rule = Reheat.from_config({"enabled": True, "triggers": ["ksd_plateau", "low_cess"], "require": "all",
                               "ksd_window": 2, "ksd_tol": 0.1, "min_cess": 0.5, "max_reheats": 1})
    rule.start()
    st = {"ksd": [1.0, 1.0], "group": [0, 0], "finite": [True, True], "acceptance": None}
    assert rule.signals(st, 0.9)["fired"] == []                       # no history yet
    rule.signals(st, 0.9)
    sig = rule.signals(st, 0.9)                                       # flat over 2 levels: plateau
    assert sig["fired"] == ["ksd_plateau"] and sig["ksd_decrease"] == 0 and not rule.decide(sig)  # 'all' not met
    sig = rule.signals(st, 0.2)
    assert sig["fired"] == ["ksd_plateau", "low_cess"] and rule.decide(sig)
    assert rule.apply(1.0, bound=5.0) == 2.0 and rule.count == 1 and rule.ksd_history == []
    assert not rule.decide(sig)                                       # max_reheats reached
    assert Reheat(enabled=True, factor=3.0).apply(1.0, bound=1.5) == 1.5  # bounded by the preset's next level
    assert Reheat(enabled=True).apply(1.0, bound=0.9) is None         # no levels saved: nothing to spend
    nan = {**st, "ksd": [math.nan, 1.0]}
    assert Reheat.from_config({"enabled": True, "triggers": ["ksd_plateau"]}).signals(nan, None)["ksd"] is None


def test_reheat_config_errors_name_the_key(gmm):
    with pytest.raises(ValueError, match=r"reheat.factr \(did you mean factor\?\)"):
        make({**FAST, "reheat": {"factr": 2.0}})
    for bad, match in (({"triggers": ["plateau"]}, "triggers"), ({"require": "most"}, "require"),
                       ({"factor": 1.0}, "factor"), ({"max_reheats": -1}, "max_reheats"), ({"min_cess": 2}, "min_cess")):
        with pytest.raises(ValueError, match=match):
            make({**FAST, "reheat": {"enabled": True, **bad}})
    d, _ = gmm
    acc = {**FAST, "reheat": {"enabled": True, "triggers": ["low_acceptance"]}}
    with pytest.raises(ValueError, match="low_acceptance reads MH acceptance rates, but mc_algo=hmc"):
        make(acc).check(d, 2)
    make(acc, mc_algo="mala").check(d, 2)


def test_a_forced_trigger_reheats_within_the_preset_bounds():
    preset = PresetSchedule.from_config({**ANNEAL, "num_steps": 30})
    sched = K2Schedule(preset, warm_steps=2, max_step_factor=3.0,
                       reheat={"enabled": True, "triggers": ["low_cess"], "min_cess": 1.0, "max_reheats": 2})
    visited, reports = walk(sched, [[0.5, 1.0, 1.5, 2.0]])
    rises = [k for k, (a, b) in enumerate(zip(visited, visited[1:])) if b > a]
    assert len(rises) == 2 and [r["mode"] for r in reports].count("reheat") == 2
    for k in rises:
        assert visited[k + 1] == min(2.0 * visited[k], preset.levels[k + 1]) and reports[k]["mode"] == "reheat"
    assert len(visited) <= len(preset.levels)
    assert all(b <= max(preset.levels[k + 1], sched.threshold) for k, b in enumerate(visited[1:]))
    json.dumps(reports)


def test_ksd_trigger_reheats_in_the_sampler(gmm):
    d, y = gmm
    s = make({**FAST, "reheat": {"enabled": True, "triggers": ["ksd_plateau"], "ksd_window": 1, "ksd_tol": 1.0,
                                 "max_reheats": 1}})
    events = []
    res = run(d, s, y, [0, 0, 1, 1], events=events)
    (reheat,) = [e for e in events if e["event"] == "reheat"]
    assert reheat["trigger"] == ["ksd_plateau"] and math.isfinite(reheat["ksd"])
    k = reheat["step"]
    assert res.levels[k + 1] == reheat["next_sigma"] > res.levels[k]


def test_check_events_accepts_a_reheat_and_refuses_a_rise_without_one(tmp_path):
    args = ["+data=test-fmnist", "+model=fmnist32ddpm", "+task=phase_retrieval", "+sampler=edm_daps",
            "task_group=fmnist_pixel", "+experiment=k2_speed", "data.end_id=1", "num_samples=2",
            "sampler.annealing_scheduler_config.num_steps=16", "sampler.diffusion_scheduler_config.num_steps=1",
            "task.fmnist_pixel.mcmc_sampler_config.num_steps=2", "sampler.k2_scheduler_config.warm_steps=2",
            "++sampler.k2_scheduler_config.reheat.enabled=true",
            "++sampler.k2_scheduler_config.reheat.triggers=[low_cess]",
            "++sampler.k2_scheduler_config.reheat.min_cess=1.0", "eval_fn_list=[psnr]", "show_progress=false",
            f"save_dir={tmp_path}", "name=reheat"]
    proc = cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "reheat"
    check = [sys.executable, str(ROOT / "scripts" / "check_events.py"), str(run_dir)]
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode == 0 and "reheats 2" in out.stdout and "monotone=True" in out.stdout, out.stdout
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    (run_dir / "events.jsonl").write_text("\n".join(ln for ln in lines if '"event": "reheat"' not in ln) + "\n")
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode == 1 and "monotone=False" in out.stdout, out.stdout
