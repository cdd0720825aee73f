"""scripts/parse_metrics.py and scripts/check_events.py on hand-written results folders; bad dataset files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_images
from utils.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]
LEVELS = [10.0, 3.0, 1.0, 0.1]


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def level(images: tuple[int, int], run: int, step: int) -> dict:
    """A level event as Run.on_level writes it."""
    nxt = LEVELS[step + 1] if step + 1 < len(LEVELS) else 0.0
    return {"elapsed_sec": 0.1 * step, "event": "level", "phase": "explore", "images": list(images), "run": run,
            "step": step, "sigma": LEVELS[step], "next_sigma": nxt, "particles": [f"{images[0]}:0"],
            "loss": {"n": 1, "nonfinite": 0, "min": 1.0, "median": 1.0, "max": 1.0, "mean": 1.0},
            "loss_per_particle": [1.0], "acceptance": None, "acceptance_per_particle": None, "nonfinite": []}


def make_run(root: Path, status: str = "complete", done: int = 2, streams: dict | None = None,
             config: dict | None = None, **extra) -> Path:
    """A results folder in the format of posterior_sample.py / utils.results: config.yaml, events.jsonl,
    per_image/<index>.json, metrics.json and timing.json. ``streams``: {(first, last image): levels run}."""
    (root / "per_image").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config or {"name": root.name, "seed": 42}, sort_keys=False))
    streams = {(i, i): len(LEVELS) for i in range(done)} if streams is None else streams
    lines = [json.dumps(level(images, 0, s)) for images, n in streams.items() for s in range(n)]
    (root / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    summary = {"psnr": {"n": 1, "max": 20.0, "min": 20.0, "mean": 20.0, "std": 0.0, "best": 20.0}}
    images = [{"index": i, "name": f"{i:05d}", "particles": [{"sample": 0, "run": 0, "status": "ok",
                                                              "stopped_at_level": None, "psnr": 20.0}],
               "summary": summary, "nonfinite_particles": 0} for i in range(done)]
    for img in images:
        (root / "per_image" / f"{img['index']:05d}.json").write_text(json.dumps(img))
    timing = {"status": status, "total_wall_sec": 2.0, "images_done": done, "per_image_sec": 1.0,
              "anneal_steps_cfg": len(LEVELS), "used_anneal_steps": len(LEVELS), "phases": {}}
    agg = {"psnr": {"images": done, "best_of_n": 20.0, "mean_of_n": 20.0, "mean_std_over_particles": 0.0}}
    metrics = {"status": status, "name": root.name, "particles_per_image": 1, "num_samples": 1, "num_runs": 1,
               "num_images_done": done, "nonfinite_particles": 0,
               "aggregate": agg if done else {}, "images": images, "timing": timing, **extra}
    (root / "timing.json").write_text(json.dumps({**timing, **{k: v for k, v in extra.items()
                                                               if k == "heartbeat_unix"}}))
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def make_sweep(root: Path, lrs: list[float], multirun: bool) -> Path:
    """A Hydra multirun folder (hydra.sweep.subdir: .) of jobs run<NNN>/ that differ in one swept key, which
    an interpolation copies into a second key (as ${...} does in the configs)."""
    for i, lr in enumerate(lrs):
        make_run(root / f"run{i:03d}", config={"name": root.name, "seed": 42, "sampler": {"lr": lr, "steps": 4},
                                                "lr_copy": lr})
    if multirun:
        overrides = ["+data=gmm-toy", f"name={root.name}", f"sampler.lr={','.join(map(str, lrs))}"]
        (root / "multirun.yaml").write_text(yaml.safe_dump({"name": root.name, "hydra": {
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": overrides}}}))
    return root


def table(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


@pytest.mark.parametrize("name", ["parse_metrics.py", "check_events.py"])
def test_missing_or_mistyped_folder_fails_naming_it(tmp_path, name):
    make_run(tmp_path / "exp0_baseline")
    r = script(name, tmp_path / "exp0_baselin")
    assert r.returncode != 0 and r.stdout == ""
    typo, near = tmp_path / "exp0_baselin", tmp_path / "exp0_baseline"
    assert r.stderr.strip() == f"{typo}: no such folder (did you mean {near}?)"
    (tmp_path / "empty").mkdir()
    r = script(name, tmp_path / "empty")
    assert r.returncode != 0 and f"{tmp_path / 'empty'}: not a results folder" in r.stderr
    r = script(name, tmp_path)  # save_dir itself: points at the folders inside
    assert r.returncode != 0 and f"give those, e.g. {tmp_path}/*" in r.stderr


def test_complete_run_keeps_its_outputs(tmp_path):
    run = make_run(tmp_path / "toy")
    r = script("parse_metrics.py", run, "--csv", tmp_path / "t.csv")
    assert r.returncode == 0 and "| toy | complete | 2 | 1 | 0 | 20 | 20 |" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "t.csv").read_text().startswith("run,status,images")
    r = script("check_events.py", run)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"images {i}-{i} run 0: 4 levels, propagates=True, monotone=True, last next_sigma=0: True, NaN particles 0"
        for i in range(2)]


@pytest.mark.parametrize("multirun, columns", [(True, ["sampler.lr"]), (False, ["sampler.lr", "lr_copy"])])
def test_sweep_folder_has_a_row_per_job_and_the_swept_key_as_column(tmp_path, multirun, columns):
    sweep = make_sweep(tmp_path / "sweep_lr", [1e-5, 2e-5], multirun)
    r = script("parse_metrics.py", sweep)
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0][:len(columns) + 2] == ["run", *columns, "status"]
    assert [row[:2] for row in rows[1:]] == [["sweep_lr/run000", "1e-05"], ["sweep_lr/run001", "2e-05"]]
    r = script("check_events.py", sweep)
    assert r.returncode == 0 and r.stdout.count("sweep_lr/run001: images 1-1 run 0: 4 levels") == 1, r.stdout


def test_sweep_over_a_config_group_shows_the_keys_that_differ(tmp_path):
    sweep = make_sweep(tmp_path / "s", [1e-5, 2e-5], multirun=True)
    mr = yaml.safe_load((sweep / "multirun.yaml").read_text())
    mr["hydra"]["overrides"]["task"] = ["+sampler=edm_daps,other_daps"]  # the group's options differ in lr
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(mr))
    rows = table(script("parse_metrics.py", sweep).stdout)
    assert rows[0][:3] == ["run", "sampler.lr", "status"]


def test_running_run_with_an_old_heartbeat_is_stale(tmp_path):
    run = make_run(tmp_path / "killed", status="running", done=1, pid=12345, host="another-host",
                   heartbeat_unix=time.time() - 3600)
    r = script("parse_metrics.py", run)
    assert r.returncode == 0 and table(r.stdout)[1][:2] == ["killed", "stale"]
    assert "killed: stale: recorded as running, but its last heartbeat was 60 min ago" in r.stdout
    r = script("parse_metrics.py", run, "--stale-after", 120)
    assert table(r.stdout)[1][:2] == ["killed", "running"]


def test_running_run_whose_process_ended_on_this_host_is_stale(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = make_run(tmp_path / "gone", status="running", done=1, pid=ended.pid, host=socket.gethostname(),
                    heartbeat_unix=time.time())
    alive = make_run(tmp_path / "alive", status="running", done=1, pid=os.getpid(), host=socket.gethostname(),
                     heartbeat_unix=time.time())
    r = script("parse_metrics.py", gone, alive)
    assert [row[:2] for row in table(r.stdout)[1:]] == [["gone", "stale"], ["alive", "running"]]
    assert f"process {ended.pid} on {socket.gethostname()} has ended" in r.stdout


def test_failed_and_interrupted_runs_are_shown_as_such(tmp_path):
    failed = make_run(tmp_path / "failed", status="failed", done=1, error="CUDA out of memory")
    stopped = make_run(tmp_path / "stopped", status="interrupted", done=1)
    r = script("parse_metrics.py", failed, stopped)
    assert r.returncode == 0
    assert [row[:2] for row in table(r.stdout)[1:]] == [["failed", "failed"], ["stopped", "interrupted"]]
    assert "failed: failed: 1 image(s) finished; error: CUDA out of memory" in r.stdout
    assert "complete" not in r.stdout


def test_check_events_reports_the_unfinished_image_of_an_interrupted_run(tmp_path):
    run = make_run(tmp_path / "stopped", status="interrupted", done=1, streams={(0, 0): 4, (1, 1): 2})
    with open(run / "events.jsonl", "a") as f:
        f.write('{"elapsed_sec": 0.3, "event": "lev')  # killed while writing a line
    r = script("check_events.py", run)
    assert r.returncode == 0, r.stdout
    assert "status interrupted: 1 image(s) finished" in r.stdout
    assert "images 1-1 run 0: unfinished (last level 2 of 4), propagates=True, monotone=True" in r.stdout
    assert "events.jsonl: last line cut off" in r.stdout
    assert "images 0-0 run 0: 4 levels" in r.stdout


def test_run_killed_before_its_first_metrics_is_unfinished_not_an_error(tmp_path):
    run = make_run(tmp_path / "killed", done=0, streams={(0, 0): 2},
                   config={"sampler": {"annealing_scheduler_config": {"num_steps": 4}}})
    for name in ("metrics.json", "timing.json"):
        (run / name).unlink()
    r = script("check_events.py", run)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "status unknown: no metrics.json (the run was stopped before writing it, or is starting)",
        "images 0-0 run 0: unfinished (last level 2 of 4), propagates=True, monotone=True, NaN particles 0"]
    r = script("parse_metrics.py", run)
    assert r.returncode == 0 and table(r.stdout)[1] == ["killed", "unknown"]


def test_check_events_still_fails_a_complete_run_that_ends_with_noise(tmp_path):
    run = make_run(tmp_path / "bug", status="complete", done=1, streams={(0, 0): 3})
    r = script("check_events.py", run)
    assert r.returncode == 1 and "last next_sigma=0: False" in r.stdout
    stopped = make_run(tmp_path / "stopped", status="interrupted", done=1, streams={(0, 0): 3, (1, 1): 2})
    r = script("check_events.py", stopped)  # the stream it did not stop in is a finished one: a sigma bug
    assert r.returncode == 1 and "images 0-0 run 0: 3 levels" in r.stdout and "unfinished" in r.stdout


@pytest.mark.parametrize("content, message", [
    (lambda b: b[:len(b) // 2], "damaged image file (image file is truncated"),
    (lambda b: b"<html>not found</html>", "not an image file")])
def test_bad_image_file_is_named_with_the_fix(tmp_path, content, message):
    folder = save_images(tmp_path / "data", 2, 16)
    bad = folder / "00001.png"
    bad.write_bytes(content(bad.read_bytes()))
    with pytest.raises(ValueError) as err:
        build_dataset({"name": "image", "root": str(folder), "resolution": 16})
    text = str(err.value)
    assert text.startswith(f"{bad}: {message}") and "move it out of" in text and "\n" not in text


def test_bad_image_file_is_one_line_from_the_entry_point(tmp_path):
    folder = save_images(tmp_path / "data", 1, 16)
    bad = folder / "00000.png"
    bad.write_bytes(bad.read_bytes()[:100])
    r = subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), "+data.name=image", f"+data.root={folder}",
                        "+data.resolution=16", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps",
                        f"save_dir={tmp_path}", "gpu=-1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ERROR posterior_sample: data: {bad}: damaged image file (image file is truncated); "
        f"copy it again from its source or move it out of {folder}"], r.stderr


def test_folder_without_images_says_what_to_do(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no png/jpg images in .*point data.root at the folder"):
        build_dataset({"name": "image", "root": str(tmp_path / "data"), "resolution": 16})
