"""Turn results/<name>/metrics.json (+ timing.json) of one or more runs into a table, or compare two runs fairly.

    python scripts/parse_metrics.py results/exp0_* [--csv out.csv] [--plot out.png] [--stale-after 10]
    python scripts/parse_metrics.py --compare BASE NEW [--metrics psnr,ssim] [--force] [--format md] [--json out.json]
    python scripts/parse_metrics.py --modes results/exp1_* results/exp2_* [--csv out.csv] [--split-step S] [--base RUN]

--modes: the plan's Exp 1-3 table instead (phase retrieval's twin-aware fields, utils/twins.py), one row per run:
psnr_twin_aware best-of-n ("oracle": picked with the ground truth), mean (over images of the per-image mean of the
particles) with its 95% percentile bootstrap interval over images (10,000 resamples, numpy seed 0) and std over
images of those per-image means, success and coverage rates (success with a 95% Wilson score interval over
images), the non-oracle pick (lowest meas_err particle: modes.pick_psnr_twin_aware and pick_success_rate), the
mean pairwise distance of the final level (events.jsonl: per run and measurement the last level event's
repulsion.pair_dist mean, then the mean over those), and wall seconds and peak memory (GB) per phase
(metrics.json timing.phases, peak_memory). A run without twin fields (not phase retrieval) shows "n/a" there.
Every per-image quantity has its 95% interval over images: the oracle best-of-n, the mean and the pick's PSNR
(percentile bootstrap of the mean of the per-image values, as for the mean), the pairwise distance (bootstrap over
measurements), success and coverage (Wilson); "std over particles" is the mean over images of the std of an
image's particles (aggregate mean_std_over_particles). Times and peak memory are one measurement per run (no
interval).

    --split-step S   add the wall seconds of the levels before step S and of the levels from step S on, from the
                     level events' elapsed_sec (events.jsonl; the end is the closing phase event): a run without a
                     prune (Exp 1) then has a part comparable with the refine phase of a run that prunes before
                     level S (Exp 2; its part from S includes the prune itself). Summed over (images, run) streams.
    --base RUN       a second table: each run minus RUN, paired by image index over the images both finished, with
                     95% percentile bootstrap intervals over those images (10,000 resamples, seed 0): success,
                     coverage and the pick's success (differences of per-image 0/1), oracle best-of-n, mean and the
                     pick's psnr_twin_aware; and the discordant images (success in one run only, per side).

A sweep folder (python posterior_sample.py -m ...: run<NNN>/ jobs, multirun.yaml) contributes one row per job,
with the swept keys as columns (the keys of multirun.yaml's sweep overrides; without it, the config.yaml keys
that differ between the jobs).

Columns: swept keys, status, images, particles per image, best-of-n (an oracle: chosen with the ground truth)
and mean-of-n of each metric, NaN particles, seconds per image, used annealing levels, peak memory per phase.

Status is the run's own (complete, running, interrupted, failed), except that a run recorded as running whose
process has ended on this host (pid, host) or whose heartbeat (heartbeat_unix) is older than --stale-after
minutes is shown as stale: it was killed without a chance to say so. A line under the table explains every
run that is not complete. A folder that does not exist or is not a results folder is an error (exit 1).

--compare BASE NEW: the fair A/B of the K2 experiment log (sections 0, 4, 12). NEW is a run or a sweep folder
(each job against BASE, then a summary sorted by the log's selection rule: dPSNR high first, then used steps,
then time, low first). Per image and metric the value of the tables: the mean over the image's particles
(num_runs x num_samples), and best-of-n, shown as an oracle (picked with the ground truth) and never judged.
Differences are NEW - BASE paired by image index over the images both runs finished, with a 95% percentile
bootstrap interval over images (10,000 resamples of the images, numpy seed 0). An
image whose metric is NaN in either run (all its particles stopped) is named and left out of that metric, never
replaced. Cost: sampling seconds per image (timing.json's sampling_per_image_sec) and used annealing levels
(used_anneal_steps), NEW / BASE; both are over each run's own images.

The log's non-inferiority rule (section 0), judged on the point estimate (the mean paired difference of the
mean-of-particles values), as the log does; the interval's bound is printed next to it: dPSNR >= -0.10 dB,
dLPIPS <= +0.005, dSSIM >= -0.002, and (time x0.80 or less, or used steps x0.75 or less). A rule metric that
a run did not measure is "not measured" and the verdict cannot pass; --metrics psnr restricts the table and the
rule to PSNR (the log's eval_fn_list=[psnr] runs).

The runs' config.yaml must agree outside the K2 settings (sampler.k2_scheduler_config.*): any other difference,
the seed included (other seeds: other measurements and particles, nothing is paired), batch_size (K2's batch
median couples a batch; the time per image depends on it) and num_runs / num_samples, is refused with the keys
named, unless --force. Not compared (IGNORED_KEYS): name, save_dir (where the results go), overwrite, resume
(how the folder is used), gpu, use_tpu (which device: the devices recorded in metrics.json are compared and a
difference is noted, as it changes the time), show_progress, save_samples, save_traj (outputs only),
eval_fn_list (what is scored after sampling: a metric one run lacks is "not measured"), data.start_id and
data.end_id (the slice: seeds depend on the image index only, and images are compared on the intersection).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

STALE_AFTER_MIN = 10.0
JOB = re.compile(r"run\d+")


def is_run(folder: Path) -> bool:
    """A run's results folder: posterior_sample.py writes config.yaml first, then events, then metrics.json."""
    return any((folder / f).is_file() for f in ("metrics.json", "config.yaml")) or any(folder.glob("events*.jsonl"))


