"""The results folder of a run or sweep: what is there, whether this run may use it, and the only deletion.

A folder this tool creates holds a marker file (:data:`MARKER`, JSON: tool, kind ``run`` or ``sweep``, creation
time). ``overwrite=true`` removes a folder only if it holds the marker, is not a symbolic link and does not contain
the working directory; ``name`` is one path component (utils/build.check_name), so the folder is never save_dir
or a parent of it. ``resume=true`` continues a run in its own folder when its config.yaml agrees with the
command in every key that changes results (utils/build.RESUME_FREE_KEYS).

:class:`ChunkCheckpoint` (``checkpoint/chunk.pt``, ``chunk.rank<r>.pt`` under torchrun) holds the chunk in flight after
its last finished level, so that ``resume=true`` continues that chunk (posterior_sample.py: Run.run_chunk) instead of
sampling it again; :func:`usable_checkpoint` says whether a resumed run can continue it.

:class:`SweepFolder` (a Hydra callback, configs/default.yaml) applies the same rules to a sweep's folder before
Hydra writes multirun.yaml into it, so a refused sweep leaves the folder as it was.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import torch
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from utils.build import RESUME_FREE_KEYS, UserError, check_name, config_differences
from utils.events import dump_json, drop_unfinished

log = logging.getLogger("posterior_sample")
MARKER = ".daps_run"


@dataclass
class Existing:
    """What an existing, non-empty results folder holds."""

    root: Path
    kind: str | None  # "run" or "sweep" (from the marker); None: not made by this tool
    status: str | None  # metrics.json's status
    finished: int  # images with a per_image/<index>.json
    pid: int | None = None
    host: str | None = None

    @property
    def ours(self) -> bool:
        return self.kind is not None

    def describe(self) -> str:
        if self.kind == "sweep":
            jobs = sorted(p.name for p in self.root.glob("run[0-9]*") if p.is_dir())
            return f"a sweep with {len(jobs)} job folder(s)"
        return f"a run ({self.status or 'no metrics.json'}, {self.finished} image(s) finished)"


def inspect(root: Path) -> Existing | None:
    """What ``root`` holds, or None when it does not exist or is empty."""
    if not root.is_dir() or not any(root.iterdir()):
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is a file, not a results folder: choose another name=...")
        return None
    kind = (_read_json(root / MARKER).get("kind") or "run") if (root / MARKER).is_file() else None
    metrics = _read_json(root / "metrics.json")
    finished = len(list((root / "per_image").glob("*.json"))) if (root / "per_image").is_dir() else 0
    return Existing(root, kind, metrics.get("status"), finished, metrics.get("pid"), metrics.get("host"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def refusal(existing: Existing) -> str:
    """Why an existing folder is not used without resume=true or overwrite=true, and what to do instead."""
    root = existing.root
    if not existing.ours:
        return (f"{root} already exists and was not created by posterior_sample.py (no {MARKER} file): choose "
                f"another name=..., or remove the folder by hand if you are sure it can go")
    return (f"{root} already holds {existing.describe()}: resume=true continues it (finished images are kept), "
            f"or choose another name=...; overwrite=true deletes it, finished images included")


def check(root: Path, cfg: DictConfig, free: tuple[str, ...] = RESUME_FREE_KEYS) -> Existing | None:
    """Whether this run may use ``root`` (a UserError saying why not); returns the run to resume, if any. ``free``:
    the top-level keys that may change on resume (RunParts.resume_free_keys)."""
    existing = inspect(root)
    if existing is None:
        if cfg.resume:
            log.info("resume=true: %s has nothing to resume, starting the run", root)
        return None
    if not existing.ours or not (cfg.resume or cfg.overwrite):
        raise UserError(refusal(existing))
    if cfg.overwrite:
        removable(root)
        return None
    if existing.kind != "run" or not (root / "config.yaml").is_file():
        raise UserError(f"resume=true: {root} holds {existing.describe()}, not a run to resume (no config.yaml); "
                        f"a sweep is resumed with the same -m command line and resume=true")
    if existing.status == "running" and existing.host == socket.gethostname() and existing.pid != os.getpid() \
            and _alive(existing.pid):
        raise UserError(f"resume=true: {root} is still being written by process {existing.pid} on this host: "
                        f"wait for it to end or stop it (kill -TERM {existing.pid}) first")
    if existing.status == "running" and existing.host != socket.gethostname():
        log.warning("resume=true: %s is recorded as running by process %s on %s: make sure it has ended, or both "
                    "processes write the same files", root, existing.pid, existing.host)
    differ = config_differences(yaml.safe_load((root / "config.yaml").read_text()) or {}, cfg, free)
    if differ:
        raise UserError(f"resume=true: the command differs from {root}/config.yaml in {'; '.join(differ)}. "
                        f"Only {', '.join(free)} may change on resume; use the same values, or "
                        f"another name=... for a new run")
    return existing


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def removable(root: Path) -> None:
    """Refuse (UserError) to delete ``root`` unless it is one of this tool's folders and holds no one's cwd."""
    if root.is_symlink():
        raise UserError(f"overwrite=true: {root} is a symbolic link; remove it by hand")
    if not (root / MARKER).is_file():
        raise UserError(refusal(Existing(root, None, None, 0)))
    real, cwd = root.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"overwrite=true: {root} contains the working directory {cwd}; it is not removed")


def remove(root: Path) -> None:
    """Delete one of this tool's folders (checked again by :func:`removable`) and say what went."""
    existing = inspect(root)
    removable(root)
    files = sum(1 for p in root.rglob("*") if p.is_file())
    log.warning("overwrite=true: removing %s (%s, %d file(s))", root, existing.describe() if existing else "empty",
                files)
    shutil.rmtree(root)


