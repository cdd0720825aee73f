"""The run's observer of the sampler's events: events.jsonl, phase-timer boundaries, trajectory snapshots, the
progress display and the heartbeat. The sampler emits typed dicts through its one callback (``phase``, ``level``);
this is the only place that turns them into files and timers, so a feature that adds an event only emits it.

Also the run's logging: :func:`setup_logging` (stderr) and :class:`RunLog` (run.log, including what was logged
before the results folder existed)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from cores.models import Denoiser
from sampler import ParticleId
from utils.events import EventLog, PhaseTimer, summarise
from utils.images import save_grid

log = logging.getLogger("posterior_sample")
TRAJ_SNAPSHOTS = 10
PROGRESS_LINES = 10  # log lines per sample() call when stderr is not a terminal
LEVEL_KEYS = {"event", "step", "sigma", "next_sigma", "ids", "loss", "acceptance", "finite", "x0hat", "x0y"}


def setup_logging() -> None:
    """INFO and above on stderr; Python warnings are logged too (so that run.log has them)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)


class RunLog(logging.Handler):
    """run.log: every log record of the run. Records logged before the results folder exists (the build's
    warnings: CPU fallback, resized images, LPIPS unavailable) are kept in memory and written first by :meth:`open`."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.early: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.early.append(record)
        else:
            self.file.emit(record)

    def open(self, path: Path) -> None:
        """Write to ``path`` (appending: a resumed run's log goes on), starting with the records kept so far."""
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.early:
            self.file.emit(record)
        self.early.clear()

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        if self.file is not None:
            self.file.close()


class LogProgress:
    """Progress for a log that is not a terminal: an INFO line at every tenth of the levels, instead of a bar's
    carriage returns. Has the part of tqdm's interface that the sampler uses."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.marks = {max(1, round(total * j / PROGRESS_LINES)) for j in range(1, PROGRESS_LINES + 1)}
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n in self.marks:
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            log.info("%s: level %d/%d%s, %.1f s", self.desc, self.n, self.total, extra, time.perf_counter() - self.t0)

    def close(self) -> None:
        """Nothing to clear (tqdm's interface)."""


class RunObserver:
    """Receives every event of one ``sample()`` call of a chunk (``images``: first and last index, ``run``)."""

    def __init__(self, events: EventLog, timer: PhaseTimer, model: Denoiser, planned_levels: int,
                 trajectory_dir: Path | None, show_progress: bool, heartbeat: Callable[[], None] = lambda: None):
        self.events, self.timer, self.model = events, timer, model
        self.trajectory_dir, self.show_progress, self.heartbeat = trajectory_dir, show_progress, heartbeat
        self.marks = {round(j * (planned_levels - 1) / (TRAJ_SNAPSHOTS - 1)) for j in range(TRAJ_SNAPSHOTS)}
        self.context: dict[str, Any] = {}
        self.trajectory: dict[ParticleId, list] = {}

    def begin(self, images: list[int], run: int, num_runs: int) -> None:
        """The events that follow belong to the chunk of ``images`` (dataset indices), run ``run``."""
        self.context = {"images": [images[0], images[-1]], "run": run}
        self.num_runs = num_runs
        self.trajectory = {}

    def progress(self) -> Callable[[int], Any] | None:
        """A tqdm bar on a terminal, log lines (:class:`LogProgress`) otherwise, nothing with show_progress=false."""
        if not self.show_progress:
            return None
        desc = f"images {self.context['images'][0]}-{self.context['images'][1]} run {self.context['run'] + 1}/" \
               f"{self.num_runs}"
        if not sys.stderr.isatty():
            return lambda total: LogProgress(total, desc)
        return lambda total: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "level":
            self.on_level(ev)
            return
        if ev["event"] == "phase":
            self.timer.enter(ev["phase"])
        self.events.write({**self.context, **ev})  # phase, and features' own events (k2, reheat, prune, ...)

    def on_level(self, ev: dict[str, Any]) -> None:
        self.timer.step()
        names = [str(i) for i in ev["ids"]]
        self.events.write({
            "event": "level", "phase": self.timer.current, **self.context,
            "step": ev["step"], "sigma": ev["sigma"], "next_sigma": ev["next_sigma"], "particles": names,
            "loss": summarise(ev["loss"]), "loss_per_particle": ev["loss"],
            "acceptance": summarise(ev["acceptance"]) if ev["acceptance"] is not None else None,
            "acceptance_per_particle": ev["acceptance"],
            "nonfinite": [n for n, ok in zip(names, ev["finite"]) if not ok],
            **{k: v for k, v in ev.items() if k not in LEVEL_KEYS}})  # features' sub-dicts (k2, repulsion, ...)
        if self.trajectory_dir is not None and ev["step"] in self.marks:
            with torch.no_grad():
                pics = [self.model.decode(ev[k]).cpu() for k in ("x0hat", "x0y")]
            for row, pid in enumerate(ev["ids"]):
                self.trajectory.setdefault(pid, []).append((pics[0][row], pics[1][row]))
        self.heartbeat()

    def save_trajectory(self) -> None:
        """trajectory/<image>_particle<k>.png: x0hat (top) and x0y (bottom) at the snapshot levels."""
        if self.trajectory_dir is None:
            return
        self.trajectory_dir.mkdir(exist_ok=True)
        for pid, snaps in self.trajectory.items():
            save_grid([[s[0] for s in snaps], [s[1] for s in snaps]],
                      self.trajectory_dir / f"{pid.image:05d}_particle{pid.sample:02d}.png")
