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


def _twin_run(folder, best, mean, pick, success, coverage, streams):
    """A results folder with the fields --modes reads: per image psnr_twin_aware best / mean, the pick's PSNR and
    mode, success and coverage; and level events with elapsed_sec for each (images, run) stream of
    ``streams`` = {run: [elapsed of level 0, 1, ...]} (closing phase event 0.5 s after the last level)."""
    folder.mkdir()
    images = [{"index": i, "summary": {"psnr_twin_aware": {"n": 2, "best": b, "mean": m}},
               "modes": {"success": s, "coverage": c, "pick": {"psnr_twin_aware": p, "mode": "0" if s else "none"}}}
              for i, (b, m, p, s, c) in enumerate(zip(best, mean, pick, success, coverage))]
    n = len(images)
    metrics = {"status": "complete", "num_images_done": n, "images": images,
               "aggregate": {"psnr_twin_aware": {"best_of_n": float(np.mean(best)), "mean_std_over_particles": 1.5}},
               "modes": {"images": n, "success_rate": sum(success) / n, "coverage_rate": sum(coverage) / n,
                         "pick_psnr_twin_aware": float(np.mean(pick)),
                         "pick_success_rate": sum(success) / n}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    lines = []
    for run, times in streams.items():
        lines.append({"elapsed_sec": 0.0, "images": [0, n - 1], "run": run, "event": "phase", "phase": "explore",
                      "step": 0})
        for step, t in enumerate(times):
            lines.append({"elapsed_sec": t, "event": "level", "images": [0, n - 1], "run": run, "step": step,
                          "repulsion": {"strength": 0.0, "pair_dist": {str(g): {"mean": 1.0 + g + run, "min": 0.5}
                                                                       for g in range(n)}}})
        lines.append({"elapsed_sec": times[-1] + 0.5, "images": [0, n - 1], "run": run, "event": "phase",
                      "phase": None, "step": len(times)})
    (folder / "events.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    return folder


def _table(text, first):
    """The markdown table that starts at the line starting with ``first``: {run: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_modes_intervals_split_step_and_paired_base(tmp_path):
    """Every per-image quantity has its interval (oracle, pick, coverage, distance); --split-step splits the level
    times at a step, summed over streams; --base gives paired differences with the hand-computable intervals."""
    from scripts import parse_metrics as pm

    base = _twin_run(tmp_path / "base", best=[20.0] * 5, mean=[18.0] * 5, pick=[19.0] * 5,
                     success=[True] * 5, coverage=[False] * 5, streams={0: [1.0, 2.0, 3.0, 4.0]})
    new = _twin_run(tmp_path / "new", best=[20.0, 20.0, 20.0, 20.0, 25.0], mean=[18.0] * 5, pick=[19.0] * 5,
                    success=[True, True, True, True, False], coverage=[True, False, False, False, False],
                    streams={0: [1.0, 2.0, 3.0, 4.0], 1: [2.0, 4.0, 6.0, 8.0]})
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "parse_metrics.py"), "--modes", str(base),
                          str(new), "--split-step", "2", "--base", str(base)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = _table(out.stdout, "| run | status")
    b, n = rows["base"], rows["new"]
    # constant per-image values: a degenerate interval at the value; (0, 0, 0, 0, 5): [0, 3] (tests/test_compare.py)
    assert b["oracle 95% CI (bootstrap)"] == "[20, 20]" and b["pick 95% CI (bootstrap)"] == "[19, 19]"
    assert n["oracle 95% CI (bootstrap)"] == "[20, 23]" and float(n["psnr_twin_aware_best (oracle)"]) == 21
    lo, hi = pm.wilson(1, 5)
    assert n["coverage 95% CI (Wilson)"] == f"[{lo:.4g}, {hi:.4g}]" and float(n["coverage_rate"]) == 0.2
    assert b["coverage 95% CI (Wilson)"] == f"[{pm.wilson(0, 5)[0]:.4g}, {pm.wilson(0, 5)[1]:.4g}]"
    assert float(n["std over particles"]) == 1.5
    # pair distance: per measurement the last level's mean (1 + g + run), its interval over the measurements
    assert float(b["pair_dist (final level)"]) == 3.0 and float(n["pair_dist (final level)"]) == 3.5
    # split at step 2: up to level 1's event, and from there to the closing event; summed over the two streams
    assert float(b["levels<2_sec"]) == 2.0 and float(b["levels>=2_sec"]) == 2.5
    assert float(n["levels<2_sec"]) == 2.0 + 4.0 and float(n["levels>=2_sec"]) == 2.5 + 4.5
    assert pm.split_times(base, 0) == (0.0, 4.5) and pm.split_times(base, 9) == (4.5, 0.0)
    paired = _table(out.stdout, "| run | images")
    p = paired["new"]
    assert float(p["d success"]) == -0.2 and p["d success 95% CI"] == "[-0.6, 0]"
    assert float(p["d coverage"]) == 0.2 and p["d coverage 95% CI"] == "[0, 0.6]"
    assert float(p["d oracle best"]) == 1.0 and p["d oracle best 95% CI"] == "[0, 3]"
    assert float(p["d mean"]) == 0.0 and p["success: only run / only BASE"] == "0 / 1"
    assert paired["base"]["d success"] == "0"
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "parse_metrics.py"), str(base), "--split-step", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "go with --modes" in bad.stderr
