#!/usr/bin/env python3
"""A/B timing of two sampling set-ups, alternating in one process tree (one device call): A, B, A, B, ...

    python scripts/bench_daps.py --common "<posterior_sample.py overrides>" [--a "<overrides>"] [--b "<overrides>"]
        [--a-code DIR] [--b-code DIR] [--repeats 3] [--save DIR] [--json OUT]

A and B differ by their extra overrides (``--a "noise=generator" --b "noise=counter"``) and/or their code: ``--a-code``
is a folder holding another version of the repository (``git archive <commit> posterior_sample.py sampler.py cores
utils configs scripts | tar -x -C DIR``, with ``checkpoints`` and ``dataset`` linked in), default this checkout. Each
run is ``posterior_sample.py <common> <side overrides> save_dir=<save>/<side>_<k> name=run``; its timing.json gives:

- sampling s / image and s / particle (the sampler's wall time up to each finished image, start-up and scoring out),
- end-to-end s (the process, start-up and result writing included), and the time outside sampling (start-up,
  scoring, writing) as a fraction of the sampling time,
- peak memory (the largest over the phases; None on the CPU),
- particle network evaluations per second of sampling,
- and, in a second table, where the time outside sampling went (:func:`stages`).

``--sides A`` or ``--sides B`` runs one side only (its medians; no ratio).

Printed: every run, then the medians per side and the ratio B / A of each. The order alternates A B, B A, A B, ...
so that neither side always runs first (a cold start, a drift). The timings of the two sides are comparable only
within one call of one device.

``--sweep "seed=1,2,3"`` makes each run one Hydra multirun (``-m``) of those jobs in one process, as a user's sweep
from the command line, and each job a row: a job's end-to-end time runs from its start (the process's start for the
first job; ``job_started_unix`` in timing.json) to the next job's start (the process's end for the last), so the
first job carries the process's imports and the model's build and compile, and the later jobs what a job of a sweep
costs when it reuses them. The medians are then over the later jobs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("sampling_s_per_image", "sampling_s_per_particle", "end_to_end_s", "outside_vs_sampling", "peak_GB",
          "particle_nfe_per_s")
RUN_STAGES = ("warm_up", "scoring", "saving", "writing")  # utils/results.py's STAGES, read from older commits too
STAGES = ("before_build_s", "build_s", "run_outside_sampling_s", *(f"{s}_s" for s in RUN_STAGES), "run_other_s",
          "after_results_s")


def launch(code: Path, overrides: list[str], save: Path) -> tuple[float, float]:
    """Run posterior_sample.py in ``code`` with results in ``save``/run and its console output in ``save``/console.txt;
    its start and end (Unix seconds)."""
    cmd = [sys.executable, "posterior_sample.py", *overrides, f"save_dir={save}", "name=run", "show_progress=false"]
    start = time.time()
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    save.mkdir(parents=True, exist_ok=True)
    (save / "console.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"bench_daps: a run failed (exit {done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return start, time.time()


def measure(code: Path, overrides: list[str], save: Path) -> list[dict[str, Any]]:
    """One run of posterior_sample.py in ``code``: one row of the fields above."""
    start, end = launch(code, overrides, save)
    timing = json.loads((save / "run" / "timing.json").read_text())
    return [{**fields(timing, end - start), **stages(timing, start, end)}]


def measure_sweep(code: Path, overrides: list[str], sweep: list[str], save: Path) -> list[dict[str, Any]]:
    """One sweep (``-m``, the jobs in one process): a row per job, its wall from its start to the next job's."""
    start, end = launch(code, ["-m", *overrides, *sweep], save)
    timings = [json.loads((job / "timing.json").read_text()) for job in sorted((save / "run").glob("run[0-9]*"))]
    if not timings or any("job_started_unix" not in (t.get("attempts") or [{}])[-1] for t in timings):
        sys.exit(f"bench_daps: {code} writes no job_started_unix in timing.json: --sweep needs a newer version")
    bounds = [start, *[t["attempts"][-1]["job_started_unix"] for t in timings[1:]], end]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        sys.exit("bench_daps: the sweep's jobs overlapped (a parallel launcher?): --sweep times jobs that run one "
                 "after another in one process (Hydra's default launcher)")
    return [{"job": k, **fields(t, bounds[k + 1] - bounds[k]), **stages(t, bounds[k], bounds[k + 1])}
            for k, t in enumerate(timings)]


def stages(timing: dict[str, Any], begin: float, end: float) -> dict[str, Any]:
    """Where a run's (or a sweep job's) time from ``begin`` to ``end`` went, in seconds: before its parts were built
    (the process's imports and Hydra), building them, the run's clock up to its final timing.json outside sampling,
    split into the run's stage clocks (the warm-up's compiles, scoring, saving, writing; ``run_other_s`` is the rest:
    opening the folder, the measurements, copies), and after it (the final write, the grid, Hydra's end of the job,
    the next job's start; the process's exit for the last). A timing.json without ``attempts`` (older commits, af9e5f8
    among them) records none of these clocks, one without ``stages_sec`` (before the twelfth session) not the split:
    those are None. So is the split of a resumed run (its sampling time covers every attempt) or of several ranks
    (the stages are rank 0's, the sampling time the slowest rank's)."""
    if "attempts" not in timing:
        return dict.fromkeys(STAGES)
    attempt = timing["attempts"][-1]
    job = attempt.get("job_started_unix", attempt["started_unix"])
    written = timing["heartbeat_unix"]
    outside = written - attempt["started_unix"] - timing["sampling_wall_sec"]
    one = len(timing["attempts"]) == 1 and timing.get("world_size", 1) == 1
    clocks = attempt.get("stages_sec") if one else None
    split = {f"{s}_s": clocks[s] if clocks else None for s in RUN_STAGES}
    return {"before_build_s": job - begin, "build_s": attempt["started_unix"] - job, "run_outside_sampling_s": outside,
            **split, "run_other_s": outside - sum(clocks[s] for s in RUN_STAGES) if clocks else None,
            "after_results_s": end - written}