def sweep_jobs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and JOB.fullmatch(p.name))


def not_results(folder: Path) -> str:
    """The one-line reason a path given on the command line holds no runs."""
    if not folder.exists():
        near = difflib.get_close_matches(folder.name, [p.name for p in folder.parent.glob("*")], n=1) \
            if folder.parent.is_dir() else []
        hint = f" (did you mean {folder.parent / near[0]}?)" if near else ""
        return f"{folder}: no such folder{hint}"
    if not folder.is_dir():
        return f"{folder}: a file, not a results folder (give the folder that holds metrics.json)"
    if (folder / "multirun.yaml").is_file():
        return f"{folder}: a sweep folder (multirun.yaml) without run<NNN>/ jobs yet"
    inner = [p for p in folder.iterdir() if p.is_dir() and (is_run(p) or sweep_jobs(p))]
    hint = f"; it holds {len(inner)} results folder(s): give those, e.g. {folder}/*" if inner else ""
    return f"{folder}: not a results folder (no metrics.json, config.yaml or events*.jsonl, no run<NNN>/ jobs){hint}"


def find_runs(paths: list[Path]) -> list[tuple[Path, list[Path]]]:
    """(path, its run folders) for each path: [path] for a run, its run<NNN>/ jobs for a sweep.

    Any path that is neither is a SystemExit naming it (one line each), before anything is read.
    """
    found, errors = [], []
    for p in paths:
        if p.is_dir() and is_run(p):
            found.append((p, [p]))
        elif p.is_dir() and sweep_jobs(p):
            found.append((p, sweep_jobs(p)))
        else:
            errors.append(not_results(p))
    if errors:
        raise SystemExit("\n".join(errors))
    return found


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_status(run: Path, stale_after_sec: float = STALE_AFTER_MIN * 60) -> tuple[str, str | None]:
    """(status, note): the status recorded in metrics.json, 'stale' for a running run that is gone,
    'unknown' without metrics.json; the note says why, for any run that is not complete."""
    metrics = read_json(run / "metrics.json")
    if not metrics:
        return "unknown", "no metrics.json (the run was stopped before writing it, or is starting)"
    status = metrics.get("status", "unknown")
    done = f"{metrics.get('num_images_done', 0)} image(s) finished"
    if status == "complete":
        return status, None
    if status != "running":
        error = metrics.get("error")
        return status, f"{done}" + (f"; error: {error}" if error else "")
    timing = read_json(run / "timing.json")
    pid, host = metrics.get("pid"), metrics.get("host")
    beats = [r["heartbeat_unix"] for r in (metrics, timing) if isinstance(r.get("heartbeat_unix"), (int, float))]
    age = time.time() - max(beats) if beats else None
    where = f"process {pid} on {host}" if pid is not None else "process unknown"
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        return "stale", f"recorded as running, but {where} has ended (killed?); {done}"
    if age is not None and age > stale_after_sec:
        return "stale", (f"recorded as running, but its last heartbeat was {ago(age)} ago "
                         f"(stale after {stale_after_sec / 60:g} min; {where}); {done}")
    beat = f", heartbeat {ago(age)} ago" if age is not None else ", no heartbeat recorded"
    return "running", f"{where}{beat}; {done}"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def swept_keys(sweep: Path, configs: list[dict[str, Any]]) -> list[str]:
    """Config keys (dotted) that the sweep varies, in the order of its command line.

    The sweep overrides of multirun.yaml name them (the command line's, then those of the sweeper's ``params``, which
    an experiment config can set: configs/experiment/k2_sweep.yaml); a swept config group (+sampler=a,b) stands for
    the keys under it that differ between the jobs. Without multirun.yaml: every key whose value differs between the
    jobs.
    """
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    multirun = sweep / "multirun.yaml"
    if not multirun.is_file():
        return differ
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = yaml.safe_load(multirun.read_text())["hydra"]
    params = (hydra.get("sweeper") or {}).get("params") or {}
    overrides = [*hydra["overrides"]["task"], *(f"{k}={v}" for k, v in params.items())]
    cols = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.key_or_group.replace("/", ".")
            cols += [key] if key in keys else [k for k in differ if k.startswith(key + ".")]
    return list(dict.fromkeys(cols))


def job_name(run: Path) -> str:
    return f"{run.parent.name}/{run.name}" if JOB.fullmatch(run.name) else run.name


def row(run: Path, name: str, stale_after_sec: float) -> tuple[dict[str, Any], str | None]:
    """The table row of a run, and its note (None for a complete run)."""
    status, note = run_status(run, stale_after_sec)
    out: dict[str, Any] = {"run": name, "status": status}
    metrics = read_json(run / "metrics.json")
    if not metrics:
        return out, note
    timing = read_json(run / "timing.json")
    out.update(images=metrics.get("num_images_done"), particles=metrics.get("particles_per_image"),
               nan_particles=metrics.get("nonfinite_particles"))
    for m, agg in (metrics.get("aggregate") or {}).items():
        out[f"{m}_best"], out[f"{m}_mean"] = agg["best_of_n"], agg["mean_of_n"]
    out["sec_per_image"] = timing.get("per_image_sec")
    out["used_levels"] = timing.get("used_anneal_steps")
    for phase, peak in (metrics.get("peak_memory") or {}).items():
        out[f"peak_{phase}_GB"] = peak / 1e9 if isinstance(peak, (int, float)) else None
    return out, note


