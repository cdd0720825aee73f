"""Turn results/<name>/metrics.json (+ timing.json) of one or more runs into a table.

    python scripts/parse_metrics.py results/exp0_* [--csv out.csv] [--plot out.png] [--stale-after 10]

A sweep folder (python posterior_sample.py -m ...: run<NNN>/ jobs, multirun.yaml) contributes one row per job,
with the swept keys as columns (the keys of multirun.yaml's sweep overrides; without it, the config.yaml keys
that differ between the jobs).

Columns: swept keys, status, images, particles per image, best-of-n (an oracle: chosen with the ground truth)
and mean-of-n of each metric, NaN particles, seconds per image, used annealing levels, peak memory per phase.

Status is the run's own (complete, running, interrupted, failed), except that a run recorded as running whose
process has ended on this host (pid, host) or whose heartbeat (heartbeat_unix) is older than --stale-after
minutes is shown as stale: it was killed without a chance to say so. A line under the table explains every
run that is not complete. A folder that does not exist or is not a results folder is an error (exit 1).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

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

    The sweep overrides of multirun.yaml name them; a swept config group (+sampler=a,b) stands for the keys under
    it that differ between the jobs. Without multirun.yaml: every key whose value differs between the jobs.
    """
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    multirun = sweep / "multirun.yaml"
    if not multirun.is_file():
        return differ
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = yaml.safe_load(multirun.read_text())["hydra"]["overrides"]["task"]
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
            configs = [flatten(yaml.safe_load((r / "config.yaml").read_text()) if (r / "config.yaml").is_file()
                               else {}) for r in runs]
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


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="results folders (runs or sweeps)")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--plot", type=Path, help="bar chart of best-of-n and mean-of-n PSNR")
    ap.add_argument("--stale-after", type=float, default=STALE_AFTER_MIN, metavar="MIN",
                    help=f"a running run whose heartbeat is older is shown as stale (default {STALE_AFTER_MIN:g})")
    args = ap.parse_args()
    rows, cols, notes = table(args.runs, args.stale_after * 60)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
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
