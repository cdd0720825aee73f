"""Runs that never lie about their status, survive signals and crashes, resume without recomputing, and delete only
their own folders.

1. status: ``failed`` with the error on an exception (an I/O error while saving, an out-of-memory error while
   sampling), ``interrupted`` on SIGINT / SIGTERM (exit 130 / 143), ``running`` with pid, host and heartbeat while it
   goes on (so a SIGKILLed run is stale for scripts/parse_metrics.py);
2. resume=true: finished images are kept, not recomputed, and the result equals an uninterrupted run's; a changed
   config is refused with the keys named;
3. an interrupt loses only the levels since the last checkpoint of the chunk in flight: resume continues that chunk
   from its level, and the result equals an uninterrupted run's;
4. name is one folder name; overwrite=true deletes only this tool's folders;
5. a sweep with an invalid value records that job as failed and runs the others; a refused sweep leaves its
   multirun.yaml alone;
6. bad values and messages: negative operator sigma, warnings before sampling in run.log, progress as log lines,
   an unwritable save_dir in one line.
In-process runs compose the config as tests/test_configs.py does; signals go to real subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import posterior_sample
import utils.results
from posterior_sample import Run
from scripts.parse_metrics import run_status
from utils.build import KEPT, KeptForSweep, UserError, build_run
from utils.config import CONFIGS
from utils.folder import MARKER
from utils.metrics import Evaluator
from utils.observer import RunLog

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps"]
SMALL = ["task_group=pixel_hmc", "data.end_id=3", "batch_size=1", "num_samples=2", "eval_fn_list=[psnr]",
         "show_progress=false", "gpu=-1", "sampler.annealing_scheduler_config.num_steps=4",
         "sampler.diffusion_scheduler_config.num_steps=2"]
# what may differ between an uninterrupted run and an interrupted-then-resumed one: times and the process
VOLATILE = {"timing", "peak_memory", "pid", "host", "heartbeat_unix"}


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="default", overrides=[*GROUPS, *SMALL, *overrides])


def choices() -> dict[str, str]:
    return {o[1:].split("=")[0]: o.split("=")[1] for o in GROUPS}


def build(*overrides: str):
    return build_run(compose_run(*overrides), choices(), [CONFIGS])


def run_in_process(*overrides: str) -> int:
    torch.manual_seed(0)
    return Run(build(*overrides)).execute()


def read(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def stable(root: Path) -> dict:
    """metrics.json without the fields that measure time or name the process."""
    return {k: v for k, v in read(root, "metrics.json").items() if k not in VOLATILE}


def cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run of the 3 images, in process (the reference for resumed runs)."""
    save = tmp_path_factory.mktemp("straight")
    assert run_in_process(f"save_dir={save}", "name=r") == 0
    return save / "r"


# 1-3. failures and resume ---------------------------------------------------------------------------------------

def fail_on_second_image_save(monkeypatch):
    """save_png raises an I/O error (a full disk) when the second image saves its first particle."""
    real, calls = utils.results.save_png, []

    def save_png(img, path):
        calls.append(path)
        if "00001_particle00" in path.name:
            raise OSError(28, "No space left on device")
        real(img, path)
    monkeypatch.setattr(utils.results, "save_png", save_png)