def table(paths: list[Path], stale_after_sec: float) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows, columns, notes) for the runs under the given folders."""
    rows, swept, notes = [], [], []
    for path, runs in find_runs(paths):
        sweep = runs != [path]
        if sweep:
            configs = [run_config(r) for r in runs]
            keys = swept_keys(path, configs)
            swept += keys
        for i, r in enumerate(runs):
            name = job_name(r)
            out, note = row(r, name, stale_after_sec)
            if sweep:
                out = {"run": name, **{k: configs[i].get(k) for k in keys}, **out}
            rows.append(out)
            if note:
                notes.append(f"{name}: {out['status']}: {note}")
    cols = list(dict.fromkeys(["run", *swept, *(k for r in rows for k in r)]))
    return rows, cols, notes


# --modes: the Exp 1-3 table --------------------------------------------------------------------------------------

NA = "n/a"


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a rate (None without images)."""
    if not n:
        return None
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def bootstrap_mean(values: list[float]) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean over images (:func:`bootstrap`), None without values."""
    return tuple(bootstrap(np.asarray(values, dtype=float))) if values else None


def events(run: Path) -> list[dict[str, Any]]:
    """The run's events (events*.jsonl), skipping a line cut by a kill."""
    out = []
    for path in sorted(run.glob("events*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def final_pair_dists(run: Path) -> list[float]:
    """Per measurement (run, image): the last level event's repulsion.pair_dist mean (events*.jsonl)."""
    last: dict[tuple[Any, Any], float] = {}
    for e in events(run):
        dist = (e.get("repulsion") or {}).get("pair_dist") if e.get("event") == "level" else None
        for g, d in (dist or {}).items():
            images = e.get("images") or []
            image = images[int(g)] if int(g) < len(images) else g
            if isinstance(d, dict) and isinstance(d.get("mean"), (int, float)):
                last[(e.get("run"), image)] = d["mean"]
    return list(last.values())


def final_pair_dist(run: Path) -> float | None:
    """Mean over measurements (run, image) of the last level event's repulsion.pair_dist mean (events*.jsonl)."""
    last = final_pair_dists(run)
    return sum(last) / len(last) if last else None


def split_times(run: Path, step: int) -> tuple[float, float] | None:
    """(seconds of the levels before ``step``, seconds of the levels from ``step`` on), summed over the (images,
    run) streams of the level events: the split is the elapsed_sec of the level event of ``step`` - 1 (the stream's
    start for step 0), the ends are the stream's first event and its closing phase event (else its last level)."""
    streams: dict[tuple[str, Any], dict[str, float]] = {}
    for e in events(run):
        if not isinstance(e.get("elapsed_sec"), (int, float)) or e.get("event") not in ("phase", "level", "prune"):
            continue
        t = streams.setdefault((json.dumps(e.get("images")), e.get("run")), {"start": e["elapsed_sec"]})
        t["start"] = min(t["start"], e["elapsed_sec"])
        if e["event"] == "level" and e.get("step") == step - 1:
            t["split"] = e["elapsed_sec"]
        if e["event"] == "level" or (e["event"] == "phase" and e.get("phase") is None):
            t["end"] = max(t.get("end", e["elapsed_sec"]), e["elapsed_sec"])
    if not streams or any("end" not in t for t in streams.values()):
        return None
    before = after = 0.0
    for t in streams.values():
        split = t.get("split", t["start"] if step <= 0 else t["end"])
        before, after = before + split - t["start"], after + t["end"] - split
    return before, after


def interval_text(ci: tuple[float, float] | None) -> str | None:
    return None if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


TWIN_COLUMNS = ("psnr_twin_aware_best (oracle)", "oracle 95% CI (bootstrap)", "psnr_twin_aware_mean",
                "mean 95% CI (bootstrap)", "std over images", "std over particles", "success_rate",
                "success 95% CI (Wilson)", "coverage_rate", "coverage 95% CI (Wilson)",
                "pick_psnr_twin_aware (no oracle)", "pick 95% CI (bootstrap)", "pick_success_rate (no oracle)")


def twin_images(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [img for img in metrics.get("images") or [] if "modes" in img]


def scored(img: dict[str, Any], kind: str) -> float | None:
    """An image's psnr_twin_aware of its particles (``kind`` "mean" or "best", the oracle), or its pick's."""
    if kind == "pick":
        return (img["modes"].get("pick") or {}).get("psnr_twin_aware")
    stats = (img.get("summary") or {}).get("psnr_twin_aware") or {}
    return stats.get(kind) if stats.get("n") else None


def modes_row(run: Path, name: str, split_step: int | None = None) -> dict[str, Any]:
    """The Exp 1-3 row of a run (see --modes in the module docstring)."""
    metrics = read_json(run / "metrics.json")
    out: dict[str, Any] = {"run": name, "status": metrics.get("status", "unknown"),
                           "images": metrics.get("num_images_done")}
    modes = metrics.get("modes")
    twin = twin_images(metrics)
    if not modes or not twin:
        out.update({k: NA for k in TWIN_COLUMNS})
    else:
        per_image = {kind: [v for v in (scored(img, kind) for img in twin) if v is not None]
                     for kind in ("best", "mean", "pick")}
        n = modes["images"]
        aggregate = (metrics.get("aggregate") or {}).get("psnr_twin_aware") or {}
        out["psnr_twin_aware_best (oracle)"] = aggregate.get("best_of_n")
        out["oracle 95% CI (bootstrap)"] = interval_text(bootstrap_mean(per_image["best"]))
        out["psnr_twin_aware_mean"] = float(np.mean(per_image["mean"])) if per_image["mean"] else None
        out["mean 95% CI (bootstrap)"] = interval_text(bootstrap_mean(per_image["mean"]))
        out["std over images"] = float(np.std(per_image["mean"])) if per_image["mean"] else None
        out["std over particles"] = aggregate.get("mean_std_over_particles")
        out["success_rate"] = modes["success_rate"]
        out["success 95% CI (Wilson)"] = interval_text(wilson(sum(bool(img["modes"]["success"]) for img in twin), n))
        out["coverage_rate"] = modes["coverage_rate"]
        out["coverage 95% CI (Wilson)"] = interval_text(wilson(sum(bool(img["modes"]["coverage"]) for img in twin),
                                                               n))
        out["pick_psnr_twin_aware (no oracle)"] = modes["pick_psnr_twin_aware"]
        out["pick 95% CI (bootstrap)"] = interval_text(bootstrap_mean(per_image["pick"]))
        out["pick_success_rate (no oracle)"] = modes["pick_success_rate"]
    dists = final_pair_dists(run)
    out["pair_dist (final level)"] = sum(dists) / len(dists) if dists else None
    out["pair_dist 95% CI (bootstrap)"] = interval_text(bootstrap_mean(dists))
    for phase, rec in ((metrics.get("timing") or {}).get("phases") or {}).items():
        out[f"{phase}_sec"] = rec.get("wall_sec") if isinstance(rec, dict) else None
    for phase, peak in (metrics.get("peak_memory") or {}).items():
        out[f"peak_{phase}_GB"] = peak / 1e9 if isinstance(peak, (int, float)) else None
    if split_step is not None:
        split = split_times(run, split_step)
        out[f"levels<{split_step}_sec"], out[f"levels>={split_step}_sec"] = split or (None, None)
    return out


def modes_table(paths: list[Path], split_step: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns) of the Exp 1-3 table for the runs under the given folders."""
    rows = [modes_row(r, job_name(r), split_step) for _, runs in find_runs(paths) for r in runs]
    return rows, list(dict.fromkeys(k for r in rows for k in r))


def paired_modes_row(base: dict[str, Any], run: Path, name: str) -> dict[str, Any]:
    """--base: ``run`` minus BASE (its metrics.json), paired by image index (see the module docstring)."""
    out: dict[str, Any] = {"run": name}
    b, n = ({img["index"]: img for img in twin_images(m)} for m in (base, read_json(run / "metrics.json")))
    common = sorted(b.keys() & n.keys())
    out["images"] = len(common)
    if not common:
        return out

    def pick_success(img: dict[str, Any]) -> bool:
        return ((img["modes"].get("pick") or {}).get("mode") or "none") != "none"

    for label, get in (("success", lambda img: bool(img["modes"]["success"])),
                       ("coverage", lambda img: bool(img["modes"]["coverage"])),
                       ("pick success (no oracle)", pick_success)):
        d = np.array([float(get(n[i])) - float(get(b[i])) for i in common])
        out[f"d {label}"], out[f"d {label} 95% CI"] = float(d.mean()), interval_text(tuple(bootstrap(d)))
    for label, kind in (("oracle best", "best"), ("mean", "mean"), ("pick psnr (no oracle)", "pick")):
        pairs = [(scored(b[i], kind), scored(n[i], kind)) for i in common]
        d = np.array([y - x for x, y in pairs if x is not None and y is not None])
        out[f"d {label}"] = float(d.mean()) if d.size else None
        out[f"d {label} 95% CI"] = interval_text(tuple(bootstrap(d))) if d.size else None
    only = [sum(bool(x[i]["modes"]["success"]) and not y[i]["modes"]["success"] for i in common) for x, y in ((n, b),
                                                                                                        (b, n))]
    out["success: only run / only BASE"] = f"{only[0]} / {only[1]}"
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render(header: list[str], rows: list[list[Any]], style: str) -> str:
    """A table as markdown ("md") or as aligned plain text ("text"); cells through :func:`fmt`."""
    cells = [header, *[[fmt(v) for v in r] for r in rows]]
    if style == "md":
        return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(r) + " |" for r in cells[1:])])
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# --compare: the fair A/B of the K2 experiment log ------------------------------------------------------------------

K2_KEY = "sampler.k2_scheduler_config"
IGNORED_KEYS = ("name", "save_dir", "overwrite", "resume", "gpu", "use_tpu", "show_progress", "save_samples",
                "save_traj", "eval_fn_list", "data.start_id", "data.end_id")
# metric: (limit of NEW - BASE, higher is better, the clause as the log writes it)
RULE = {"psnr": (-0.10, True, "dPSNR >= -0.10 dB"), "lpips": (0.005, False, "dLPIPS <= +0.005"),
        "ssim": (-0.002, True, "dSSIM >= -0.002")}
# cost: (timing.json key, label, the largest NEW / BASE ratio that passes)
COST = {"time": ("sampling_per_image_sec", "sampling s/image", 0.80),
        "steps": ("used_anneal_steps", "used annealing steps", 0.75)}
COST_RULE = "time x0.80 or less, or used steps x0.75 or less"
ROUNDING = 1e-9  # a difference on the limit (19.9 - 20.0 = -0.10000000000000142) meets it
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0
KINDS = {"mean": "mean of particles", "best": "best-of-n (oracle)"}
SIDES = ("BASE", "NEW")


class NotComparable(ValueError):
    """Why a run cannot be compared: an error for BASE or a single NEW, a 'not compared' row for a sweep job."""


def run_config(run: Path) -> dict[str, Any]:
    """The run's config.yaml, flattened to dotted keys ({} without one)."""
    path = run / "config.yaml"
    return flatten(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


@dataclass
class Scored:
    """What --compare reads of a run: its flat config, per-image statistics, timing.json and metrics.json."""

    path: Path
    config: dict[str, Any]
    images: dict[int, dict[str, Any]]  # image index -> {metric: particle statistics (n, mean, best, ...)}
    timing: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def read(cls, run: Path) -> Scored:
        if not (run / "config.yaml").is_file():
            raise NotComparable(f"{run}: no config.yaml, so its settings cannot be checked")
        metrics = read_json(run / "metrics.json")
        if not metrics.get("images"):
            status, note = run_status(run)
            raise NotComparable(f"{run}: no finished image (status {status}{': ' + note if note else ''})")
        return cls(run, run_config(run), {img["index"]: img["summary"] for img in metrics["images"]},
                   read_json(run / "timing.json"), metrics)

    @property
    def measured(self) -> list[str]:
        return list(dict.fromkeys(m for summary in self.images.values() for m in summary))

    def value(self, index: int, metric: str, kind: str) -> float:
        """The image's mean over its particles (kind "mean") or best-of-n ("best"); NaN if no particle is scored."""
        stats = self.images[index].get(metric, {"n": 0})
        return float(stats[kind]) if stats["n"] else math.nan

    def unmeasured_reason(self, metric: str) -> str:
        return (self.metrics.get("eval") or {}).get(metric, {}).get("reason", "not in eval_fn_list")


ABSENT = object()


def differences(base: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    """The keys (dotted, with both values) in which two flat configs differ: "k2" settings, "ignored" keys
    (IGNORED_KEYS) and "other" keys (those that make the comparison unfair)."""
    out: dict[str, list[str]] = {"k2": [], "ignored": [], "other": []}
    for key in dict.fromkeys([*base, *new]):
        a, b = base.get(key, ABSENT), new.get(key, ABSENT)
        if a != b:
            group = "k2" if under(key, K2_KEY) else "ignored" if any(under(key, k) for k in IGNORED_KEYS) else "other"
            out[group].append(f"{key} (BASE {shown(a)}, NEW {shown(b)})")
    return out


def shown(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value, default=str)


def under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def bootstrap(d: np.ndarray) -> list[float]:
    """95% percentile bootstrap interval of the mean of ``d``, resampling its entries (images) with replacement."""
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))
    return [float(v) for v in np.percentile(d[picks].mean(axis=1), [2.5, 97.5])]


def paired(base: Scored, new: Scored, metric: str, images: list[int]) -> dict[str, Any]:
    """NEW - BASE of ``metric`` over ``images``, per kind (mean of particles, best-of-n), with its bootstrap interval;
    images whose value is NaN in either run are listed under "excluded" and left out."""
    nan = {i: [s for s, r in zip(SIDES, (base, new)) if math.isnan(r.value(i, metric, "mean"))] for i in images}
    kept = [i for i in images if not nan[i]]
    out: dict[str, Any] = {"images": len(kept),
                           "excluded": [{"image": i, "nan_in": " and ".join(nan[i])} for i in images if nan[i]]}
    if kept:
        for kind in KINDS:
            b, n = (np.array([r.value(i, metric, kind) for i in kept]) for r in (base, new))
            out[kind] = {"base": float(b.mean()), "new": float(n.mean()), "diff": float((n - b).mean()),
                         "ci": bootstrap(n - b)}
    return out


def meets(value: float, limit: float, higher: bool) -> bool:
    return value >= limit - ROUNDING if higher else value <= limit + ROUNDING


def compare(base: Scored, new: Scored, chosen: list[str] | None) -> dict[str, Any]:
    """Paired differences, cost ratios, the rule's clauses and the verdict of NEW against BASE (JSON-ready).

    ``chosen`` (--metrics) restricts the table and the rule to those metrics; by default the table holds every
    metric either run measured and the rule all of RULE."""
    images = sorted(base.images.keys() & new.images.keys())
    if not images:
        raise NotComparable(f"{new.path}: no finished image in common with BASE {base.path} "
                            f"(BASE has {span(base.images)}, NEW has {span(new.images)})")
    out: dict[str, Any] = {"base": str(base.path), "new": str(new.path),
                           "images": {"common": len(images), "base_only": len(base.images.keys() - new.images.keys()),
                                      "new_only": len(new.images.keys() - base.images.keys())},
                           "metrics": {}, "cost": {}, "notes": []}
    for metric in chosen or dict.fromkeys([*base.measured, *new.measured, *RULE]):
        lacking = [f"{s} ({r.unmeasured_reason(metric)})" for s, r in zip(SIDES, (base, new))
                   if metric not in r.measured]
        out["metrics"][metric] = {"not_measured": ", ".join(lacking)} if lacking else \
            paired(base, new, metric, images)
    for name, (key, _, _) in COST.items():
        b, n = base.timing.get(key), new.timing.get(key)
        ratio = n / b if isinstance(b, (int, float)) and isinstance(n, (int, float)) and b > 0 else None
        out["cost"][name] = {"base": b, "new": n, "ratio": ratio}
    out["clauses"] = clauses(out, [m for m in (chosen or RULE) if m in RULE])
    out["verdict"] = verdict(out["clauses"])
    for side, r in zip(SIDES, (base, new)):
        status, note = run_status(r.path)
        if note:
            out["notes"].append(f"{side} is {status}: {note}")
    devices = [" ".join(str((r.metrics.get("device") or {}).get(k, "?")) for k in ("type", "name"))
               for r in (base, new)]
    if devices[0] != devices[1]:
        out["notes"].append(f"BASE ran on {devices[0]}, NEW on {devices[1]}: the time ratio compares devices")
    if out["images"]["base_only"] or out["images"]["new_only"]:
        out["notes"].append("the runs finished other images too: the cost ratios are over each run's own images")
    return out


def span(images: Any) -> str:
    return f"{len(images)} image(s), {min(images)}-{max(images)}" if images else "no image"


def clauses(result: dict[str, Any], rule_metrics: list[str]) -> list[dict[str, Any]]:
    """The rule's clauses: each with its point estimate and pass (None: not measured), and for the metrics the
    interval's bound on the unfavourable side and whether the bound would pass too (shown, not judged)."""
    out = []
    for metric in rule_metrics:
        limit, higher, text = RULE[metric]
        entry = result["metrics"][metric]
        if "mean" not in entry:
            why = entry.get("not_measured") or "no image with a finite value in both runs"
            out.append({"clause": metric, "rule": text, "pass": None, "note": f"not measured: {why}"})
            continue
        diff, bound = entry["mean"]["diff"], entry["mean"]["ci"][0 if higher else 1]
        out.append({"clause": metric, "rule": text, "point": diff, "pass": meets(diff, limit, higher),
                    "bound": bound, "pass_at_bound": meets(bound, limit, higher)})
    ratios = {name: result["cost"][name]["ratio"] for name in COST}
    passes = [r <= COST[name][2] + ROUNDING for name, r in ratios.items() if r is not None]
    cost = {"clause": "cost", "rule": COST_RULE, "point": ratios,
            "pass": True if any(passes) else False if len(passes) == len(ratios) else None}
    if cost["pass"] is None:
        cost["note"] = "not measured: " + ", ".join(name for name, r in ratios.items() if r is None)
    return [*out, cost]


def verdict(rule: list[dict[str, Any]]) -> str:
    failed = [c["clause"] for c in rule if c["pass"] is False]
    missing = [c["clause"] for c in rule if c["pass"] is None]
    if failed:
        return f"FAIL ({', '.join(failed)})" + (f"; not measured: {', '.join(missing)}" if missing else "")
    if missing:
        return f"NO VERDICT: not measured: {', '.join(missing)} (--metrics restricts the rule to what was measured)"
    return "PASS"


def compare_paths(base_path: Path, new_path: Path, chosen: list[str] | None, force: bool) -> dict[str, Any]:
    """--compare: BASE (one run) against NEW (a run, or each job of a sweep); refuses (SystemExit) runs that differ
    outside the K2 settings unless ``force``, and a BASE or single NEW that cannot be compared."""
    (_, base_runs), (_, new_runs) = find_runs([base_path, new_path])
    if base_runs != [base_path]:
        raise SystemExit(f"{base_path}: a sweep folder; BASE is one run (e.g. {base_runs[0]})")
    sweep = new_runs != [new_path]
    try:
        base = Scored.read(base_path)
    except NotComparable as err:
        raise SystemExit(str(err)) from None
    configs = {r: run_config(r) for r in new_runs}
    differ = {job_name(r): differences(base.config, configs[r]) for r in new_runs if (r / "config.yaml").is_file()}
    unfair = [f"  {name}: " + "; ".join(d["other"]) for name, d in differ.items() if d["other"]]
    if unfair and not force:
        raise SystemExit(f"BASE {base_path} and NEW differ outside the K2 settings ({K2_KEY}.*), so the comparison "
                         f"is not the log's fair A/B:\n" + "\n".join(unfair) +
                         "\nrun them with the same settings, or pass --force to compare anyway")
    keys = swept_keys(new_path, list(configs.values())) if sweep else []
    comparisons = []
    for run in new_runs:
        entry: dict[str, Any] = {"job": job_name(run)}
        if sweep:
            entry["overrides"] = {k.removeprefix(K2_KEY + "."): configs[run].get(k) for k in keys}
        try:
            entry.update(compare(base, Scored.read(run), chosen), config=differ[entry["job"]])
        except NotComparable as err:
            if not sweep:
                raise SystemExit(str(err)) from None
            entry["error"] = str(err)
        comparisons.append(entry)
    return {"base": str(base_path), "new": str(new_path), "sweep": sweep,
            "bootstrap": {"interval": "95% percentile, over images", "resamples": BOOTSTRAP_RESAMPLES,
                          "seed": BOOTSTRAP_SEED},
            "metrics": chosen, "comparisons": comparisons, "ranking": [c["job"] for c in ranked(comparisons)]}


def ranked(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log's selection rule (section 4): dPSNR high first, then used steps, then time, low first."""
    def key(c: dict[str, Any]) -> tuple[float, float, float]:
        psnr = c.get("metrics", {}).get("psnr", {}).get("mean")
        ratios = [c["cost"][name]["ratio"] if "cost" in c else None for name in ("steps", "time")]
        return (-psnr["diff"] if psnr else math.inf, *(math.inf if r is None else r for r in ratios))
    return sorted(comparisons, key=key)


def signed(v: float | None) -> str | None:
    return None if v is None else f"{v:+.4f}"


def ratio(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}"


def interval(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def heading(text: str, style: str) -> str:
    return f"### {text}" if style == "md" else f"== {text} =="


def paragraph(lines: list[str], style: str) -> str:
    return "\n".join(f"- {line}" if style == "md" else line for line in lines)


def show_comparison(c: dict[str, Any], style: str) -> str:
    """One comparison: settings, images, the paired table, the cost table, the rule's clauses and the verdict."""
    title = heading(f"{c['job']} vs BASE", style)
    if "error" in c:
        return f"{title}\n\nnot compared: {c['error']}"
    config, images = c["config"], c["images"]
    lines = [f"K2 settings: {'; '.join(config['k2']) or 'the same as BASE'}"]
    lines += [f"not compared (ignored keys): {'; '.join(config['ignored'])}"] if config["ignored"] else []
    lines += [f"FORCED: differs outside the K2 settings in {'; '.join(config['other'])}"] if config["other"] else []
    lines.append(f"images: {images['common']} in common (BASE only {images['base_only']}, "
                 f"NEW only {images['new_only']}); paired by image index")
    for metric, entry in c["metrics"].items():
        if entry.get("excluded"):
            lines.append(f"{metric}: excluded (NaN, never replaced): " +
                         ", ".join(f"image {e['image']} (NaN in {e['nan_in']})" for e in entry["excluded"]))
        if "not_measured" in entry:
            lines.append(f"{metric}: not measured in {entry['not_measured']}")
    lines += c["notes"]
    rows = [[metric, label, entry["images"], f"{entry[kind]['base']:.4f}", f"{entry[kind]['new']:.4f}",
             signed(entry[kind]["diff"]), interval(entry[kind]["ci"])]
            for metric, entry in c["metrics"].items() if "mean" in entry for kind, label in KINDS.items()]
    paired_table = render(["metric", "per image", "images", "BASE", "NEW", "NEW - BASE", "95% CI"], rows, style)
    cost_table = render(["cost", "BASE", "NEW", "NEW / BASE"],
                        [[label, c["cost"][name]["base"], c["cost"][name]["new"], ratio(c["cost"][name]["ratio"])]
                         for name, (_, label, _) in COST.items()], style)
    rule_rows = []
    for clause in c["clauses"]:
        verdict_cell = "not measured" if clause["pass"] is None else "pass" if clause["pass"] else "FAIL"
        if clause["clause"] == "cost":
            point = ", ".join(f"{name} {ratio(r)}" for name, r in clause["point"].items())
            rule_rows.append(["cost", clause["rule"], point, verdict_cell, None, None])
        else:
            rule_rows.append([clause["clause"], clause["rule"], signed(clause.get("point")), verdict_cell,
                              signed(clause.get("bound")),
                              None if "pass_at_bound" not in clause else "pass" if clause["pass_at_bound"] else "FAIL"])
    rule_table = render(["clause", "rule", "point estimate", "result", "95% CI bound", "at the bound"], rule_rows,
                        style)
    return "\n\n".join([title, paragraph(lines, style), paired_table, cost_table, rule_table,
                        f"verdict (judged on the point estimates, as the log does; the CI bounds are shown, not "
                        f"judged): {c['verdict']}"])


def show(result: dict[str, Any], style: str) -> str:
    """Every comparison, then (for a sweep) the summary in the order of the log's selection rule."""
    b = result["bootstrap"]
    chosen = result["metrics"] or list(RULE)
    rule = ", ".join(RULE[metric][2] for metric in RULE if metric in chosen)
    skipped = [metric for metric in RULE if metric not in chosen]
    head = [f"BASE {result['base']}, NEW {result['new']}{' (sweep)' if result['sweep'] else ''}",
            f"differences NEW - BASE per image (mean of particles; best-of-n is an oracle: picked with the ground "
            f"truth, never judged); 95% CI: percentile bootstrap over images, {b['resamples']} resamples, seed "
            f"{b['seed']}",
            f"rule (K2 log section 0): {rule}; and {COST_RULE} (sampling s/image and used annealing steps, NEW / BASE)"
            + (f"; not judged (--metrics): {', '.join(skipped)}" if skipped else "")]
    blocks = [paragraph(head, style), *(show_comparison(c, style) for c in result["comparisons"])]
    if result["sweep"]:
        order = ranked(result["comparisons"])
        keys = list(order[0]["overrides"])
        rows = []
        for c in order:
            psnr = c.get("metrics", {}).get("psnr", {}).get("mean")
            cost = c.get("cost", {})
            rows.append([c["job"], *(c["overrides"][k] for k in keys), c.get("images", {}).get("common"),
                         f"{psnr['diff']:+.4f} {interval(psnr['ci'])}" if psnr else None,
                         ratio(cost.get("time", {}).get("ratio")), ratio(cost.get("steps", {}).get("ratio")),
                         c.get("verdict") or f"not compared: {c['error']}"])
        blocks += [heading(f"summary: {len(order)} job(s) vs BASE, by dPSNR (high first), then used steps, then "
                           f"time (low first)", style),
                   render(["job", *keys, "images", "dPSNR [95% CI]", "time ratio", "step ratio", "verdict"], rows,
                          style)]
    return "\n\n".join(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="results folders (runs or sweeps)")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--plot", type=Path, help="bar chart of best-of-n and mean-of-n PSNR")
    ap.add_argument("--stale-after", type=float, default=STALE_AFTER_MIN, metavar="MIN",
                    help=f"a running run whose heartbeat is older is shown as stale (default {STALE_AFTER_MIN:g})")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BASE", "NEW"),
                    help="the K2 log's fair A/B: BASE (a run) against NEW (a run, or a sweep folder: each job)")
    ap.add_argument("--metrics", type=lambda s: [m for m in s.split(",") if m], metavar="M[,M...]",
                    help="with --compare: only these metrics in the table and the rule, e.g. psnr")
    ap.add_argument("--force", action="store_true",
                    help="with --compare: compare runs that differ outside the K2 settings (the keys are listed)")
    ap.add_argument("--format", choices=["text", "md"],
                    help="aligned text or markdown tables (default: md for the table, text for --compare)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="with --compare: also write the comparison as JSON")
    ap.add_argument("--modes", action="store_true",
                    help="the Exp 1-3 table (twin-aware success, coverage, non-oracle pick, distance, phases)")
    ap.add_argument("--split-step", type=int, metavar="S",
                    help="with --modes: wall seconds of the levels before step S and from S on (events.jsonl)")
    ap.add_argument("--base", type=Path, metavar="RUN",
                    help="with --modes: a second table, each run minus RUN paired by image, bootstrap intervals")
    args = ap.parse_args()
    if args.compare:
        if args.runs or args.csv or args.plot:
            ap.error("--compare takes BASE and NEW only (no other folders, --csv or --plot)")
        if args.metrics is not None and not set(args.metrics) & set(RULE):
            ap.error(f"--metrics must name one of the rule's metrics ({', '.join(RULE)}), or nothing is judged")
        result = compare_paths(*args.compare, args.metrics, args.force)
        print(show(result, args.format or "text"))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return
    if not args.runs:
        ap.error("give results folders, or --compare BASE NEW")
    if args.metrics is not None or args.force or args.json:
        ap.error("--metrics, --force and --json go with --compare")
    if (args.split_step is not None or args.base) and not args.modes:
        ap.error("--split-step and --base go with --modes")
    if args.modes:
        if args.plot:
            ap.error("--plot does not go with --modes")
        rows, cols = modes_table(args.runs, args.split_step)
        print(render(cols, [[r.get(c) for c in cols] for r in rows], args.format or "md"))
        print("\noracle: best-of-n picked with the ground truth; pick: the lowest-meas_err particle (no oracle). "
              "PSNR and distance CIs: percentile bootstrap of the mean over images (measurements); success and "
              "coverage CIs: Wilson score interval over images.")
        if args.base:
            if not is_run(args.base):
                ap.error(f"--base {args.base}: not a results folder")
            base = read_json(args.base / "metrics.json")
            paired_rows = [paired_modes_row(base, r, job_name(r)) for _, runs in find_runs(args.runs) for r in runs]
            paired_cols = list(dict.fromkeys(k for r in paired_rows for k in r))
            print(f"\npaired by image index, run - BASE ({args.base}); 95% CI: percentile bootstrap over the common "
                  "images; success counts: images where only one side succeeded\n")
            print(render(paired_cols, [[r.get(c) for c in paired_cols] for r in paired_rows], args.format or "md"))
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        return
    rows, cols, notes = table(args.runs, args.stale_after * 60)
    print(render(cols, [[r.get(c) for c in cols] for r in rows], args.format or "md"))
    if notes:
        print("\n" + "\n".join(notes))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, len(rows)), 3))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r.get("psnr_best") or 0 for r in rows], 0.4, label="best-of-n (oracle)")
        ax.bar([x + 0.2 for x in xs], [r.get("psnr_mean") or 0 for r in rows], 0.4, label="mean-of-n")
        ax.set_xticks(list(xs), [r["run"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("PSNR (dB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
