"""scripts/bench_daps.py: A/B runs alternate, each side's overrides reach its runs, the table and the JSON hold every
run, the medians and the ratio; a non-empty save folder is refused. scripts/bench_pr_gradient.py times both gradients
and checks that they agree; scripts/bench_noise.py times each noise kind; scripts/profile_level.py profiles one level;
scripts/startup_floor.py prints a process's fixed costs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("+data=test-fmnist +model=fmnist32ddpm +sampler=edm_daps +task=phase_retrieval task_group=fmnist_pixel "
          "data.end_id=1 batch_size=1 num_samples=2 sampler.annealing_scheduler_config.num_steps=2 "
          "sampler.diffusion_scheduler_config.num_steps=1 task.fmnist_pixel.mcmc_sampler_config.num_steps=2 "
          "eval_fn_list=[psnr] gpu=-1 save_samples=false")


def bench(tmp_path, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_daps.py"), "--common", COMMON, "--a",
                           "noise=generator", "--b", "noise=counter", "--repeats", "1", "--save", str(tmp_path / "s"),
                           "--json", str(tmp_path / "b.json"), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_bench_alternates_and_reports(tmp_path):
    r = bench(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert [len(out["runs"][s]) for s in "AB"] == [1, 1] and "| B / A |" in r.stdout
    for side, kind in (("A", "generator"), ("B", "counter")):
        config = (tmp_path / "s" / f"{side}_0" / "run" / "config.yaml").read_text()
        assert f"noise: {kind}" in config
        assert out["runs"][side][0]["sampling_s_per_particle"] > 0 and out["runs"][side][0]["particle_nfe_per_s"] > 0
    assert out["ratio"]["sampling_s_per_image"] > 0
    for row in out["runs"]["A"] + out["runs"]["B"]:  # the run's stage clocks fit in its clock outside sampling
        assert row["scoring_s"] > 0 and row["writing_s"] > 0 and row["run_other_s"] >= 0
    again = bench(tmp_path)
    assert again.returncode != 0 and "is not empty" in again.stderr


def test_pr_gradient_bench_times_both_and_checks_they_agree():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pr_gradient.py"), "--device", "cpu", "--batch",
                        "4", "--size", "8", "--min-run-time", "0.05"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device cpu, x (4, 1, 8, 8) float32")
    assert [ln.split()[0] for ln in lines[1:3]] == ["autograd", "closed"]
    assert float(lines[3].split("max |difference| / max |gradient| ")[1]) < 1e-5


def test_noise_bench_times_each_kind():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_noise.py"), "--device", "cpu", "--batch", "4",
                        "--shape", "1", "4", "4", "--kinds", "generator", "counter", "--min-run-time", "0.05"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device cpu, 4 particles x (1, 4, 4)")
    assert [ln.split()[0] for ln in lines[1:]] == ["generator", "counter"] and "1.000x the first" in lines[1]


def test_profile_level_records_one_levels_ode_and_mcmc(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_level.py"), "--level", "1", "--top", "3",
                        "--trace", str(tmp_path / "trace.json"), "--", *COMMON.split(), f"save_dir={tmp_path}",
                        "name=p"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    head = [ln for ln in r.stdout.splitlines() if ln.startswith(("device", "top-level", "ode:"))]
    assert head[0].startswith("device cpu; level 1: 2 MCMC steps") and "per step" in head[1]
    assert float(head[1].split(", ")[1].split()[0]) > 0
    assert float(head[2].split()[2]) > 0 and "of the level's ODE + MCMC" in head[2]
    assert all((tmp_path / f"trace_{part}.json").stat().st_size > 0 for part in ("ode", "mcmc"))
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["status"] == "complete"
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_level.py"), "--level", "9", "--",
                              *COMMON.split(), f"save_dir={tmp_path}", "name=q"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and "--level 9 was not reached" in missing.stderr


def test_bench_reads_an_older_commits_timing_without_the_stage_clocks():
    """af9e5f8's timing.json (the issue's baseline) has no attempts or heartbeat: its fields come from the counters it
    has, its stages are n/a in the table, and nothing raises. The tenth session's has the job's clocks but not the
    run's stage clocks: those alone are n/a, as they are for a resumed run or several ranks; a single attempt's split
    leaves the rest of the run's clock outside sampling in run_other_s."""
    from scripts.bench_daps import RUN_STAGES, STAGES, cells, fields, stages
    from utils.results import STAGES as STAGES_OF_A_RUN

    old = {"status": "complete", "images_done": 1, "sampling_wall_sec": 0.5, "sampling_per_image_sec": 0.5,
           "particles_per_image": 2, "network_evals_per_particle": 2, "world_size": 1,
           "phases": {"explore": {"wall_sec": 0.5, "steps": 2, "peak_memory": {"available": False}}}}
    row = {**fields(old, 2.0), **stages(old, 100.0, 102.0)}
    assert row["sampling_s_per_particle"] == 0.25 and row["particle_nfe_per_s"] == 8.0
    assert row["outside_vs_sampling"] == 3.0 and row["peak_GB"] is None
    assert all(row[k] is None for k in STAGES)
    assert cells(row, STAGES, ".2f") == " | ".join(["n/a"] * len(STAGES))
    tenth = {**old, "heartbeat_unix": 101.5, "attempts": [{"started_unix": 100.5, "job_started_unix": 100.25}]}
    row = stages(tenth, 100.0, 102.0)  # the tenth session's: job clocks, no stage clocks
    assert row["build_s"] == 0.25 and row["run_outside_sampling_s"] == 0.5 and row["after_results_s"] == 0.5
    assert row["scoring_s"] is None and row["run_other_s"] is None
    stages_sec = dict.fromkeys(RUN_STAGES, 0.1)
    now = {**tenth, "attempts": [{**tenth["attempts"][0], "stages_sec": stages_sec}]}
    assert abs(stages(now, 100.0, 102.0)["run_other_s"] - 0.1) < 1e-9  # 0.5 s outside sampling, 4 x 0.1 in stages
    for split_off in ({**now, "world_size": 2}, {**now, "attempts": [{"status": "failed"}, *now["attempts"]]}):
        assert stages(split_off, 100.0, 102.0)["scoring_s"] is None  # several ranks; a resumed run
    assert RUN_STAGES == STAGES_OF_A_RUN  # the script's copy of utils/results.py's names