def fail_on_second_chunk_sampling(monkeypatch):
    """The sampler runs out of memory in its second call (the second image)."""
    from sampler import DAPS

    real, calls = DAPS.sample, []

    def sample(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(DAPS, "sample", sample)


@pytest.mark.parametrize("inject, error", [
    (fail_on_second_image_save, "OSError: [Errno 28] No space left on device"),
    (fail_on_second_chunk_sampling, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_a_crash_is_failed_and_resume_finishes_it_as_an_uninterrupted_run(tmp_path, monkeypatch, straight, inject,
                                                                          error):
    root = tmp_path / "r"
    with monkeypatch.context() as patch:
        inject(patch)
        assert run_in_process(f"save_dir={tmp_path}", "name=r") == 1
    metrics, timing = read(root, "metrics.json"), read(root, "timing.json")
    assert metrics["status"] == timing["status"] == "failed"
    assert metrics["error"] == timing["error"] == error
    assert metrics["num_images_done"] == timing["images_done"] == 1 and metrics["num_images_planned"] == 3
    assert timing["per_image_sec"] == timing["finished_wall_sec"] < timing["total_wall_sec"]  # image 2 not counted
    log = (root / "run.log").read_text()
    assert f"failed: {error}" in log and "Traceback" in log
    assert "resume=true continues it" in log
    assert sorted(p.name for p in (root / "per_image").iterdir()) == ["00000.json"]

    from sampler import DAPS
    sampled, real = [], DAPS.sample
    monkeypatch.setattr(DAPS, "sample", lambda self, m, o, particles, **kw: (
        sampled.append(sorted({p.image for p in particles.ids})), real(self, m, o, particles, **kw))[1])
    first = (root / "per_image" / "00000.json").stat().st_mtime_ns
    assert run_in_process(f"save_dir={tmp_path}", "name=r", "resume=true") == 0
    assert sampled == [[1], [2]]  # image 0 was loaded, not recomputed
    assert (root / "per_image" / "00000.json").stat().st_mtime_ns == first
    assert stable(root) == stable(straight)
    assert read(root, "metrics.json")["status"] == "complete"
    timing = read(root, "timing.json")
    assert [a["status"] for a in timing["attempts"]] == ["failed", "complete"] and timing["images_done"] == 3
    assert timing["total_wall_sec"] == pytest.approx(sum(a["wall_sec"] for a in timing["attempts"]))
    for p in (straight / "samples").iterdir():
        assert p.read_bytes() == (root / "samples" / p.name).read_bytes(), p.name
    assert (root / "grid_results.png").read_bytes() == (straight / "grid_results.png").read_bytes()
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_events.py"), str(root)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count("4 levels, propagates=True") == 3, check.stdout


@pytest.mark.parametrize("batch_size, writes, grids", [(3, 3, 1), (1, 5, 3)])
def test_metrics_json_is_written_once_per_batch_not_per_image(tmp_path, monkeypatch, straight, batch_size, writes,
                                                              grids):
    """At the start, after each batch, at the end: 3 images in one batch of 3 (3 writes) or in 3 batches (5). The
    grid after each batch, not again at the end when it shows the same images."""
    real, names = utils.results.dump_json, []
    monkeypatch.setattr(utils.results, "dump_json", lambda obj, path: (names.append(Path(path).name), real(obj, path)))
    real_grid, grid_writes = utils.results.save_grid, []
    monkeypatch.setattr(utils.results, "save_grid", lambda rows, path: (grid_writes.append(path),
                                                                         real_grid(rows, path)))
    assert run_in_process(f"save_dir={tmp_path}", "name=r", f"batch_size={batch_size}") == 0
    assert names.count("metrics.json") == writes
    assert len(grid_writes) == grids and (tmp_path / "r" / "grid_results.png").is_file()
    metrics = read(tmp_path / "r", "metrics.json")
    assert metrics["status"] == "complete" and metrics["num_images_done"] == 3
    assert [img["index"] for img in metrics["images"]] == [0, 1, 2]
    if batch_size == 1:  # the reference's settings: the same records as written image by image before
        assert metrics["images"] == read(straight, "metrics.json")["images"]


def test_time_outside_sampling_is_clocked_per_stage(tmp_path, monkeypatch, caplog):
    """timing.json's attempt holds the warm-up, scoring, saving and writing clocks: on a clock that only the injected
    delays move, each stage holds exactly its own delays (3 images in 3 batches x 2 particles: 3 scorings, 6 samples
    saved, 3 grids before the final write); run.log's ``outside sampling:`` line says the same."""
    now = [0.0]
    monkeypatch.setattr(utils.results, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time))

    def slowed(real, sec):
        def call(*args, **kwargs):
            now[0] += sec
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(utils.results, "save_png", slowed(utils.results.save_png, 0.1))
    monkeypatch.setattr(utils.results, "save_grid", slowed(utils.results.save_grid, 0.01))
    monkeypatch.setattr(Run, "warm_up", slowed(Run.warm_up, 1.0))
    monkeypatch.setattr(Evaluator, "__call__", slowed(Evaluator.__call__, 10.0))
    with caplog.at_level(logging.INFO, logger="posterior_sample"):
        assert run_in_process(f"save_dir={tmp_path}", "name=r") == 0
    stages = read(tmp_path / "r", "timing.json")["attempts"][-1]["stages_sec"]
    assert stages == pytest.approx({"warm_up": 1.0, "scoring": 30.0, "saving": 0.6, "writing": 0.03}, abs=1e-9)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("outside sampling: "))
    assert line == "outside sampling: warm_up 1.00 s, scoring 30.00 s, saving 0.60 s, writing 0.03 s (the final write " \
                   "included)"


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path, monkeypatch):
    fail_on_second_image_save(monkeypatch)
    assert run_in_process(f"save_dir={tmp_path}", "name=r") == 1
    with pytest.raises(UserError) as err:
        Run(build(f"save_dir={tmp_path}", "name=r", "resume=true", "seed=7",
                  "sampler.annealing_scheduler_config.num_steps=5"))
    msg = str(err.value)
    assert "seed (saved 42, now 7)" in msg and "sampler.annealing_scheduler_config.num_steps (saved 4, now 5)" in msg
    # where results go, what is shown, the device and the batch size do not change results
    Run(build(f"save_dir={tmp_path}", "name=r", "resume=true", "batch_size=2", "show_progress=true", "gpu=1"))


def test_resume_of_a_run_from_before_a_key_existed_takes_the_old_behaviours_value():
    """A config.yaml written before model.compile / model.channels_last / noise existed matches a command that sets
    them to the old behaviour (none, false, generator) and differs from any other value, which the message names."""
    from omegaconf import OmegaConf

    from utils.build import config_differences

    now = OmegaConf.create({"seed": 42, "noise": "generator", "model": {"name": "x", "compile": "none",
                                                                          "channels_last": False}})
    saved = {"seed": 42, "model": {"name": "x"}}
    assert config_differences(saved, now) == []
    now.model.compile = "auto"
    assert config_differences(saved, now) == ["model.compile (saved absent, as 'none', now 'auto')"]
    assert "extra (saved 1, now absent)" in config_differences({**saved, "extra": 1}, now)


def test_resume_refuses_another_batch_size_when_the_sampler_couples_the_batch(tmp_path):
    k2 = ["+experiment=k2_speed", "data.end_id=1"]  # K2's batch median couples the images of a batch
    assert run_in_process(f"save_dir={tmp_path}", "name=r", *k2) == 0
    with pytest.raises(UserError, match="batch_size \\(saved 1, now 2\\)"):
        Run(build(f"save_dir={tmp_path}", "name=r", "resume=true", "batch_size=2", *k2))


def test_an_existing_run_is_refused_with_resume_and_overwrite_named(tmp_path, monkeypatch):
    fail_on_second_image_save(monkeypatch)
    assert run_in_process(f"save_dir={tmp_path}", "name=r") == 1
    with pytest.raises(UserError, match="already holds a run \\(failed, 1 image\\(s\\) finished\\): resume=true "
                                        "continues it .* overwrite=true deletes it, finished images included"):
        Run(build(f"save_dir={tmp_path}", "name=r"))
    with pytest.raises(UserError, match="overwrite=true and resume=true contradict"):
        build(f"save_dir={tmp_path}", "name=r", "resume=true", "overwrite=true")


def test_resume_refuses_a_run_still_being_written(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = tmp_path / "r"
        root.mkdir()
        (root / MARKER).write_text(json.dumps({"kind": "run"}))
        (root / "config.yaml").write_text("name: r\n")
        (root / "metrics.json").write_text(json.dumps({"status": "running", "pid": sleeper.pid,
                                                       "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"still being written by process {sleeper.pid}"):
            Run(build(f"save_dir={tmp_path}", "name=r", "resume=true"))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_job_system_signal_handler_still_runs_and_the_run_is_interrupted(tmp_path, monkeypatch):
    """submitit installs a SIGUSR2 handler (SLURM time limit) that raises SystemExit after requeueing the job."""
    def submitit_like(signum, frame):
        raise SystemExit(-1)
    previous = signal.signal(signal.SIGUSR2, submitit_like)
    real = utils.results.save_png
    monkeypatch.setattr(utils.results, "save_png", lambda img, path: (
        real(img, path), "00001_particle01" in path.name and os.kill(os.getpid(), signal.SIGUSR2)))
    try:
        with pytest.raises(SystemExit):
            run_in_process(f"save_dir={tmp_path}", "name=r")
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # handlers are restored after the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
    metrics = read(tmp_path / "r", "metrics.json")
    assert metrics["status"] == "interrupted" and metrics["num_images_done"] == 1
    assert "interrupted (SIGUSR2)" in (tmp_path / "r" / "run.log").read_text()


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "posterior_sample.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"


@pytest.fixture(scope="module")
def straight_cli(tmp_path_factory) -> Path:
    """An uninterrupted run in a subprocess (the reference for the signal tests, 8 levels per image)."""
    save = tmp_path_factory.mktemp("straight_cli")
    r = cli([*GROUPS, *SMALL, "sampler.annealing_scheduler_config.num_steps=8", f"save_dir={save}", "name=r"])
    assert r.returncode == 0, r.stderr[-2000:]
    return save / "r"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_is_interrupted_and_resume_recomputes_only_the_rest(tmp_path, straight_cli, sig, code):
    args = [*GROUPS, *SMALL, "sampler.annealing_scheduler_config.num_steps=8", f"save_dir={tmp_path}", "name=r"]
    root = tmp_path / "r"
    proc = start(args)
    wait_for(root / "per_image" / "00000.json", proc)
    running = read(root, "metrics.json")
    assert running["status"] == "running" and running["pid"] == proc.pid and running["heartbeat_unix"] > 0
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    metrics, timing = read(root, "metrics.json"), read(root, "timing.json")
    assert metrics["status"] == timing["status"] == "interrupted"
    done = metrics["num_images_done"]
    assert 1 <= done < 3 and timing["images_done"] == done
    assert timing["per_image_sec"] == pytest.approx(timing["finished_wall_sec"] / done)
    assert timing["finished_wall_sec"] < timing["total_wall_sec"]  # the image in flight is not counted
    name = signal.Signals(sig).name
    assert f"interrupted ({name}): {done} of 3 image(s) finished" in (root / "run.log").read_text()
    assert run_status(root)[0] == "interrupted"

    r = cli([*args, "resume=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{done} of 3 image(s) finished earlier are kept; sampling the other {3 - done}" in r.stderr
    assert stable(root) == stable(straight_cli)
    assert [a["status"] for a in read(root, "timing.json")["attempts"]] == ["interrupted", "complete"]


def level_steps(events: Path, images: list[int]) -> list[int]:
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.endswith("}")]
    return [e["step"] for e in lines if e["event"] == "level" and e["images"] == images]


def test_sigint_mid_chunk_resumes_the_chunk_from_its_last_level(tmp_path):
    """batch_size=2: images 0-1 are one chunk; SIGINT after its 10th level; resume goes on from the checkpoint."""
    args = [*GROUPS, *SMALL, "batch_size=2", "sampler.annealing_scheduler_config.num_steps=60",
            "checkpoint_every_sec=0"]
    r = cli([*args, f"save_dir={tmp_path / 'straight'}", "name=r"])
    assert r.returncode == 0, r.stderr[-2000:]
    straight, root = tmp_path / "straight" / "r", tmp_path / "r"
    proc = start([*args, f"save_dir={tmp_path}", "name=r"])
    deadline = time.time() + 240
    events = root / "events.jsonl"
    while time.time() < deadline and proc.poll() is None and \
            not (events.is_file() and max(level_steps(events, [0, 1]), default=-1) >= 9):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert read(root, "metrics.json")["num_images_done"] == 0  # the chunk was in flight
    saved = torch.load(root / "checkpoint" / "chunk.pt", weights_only=True)
    step = saved["sample"]["step"]
    # the level's event is written before its checkpoint: a signal between the two leaves the checkpoint one level behind
    assert saved["images"] == [0, 1] and saved["run"] == 0 and 8 <= step < 59
    before = set(events.read_text().splitlines())

    r = cli([*args, f"save_dir={tmp_path}", "name=r", "resume=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"images 0-1 continue from their checkpoint (run 1, after level {step + 1})" in r.stderr
    new = [line for line in events.read_text().splitlines() if line not in before]
    assert level_steps(events, [0, 1]) == list(range(60))  # each level once: those before the interrupt kept
    assert [json.loads(line)["step"] for line in new if '"event": "level"' in line and '"images": [0, 1]' in line] \
        == list(range(step + 1, 60))  # the resumed run computed only the levels after the checkpoint
    assert stable(root) == stable(straight)
    for name in ("per_image/00000.json", "per_image/00001.json", "per_image/00002.json"):
        assert read(root, name) == read(straight, name)
    pngs = sorted(p.name for p in (straight / "samples").iterdir())
    assert sorted(p.name for p in (root / "samples").iterdir()) == pngs and len(pngs) == 6
    for name in pngs:
        assert (straight / "samples" / name).read_bytes() == (root / "samples" / name).read_bytes(), name
    evals = [read(folder, "timing.json")["particle_network_evals"] for folder in (root, straight)]
    assert evals[0] == evals[1]  # the levels before the interrupt are counted once
    assert not (root / "checkpoint").exists()  # deleted once its chunk's images were saved
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_events.py"), str(root)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count("60 levels, propagates=True") == 2, check.stdout


def test_resume_with_another_batch_size_samples_the_checkpointed_chunk_again(tmp_path, monkeypatch, caplog):
    from sampler import DAPS

    real = DAPS.sample

    def sample(self, *args, **kwargs):  # interrupted after the first chunk's third level
        saves = []
        save = kwargs["checkpoint"]
        kwargs["checkpoint"] = lambda state: (save(state), saves.append(1),
                                              len(saves) == 3 and os.kill(os.getpid(), signal.SIGINT))
        return real(self, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(DAPS, "sample", sample)
        assert run_in_process(f"save_dir={tmp_path}", "name=r", "batch_size=2", "checkpoint_every_sec=0") == 130
    assert torch.load(tmp_path / "r" / "checkpoint" / "chunk.pt", weights_only=True)["sample"]["step"] == 2
    with caplog.at_level(logging.INFO):
        assert run_in_process(f"save_dir={tmp_path}", "name=r", "batch_size=3", "resume=true") == 0
    assert "checkpoint chunk.pt of images 0-1 is not continued: it was written with batch_size=2, now 3" in caplog.text
    assert not (tmp_path / "r" / "checkpoint").exists()
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_events.py"), str(tmp_path / "r")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count("4 levels, propagates=True") == 1, check.stdout


def test_torchrun_resumes_each_ranks_unfinished_images(tmp_path, monkeypatch, straight_cli):
    args = ["sampler.annealing_scheduler_config.num_steps=8", f"save_dir={tmp_path}", "name=r"]
    with monkeypatch.context() as patch:
        fail_on_second_image_save(patch)
        assert run_in_process(*args) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(ROOT / "posterior_sample.py"), *GROUPS, *SMALL, *args, "resume=true"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stable(tmp_path / "r") == stable(straight_cli)
    timing = read(tmp_path / "r", "timing.json")
    assert timing["world_size"] == 2 and [x["images_done"] for x in timing["ranks"]] == [0, 2]  # image 0 was kept


def test_sigkill_leaves_a_running_record_that_parse_metrics_calls_stale(tmp_path):
    root = tmp_path / "r"
    proc = start([*GROUPS, *SMALL, "sampler.annealing_scheduler_config.num_steps=8", f"save_dir={tmp_path}", "name=r"])
    wait_for(root / "per_image" / "00000.json", proc)
    proc.kill()
    proc.communicate(timeout=60)
    metrics, timing = read(root, "metrics.json"), read(root, "timing.json")
    assert metrics["status"] == timing["status"] == "running"
    assert metrics["pid"] == timing["pid"] == proc.pid and isinstance(timing["heartbeat_unix"], float)
    status, note = run_status(root)
    assert status == "stale" and f"process {proc.pid}" in note


# 4. deletion ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_name_must_be_one_folder_name(tmp_path, name):
    (tmp_path / "keep.txt").write_text("other results")
    with pytest.raises(UserError, match="is not a folder name"):
        build(f"save_dir={tmp_path}", f"name='{name}'", "overwrite=true")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", ["", ".."])
def test_empty_or_parent_name_with_overwrite_deletes_nothing_from_the_command_line(tmp_path, name):
    save = tmp_path / "save"
    save.mkdir()
    (save / "other_run.txt").write_text("another run's results")
    r = cli([*GROUPS, f"save_dir={save}", f"name={name}", "overwrite=true", "gpu=-1"], timeout=120)
    assert r.returncode == 2 and "is not a folder name" in r.stderr and "Traceback" not in r.stderr
    assert (save / "other_run.txt").read_text() == "another run's results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]


def test_overwrite_refuses_a_folder_this_tool_did_not_create(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("not ours")
    with pytest.raises(UserError, match="not created by posterior_sample.py .* remove the folder by hand"):
        Run(build(f"save_dir={tmp_path}", "name=r", "overwrite=true"))
    assert (tmp_path / "r" / "thesis.tex").read_text() == "not ours"
    (tmp_path / "link").symlink_to(tmp_path / "r")
    (tmp_path / "r" / MARKER).write_text("{}")
    with pytest.raises(UserError, match="symbolic link"):
        Run(build(f"save_dir={tmp_path}", "name=link", "overwrite=true"))
    assert (tmp_path / "r" / "thesis.tex").is_file()


def test_overwrite_removes_only_its_own_folder_and_says_so(tmp_path, caplog):
    assert run_in_process(f"save_dir={tmp_path}", "name=r", "data.end_id=1") == 0
    (tmp_path / "neighbour.txt").write_text("keep")
    with caplog.at_level(logging.WARNING):
        assert run_in_process(f"save_dir={tmp_path}", "name=r", "data.end_id=1", "overwrite=true") == 0
    assert "overwrite=true: removing" in caplog.text and "1 image(s) finished" in caplog.text
    assert (tmp_path / "neighbour.txt").read_text() == "keep"
    assert read(tmp_path / "r", "metrics.json")["status"] == "complete"
    assert [a["status"] for a in read(tmp_path / "r", "timing.json")["attempts"]] == ["complete"]


# 5. sweeps --------------------------------------------------------------------------------------------------------

def sweep_args(save: Path, *extra: str) -> list[str]:
    return ["-m", *GROUPS, "data.end_id=1", "show_progress=false", "gpu=-1", "eval_fn_list=[psnr]",
            "sampler.annealing_scheduler_config.num_steps=2", "sampler.diffusion_scheduler_config.num_steps=1",
            f"save_dir={save}", "name=sw", *extra]


def sweep(save: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(sweep_args(save, *extra), timeout=600)


def job(save: Path, n: int) -> dict:
    return read(save / "sw" / f"run{n:03d}", "metrics.json")


def test_sweep_with_an_invalid_value_runs_the_others_and_a_refused_sweep_keeps_its_record(tmp_path):
    lrs = "task.pixel.mcmc_sampler_config.lr=1e-5,-1,2e-5"
    r = sweep(tmp_path, lrs)
    assert r.returncode == 1, r.stderr[-3000:]
    assert [job(tmp_path, n)["status"] for n in range(3)] == ["complete", "failed", "complete"]
    assert "lr" in job(tmp_path, 1)["error"] and "UserError" in job(tmp_path, 1)["error"]
    assert "lr" in (tmp_path / "sw" / "run001" / "run.log").read_text()
    record = tmp_path / "sw" / "multirun.yaml"
    before = record.read_bytes()

    r = sweep(tmp_path, "task.pixel.mcmc_sampler_config.lr=3e-5,4e-5")  # the same name again
    assert r.returncode == 2 and "already holds a sweep with 3 job folder(s): resume=true" in r.stderr, r.stderr
    assert record.read_bytes() == before
    r = sweep(tmp_path, "task.pixel.mcmc_sampler_config.lr=3e-5,4e-5", "resume=true")
    assert r.returncode == 2 and "overrides differ from those in" in r.stderr and record.read_bytes() == before
    assert "mcmc_sampler_config.lr=3e-5,4e-5, task.pixel.mcmc_sampler_config.lr=1e-5,-1,2e-5 (saved)" in r.stderr

    stamps = [(tmp_path / "sw" / f"run{n:03d}" / "per_image" / "00000.json").stat().st_mtime_ns for n in (0, 2)]
    r = sweep(tmp_path, lrs, "resume=true")
    assert r.returncode == 1, r.stderr[-3000:]
    assert [job(tmp_path, n)["status"] for n in range(3)] == ["complete", "failed", "complete"]
    assert stamps == [(tmp_path / "sw" / f"run{n:03d}" / "per_image" / "00000.json").stat().st_mtime_ns
                      for n in (0, 2)]


def test_ctrl_c_on_a_parallel_sweep_leaves_every_job_interrupted_and_resume_completes_them(tmp_path):
    args = ["hydra/launcher=local", "data.end_id=3", "batch_size=1", "sampler.annealing_scheduler_config.num_steps=16",
            "seed=1,2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "posterior_sample.py"), *sweep_args(tmp_path, *args)],
                            cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for n in range(2):
        wait_for(tmp_path / "sw" / f"run{n:03d}" / "per_image" / "00000.json", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the sweep and its workers get SIGINT
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    statuses = [job(tmp_path, n)["status"] for n in range(2)]  # a job may have finished before the signal
    assert "interrupted" in statuses and set(statuses) <= {"interrupted", "complete"}, err[-3000:]
    r = sweep(tmp_path, *args, "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(job(tmp_path, n)["status"], job(tmp_path, n)["num_images_done"]) for n in range(2)] == \
        [("complete", 3)] * 2


def test_sequential_sweep_jobs_reuse_the_last_jobs_model_only_for_the_same_config(tmp_path):
    args = [a for a in sweep_args(tmp_path, "model.component_std=0.05,0.07", "seed=1,2") if not a.startswith("eval_")]
    r = cli([*args, "eval_fn_list=[psnr,lpips]"], timeout=600)  # LPIPS is unavailable at 16 x 16: a build warning
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted((tmp_path / "sw").glob("run*"))
    stds = [yaml.safe_load((p / "config.yaml").read_text())["model"]["component_std"] for p in jobs]
    reused = ["the model built by an earlier job of this process is reused" in (p / "run.log").read_text()
              for p in jobs]
    assert len(jobs) == 4 and reused == [False] + [a == b for a, b in zip(stds, stds[1:])]
    assert any(reused) and not all(reused[1:])
    assert all("the evaluator built by an earlier job" in (p / "run.log").read_text() for p in jobs[1:])
    assert all("lpips unavailable" in (p / "run.log").read_text() for p in jobs)
    last = yaml.safe_load((jobs[-1] / "config.yaml").read_text())
    alone = tmp_path / "alone"
    args = [a for a in sweep_args(tmp_path, f"model.component_std={last['model']['component_std']}",
                                  f"seed={last['seed']}") if a not in ("-m", "name=sw") and not a.startswith("eval_")]
    r = cli([*args, "name=alone", "eval_fn_list=[psnr,lpips]"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reused" not in (alone / "run.log").read_text()
    assert reused[-1] and stable(alone)["images"] == stable(jobs[-1])["images"]


def test_a_job_that_fails_hands_nothing_on_to_the_next_job_of_a_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(posterior_sample.Run, "execute", lambda self: posterior_sample.EXIT_FAILED)
    KEPT.take("model", "earlier job", lambda: torch.nn.Linear(1, 1))
    run_log = RunLog()
    try:
        assert posterior_sample.start_and_execute(compose_run(f"save_dir={tmp_path}", "name=r"), run_log) == \
            (posterior_sample.EXIT_FAILED, None)  # outside a sweep: no error for Hydra
    finally:
        run_log.close()
    assert KEPT.kept == {}


def test_kept_for_sweep_builds_again_for_another_key_and_releases_the_old_object(caplog):
    kept, built, old = KeptForSweep(), [], []

    def build(tag):
        built.append((tag, [ref() is None for ref in old]))  # whether the object built before is released by now
        logging.getLogger("posterior_sample").warning("built %s", tag)
        return torch.nn.Linear(1, 1)
    first = kept.take("model", {"a": 1}, lambda: build("a"))
    with caplog.at_level(logging.INFO):
        assert kept.take("model", {"a": 1}, lambda: build("again")) is first
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["built a", "built a"]
    old.append(weakref.ref(first))
    del first
    second = kept.take("model", {"a": 2}, lambda: build("b"))
    assert kept.take("model", {"a": 2}, lambda: build("c")) is second
    assert built == [("a", []), ("b", [True])]


@pytest.mark.parametrize("launcher", ["hydra/launcher=local", "hydra/launcher=submitit_local"])
def test_sweep_jobs_under_joblib_and_submitit_have_their_own_status(tmp_path, launcher):
    r = sweep(tmp_path, launcher, "task.pixel.mcmc_sampler_config.lr=-1,2e-5")
    assert r.returncode == 1, r.stderr[-3000:]
    assert [job(tmp_path, n)["status"] for n in range(2)] == ["failed", "complete"]


# 6. bad values, logs, progress ------------------------------------------------------------------------------------

def test_negative_operator_sigma_is_refused(tmp_path):
    with pytest.raises(UserError, match="operator.*sigma .* must be a finite number >= 0, got -0.1"):
        build(f"save_dir={tmp_path}", "task.pixel_hmc.operator.sigma=-0.1")


def test_warnings_before_sampling_are_in_run_log(tmp_path):
    run_log = RunLog()  # as main() does before building
    parts = build(f"save_dir={tmp_path}", "name=r", "data.end_id=1", "eval_fn_list=[psnr,lpips]")
    assert Run(parts, run_log).execute() == 0
    assert "lpips unavailable: images of 16x16 px are below AlexNet's 32 px minimum" in \
        (tmp_path / "r" / "run.log").read_text()


def test_progress_is_log_lines_when_stderr_is_not_a_terminal(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO):
        assert run_in_process(f"save_dir={tmp_path}", "name=r", "data.end_id=1", "show_progress=true") == 0
    lines = [r.getMessage() for r in caplog.records if "level " in r.getMessage()]
    assert [line.split(": level ")[1].split(",")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "\r" not in capsys.readouterr().err


def test_unwritable_save_dir_is_one_line(tmp_path, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "ro" / "r":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    run = Run(build(f"save_dir={tmp_path / 'ro'}", "name=r"))
    with pytest.raises(UserError, match=f"cannot write results to {tmp_path / 'ro' / 'r'}: Permission denied"):
        run.open()


def test_compiled_model_warms_up_once_before_sampling(tmp_path, caplog, compile_fused_as_on_cuda):
    """A compiled model (model.compile) compiles for a full chunk's particles before the first chunk, outside the
    sampling clock; an uncompiled one is not called. Two MCMC steps warm up the rest once: with the fused noise draw
    and the arithmetic that runs compiled on CUDA (forced here, with dynamo's eager backend), sampling traces nothing
    more. Generator noise on the CPU has nothing to warm up."""
    eager_compile = compile_fused_as_on_cuda()
    parts = build(f"save_dir={tmp_path}", "name=w", "noise=counter-fused")
    calls: list[int] = []
    parts.model.compiled = "default"
    parts.model.warm_up = calls.append
    traced: list[int] = []
    real = parts.sampler.warm_up
    parts.sampler.warm_up = lambda *a: (real(*a), traced.append(eager_compile["stats"]["unique_graphs"]))
    with caplog.at_level(logging.INFO, logger="posterior_sample"):
        assert Run(parts).execute() == 0
    assert calls == [1 * 2]  # one call, batch_size x num_samples of SMALL
    assert "model.compile=default: compiled the networks for 2 particles" in caplog.text
    assert caplog.text.count("warm-up: two MCMC steps (") == 1 and "counter-fused noise" in caplog.text
    assert traced[0] >= 6 and eager_compile["stats"]["unique_graphs"] == traced[0]  # noise, signed image, spectrum, ...
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="posterior_sample"):
        assert Run(build(f"save_dir={tmp_path}", "name=g", "noise=generator")).execute() == 0
    assert "warm-up" not in caplog.text and "compiled the networks" not in caplog.text