def fields(timing: dict[str, Any], wall: float) -> dict[str, Any]:
    """A run's timing.json and end-to-end wall, read into the fields above."""
    # timing.json of older commits (af9e5f8 and before) lacks the two newer counters: their equivalents.
    images, particles = timing["images_done"], timing["images_done"] * timing["particles_per_image"]
    sampling = timing.get("finished_sampling_sec", timing["sampling_wall_sec"])
    nfe = timing.get("particle_network_evals", timing.get("network_evals_per_particle", 0) * particles)
    peaks = [p["peak_memory_bytes"] for p in timing["phases"].values() if "peak_memory_bytes" in p]
    return {"sampling_s_per_image": timing["sampling_per_image_sec"], "sampling_s_per_particle": sampling / particles,
            "end_to_end_s": wall, "outside_vs_sampling": (wall - sampling) / sampling if sampling else None,
            "peak_GB": max(peaks) / 1e9 if peaks else None,
            "particle_nfe_per_s": nfe / sampling if sampling and nfe else None}


def cells(row: dict[str, Any], keys: tuple[str, ...], digits: str) -> str:
    """A table row's cells: each value with ``digits`` (a format spec), n/a where it is None."""
    return " | ".join("n/a" if row[k] is None else format(row[k], digits) for k in keys)


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--common", required=True, help="overrides of both sides (one quoted string)")
    ap.add_argument("--a", default="", help="overrides of side A only")
    ap.add_argument("--b", default="", help="overrides of side B only")
    ap.add_argument("--a-code", type=Path, default=ROOT, help="repository version of side A (default: this one)")
    ap.add_argument("--b-code", type=Path, default=ROOT, help="repository version of side B (default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", choices=("AB", "A", "B"), default="AB", help="run both sides (default) or one")
    ap.add_argument("--save", type=Path, default=Path("/tmp/bench_daps"))
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    ap.add_argument("--sweep", default="", help="sweep overrides (one quoted string, e.g. \"seed=1,2,3\"): each run "
                    "is one multirun of these jobs in one process, a row per job; medians over the jobs after the first")
    args = ap.parse_args()
    for code in (args.a_code, args.b_code):
        if not (code / "posterior_sample.py").is_file():
            sys.exit(f"bench_daps: {code} holds no posterior_sample.py")
    if args.save.exists() and any(args.save.iterdir()):
        sys.exit(f"bench_daps: {args.save} is not empty: give a new --save folder")
    sides = {"A": (args.a_code.resolve(), shlex.split(args.common) + shlex.split(args.a)),
             "B": (args.b_code.resolve(), shlex.split(args.common) + shlex.split(args.b))}
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    sweep = shlex.split(args.sweep)
    print("| side | repeat | job | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 3))
    for k in range(args.repeats):
        for side in [side for side in (("A", "B") if k % 2 == 0 else ("B", "A")) if side in args.sides]:
            code, overrides = sides[side]
            save = args.save.resolve() / f"{side}_{k}"
            rows = measure_sweep(code, overrides, sweep, save) if sweep else measure(code, overrides, save)
            for row in rows:
                row["repeat"] = k
                runs[side].append(row)
                print(f"| {side} | {k} | {row.get('job', '-')} | {cells(row, FIELDS, '.4g')} |", flush=True)
    counted = {side: [r for r in rows if r.get("job", 1) > 0] for side, rows in runs.items()}
    medians = {side: {f: median(rows, f) for f in FIELDS} for side, rows in counted.items()}
    print("\n| median" + (" (jobs after the first)" if sweep else "") + " | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 1))
    for side in ("A", "B"):
        print(f"| {side} | {cells(medians[side], FIELDS, '.4g')} |")
    ratio = {f: (medians["B"][f] / medians["A"][f] if medians["A"][f] and medians["B"][f] is not None else None)
             for f in FIELDS}
    print(f"| B / A | {cells(ratio, FIELDS, '.3f')} |")
    print("\n| side | repeat | job | " + " | ".join(STAGES) + " |\n|" + "---|" * (len(STAGES) + 3))
    for side, rows in runs.items():
        for row in rows:
            print(f"| {side} | {row['repeat']} | {row.get('job', '-')} | {cells(row, STAGES, '.2f')} |")
    print(f"\nA: {shlex.join(sides['A'][1])} (code {sides['A'][0]})\nB: {shlex.join(sides['B'][1])} "
          f"(code {sides['B'][0]})")
    if args.json:
        args.json.write_text(json.dumps({"sides": {s: {"code": str(c), "overrides": o} for s, (c, o) in sides.items()},
                                         "runs": runs, "medians": medians, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
