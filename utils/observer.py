"""The run's observer of the sampler's events: events.jsonl, phase-timer boundaries, trajectory snapshots and
the progress bar. The sampler emits typed dicts through its one callback (``phase``, ``level``); this is the
only place that turns them into files and timers, so a feature that adds an event only emits it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from cores.models import Denoiser
from sampler import ParticleId
from utils.events import EventLog, PhaseTimer, summarise
from utils.images import save_grid

TRAJ_SNAPSHOTS = 10
LEVEL_KEYS = {"event", "step", "sigma", "next_sigma", "ids", "loss", "acceptance", "finite", "x0hat", "x0y"}


class RunObserver:
    """Receives every event of one ``sample()`` call of a chunk (``images``: first and last index, ``run``)."""

    def __init__(self, events: EventLog, timer: PhaseTimer, model: Denoiser, planned_levels: int,
                 trajectory_dir: Path | None, show_progress: bool):
        self.events, self.timer, self.model = events, timer, model
        self.trajectory_dir, self.show_progress = trajectory_dir, show_progress
        self.marks = {round(j * (planned_levels - 1) / (TRAJ_SNAPSHOTS - 1)) for j in range(TRAJ_SNAPSHOTS)}
        self.context: dict[str, Any] = {}
        self.trajectory: dict[ParticleId, list] = {}

    def begin(self, images: list[int], run: int, num_runs: int) -> None:
        """The events that follow belong to the chunk of ``images`` (dataset indices), run ``run``."""
        self.context = {"images": [images[0], images[-1]], "run": run}
        self.num_runs = num_runs
        self.trajectory = {}

    def progress(self) -> Callable[[int], Any] | None:
        if not self.show_progress:
            return None
        desc = f"images {self.context['images'][0]}-{self.context['images'][1]} run {self.context['run'] + 1}/" \
               f"{self.num_runs}"
        return lambda total: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "level":
            self.on_level(ev)
            return
        if ev["event"] == "phase":
            self.timer.enter(ev["phase"])
        self.events.write({**ev, **self.context})  # phase, and features' own events (prune, reheat, ...)

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

    def save_trajectory(self) -> None:
        """trajectory/<image>_particle<k>.png: x0hat (top) and x0y (bottom) at the snapshot levels."""
        if self.trajectory_dir is None:
            return
        self.trajectory_dir.mkdir(exist_ok=True)
        for pid, snaps in self.trajectory.items():
            save_grid([[s[0] for s in snaps], [s[1] for s in snaps]],
                      self.trajectory_dir / f"{pid.image:05d}_particle{pid.sample:02d}.png")
