"""scripts/parse_metrics.py --modes: the Exp 1-3 table from two real tiny runs (phase retrieval and inpainting)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.test_cli import ROOT, cli

TINY = ["+data=test-fmnist", "+model=fmnist32ddpm", "+sampler=edm_daps", "sampler.annealing_scheduler_config.num_steps=6",
        "sampler.diffusion_scheduler_config.num_steps=1", "eval_fn_list=[psnr]", "show_progress=false", "gpu=-1"]


def test_modes_table_of_a_pruning_run_and_an_inpainting_run(tmp_path):
    r = cli([*TINY, "+task=phase_retrieval", "task_group=fmnist_pixel",
             "task.fmnist_pixel.mcmc_sampler_config.num_steps=2", "+experiment=exp2_pruning", "data.end_id=2", f"save_dir={tmp_path}",
             "name=pr"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli([*TINY, "+task=inpainting", "task_group=pixel", "task.pixel.operator.mask_len_range=[4,5]",
             "task.pixel.mcmc_sampler_config.num_steps=2", "data.end_id=1",
             "sampler.annealing_scheduler_config.num_steps=2", "num_samples=1", f"save_dir={tmp_path}", "name=inp"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "parse_metrics.py"), "--modes", str(tmp_path / "pr"),
                          str(tmp_path / "inp"), "--csv", str(tmp_path / "t.csv")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:4])}
    for col in ("psnr_twin_aware_best (oracle)", "psnr_twin_aware_mean", "mean 95% CI (bootstrap)", "std over images",
                "success_rate", "success 95% CI (Wilson)", "coverage_rate", "pick_psnr_twin_aware (no oracle)",
                "pick_success_rate (no oracle)", "pair_dist (final level)", "explore_sec", "refine_sec"):
        assert col in header
    assert "oracle" in out.stdout and "Wilson" in out.stdout
    m = json.loads((tmp_path / "pr" / "metrics.json").read_text())
    pr = rows["pr"]
    assert float(pr["psnr_twin_aware_best (oracle)"]) == float(f"{m['aggregate']['psnr_twin_aware']['best_of_n']:.4g}")
    means = [img["summary"]["psnr_twin_aware"]["mean"] for img in m["images"]]
    assert float(pr["psnr_twin_aware_mean"]) == float(f"{np.mean(means):.4g}")
    assert float(pr["success_rate"]) == m["modes"]["success_rate"]
    assert float(pr["coverage_rate"]) == m["modes"]["coverage_rate"]
    assert float(pr["pick_psnr_twin_aware (no oracle)"]) == float(f"{m['modes']['pick_psnr_twin_aware']:.4g}")
    assert float(pr["refine_sec"]) == float(f"{m['timing']['phases']['refine']['wall_sec']:.4g}")
    assert float(pr["pair_dist (final level)"]) > 0
    inp = rows["inp"]
    assert inp["success_rate"] == "n/a" and inp["psnr_twin_aware_best (oracle)"] == "n/a"
    assert "pr,complete,2," in (tmp_path / "t.csv").read_text()
