"""The results of a run: scoring, per-image JSON, samples, metrics.json, eval.md, timing.json, the grid, the
merge of the ranks' timings and of a resumed run's attempts.

Each image's record (per_image/<index>.json) is written when it finishes; metrics.json, eval.md, timing.json and
the grid are rewritten (atomically) from those records after each batch and at the end (also of an interrupted run),
so an interrupted run leaves the metrics of every finished image. Metrics of a stopped (NaN/Inf) particle are null and excluded from
the statistics; the statistics say how many particles they cover. While the run goes on, metrics.json
and timing.json say ``running`` with the process (``pid``, ``host``) and ``heartbeat_unix``, which
timing.json refreshes at most every :data:`HEARTBEAT_SEC` seconds at the end of a level: a run killed
without warning stays ``running`` with an old heartbeat or a dead process (scripts/parse_metrics.py: stale).

For an operator with a twin (phase retrieval) each particle is also scored twin-aware (utils/twins.py: psnr_0,
psnr_180, psnr_twin_aware, mode), each image gets ``gt_twin_psnr`` and ``modes`` (found, success, coverage, the
lowest-loss pick), and metrics.json a run-level ``modes`` (docs/twins.md lists the fields).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from utils.data import load_image
from utils.events import PhaseTimer, dump_json
from utils.images import save_grid, save_png, to_uint8
from utils.metrics import HIGHER_IS_BETTER
from utils.twins import PARTICLE_FIELDS, TWIN_METRIC, gt_twin_psnr, image_modes, particle_scores, run_modes

GRID_MAX_IMAGES = 16
HEARTBEAT_SEC = 10.0
# An attempt's clocks outside sampling (timing.json's ``attempts[i].stages_sec``, rank 0's): the warm-up's compiles,
# scoring the particles, saving each image's files (samples, per_image/<index>.json, the grid's copies) and rewriting
# the run's files (metrics.json, eval.md, timing.json, the grid). Each holds its blocks' wall time up to the start of
# the write that records it; run.log's ``outside sampling:`` line adds the final write.
STAGES = ("warm_up", "scoring", "saving", "writing")


def particle_stats(values: list[float | None], higher_is_better: bool) -> dict[str, Any]:
    """max / min / mean / std (population) / best over the scored particles of one image."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    return {"n": len(v), "max": max(v), "min": min(v), "mean": mean, "std": std,
            "best": max(v) if higher_is_better else min(v)}