def test_sweep_against_a_commit_without_job_clocks_says_so(tmp_path):
    """--sweep needs job_started_unix; an older commit's sweep (timing.json without attempts) gets that message, not a
    KeyError. The older commit is a stand-in posterior_sample.py that writes such a timing.json per job."""
    code = tmp_path / "old"
    code.mkdir()
    (code / "posterior_sample.py").write_text(
        "import json, pathlib, sys\n"
        "save = pathlib.Path(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('save_dir=')))\n"
        "for k in range(2):\n"
        "    job = save / 'run' / f'run{k:03d}'\n"
        "    job.mkdir(parents=True)\n"
        "    (job / 'timing.json').write_text(json.dumps({'status': 'complete', 'sampling_wall_sec': 1.0}))\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_daps.py"), "--common", "seed=0", "--sides", "A",
                        "--a-code", str(code), "--sweep", "seed=1,2", "--repeats", "1", "--save", str(tmp_path / "s")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--sweep needs a newer version" in r.stderr, r.stderr[-2000:]


def test_startup_floor_prints_each_step_and_its_share_of_sampling(monkeypatch, capsys):
    """scripts/startup_floor.py: one row per step (the unmeasured first run of each command not counted), the median,
    min and max of the repeats, and the share of --sampling-sec; the steps' commands run in a fresh interpreter."""
    from scripts import startup_floor

    assert startup_floor.wall("pass") > 0
    commands = [code for _, code in startup_floor.steps("cpu")]
    assert "torch.zeros(1, device='cpu')" in commands[2] and "UNet2DModel" in commands[4]
    subprocess.run([sys.executable, "-c", commands[3]], cwd=ROOT, check=True)  # this repository's imports work
    clock = iter([9.0, 1.0, 3.0, 2.0] * len(commands))  # per step: the unmeasured run, then three repeats
    monkeypatch.setattr(startup_floor, "wall", lambda code: next(clock))
    monkeypatch.setattr(sys, "argv", ["startup_floor.py", "--repeats", "3", "--sampling-sec", "40"])
    startup_floor.main()
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {name}" for name, _ in startup_floor.steps("cpu")]
    assert all(r.endswith("| 2.000 | 1.000 | 3.000 | 5.0% |") for r in rows)
