"""The K2 experiment log's commands (../shared/seeds/k2-daps-experiment-log.md, sections 5, 12 and 14) run as
written, on the embedded Fashion-MNIST prior instead of the FFHQ checkpoint and with tiny sizes appended (a later
override of the same key wins in Hydra); the log's own diagnostics (section 6's snippet, section 17's awk count of
``"mode": "used"``) read the events they write."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import ROOT, cli

FIXED = """+data=test-ffhq +model=ffhq256ddpm +task=phase_retrieval +sampler=edm_daps
    task_group=pixel_hmc save_dir=results num_runs=1
    +sampler.diffusion_scheduler_config.solver=euler
    sampler.diffusion_scheduler_config.num_steps=5
    sampler.annealing_scheduler_config.num_steps=200"""
NOOP = """++sampler.k2_scheduler_config.name=k2
    ++sampler.k2_scheduler_config.target_cess=1.0
    ++sampler.k2_scheduler_config.max_step_factor=1.0
    ++sampler.k2_scheduler_config.ema_alpha=0.0
    ++sampler.k2_scheduler_config.min_sigma=0.05"""
K2 = """++sampler.k2_scheduler_config.name=k2
    ++sampler.k2_scheduler_config.target_cess=0.90
    ++sampler.k2_scheduler_config.max_step_factor=3.0
    ++sampler.k2_scheduler_config.ema_alpha=0.2
    ++sampler.k2_scheduler_config.min_sigma=0.05"""
SLICE = "save_traj=false batch_size=10 data.start_id=0 data.end_id=20"
COMMANDS = {  # name: the log's overrides, verbatim
    "s5_baseline": f"{FIXED} sampler.k2_scheduler_config=null",
    "s5_k2": f"{FIXED} {K2}",
    "s12_noop_baseline": f"{FIXED} {NOOP} {SLICE} name=ab_hmc_euler_baseline_s0_20_noopk2 gpu=0",
    "s12_k2": f"{FIXED} {K2} {SLICE} name=ab_k2_cess_euler_min005_s0_20 gpu=0",
    "s14_k2_early": "+data=test-ffhq +model=ffhq256ddpm +task=phase_retrieval +sampler=edm_daps task_group=pixel_hmc "
                    "save_dir=results num_runs=1 +sampler.diffusion_scheduler_config.solver=euler "
                    "sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 "
                    "++sampler.k2_scheduler_config.name=k2 ++sampler.k2_scheduler_config.target_cess=0.90 "
                    "++sampler.k2_scheduler_config.max_step_factor=3.0 ++sampler.k2_scheduler_config.ema_alpha=0.2 "
                    "++sampler.k2_scheduler_config.min_sigma=0.05002 ++sampler.k2_scheduler_config.early_stop=true "
                    "+eval_fn_list='[psnr]' save_traj=false batch_size=10 data.start_id=0 data.end_id=20 "
                    "name=time_ab_k2_psnr_early gpu=0",
}
TINY = ["data.end_id=1", "sampler.annealing_scheduler_config.num_steps=14",
        "sampler.diffusion_scheduler_config.num_steps=1", "task.pixel_hmc.mcmc_sampler_config.num_steps=2",
        "show_progress=false"]


def log_snippet(events: Path) -> tuple[bool, bool, float | None]:
    """Section 6's check, as the log writes it: (propagates, monotone, last next_sigma) over ``mode: cess`` records."""
    prop = mono = True
    prev = last = None
    for ln in events.open():
        ev = json.loads(ln)
        if ev.get("mode") == "cess":
            if prev is not None:
                prop &= abs(prev - float(ev["sigma"])) < 1e-6
            mono &= float(ev["next_sigma"]) <= float(ev["sigma"]) + 1e-9
            last = float(ev["next_sigma"])
            prev = last
    return prop, mono, last


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_logs_k2_commands_run_as_written(tmp_path, name):
    args = shlex.split(COMMANDS[name].replace("+data=test-ffhq +model=ffhq256ddpm", "+data=test-fmnist "
                                              "+model=fmnist32ddpm"))
    args = [a.replace("save_dir=results", f"save_dir={tmp_path}") for a in args]
    k2_on = "k2_scheduler_config=null" not in COMMANDS[name]
    proc = cli(args + TINY + (["++sampler.k2_scheduler_config.warm_steps=2"] if k2_on else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    timing = json.loads((run / "timing.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == (4 if k2_on else 1)  # num_samples: null -> 4 with K2 (the log's 4 runs)
    assert ("Not batch-invariant: the sampler couples the whole batch" in (run / "eval.md").read_text()) == k2_on
    used_lines = sum('"mode": "used"' in line for line in (run / "events.jsonl").open())  # section 17's awk
    assert used_lines == (timing["used_anneal_steps"] if k2_on else 0)
    if name == "s14_k2_early":
        assert set(metrics["eval"]) == {"psnr"} and timing["used_anneal_steps"] < 14
    if name == "s12_k2":
        prop, mono, last = log_snippet(run / "events.jsonl")
        assert prop and mono and last is not None
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_events.py"), str(run)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (f"K2 used {timing['used_anneal_steps']} levels" in check.stdout) == k2_on
