"""posterior_sample.py as the user runs it: override style, every output file, fail-fast errors, an existing folder.
Statuses, signals, resume and deletion: tests/test_run_status.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAST = ["sampler.annealing_scheduler_config.num_steps=4", "sampler.diffusion_scheduler_config.num_steps=2",
        "show_progress=false", "gpu=-1"]


def cli(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def data_args(image_dir: Path, n: int = 1) -> list[str]:
    return ["+data.name=image", f"+data.root={image_dir}", "+data.resolution=16", "+data.start_id=0",
            f"+data.end_id={n}"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, pixel_model_dir, latent_model_dir, image_dir) -> Path:
    """Extra config groups (found through hydra.searchpath) so the tests type +data=... +model=... like the user."""
    root = tmp_path_factory.mktemp("configs")
    (root / "model").mkdir()
    (root / "data").mkdir()
    (root / "model" / "tiny_pixel.yaml").write_text(f"name: diffusers\npath: {pixel_model_dir}\n")
    (root / "model" / "tiny_latent.yaml").write_text(f"name: diffusers\npath: {latent_model_dir}\n")
    (root / "data" / "tiny.yaml").write_text(f"name: image\nroot: {image_dir}\nresolution: 16\nend_id: 1\n")
    return root


def check_outputs(root: Path, images: int, particles: int, levels: int, latent: bool, runs: int = 1) -> dict:
    for name in ("config.yaml", "events.jsonl", "timing.json", "metrics.json", "eval.md", "grid_results.png",
                 "run.log", ".daps_run"):
        assert (root / name).is_file(), name
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]
    phases = [ev for ev in events if ev["event"] == "phase"]
    events = [ev for ev in events if ev["event"] == "level"]
    assert [p["phase"] for p in phases] == ["explore", None] * runs * -(-images // 10)
    assert len(events) == levels * runs * -(-images // 10)  # a line per level, per run and chunk (batch_size 10)
    for ev in events:
        assert {"step", "sigma", "next_sigma", "acceptance", "loss", "loss_per_particle", "elapsed_sec",
                "phase"} <= set(ev)
        assert ev["loss"]["n"] == images * particles // runs
    assert events[-1]["next_sigma"] == 0
    timing = json.loads((root / "timing.json").read_text())
    assert {"total_wall_sec", "per_image_sec", "ode_steps", "anneal_steps_cfg", "used_anneal_steps",
            "phases"} <= set(timing)
    assert timing["anneal_steps_cfg"] == timing["used_anneal_steps"] == levels
    assert timing["phases"]["explore"]["steps"] == levels * runs and timing["phases"]["explore"]["wall_sec"] > 0
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["status"] == timing["status"] == "complete"
    assert metrics["num_images_done"] == metrics["num_images_planned"] == timing["images_done"] == images
    assert metrics["pid"] == timing["pid"] and isinstance(metrics["heartbeat_unix"], float)
    assert metrics["sampler"]["latent"] is latent
    assert metrics["noise"] == "generator"  # noise: auto on the CPU, resolved and recorded
    assert "noise: generator" in (root / "config.yaml").read_text()
    assert set(metrics["eval"]) == {"psnr", "ssim", "lpips"}
    assert metrics["eval"]["lpips"]["available"] or metrics["eval"]["lpips"]["reason"]
    assert {"name", "type", "versions"} <= set(metrics["device"]) and "explore" in metrics["peak_memory"]
    for img in metrics["images"]:
        assert len(img["particles"]) == particles
        for p in img["particles"]:
            assert p["status"] == "ok" and isinstance(p["psnr"], float) and isinstance(p["ssim"], float)
            assert isinstance(p["meas_err"], float)
            assert p["mode"] in ("0", "180", "none") and p["psnr_twin_aware"] == max(p["psnr_0"], p["psnr_180"])
        for m in ("psnr", "ssim", "meas_err"):
            assert {"max", "mean", "std", "best", "n"} <= set(img["summary"][m])
        assert (root / "per_image" / f"{img['index']:05d}.json").is_file()
    assert "psnr" in metrics["aggregate"] and "best_of_n" in metrics["aggregate"]["psnr"]
    assert "psnr_twin_aware" in metrics["aggregate"] and metrics["modes"]["images"] == images  # phase retrieval
    assert len(list((root / "samples").glob("*.png"))) == images * particles
    assert "| psnr |" in (root / "eval.md").read_text()
    return metrics


def test_pixel_run_in_the_users_override_style(tmp_path, config_dir):
    r = cli([f"hydra.searchpath=[file://{config_dir}]", "+data=tiny", "+model=tiny_pixel",
             "+task=phase_retrieval", "+sampler=edm_daps", "task_group=pixel_hmc",
             "+sampler.diffusion_scheduler_config.solver=euler", "num_samples=4", f"save_dir={tmp_path}",
             "name=pixel", "save_traj=true", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = check_outputs(tmp_path / "pixel", images=1, particles=4, levels=4, latent=False)
    assert metrics["sampler"]["mc_algo"] == "hmc" and metrics["sampler"]["ode_solver"] == "euler"
    cfg = yaml.safe_load((tmp_path / "pixel" / "config.yaml").read_text())
    assert cfg["task_group"] == "pixel_hmc" and cfg["sampler"]["diffusion_scheduler_config"]["solver"] == "euler"
    assert len(list((tmp_path / "pixel" / "trajectory").glob("*.png"))) == 4


def test_latent_run_with_progress_as_log_lines(tmp_path, config_dir):
    fast = [a for a in FAST if not a.startswith("show_progress")]  # show_progress=true (the default)
    r = cli([f"hydra.searchpath=[file://{config_dir}]", "+data=tiny", "+model=tiny_latent", "+task=phase_retrieval",
             "+sampler=latent_edm_daps", "task_group=ldm", "num_samples=4",
             f"save_dir={tmp_path}", "name=latent", *fast])
    assert r.returncode == 0, r.stderr[-3000:]
    check_outputs(tmp_path / "latent", images=1, particles=4, levels=4, latent=True)
    # stderr is not a terminal here: one log line per tenth of the levels instead of a bar's carriage returns
    assert "\r" not in r.stderr and r.stderr.count("INFO posterior_sample: images 0-0 run 1/1: level ") == 4
    assert "\nINFO posterior_sample: complete: 1 image(s)" in r.stderr


def test_gmm_toy_with_runs_and_heun(tmp_path):
    r = cli(["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps", "task_group=pixel_hmc",
             "data.end_id=2", "num_samples=2", "num_runs=2", "+sampler.diffusion_scheduler_config.solver=heun",
             f"save_dir={tmp_path}", "name=toy", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = check_outputs(tmp_path / "toy", images=2, particles=4, levels=4, latent=False, runs=2)
    assert metrics["eval"]["lpips"]["available"] is False and "32 px" in metrics["eval"]["lpips"]["reason"]
    assert "WARNING utils.metrics: lpips unavailable" in (tmp_path / "toy" / "run.log").read_text()  # before sampling
    assert [p["run"] for p in metrics["images"][0]["particles"]] == [0, 0, 1, 1]
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_events.py"), str(tmp_path / "toy")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count("propagates=True, monotone=True") == 2, check.stdout
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "parse_metrics.py"), str(tmp_path / "toy"),
                            "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert table.returncode == 0 and "| toy | complete | 2 | 4 |" in table.stdout, table.stdout + table.stderr
    assert (tmp_path / "t.csv").read_text().startswith("run,status,images")


@pytest.mark.parametrize("args, message", [
    (["task_group=pixel_hmcc"], "task_group=pixel_hmcc is not defined"),
    (["optimization_step=2000"], "hard_dc.step (optimization_step) must be a DDPM time in [0, 1000] or -1"),
    (["++sampler.hard_dc.accept=maybe"], "sampler.hard_dc.accept must be one of always, improved, never"),
    (["repulsion_scale=-1"], "repulsion.scale (repulsion_scale) must be a number >= 0"),
    (["pruning_step=2000"], "pruning.step (pruning_step) must be a DDPM time in [0, 1000] or -1"),
    (["++sampler.repulsion.decay=exp"], "sampler.repulsion.decay must be one of"),
    (["num_samples=0"], "num_samples must be a positive integer"),
    (["checkpoint_every_sec=-1"], "checkpoint_every_sec must be a number of seconds >= 0 (0: after every level)"),
    (["task.pixel_hmc.operator.sigma=-0.1"], "sigma (the measurement noise std) must be a finite number >= 0"),
    (["+sampler.diffusion_scheduler_config.solver=rk5"], "unknown ODE solver"),
    (["task.pixel_hmc.mcmc_sampler_config.mc_algo=ula"], "unknown mc_algo"),
    (["++sampler.k2_scheduler_config.name=k2", "num_samples=1"], "K2-DAPS needs at least 2 particles of one measurement"),
    # typos fail with the key named and its nearest valid neighbour (they used to run with the defaults)
    (["++num_sampels=4"], "unknown top-level key num_sampels (did you mean num_samples?)"),
    (["+num_sample=4"], "unknown top-level key num_sample (did you mean num_samples?)"),
    (["++sampler.annealing_scheduler_config.num_step=3"],
     "unknown key sampler.annealing_scheduler_config.num_step (did you mean num_steps?)"),
    (["++data.end_idd=3"], "unknown key data.end_idd (did you mean end_id?)"),
    (["++model.component_sdt=0.1"], "unknown key model.component_sdt (did you mean component_std?)"),
    (["++task.pixel.operator.oversampl=2"], "unknown key task.pixel.operator.oversampl (did you mean oversample?)"),
    (["++task.pixel.mcmc_sampler_config.momentm=0.5"], "task.pixel.mcmc_sampler_config.momentm (did you mean momentum?)"),
    (["++sampler.repulsion.scal=3"], "unknown key sampler.repulsion.scal (did you mean scale?)"),
])
def test_bad_configuration_fails_before_compute(tmp_path, args, message):
    r = cli(["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps", "task_group=pixel_hmc",
             f"save_dir={tmp_path}", "name=bad", *FAST, *args])
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert not (tmp_path / "bad").exists()


def test_unknown_key_is_rejected_by_hydra(tmp_path):
    r = cli(["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps",
             "sampler.annealing_scheduler_config.num_stepz=3", f"save_dir={tmp_path}", *FAST])
    assert r.returncode != 0 and "num_stepz" in r.stderr


def test_missing_files_say_where_they_were_looked_for(tmp_path, image_dir):
    r = cli(["+model.name=diffusers", f"+model.path={tmp_path}/no_such_model", *data_args(image_dir),
             "+task=phase_retrieval", "+sampler=edm_daps", f"save_dir={tmp_path}", *FAST])
    assert r.returncode == 2 and f"{tmp_path}/no_such_model" in r.stderr and "train_prior.py" in r.stderr
    r = cli(["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps", "data.resolution=32",
             f"save_dir={tmp_path}", *FAST])
    assert r.returncode == 2 and "resolution" in r.stderr
    r = cli(["+model=gmm_toy", "+data.name=image", f"+data.root={tmp_path}/nowhere", "+data.resolution=16",
             "+task=phase_retrieval", "+sampler=edm_daps", f"save_dir={tmp_path}", *FAST])
    assert r.returncode == 2 and f"{tmp_path}/nowhere" in r.stderr


def test_existing_results_are_not_overwritten(tmp_path):
    args = ["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps", "data.end_id=1",
            f"save_dir={tmp_path}", "name=once", "eval_fn_list=[psnr]", *FAST]
    assert cli(args).returncode == 0
    stamp = (tmp_path / "once" / "metrics.json").stat().st_mtime_ns
    r = cli(args)
    assert r.returncode == 2 and "already holds a run (complete, 1 image(s) finished): resume=true" in r.stderr
    assert (tmp_path / "once" / "metrics.json").stat().st_mtime_ns == stamp
    r = cli([*args, "overwrite=true"])
    assert r.returncode == 0 and f"overwrite=true: removing {tmp_path / 'once'}" in r.stderr


TEARDOWN_PROBE = """
import atexit, os, pathlib, sys, threading, time
sys.path.insert(0, sys.argv[2])
import posterior_sample
out = pathlib.Path(sys.argv[1])
class Probe:  # writes into its file in the interpreter's teardown of this module, if there is one
    def __init__(self, path):
        self.fd, self.write = os.open(path, os.O_CREAT | os.O_WRONLY), os.write  # builtins are gone by then
    def __del__(self):
        self.write(self.fd, b"ran")
probe = Probe(out / "teardown")
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("ran"))).start()
if sys.argv[3] == "profiled":
    sys.setprofile(lambda *a: None)
print("flushed?", end="")
posterior_sample.exit_without_teardown()
"""


@pytest.mark.parametrize("mode", ["plain", "profiled"])
def test_exit_without_teardown_runs_threads_and_exit_handlers_and_skips_teardown_unless_profiled(tmp_path, mode):
    r = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, str(tmp_path), str(ROOT), mode], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "flushed?", r.stderr[-2000:]
    ran = sorted(p.name for p in tmp_path.iterdir() if p.read_text() == "ran")
    assert ran == (["atexit", "thread"] if mode == "plain" else ["atexit", "teardown", "thread"])


def test_a_run_under_cprofile_writes_its_profile(tmp_path):
    prof = tmp_path / "run.prof"
    r = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), str(ROOT / "posterior_sample.py"),
                        "+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps",
                        "data.end_id=1", "eval_fn_list=[psnr]", *FAST, f"save_dir={tmp_path}", "name=r"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "complete: 1 image(s)" in r.stderr and prof.is_file() and prof.stat().st_size > 0
