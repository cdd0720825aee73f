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
- particle network evaluations per second of sampling.

Printed: every run, then the medians per side and the ratio B / A of each. The order alternates A B, B A, A B, ...
so that neither side always runs first (a cold start, a drift). The timings of the two sides are comparable only
within one call of one device.
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


def measure(code: Path, overrides: list[str], save: Path) -> dict[str, Any]:
    """One run of posterior_sample.py in ``code``; its timing.json, read into the fields above."""
    cmd = [sys.executable, "posterior_sample.py", *overrides, f"save_dir={save}", "name=run", "show_progress=false"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"bench_daps: a run failed (exit {done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    timing = json.loads((save / "run" / "timing.json").read_text())
    # timing.json of older commits (af9e5f8 and before) lacks the two newer counters: their equivalents.
    images, particles = timing["images_done"], timing["images_done"] * timing["particles_per_image"]
    sampling = timing.get("finished_sampling_sec", timing["sampling_wall_sec"])
    nfe = timing.get("particle_network_evals", timing.get("network_evals_per_particle", 0) * particles)
    peaks = [p["peak_memory_bytes"] for p in timing["phases"].values() if "peak_memory_bytes" in p]
    return {"sampling_s_per_image": timing["sampling_per_image_sec"], "sampling_s_per_particle": sampling / particles,
            "end_to_end_s": wall, "outside_vs_sampling": (wall - sampling) / sampling if sampling else None,
            "peak_GB": max(peaks) / 1e9 if peaks else None,
            "particle_nfe_per_s": nfe / sampling if sampling and nfe else None}


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
    ap.add_argument("--save", type=Path, default=Path("/tmp/bench_daps"))
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    args = ap.parse_args()
    for code in (args.a_code, args.b_code):
        if not (code / "posterior_sample.py").is_file():
            sys.exit(f"bench_daps: {code} holds no posterior_sample.py")
    if args.save.exists() and any(args.save.iterdir()):
        sys.exit(f"bench_daps: {args.save} is not empty: give a new --save folder")
    sides = {"A": (args.a_code.resolve(), shlex.split(args.common) + shlex.split(args.a)),
             "B": (args.b_code.resolve(), shlex.split(args.common) + shlex.split(args.b))}
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    print("| side | repeat | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 2))
    for k in range(args.repeats):
        for side in ("A", "B") if k % 2 == 0 else ("B", "A"):
            code, overrides = sides[side]
            row = measure(code, overrides, args.save.resolve() / f"{side}_{k}")
            runs[side].append(row)
            print(f"| {side} | {k} | " + " | ".join("n/a" if row[f] is None else f"{row[f]:.4g}" for f in FIELDS) + " |",
                  flush=True)
    medians = {side: {f: median(rows, f) for f in FIELDS} for side, rows in runs.items()}
    print("\n| median | " + " | ".join(FIELDS) + " |\n|" + "---|" * (len(FIELDS) + 1))
    for side in ("A", "B"):
        print(f"| {side} | " + " | ".join("n/a" if medians[side][f] is None else f"{medians[side][f]:.4g}"
                                          for f in FIELDS) + " |")
    ratio = {f: (medians["B"][f] / medians["A"][f] if medians["A"][f] and medians["B"][f] is not None else None)
             for f in FIELDS}
    print("| B / A | " + " | ".join("n/a" if ratio[f] is None else f"{ratio[f]:.3f}" for f in FIELDS) + " |")
    print(f"\nA: {shlex.join(sides['A'][1])} (code {sides['A'][0]})\nB: {shlex.join(sides['B'][1])} "
          f"(code {sides['B'][0]})")
    if args.json:
        args.json.write_text(json.dumps({"sides": {s: {"code": str(c), "overrides": o} for s, (c, o) in sides.items()},
                                         "runs": runs, "medians": medians, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
