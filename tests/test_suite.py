"""The experiment suite (commands_gpu/, commands_tpu/, scripts/suite.sh): every GPU script's smallest run on the
embedded priors with tiny sizes, the usage text, the refusal of a bad argument, the dry run (TPU: use_tpu=true and the
_tpu suffix)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["exp0_baseline", "exp1_repulsion", "exp2_pruning", "exp3_2particle", "exp4_optimization"]
SCRIPTS = [*EXPERIMENTS, "exp5_final", "k2_ab", "k2_sweep"]
SMALLEST = {"exp3_2particle": ["--10"], "exp5_final": ["--ffhq"], "k2_ab": ["--20"], "k2_sweep": ["--20"]}
TINY = ["sampler.annealing_scheduler_config.num_steps=3", "sampler.diffusion_scheduler_config.num_steps=1",
        "task.fmnist_ldm.mcmc_sampler_config.num_steps=1", "task.fmnist_pixel.mcmc_sampler_config.num_steps=1",
        "sampler.hard_dc.max_iters=2", "eval_fn_list=[psnr]", "gpu=-1", "show_progress=false", "save_samples=false"]


def suite(script: str, *args: str, device: str = "gpu", save: Path | None = None, **env: str):
    environment = {**os.environ, "PY": sys.executable, "SAVE_DIR": str(save or "results"), **env}
    return subprocess.run(["bash", str(ROOT / f"commands_{device}" / f"{script}.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=environment, timeout=600)


@pytest.mark.parametrize("device", ["gpu", "tpu"])
def test_usage_without_arguments_and_refusals(device):
    for script in SCRIPTS:
        r = suite(script, device=device)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: bash {script}.sh"), (script, r.stdout, r.stderr)
        assert "--embedded" in r.stdout and "--dry-run" in r.stdout
        bad = suite(script, "--1000", device=device)
        assert bad.returncode == 2 and f"unknown argument --1000" in bad.stderr and "usage:" in bad.stderr
        assert suite(script, "plain", device=device).returncode == 2
    assert "unknown argument --1" in suite("exp3_2particle", "--1", device=device).stderr  # no 1-image run
    only_overrides = suite("exp0_baseline", "batch_size=2", device=device)
    assert only_overrides.returncode == 2 and "choose at least one of --1 --10 --100" in only_overrides.stderr
    assert "is not one of" in suite("exp0_baseline", "--1", SUITE_PRIOR="mnist", device=device).stderr


def test_dry_run_prints_the_commands_in_order():
    r = suite("exp2_pruning", "--100", "--1", "--dry-run", "batch_size=4")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2 and all(line.startswith("+ ") for line in lines)
    assert "data.end_id=1 " in lines[0] and "data.end_id=100 " in lines[1]  # increasing order
    assert all("+experiment=exp2_pruning" in line and line.endswith("batch_size=4") for line in lines)
    assert "name=exp2_pruning_1 " in lines[0] and "+model=imagenet256ldm" in lines[0] and "use_tpu=false" in lines[0]
    tpu = suite("exp2_pruning", "--10", "--embedded", "--dry-run", device="tpu").stdout
    assert "use_tpu=true" in tpu and "name=exp2_pruning_10_fmnist-ldm_tpu" in tpu and "+model=fmnist32ldm" in tpu
    final = suite("exp5_final", "--imagenet", "--ffhq", "--dry-run").stdout.splitlines()
    assert len(final) == 2 and "+model=imagenet256ldm" in final[0] and "+model=ffhq256ldm" in final[1]
    assert final[0].endswith("name=exp5_final_imagenet") and final[1].endswith("name=exp5_final_ffhq")
    k2 = suite("k2_ab", "--20", "--embedded", "--dry-run").stdout
    assert k2.count("posterior_sample.py") == 3 and k2.count("parse_metrics.py --compare") == 2
    assert "+model=fmnist32ddpm" in k2


def test_every_script_runs_its_smallest_size_on_the_embedded_prior(tmp_path):
    for script in SCRIPTS:
        args = SMALLEST.get(script, ["--1"])
        extra = ["data.end_id=2"] if script in ("exp5_final", "k2_ab", "k2_sweep", "exp3_2particle") else []
        r = suite(script, *args, "--embedded", *TINY, *extra, save=tmp_path)
        assert r.returncode == 0, (script, r.stdout[-2000:], r.stderr[-3000:])
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == sorted(["exp0_baseline_1_fmnist-ldm", "exp1_repulsion_1_fmnist-ldm", "exp2_pruning_1_fmnist-ldm",
                            "exp3_2particle_10_fmnist-ldm", "exp4_optimization_1_fmnist-ldm", "exp5_final_fmnist-ldm",
                            "k2_ab_20_fmnist-pixel", "k2_ab_quality_20_fmnist-pixel", "k2_ab_speed_20_fmnist-pixel",
                            "k2_sweep_20_fmnist-pixel"])
    for name in names:
        if name.startswith("k2_sweep"):
            assert len(list((tmp_path / name).glob("run*/metrics.json"))) == 18  # the log's 3 x 3 x 2 grid
            continue
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["status"] == "complete", name
    assert (tmp_path / "k2_ab_quality_20_fmnist-pixel_compare.md").read_text().strip()
    swept = (tmp_path / "k2_sweep_20_fmnist-pixel_compare.md").read_text()  # the grid's keys, from k2_sweep.yaml
    assert "| job | target_cess | max_step_factor | ema_alpha |" in swept
    # the report of this results tree: both tables, their CSVs, the plots there is something for
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "suite_report.py"), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = tmp_path / "report"
    rows = list(csv.DictReader(open(report / "experiments.csv")))
    assert sorted(row["run"] for row in rows) == sorted(n for n in names if n.startswith("exp"))
    exp4 = next(row for row in rows if row["run"].startswith("exp4"))
    assert float(exp4["hard_dc_updates_per_particle"]) > 0 and float(exp4["sampling_sec_per_image"]) > 0
    k2 = {row["run"]: row for row in csv.DictReader(open(report / "k2_ab.csv"))}
    assert set(k2) == {"k2_ab_quality_20_fmnist-pixel", "k2_ab_speed_20_fmnist-pixel"}
    assert all(row["verdict"].startswith(("PASS", "FAIL", "NO VERDICT")) for row in k2.values())
    for png in ("psnr_vs_time", "pair_distance_vs_sigma", "sigma_vs_level", "success_rate"):
        assert (report / f"{png}.png").stat().st_size > 1000, png
    md = (report / "report.md").read_text()
    assert "oracle" in md and "no run recorded peak memory" in md  # the CPU tracks no peak memory


def test_device_driver_starts_every_stream_and_records_it(tmp_path):
    """scripts/suite_device.sh (the suite in concurrent streams for one device call), as a dry run: each stream's
    scripts in order, with the prior and the extra arguments, one line per run in streams.txt."""
    env = {**os.environ, "PY": sys.executable, "SUITE_EXTRA": "batch_size=100 --dry-run"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "suite_device.sh"), str(tmp_path), "100"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = {line.split()[0]: line.split()[1] for line in (tmp_path / "streams.txt").read_text().splitlines()}
    expected = {f"{e}_fmnist-{p}" for e in EXPERIMENTS for p in ("ldm", "pixel")} | {"exp5_final_fmnist-ldm"}
    assert set(runs) == expected and set(runs.values()) == {"rc=0"}
    latent = (tmp_path / "logs" / "exp2_pruning_fmnist-ldm.txt").read_text()
    assert "+model=fmnist32ldm" in latent and "name=exp2_pruning_100_fmnist-ldm batch_size=100" in latent
    assert "+model=fmnist32ddpm" in (tmp_path / "logs" / "exp4_optimization_fmnist-pixel.txt").read_text()
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "suite_device.sh"), str(tmp_path / "b"), "10", "gpu"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert "unknown stream gpu" in bad.stderr