def create(root: Path, kind: str, cfg: DictConfig | None = None) -> None:
    """Make ``root`` with its marker (and the run's resolved config.yaml); an unwritable place is a UserError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        dump_json({"tool": "posterior_sample.py", "kind": kind, "created_unix": time.time()}, root / MARKER)
        if cfg is not None:
            (root / "config.yaml").write_text(_config_yaml(cfg))
    except OSError as err:
        raise UserError(f"cannot write results to {root}: {err.strerror or err} (save_dir={_save_dir(cfg)}): "
                        f"choose a writable save_dir=...") from err


def _save_dir(cfg: DictConfig | None) -> Any:
    return cfg.get("save_dir") if cfg is not None else "?"


def _config_yaml(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation error is the job's own error: keep its unresolved config
        return OmegaConf.to_yaml(cfg, resolve=False)


def record_refused_job(root: Path, cfg: DictConfig, error: Exception) -> bool:
    """A sweep job refused before it ran (a UserError): its folder says so (status failed, the error), if the folder
    is new; an existing folder is never touched. Returns whether the record was written."""
    try:
        if inspect(root) is not None:
            return False
    except UserError:
        return False
    create(root, "run", cfg)
    text = f"{type(error).__name__}: {error}"
    record = {"status": "failed", "error": text, "name": cfg.get("name"), "pid": os.getpid(),
              "host": socket.gethostname(), "heartbeat_unix": time.time(), "num_images_done": 0,
              "aggregate": {}, "images": []}
    dump_json(record, root / "metrics.json")
    dump_json({k: record[k] for k in ("status", "error", "pid", "host", "heartbeat_unix")}, root / "timing.json")
    return True


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """The command-line overrides of a sweep that change results, as (key, value) in the order that numbers the
    jobs (a key given twice counts once, at its last place, with its last value)."""
    out: dict[str, str] = {}
    for o in overrides:
        key = _override_key(o)
        if not key.startswith("hydra") and key.split(".")[0] not in RESUME_FREE_KEYS:
            out.pop(key, None)
            out[key] = o.split("=", 1)[1] if "=" in o else ""
    return list(out.items())


class SweepFolder(Callback):
    """Hydra callback: checks a sweep's folder (<save_dir>/<name>/) before Hydra writes multirun.yaml into it.

    A new or empty folder gets the marker; an existing one is refused (exit 2, nothing written) unless it is ours
    and resume=true (its multirun.yaml must list the same result-changing overrides) or overwrite=true (it is
    removed first).

    While the sweep runs, Ctrl-C in the sweep's own process waits :data:`GRACE_SEC` seconds before it stops the
    launcher: the terminal sends SIGINT to the parallel jobs (joblib) too, and the launcher kills its workers at
    once (SIGKILL) when it stops, so the wait lets each job record its status (interrupted) first. A second Ctrl-C
    stops at once."""

    GRACE_SEC = 3.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from utils.observer import setup_logging

        setup_logging()
        try:
            self.prepare(config)
        except UserError as err:
            log.error("%s", err)
            sys.exit(2)
        self.previous_sigint = signal.signal(signal.SIGINT, self.interrupted)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        signal.signal(signal.SIGINT, self.previous_sigint)

    def interrupted(self, signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("interrupted: waiting %g s for the running jobs to record their status (Ctrl-C again: stop now)",
                    self.GRACE_SEC)
        time.sleep(self.GRACE_SEC)
        sys.exit(128 + signum)

    @staticmethod
    def prepare(config: DictConfig) -> None:
        check_name(config.get("name"))
        if config.get("overwrite") and config.get("resume"):
            raise UserError("overwrite=true and resume=true contradict each other: pass one of them")
        root = Path(config.hydra.sweep.dir)
        existing = inspect(root)
        if existing is not None:
            if not existing.ours or not (config.resume or config.overwrite):
                raise UserError(refusal(existing))
            if config.resume and existing.kind != "sweep":
                raise UserError(f"resume=true: {root} holds {existing.describe()}, not a sweep")
            if config.overwrite:
                remove(root)
            else:
                saved = root / "multirun.yaml"
                before = sweep_overrides(yaml.safe_load(saved.read_text())["hydra"]["overrides"]["task"]) \
                    if saved.is_file() else None
                now = sweep_overrides(list(config.hydra.overrides.task))
                if before is not None and before != now:
                    differ = [f"{k}={v}" for k, v in now if (k, v) not in before] + \
                        [f"{k}={v} (saved)" for k, v in before if (k, v) not in now]
                    raise UserError(f"resume=true: this sweep's overrides differ from those in {saved}: "
                                    f"{', '.join(differ) or 'their order'}; resume with the same command line (only "
                                    f"{', '.join(RESUME_FREE_KEYS)} and hydra.* may change)")
                log.info("resume=true: continuing the sweep in %s", root)
                return
        create(root, "sweep")


class ChunkCheckpoint:
    """The chunk in flight after a finished level: ``images`` (dataset indices), ``batch_size``, ``world``,
    ``run`` (the run in flight), ``done`` (the finished runs' particles: ``ids``, ``x``, ``status``, ``stopped_at``)
    and ``sample`` (the loop's state, sampler.loop_state). Written with torch.save (tmp + rename: a reader never sees
    half a file), read with ``weights_only=True``, deleted when the chunk's images are saved. :meth:`save_due` writes
    it at most every ``every_sec`` seconds (0: after every level): a save copies the particles to the host and writes
    them while the GPU waits (32 MB for 40 particles of 3 x 256 x 256)."""

    def __init__(self, path: Path, every_sec: float = 0.0):
        self.path, self.every_sec = path, float(every_sec)
        self.last = -math.inf

    def save_due(self, make: Callable[[], dict[str, Any]]) -> None:
        """Save ``make()`` if ``every_sec`` seconds have passed since the last save (the first one: always)."""
        now = time.monotonic()
        if now - self.last >= self.every_sec:
            self.save(make())
            self.last = now

    def save(self, chunk: dict[str, Any]) -> None:
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(chunk, tmp)
        tmp.replace(self.path)

    def load(self) -> dict[str, Any] | None:
        return torch.load(self.path, weights_only=True) if self.path.is_file() else None

    def clear(self) -> None:
        """Delete the checkpoint (its chunk's images are saved); the next chunk's first save is due at once."""
        self.last = -math.inf
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".tmp").unlink(missing_ok=True)  # left by a save that was interrupted
        try:
            self.path.parent.rmdir()  # when no other rank's checkpoint is left
        except OSError:
            pass


def usable_checkpoint(path: Path, finished: set[int], batch_size: int, world: int, device: str
                      ) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if a resumed run continues it: none of its images finished, the same batch_size
    and number of ranks (then its chunk is the first one the rank samples) and random generators on the same kind of
    ``device``; otherwise it is deleted, with a log line saying why, and its images are sampled again."""
    try:
        saved = ChunkCheckpoint(path).load()
        why = None if saved is None else _unusable(saved, finished, batch_size, world, device)
    except Exception as err:  # noqa: BLE001 - a damaged file is only a lost head start
        saved, why = None, f"is unreadable ({type(err).__name__}: {err})"
    if saved is not None and why is None:
        return saved
    if why is not None:
        log.info("resume=true: the checkpoint %s %s: those images are sampled again", path.name, why)
    path.unlink(missing_ok=True)
    return None


def _unusable(saved: dict[str, Any], finished: set[int], batch_size: int, world: int, device: str) -> str | None:
    images, had = saved["images"], saved["sample"]["noise"]["device"]
    head = f"of images {images[0]}-{images[-1]} is not continued"
    if finished & set(images):
        return f"{head}: some of them are finished"
    if saved["batch_size"] != batch_size:
        return f"{head}: it was written with batch_size={saved['batch_size']}, now {batch_size}"
    if saved["world"] != world:
        return f"{head}: it was written by {saved['world']} rank(s), now {world}"
    if had != device:
        return f"{head}: its random generators are on {had}, now {device}"
    return None


def resume_events(path: Path, finished: set[int], chunk: dict[str, Any] | None) -> int:
    """Drop from an events file the lines of images that are sampled again, keeping those of the checkpointed
    ``chunk`` up to its last saved level (its finished runs, and the levels up to ``sample.step`` of its run in
    flight: the resumed run continues that stream). Returns the lines removed."""
    if chunk is None:
        return drop_unfinished(path, finished)
    images = chunk["images"]
    dropped = drop_unfinished(path, finished | set(range(images[0], images[-1] + 1)))
    stream, run, step = [images[0], images[-1]], chunk["run"], chunk["sample"]["step"]
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (ev := json.loads(line)).get("images") != stream or ev["run"] < run
            or (ev["run"] == run and ev.get("step", 0) <= step)]
    if len(kept) < len(lines):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped + len(lines) - len(kept)
