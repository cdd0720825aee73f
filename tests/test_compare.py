"""scripts/parse_metrics.py --compare: the K2 log's fair A/B (paired differences over images, bootstrap interval, the
non-inferiority rule clause by clause, the config check, NaN images, sweeps), on results folders in the format of a
real run (the composed config, utils.results.Recorder's metrics.json and per_image/), and end to end on the log's
section-4 sweep run as a real Hydra multirun.

Hand-computed bootstrap intervals: for per-image differences (0, 0, 0, 0, c) the mean of a resample is c k / 5, with
k ~ Binomial(5, 1/5) the picks of the last image; P(k = 0) = 0.33 > 2.5% and P(k >= 3) = 0.058 > 2.5% > P(k >= 4) =
0.0067, so the 95% percentile interval is [0, 3c/5] (far from the resampling noise of 10,000 resamples).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from utils.config import CONFIGS
from utils.folder import record_refused_job
from utils.results import Recorder

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps"]
TINY = ["task_group=pixel_hmc", "data.end_id=2", "batch_size=2", "num_samples=2", "eval_fn_list=[psnr]",
        "show_progress=false", "gpu=-1", "sampler.annealing_scheduler_config.num_steps=12",
        "sampler.diffusion_scheduler_config.num_steps=1"]
K2 = {"name": "k2", "target_cess": 0.9, "max_step_factor": 3.0, "ema_alpha": 0.2, "min_sigma": 0.05}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="default", overrides=[*GROUPS, *TINY])


def write_run(root: Path, composed, values: dict[str, list], sec: float = 10.0, steps: int = 200, first: int = 0,
              **changes) -> Path:
    """A finished run as posterior_sample.py leaves it: config.yaml (the composed config with ``changes``, dotted
    keys with __ for dots), per_image/ and metrics.json (utils.results.Recorder) and timing.json.

    ``values``: {metric: per image (indices from ``first``), its particles' values, or None for an image whose
    particles all stopped (NaN)}."""
    cfg = copy.deepcopy(composed)
    for key, value in {"name": root.name, "save_dir": str(root.parent), **changes}.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    names = list(values)
    images = len(next(iter(values.values())))
    particles = max(len(v) for per_image in values.values() for v in per_image if v is not None)
    recorder = Recorder(root, {"name": root.name, "particles_per_image": particles, "seed": cfg.seed,
                               "eval": {m: {"available": True} for m in names}}, names)
    for i in range(images):
        cells = [values[m][i] or [None] * particles for m in names]
        recorder.add_image({"index": first + i, "name": f"{first + i:05d}", "particles": [
            {"sample": k, "run": 0, "status": "ok" if None not in (c[k] for c in cells) else "nonfinite",
             "stopped_at_level": None, **{m: c[k] for m, c in zip(names, cells)}} for k in range(particles)]})
    recorder.write("complete")
    (root / "timing.json").write_text(json.dumps({
        "status": "complete", "images_done": images, "sampling_per_image_sec": sec, "per_image_sec": sec + 1.0,
        "anneal_steps_cfg": 200, "used_anneal_steps": steps, "phases": {}}))
    return root


def flat(value: float, n: int = 5) -> list[list[float]]:
    return [[value]] * n


def quality(psnr: float = 20.0, ssim: float = 0.5, lpips: float = 0.2) -> dict[str, list]:
    return {"psnr": flat(psnr), "ssim": flat(ssim), "lpips": flat(lpips)}


def compare(tmp_path: Path, base: Path, new: Path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "compare.json"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "parse_metrics.py"), "--compare", str(base), str(new),
                        "--json", str(out), *map(str, args)], capture_output=True, text=True, timeout=120)
    return r, json.loads(out.read_text()) if out.is_file() else {}


def clause(result: dict, name: str, job: int = 0) -> dict:
    return next(c for c in result["comparisons"][job]["clauses"] if c["clause"] == name)


def test_paired_differences_and_bootstrap_interval_match_a_hand_computation(tmp_path, composed):
    # mean of particles: BASE 20 per image, NEW 20 and 24 on the last image: differences (0, 0, 0, 0, 4);
    # best-of-n (oracle): BASE 21, NEW 20 and 26: differences (-1, -1, -1, -1, 5); SSIM: -0.001 on every image
    base = write_run(tmp_path / "base", composed, {"psnr": [[19.0, 21.0]] * 5, "ssim": [[0.5, 0.5]] * 5})
    new = write_run(tmp_path / "new", composed,
                    {"psnr": [[20.0, 20.0]] * 4 + [[22.0, 26.0]], "ssim": [[0.499, 0.499]] * 5},
                    sampler__k2_scheduler_config=K2)
    r, result = compare(tmp_path, base, new)
    assert r.returncode == 0, r.stderr
    psnr = result["comparisons"][0]["metrics"]["psnr"]
    assert psnr["images"] == 5 and psnr["mean"]["diff"] == pytest.approx(0.8)
    assert psnr["mean"]["ci"] == pytest.approx([0.0, 2.4])
    assert psnr["best"]["diff"] == pytest.approx(0.2) and psnr["best"]["ci"] == pytest.approx([-1.0, 2.6])
    assert result["comparisons"][0]["metrics"]["ssim"]["mean"]["ci"] == pytest.approx([-0.001, -0.001])
    assert result["bootstrap"] == {"interval": "95% percentile, over images", "resamples": 10000, "seed": 0}
    lines = r.stdout.splitlines()
    assert any(line.split()[:8] == ["psnr", "mean", "of", "particles", "5", "20.0000", "20.8000", "+0.8000"]
               for line in lines), r.stdout
    assert any("best-of-n (oracle)" in line and "[-1.0000, +2.6000]" in line for line in lines)
    assert "10000 resamples, seed 0" in r.stdout
    assert compare(tmp_path, base, new)[1]["comparisons"][0]["metrics"] == result["comparisons"][0]["metrics"]  # seeded
    # differences (0, 0, 3): all three picks on the last image has probability 1/27 = 3.7% > 2.5%, so the upper
    # bound is 3 (a 90% interval would stop at 2)
    few = write_run(tmp_path / "few", composed, {"psnr": flat(20.0, 3)})
    few_new = write_run(tmp_path / "few_new", composed, {"psnr": flat(20.0, 2) + [[23.0]]},
                        sampler__k2_scheduler_config=K2)
    assert compare(tmp_path, few, few_new)[1]["comparisons"][0]["metrics"]["psnr"]["mean"]["ci"] == \
        pytest.approx([0.0, 3.0])


# each clause fails on its own; a value on the limit passes (time x0.80, steps x0.75, -0.10 dB, ...)
@pytest.mark.parametrize("failing, new", [
    (None, {"values": quality(19.9, 0.498, 0.205), "sec": 8.0}),
    (None, {"values": quality(), "steps": 150}),
    ("psnr", {"values": quality(psnr=19.89), "steps": 150}),
    ("ssim", {"values": quality(ssim=0.4979), "steps": 150}),
    ("lpips", {"values": quality(lpips=0.2051), "steps": 150}),
    ("cost", {"values": quality(), "sec": 8.1, "steps": 151})])
def test_each_clause_of_the_rule_can_fail_on_its_own(tmp_path, composed, failing, new):
    base = write_run(tmp_path / "base", composed, quality())
    run = write_run(tmp_path / "new", composed, sampler__k2_scheduler_config=K2, **new)
    r, result = compare(tmp_path, base, run)
    assert r.returncode == 0, r.stderr
    c = result["comparisons"][0]
    assert {x["clause"]: x["pass"] for x in c["clauses"]} == {
        name: name != failing for name in ("psnr", "lpips", "ssim", "cost")}
    assert c["verdict"] == ("PASS" if failing is None else f"FAIL ({failing})")
    failed_rows = [line.split()[0] for line in r.stdout.splitlines()
                   if "FAIL" in line.split() and not line.startswith("verdict")]
    assert failed_rows == ([failing] if failing else [])


def test_verdict_is_on_the_point_estimate_and_the_interval_bound_is_shown(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, quality(), steps=200)
    # differences (0, 0, 0, 0, -0.4): mean -0.08 dB passes; the interval's lower bound -0.24 dB would not
    run = write_run(tmp_path / "new", composed, {**quality(), "psnr": flat(20.0, 4) + [[19.6]]}, steps=100,
                    sampler__k2_scheduler_config=K2)
    r, result = compare(tmp_path, base, run)
    psnr = clause(result, "psnr")
    assert (psnr["point"], psnr["pass"]) == (pytest.approx(-0.08), True)
    assert (psnr["bound"], psnr["pass_at_bound"]) == (pytest.approx(-0.24), False)
    assert result["comparisons"][0]["verdict"] == "PASS"
    row = next(line.split() for line in r.stdout.splitlines() if line.split()[:2] == ["psnr", "dPSNR"])
    assert row[-4:] == ["-0.0800", "pass", "-0.2400", "FAIL"] and "judged on the point estimates" in r.stdout


def test_a_metric_one_run_did_not_measure_blocks_the_verdict_unless_metrics_restricts_it(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, quality(), eval_fn_list=["psnr", "ssim", "lpips"])
    run = write_run(tmp_path / "new", composed, {"psnr": flat(20.0)}, steps=100, eval_fn_list=["psnr"],
                    sampler__k2_scheduler_config=K2)  # the log's eval_fn_list=[psnr] runs
    r, result = compare(tmp_path, base, run)
    assert r.returncode == 0, r.stderr
    assert clause(result, "lpips")["pass"] is None and clause(result, "ssim")["pass"] is None
    assert result["comparisons"][0]["verdict"].startswith("NO VERDICT: not measured: lpips, ssim")
    assert "ssim: not measured in NEW (not in eval_fn_list)" in r.stdout
    r, result = compare(tmp_path, base, run, "--metrics", "psnr")
    assert [c["clause"] for c in result["comparisons"][0]["clauses"]] == ["psnr", "cost"]
    assert result["comparisons"][0]["verdict"] == "PASS" and "not judged (--metrics): lpips, ssim" in r.stdout
    worse = write_run(tmp_path / "worse", composed, {"psnr": flat(19.0)}, steps=100, eval_fn_list=["psnr"],
                      sampler__k2_scheduler_config=K2)
    assert compare(tmp_path, base, worse)[1]["comparisons"][0]["verdict"] == "FAIL (psnr); not measured: lpips, ssim"


def test_runs_that_differ_outside_the_k2_settings_are_refused_naming_the_key_unless_forced(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, quality())
    seeded = write_run(tmp_path / "seeded", composed, quality(), seed=7, sampler__k2_scheduler_config=K2,
                       gpu=1, data__end_id=5)  # K2, the device and the slice may differ; the seed may not
    r, result = compare(tmp_path, base, seeded)
    assert r.returncode == 1 and result == {} and r.stdout == ""
    assert "differ outside the K2 settings (sampler.k2_scheduler_config.*)" in r.stderr
    assert r.stderr.splitlines()[1] == "  seeded: seed (BASE 42, NEW 7)" and "--force" in r.stderr
    r, result = compare(tmp_path, base, seeded, "--force")
    assert r.returncode == 0, r.stderr
    config = result["comparisons"][0]["config"]
    assert config["other"] == ["seed (BASE 42, NEW 7)"]
    assert config["ignored"] == ['name (BASE "base", NEW "seeded")', "gpu (BASE -1, NEW 1)",
                                 "data.end_id (BASE 2, NEW 5)"]
    assert 'sampler.k2_scheduler_config.target_cess (BASE absent, NEW 0.9)' in config["k2"]
    assert "FORCED: differs outside the K2 settings in seed (BASE 42, NEW 7)" in r.stdout


def test_nan_images_are_excluded_by_index_and_never_replaced(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, {"psnr": [[20.0], None, [20.0], [20.0], [20.0]]})
    new = write_run(tmp_path / "new", composed, {"psnr": [[21.0], [21.0], [22.0], None, [23.0]]},
                    sampler__k2_scheduler_config=K2)
    r, result = compare(tmp_path, base, new)
    psnr = result["comparisons"][0]["metrics"]["psnr"]
    assert psnr["excluded"] == [{"image": 1, "nan_in": "BASE"}, {"image": 3, "nan_in": "NEW"}]
    assert psnr["images"] == 3 and psnr["mean"]["diff"] == pytest.approx(2.0)  # images 0, 2, 4: +1, +2, +3
    assert result["comparisons"][0]["images"]["common"] == 5
    assert "psnr: excluded (NaN, never replaced): image 1 (NaN in BASE), image 3 (NaN in NEW)" in r.stdout


def test_images_are_paired_on_the_intersection_and_bad_input_is_one_clear_error(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, {"psnr": flat(20.0, 4)})
    shifted = write_run(tmp_path / "shifted", composed, {"psnr": flat(21.0, 4)}, first=2, data__start_id=2,
                        data__end_id=6, sampler__k2_scheduler_config=K2)
    r, result = compare(tmp_path, base, shifted)
    assert result["comparisons"][0]["images"] == {"common": 2, "base_only": 2, "new_only": 2}
    assert result["comparisons"][0]["metrics"]["psnr"]["images"] == 2
    assert "images: 2 in common (BASE only 2, NEW only 2)" in r.stdout
    apart = write_run(tmp_path / "apart", composed, {"psnr": flat(21.0, 2)}, first=10, data__start_id=10,
                      data__end_id=12)
    r, _ = compare(tmp_path, base, apart)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"{apart}: no finished image in common with BASE {base} (BASE has 4 image(s), 0-3, NEW has 2 image(s), 10-11)")
    (tmp_path / "empty").mkdir()
    r, _ = compare(tmp_path, base, tmp_path / "empty")
    assert r.returncode == 1 and r.stderr.startswith(f"{tmp_path / 'empty'}: not a results folder")


def test_a_sweep_folder_gives_a_comparison_per_job_and_a_summary_in_the_logs_order(tmp_path, composed):
    base = write_run(tmp_path / "base", composed, quality(), sec=10.0, steps=200)
    sweep = tmp_path / "k2_grid"
    jobs = [(0.85, 20.0, 120), (0.90, 20.2, 160), (0.95, 20.2, 140)]  # target_cess, PSNR, used steps
    for n, (cess, psnr, steps) in enumerate(jobs):
        write_run(sweep / f"run{n:03d}", composed, quality(psnr=psnr), steps=steps, name="k2_grid",
                  sampler__k2_scheduler_config={**K2, "target_cess": cess})
    failed = copy.deepcopy(composed)
    OmegaConf.update(failed, "sampler.k2_scheduler_config", {**K2, "target_cess": 2.0}, force_add=True)
    record_refused_job(sweep / "run003", failed, ValueError("target_cess must be in (0, 1]"))
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        *GROUPS, "name=k2_grid", "++sampler.k2_scheduler_config.target_cess=0.85,0.90,0.95,2.0"]}}}))
    r, result = compare(tmp_path, base, sweep, "--format", "md")
    assert r.returncode == 0, r.stderr
    assert [c["job"] for c in result["comparisons"]] == [f"k2_grid/run{n:03d}" for n in range(4)]
    assert result["ranking"] == ["k2_grid/run002", "k2_grid/run001", "k2_grid/run000", "k2_grid/run003"]
    assert result["comparisons"][1]["overrides"] == {"target_cess": 0.9}
    assert "failed" in result["comparisons"][3]["error"]
    summary = r.stdout[r.stdout.index("### summary"):].splitlines()
    assert summary[2] == "| job | target_cess | images | dPSNR [95% CI] | time ratio | step ratio | verdict |"
    assert summary[4] == "| k2_grid/run002 | 0.95 | 5 | +0.2000 [+0.2000, +0.2000] | 1.000 | 0.700 | PASS |"
    assert summary[5] == "| k2_grid/run001 | 0.9 | 5 | +0.2000 [+0.2000, +0.2000] | 1.000 | 0.800 | FAIL (cost) |"
    assert summary[7].startswith("| k2_grid/run003 | 2 | - | - | - | - | not compared: ")
    assert r.stdout.count("### k2_grid/run00") == 4 and "| clause | rule | point estimate |" in r.stdout


def test_section_4_sweep_as_a_real_hydra_multirun_is_compared_against_its_baseline(tmp_path):
    """The log's sweep as one multirun (two values of target_cess, early stop at min_sigma), a baseline of the same
    settings without K2, and --compare reading the sweep folder: the runs differ only in K2 (and their name)."""
    from posterior_sample import Run
    from utils.build import build_run

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="default", overrides=[*GROUPS, *TINY, f"save_dir={tmp_path}", "name=base"])
    assert Run(build_run(cfg, {o[1:].split("=")[0]: o.split("=")[1] for o in GROUPS}, [CONFIGS])).execute() == 0
    k2 = [f"++sampler.k2_scheduler_config.{k}={v}" for k, v in
          {"name": "k2", "max_step_factor": 3.0, "ema_alpha": 0.2, "min_sigma": 0.5, "warm_steps": 2,
           "early_stop": "true"}.items()]
    r = subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), "-m", *GROUPS, *TINY, f"save_dir={tmp_path}",
                        "name=k2_grid", *k2, "++sampler.k2_scheduler_config.target_cess=0.85,0.95"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r, result = compare(tmp_path, tmp_path / "base", tmp_path / "k2_grid", "--metrics", "psnr")
    assert r.returncode == 0, r.stderr
    assert [(c["job"], c["overrides"]) for c in result["comparisons"]] == [
        ("k2_grid/run000", {"target_cess": 0.85}), ("k2_grid/run001", {"target_cess": 0.95})]
    base_steps = json.loads((tmp_path / "base" / "timing.json").read_text())["used_anneal_steps"]
    for n, c in enumerate(result["comparisons"]):
        assert c["config"]["other"] == [] and c["images"]["common"] == 2 and c["metrics"]["psnr"]["images"] == 2
        steps = json.loads((tmp_path / "k2_grid" / f"run{n:03d}" / "timing.json").read_text())["used_anneal_steps"]
        assert base_steps == 12 and steps < 12 and c["cost"]["steps"]["ratio"] == pytest.approx(steps / base_steps)
        assert c["verdict"] in ("PASS", "FAIL (psnr)")  # early stop saves levels: the cost clause passes
    assert "== summary: 2 job(s) vs BASE" in r.stdout