class Recorder:
    """Collects finished images and keeps the result files up to date. ``mode_threshold_db`` (operators with a twin
    only; None otherwise): the particles carry twin-aware scores and the images and the run get mode summaries."""

    def __init__(self, root: Path, header: dict[str, Any], metric_names: list[str],
                 mode_threshold_db: float | None = None):
        self.root, self.header, self.metric_names = root, header, metric_names
        self.mode_threshold_db = mode_threshold_db
        self.images: list[dict[str, Any]] = []
        (root / "per_image").mkdir(parents=True, exist_ok=True)

    def finished(self) -> set[int]:
        """Indices of the images finished by any process or earlier attempt (their per_image/<index>.json)."""
        return {int(p.stem) for p in (self.root / "per_image").glob("*.json")}

    def record(self, index: int) -> dict[str, Any]:
        return json.loads((self.root / "per_image" / f"{index:05d}.json").read_text())

    def add_image(self, record: dict[str, Any]) -> None:
        """Record one finished image: {'index', 'name', 'particles': [{'sample', 'status', <metric>: value}]}."""
        record["summary"] = {m: particle_stats([p.get(m) for p in record["particles"]], HIGHER_IS_BETTER[m])
                             for m in self.metric_names}
        record["nonfinite_particles"] = sum(p["status"] == "nonfinite" for p in record["particles"])
        record["pruned_particles"] = sum(p["status"] == "pruned" for p in record["particles"])
        if self.mode_threshold_db is not None:
            record["modes"] = image_modes(record["particles"])
        dump_json(record, self.root / "per_image" / f"{record['index']:05d}.json")

    def load(self) -> None:
        """The finished images of every process, from the per-image files."""
        self.images = [json.loads(p.read_text()) for p in sorted((self.root / "per_image").glob("*.json"))]

    def aggregate(self) -> dict[str, Any]:
        """Means over images of the per-image best (an oracle: picked with the ground truth) and mean."""
        out = {}
        for m in self.metric_names:
            per = [img["summary"][m] for img in self.images if img["summary"][m]["n"] > 0]
            if per:
                out[m] = {"images": len(per),
                          "best_of_n": sum(p["best"] for p in per) / len(per),
                          "mean_of_n": sum(p["mean"] for p in per) / len(per),
                          "mean_std_over_particles": sum(p["std"] for p in per) / len(per)}
        return out

    def modes(self) -> dict[str, Any] | None:
        """The run's mode rates and non-oracle pick (utils/twins.run_modes); None without a twin."""
        if self.mode_threshold_db is None:
            return None
        return run_modes(self.images, self.mode_threshold_db)

    def write(self, status: str, extra: dict[str, Any] | None = None) -> None:
        """metrics.json and eval.md for the images finished so far (by any process)."""
        self.load()
        metrics = {"status": status, **self.header, **(extra or {}), "num_images_done": len(self.images),
                   "nonfinite_particles": sum(img["nonfinite_particles"] for img in self.images),
                   "aggregate": self.aggregate(), "images": self.images}
        if self.mode_threshold_db is not None:
            metrics["modes"] = self.modes()
        dc = hard_dc_summary(self.images, (extra or {}).get("timing"))
        if dc is not None:
            metrics["hard_dc"] = dc
        dump_json(metrics, self.root / "metrics.json")
        (self.root / "eval.md").write_text(self.markdown(metrics))

    def markdown(self, metrics: dict[str, Any]) -> str:
        """eval.md from the metrics.json content of :meth:`write` (nothing is computed twice)."""
        status, agg = metrics["status"], metrics["aggregate"]
        lines = [f"# {self.header.get('name', 'run')} ({status})", "",
                 f"{len(self.images)} image(s), {self.header.get('particles_per_image')} particle(s) each; "
                 f"best-of-n is an oracle (chosen per image and metric with the ground truth).", ""]
        couples = (self.header.get("sampler") or {}).get("couples", "")
        if couples and not couples.startswith("none"):
            lines += [f"Not batch-invariant: the sampler couples {couples} (batch_size "
                      f"{self.header.get('batch_size')}).", ""]
        lines += ["| metric | best-of-n | mean-of-n | mean std over particles | images |",
                  "|---|---|---|---|---|"]
        for m in self.metric_names:
            if m in agg:
                a = agg[m]
                lines.append(f"| {m} | {a['best_of_n']:.4f} | {a['mean_of_n']:.4f} | "
                             f"{a['mean_std_over_particles']:.4f} | {a['images']} |")
            else:
                lines.append(f"| {m} | n/a | n/a | n/a | 0 |")
        for m, st in self.header.get("eval", {}).items():
            if not st.get("available", True):
                lines.append(f"\n{m} unavailable: {st['reason']}")
        modes = metrics.get("modes")
        if modes is not None and modes["images"]:
            lines += self.modes_markdown(modes, agg.get(TWIN_METRIC))
        dc = metrics.get("hard_dc")
        if dc is not None:
            lines += ["", f"Hard data consistency: {dc['particles']} particle(s) optimised on {dc['levels']} particle-"
                          f"level(s), {dc['accepted_levels']} accepted; AdamW updates per particle mean "
                          f"{dc['steps_per_particle_mean']:.1f}, max {dc['steps_per_particle_max']} (stops: "
                          + ", ".join(f"{k[5:]} {v}" for k, v in dc.items() if k.startswith("stop_")) + ")."]
        if metrics["nonfinite_particles"]:
            lines.append(f"\n{metrics['nonfinite_particles']} particle(s) stopped for NaN/Inf and excluded from the "
                         "scores.")
        return "\n".join(lines) + "\n"

    @staticmethod
    def modes_markdown(modes: dict[str, Any], oracle: dict[str, Any] | None) -> list[str]:
        """The Exp 1-3 table: mode rates, the twin-aware oracle best-of-n next to the lowest-loss pick."""
        def num(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        found = modes["particles"]
        lines = ["", f"## Modes (0 / 180 degree twins: a particle found one when its PSNR against it, best over the "
                     f"shifts that keep the measurement, is >= mode_threshold_db = {modes['threshold_db']} dB)", "",
                 "| score | value | images |", "|---|---|---|",
                 f"| success rate (0 or 180 found by a particle) | {num(modes['success_rate'])} | {modes['images']} |",
                 f"| coverage rate (both found) | {num(modes['coverage_rate'])} | {modes['images']} |",
                 f"| psnr_twin_aware best-of-n (oracle) | {num(oracle and oracle['best_of_n'])} | "
                 f"{oracle['images'] if oracle else 0} |",
                 f"| psnr_twin_aware of the lowest-meas_err pick (no oracle) | {num(modes['pick_psnr_twin_aware'])} | "
                 f"{modes['scored_images']} |",
                 f"| pick found 0 or 180 (no oracle) | {num(modes['pick_success_rate'])} | {modes['images']} |",
                 f"| particles in mode 0 / 180 / none | {found['0']} / {found['180']} / {found['none']} | "
                 f"{modes['images']} |"]
        if modes["twin_ambiguous_images"]:
            lines.append(f"\n{modes['twin_ambiguous_images']} image(s) are within the threshold of their own twin "
                         f"(gt_twin_psnr): there 0 and 180 are not told apart.")
        return lines


def hard_dc_summary(images: list[dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's hard data consistency from its particles' records (sampler.Found.add_dc; pruned particles keep theirs):
    particles, levels optimised and accepted, AdamW updates (total, per particle mean and max, most in one level), the
    stopping rules' counts; with ``timing``, the optimisation's wall time and its share of the sampling time."""
    recs = [p["hard_dc"] for img in images for p in img["particles"] if p.get("hard_dc")]
    if not recs:
        return None
    steps = [r["steps"] for r in recs]
    out: dict[str, Any] = {"particles": len(recs), "levels": sum(r["levels"] for r in recs),
                           "accepted_levels": sum(r["accepted"] for r in recs), "steps_total": sum(steps),
                           "steps_per_particle_mean": sum(steps) / len(steps), "steps_per_particle_max": max(steps),
                           "steps_per_level_max": max(r["steps_max"] for r in recs),
                           **{k: sum(r[k] for r in recs) for k in recs[0] if k.startswith("stop_")}}
    if timing is not None:
        sampling = timing.get("sampling_wall_sec") or 0.0
        out["wall_sec"] = timing.get("hard_dc_sec", 0.0)
        out["share_of_sampling"] = out["wall_sec"] / sampling if sampling else None
    return out


def mode_threshold(cfg: Any) -> float:
    """The run's ``mode_threshold_db`` (configs/default.yaml), checked: a finite number of dB."""
    value = cfg.mode_threshold_db
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"mode_threshold_db must be a finite number (a PSNR in dB), got {value!r}")
    return float(value)


def process() -> dict[str, Any]:
    """Who writes the results, and when (for telling a live run from a killed one)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat_unix": time.time()}


def merge_phases(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-phase totals of two attempts: wall time and levels add up, peak memory is the larger."""
    out = {k: dict(v) for k, v in a.items()}
    for name, rec in b.items():
        if name not in out:
            out[name] = dict(rec)
            continue
        merged = out[name]
        merged["wall_sec"] += rec["wall_sec"]
        merged["steps"] += rec["steps"]
        if "peak_memory_bytes" in rec:
            merged["peak_memory_bytes"] = max(merged.get("peak_memory_bytes", 0), rec["peak_memory_bytes"])
    return out


def earlier_attempts(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts recorded in a resumed run's timing.json; one still marked running was killed (stale)."""
    attempts = [dict(a) for a in previous.get("attempts", [])]
    if attempts and attempts[-1]["status"] == "running":
        attempts[-1]["status"] = "stale"
    return attempts


class RunResults:
    """Scores finished images and writes every result file of the run (metrics on rank 0 only).

    With ``resumed``, the timing.json of the attempts before this one is read (``previous``) and the images they
    finished are counted (``done_before``): this attempt's times, levels and network evaluations add to theirs."""

    def __init__(self, parts: Any, timer: PhaseTimer, resumed: bool = False):
        self.parts, self.timer = parts, timer
        self.root = parts.root
        twin = parts.operator.has_twin
        self.fields = parts.metric_names() + (list(PARTICLE_FIELDS) if twin else [])
        self.recorder = Recorder(self.root, parts.header(), parts.metric_names() + ([TWIN_METRIC] if twin else []),
                                 mode_threshold(parts.cfg) if twin else None)
        timing = self.root / "timing.json"
        self.previous = json.loads(timing.read_text()) if resumed and timing.is_file() else {}
        self.done_before = len(self.recorder.finished()) if resumed else 0
        self.grid: dict[int, dict[str, Any]] = {}
        self.grid_saved = False  # grid_results.png shows every column of self.grid
        self.images_done = self.network_evals = self.particle_network_evals = 0
        self.finished_wall = self.finished_sampling = self.hard_dc_sec = 0.0
        self.used_levels: list[int] = []
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.started_unix, self.t0, self.last_beat = time.time(), time.perf_counter(), time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the block's wall time to the stage ``name`` of :data:`STAGES` (a block that waits for the device's
        results, as scoring and saving do, holds the device's time too)."""
        if name not in self.stages:
            raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] += time.perf_counter() - start

    def add_sampling(self, used_levels: int, network_evals: int, particle_network_evals: int,
                     hard_dc_sec: float = 0.0) -> None:
        """What one ``sample()`` call really did (levels visited, denoiser calls, hard data consistency's time)."""
        self.hard_dc_sec += hard_dc_sec
        self.used_levels.append(used_levels)
        self.network_evals = max(self.network_evals, network_evals)
        self.particle_network_evals += particle_network_evals

    def finish_image(self, item: Any, gt: torch.Tensor, y: torch.Tensor, xs: torch.Tensor,
                     status: list[tuple[str, int | None]], ids: list[Any], found: list[dict] | None = None) -> None:
        """Score the particles of one image (finite ones only) and save its files (per_image/<index>.json, samples);
        ``ids`` are the particles' ParticleIds, in the rows of ``xs``; ``found`` (per particle): ``pruned_x0hat``,
        the x0hat of a pruned particle at its prune level (saved as samples/<image>_particle<k>_pruned.png), and
        ``parent``, the id of the survivor a branched clone copied, ``hard_dc``, its hard data consistency record."""
        parts, twin = self.parts, self.recorder.mode_threshold_db is not None
        rows = [k for k, (st, _) in enumerate(status) if st == "ok"]
        scores: dict[str, list[float]] = {}
        with self.stage("scoring"):
            if rows:
                y_norm = y.flatten().norm()
                with torch.no_grad():
                    scores = parts.evaluator(gt.expand(len(rows), *gt.shape), xs[rows], lambda x: parts.operator.loss(
                        x, y.expand(len(x), *y.shape)).sqrt() / y_norm)
                if twin:
                    scores.update(particle_scores(gt, xs[rows], parts.operator.pad(gt.shape[-1]),
                                                  self.recorder.mode_threshold_db))
            twin_psnr = gt_twin_psnr(gt, parts.operator.pad(gt.shape[-1])) if twin else None
        with self.stage("saving"):
            particles = []
            for k, (st, at) in enumerate(status):
                rec: dict[str, Any] = {"sample": ids[k].sample, "run": ids[k].run, "status": st,
                                       "stopped_at_level": at}
                for m in self.fields:
                    rec[m] = scores[m][rows.index(k)] if st == "ok" else None
                extra = (found or [{}] * len(status))[k]
                for key in ("parent", "hard_dc"):
                    if extra.get(key) is not None:
                        rec[key] = extra[key]
                particles.append(rec)
                if st == "ok" and parts.cfg.save_samples:
                    save_png(xs[k], self.root / "samples" / f"{item.index:05d}_particle{k:02d}.png")
                if extra.get("pruned_x0hat") is not None and parts.cfg.save_samples:
                    save_png(extra["pruned_x0hat"],
                             self.root / "samples" / f"{item.index:05d}_particle{k:02d}_pruned.png")
            record: dict[str, Any] = {"index": item.index, "name": item.name, "particles": particles}
            if twin:
                record["gt_twin_psnr"] = twin_psnr
            self.recorder.add_image(record)
            self.add_grid(item.index, gt, y, [xs[k] if s == "ok" else None for k, (s, _) in enumerate(status)])
        self.images_done += 1
        self.finished_wall = time.perf_counter() - self.t0
        self.finished_sampling = sum(p["wall_sec"] for p in self.timer.summary().values())

    def batch_done(self) -> None:
        """After a batch's images are finished: metrics.json, eval.md, timing.json and the grid once (rank 0), not
        once per image (each rewrite reads every per-image file and writes the whole metrics.json)."""
        if self.parts.dist.main:
            self.write("running")
            self.write_grid()

    def restore_image(self, item: Any, gt: torch.Tensor, y: torch.Tensor) -> None:
        """An image finished by an earlier attempt, for the grid: its particles are read back from samples/."""
        record = self.recorder.record(item.index)
        paths = [self.root / "samples" / f"{item.index:05d}_particle{p['sample']:02d}.png" for p in record["particles"]]
        self.add_grid(item.index, gt, y, [load_image(p, gt.shape[0]) if p.is_file() else None for p in paths])

    def add_grid(self, index: int, gt: torch.Tensor, y: torch.Tensor, xs: list[torch.Tensor | None]) -> None:
        """Keep the grid column of ``index`` if it is among the :data:`GRID_MAX_IMAGES` lowest indices so far (rank 0,
        which writes the grid), as bytes."""
        if not self.parts.dist.main or (len(self.grid) >= GRID_MAX_IMAGES and index > max(self.grid)):
            return
        self.grid[index] = {"gt": to_uint8(gt), "y": to_uint8(self.parts.operator.view(y[None], gt.shape)[0]),
                            "x": [to_uint8(x) if x is not None else None for x in xs]}
        if len(self.grid) > GRID_MAX_IMAGES:
            del self.grid[max(self.grid)]
        self.grid_saved = False

    def heartbeat(self) -> None:
        """Refresh timing.json's heartbeat (rank 0, at most every HEARTBEAT_SEC seconds): called after each level."""
        if self.parts.dist.main and time.perf_counter() - self.last_beat >= HEARTBEAT_SEC:
            dump_json(self.timing("running"), self.root / "timing.json")
            self.last_beat = time.perf_counter()

    def write(self, status: str, ranks: list[dict[str, Any]] | None = None, error: str | None = None
              ) -> dict[str, Any]:
        """metrics.json, eval.md and timing.json for the images finished so far (rank 0); returns the timing."""
        with self.stage("writing"):
            timing = self.timing(status, ranks, error)
            head = {k: timing[k] for k in ("pid", "host", "heartbeat_unix", "error") if k in timing}
            self.recorder.write(status, {**head, "timing": timing,
                                         "peak_memory": {k: v.get("peak_memory_bytes", v.get("peak_memory"))
                                                         for k, v in timing["phases"].items()}})
            dump_json(timing, self.root / "timing.json")
        self.last_beat = time.perf_counter()
        return timing

    def local_timing(self) -> dict[str, Any]:
        """This rank's measurements of this attempt."""
        return {"rank": self.parts.dist.rank, "device": str(self.parts.device), "images_done": self.images_done,
                "wall_sec": time.perf_counter() - self.t0, "finished_wall_sec": self.finished_wall,
                "finished_sampling_sec": self.finished_sampling, "stages_sec": dict(self.stages),
                "used_anneal_steps": max(self.used_levels, default=0),
                "network_evals_per_particle": self.network_evals,
                "particle_network_evals": self.particle_network_evals, "hard_dc_sec": self.hard_dc_sec,
                "phases": self.timer.summary()}

    def timing(self, status: str, ranks: list[dict[str, Any]] | None = None, error: str | None = None
               ) -> dict[str, Any]:
        """Wall-clock totals (slowest rank) and throughput over all ranks and attempts; per-phase times of rank 0.

        ``per_image_sec`` and ``sampling_per_image_sec`` count the time up to each rank's last finished image only
        (an interrupted image's time is in ``total_wall_sec`` and ``sampling_wall_sec``, not in them). Levels and
        network evaluations are counted as they happened, not predicted from the config."""
        ranks = ranks or [self.local_timing()]
        prev, s = self.previous, self.parts.sampler.describe()
        done = self.done_before + sum(r["images_done"] for r in ranks)
        finished = prev.get("finished_wall_sec", 0.0) + max(r["finished_wall_sec"] for r in ranks)
        finished_sampling = prev.get("finished_sampling_sec", 0.0) + max(r["finished_sampling_sec"] for r in ranks)
        who = process()
        attempt = {"job_started_unix": self.parts.started_unix, "started_unix": self.started_unix, "status": status,
                   "wall_sec": max(r["wall_sec"] for r in ranks),
                   "images_done": sum(r["images_done"] for r in ranks), "pid": who["pid"], "host": who["host"],
                   "stages_sec": ranks[0]["stages_sec"]}
        out: dict[str, Any] = {"status": status, **who}
        if error is not None:
            out["error"] = attempt["error"] = error
        attempts = [*earlier_attempts(prev), attempt]
        out.update({
            "total_wall_sec": sum(a["wall_sec"] for a in attempts), "images_done": done,
            "per_image_sec": finished / done if done else None, "finished_wall_sec": finished,
            "sampling_wall_sec": prev.get("sampling_wall_sec", 0.0)
            + max(sum(p["wall_sec"] for p in r["phases"].values()) for r in ranks),
            "sampling_per_image_sec": finished_sampling / done if done else None,
            "finished_sampling_sec": finished_sampling,
            "particles_per_image": self.parts.particles_per_image, "batch_size_images": self.parts.cfg.batch_size,
            "ode_steps": s["ode_steps"], "ode_solver": s["ode_solver"],
            "anneal_steps_cfg": s["schedule"]["anneal_steps"],
            "used_anneal_steps": max([prev.get("used_anneal_steps", 0)] + [r["used_anneal_steps"] for r in ranks]),
            "mcmc_steps": s["mcmc_steps"],
            "network_evals_per_particle": max([prev.get("network_evals_per_particle", 0)]
                                              + [r["network_evals_per_particle"] for r in ranks]),
            "particle_network_evals": prev.get("particle_network_evals", 0)
            + sum(r["particle_network_evals"] for r in ranks),
            "phases": merge_phases(prev.get("phases", {}), ranks[0]["phases"]),
            "hard_dc_sec": prev.get("hard_dc_sec", 0.0) + max(r.get("hard_dc_sec", 0.0) for r in ranks),
            "world_size": self.parts.dist.world, "attempts": attempts})
        if self.parts.dist.world > 1:
            out["ranks"] = ranks
        return out

    def write_grid(self) -> None:
        """grid_results.png, unless it already shows the current columns (the last batch's write, at the finish)."""
        if not self.grid or self.grid_saved:
            return
        with self.stage("writing"):
            columns = [[g["gt"], g["y"], *g["x"]] for _, g in sorted(self.grid.items())]
            rows = [[col[r] for col in columns] for r in range(2 + self.parts.particles_per_image)]
            save_grid(rows, self.root / "grid_results.png")
        self.grid_saved = True

    def finish(self, status: str, ranks: list[dict[str, Any]] | None, error: str | None = None) -> dict[str, Any]:
        """The final metrics.json, timing.json, eval.md and grid (rank 0); returns the timing."""
        timing = self.write(status, ranks, error)
        self.write_grid()
        return timing
