#!/usr/bin/env python3
"""Compare two sets of runs that differ in their random numbers (other seeds, or another noise kind), per image, with
each side's particles pooled over its runs:

    python scripts/seed_compare.py --base RUN [RUN ...] --new RUN [RUN ...] [--metrics psnr,psnr_twin_aware,ssim]
                                   [--paired [--within 0.1]]

A RUN is a results folder or its metrics.json. Per image and side: the mean of the metric over every finished
particle of every run of that side (particles whose status is not "ok", or whose value is missing or not finite, are
counted and left out). Prints each run's mean over images (the spread between seeds), then NEW - BASE over the images
that every run has: its mean and a 95% percentile bootstrap interval over images (10,000 resamples, numpy seed 0).
One seed per side compares two draws; pooling seeds narrows the interval by the images' seed-to-seed variance.

``--paired``: the k-th BASE run and the k-th NEW run drew the same random numbers (the same seed, another precision or
compile), so each particle has a twin on the other side (same image, sample and run). Per metric: how far the twins
end apart (median |NEW - BASE| over the pairs where both are usable), the share within ``--within`` of each other, and
the share that chose the same twin image of phase retrieval (the particles' ``mode``, where recorded).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.parse_metrics import bootstrap  # noqa: E402  (the interval of parse_metrics.py --compare)

DEFAULT_METRICS = "psnr,psnr_twin_aware,ssim,lpips"


def load(run: str) -> dict:
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.json there (give a results folder or its metrics.json)")
    return json.loads(path.read_text())


def per_image(runs: list[dict], metric: str) -> tuple[dict[int, list[float]], int]:
    """image index -> the metric of every usable particle of ``runs``; and how many particles were left out."""
    values: dict[int, list[float]] = {}
    dropped = 0
    for run in runs:
        for image in run["images"]:
            for p in image["particles"]:
                if metric not in p and p.get("status") == "ok":
                    continue  # not in this run's eval_fn_list
                v = p.get(metric)
                if p.get("status") != "ok" or v is None or not math.isfinite(v):
                    dropped += 1
                    continue
                values.setdefault(int(image["index"]), []).append(float(v))
    return values, dropped


def paired(base: list[dict], new: list[dict], metric: str, within: float) -> str | None:
    """One row of the paired table: the twins' median |difference|, the share within ``within``, the same mode."""
    gaps, same_mode, modes = [], 0, 0
    for b_run, n_run in zip(base, new, strict=True):
        twins = {(int(im["index"]), p.get("sample"), p.get("run")): p for im in n_run["images"] for p in im["particles"]}
        for image in b_run["images"]:
            for p in image["particles"]:
                q = twins.get((int(image["index"]), p.get("sample"), p.get("run")))
                if q is None or "ok" != p.get("status") or "ok" != q.get("status"):
                    continue
                if "mode" in p and "mode" in q:
                    modes, same_mode = modes + 1, same_mode + (p["mode"] == q["mode"])
                a, b = p.get(metric), q.get(metric)
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                    gaps.append(abs(b - a))
    if not gaps:
        return None
    mode = f"{same_mode / modes:.3f}" if modes else "n/a"
    return (f"| {metric} | {len(gaps)} | {float(np.median(gaps)):.4f} | {np.mean(np.array(gaps) <= within):.3f} | "
            f"{mode} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--new", nargs="+", required=True)
    ap.add_argument("--metrics", default=DEFAULT_METRICS)
    ap.add_argument("--paired", action="store_true", help="the k-th runs of both sides share their random numbers: "
                    "also compare each particle with its twin")
    ap.add_argument("--within", type=float, default=0.1, help="--paired: the gap counted as ending together")
    args = ap.parse_args()
    if args.paired and len(args.base) != len(args.new):
        raise SystemExit(f"--paired pairs the k-th runs: give as many --new runs as --base runs "
                         f"({len(args.base)} and {len(args.new)})")
    sides = {"BASE": (args.base, [load(r) for r in args.base]), "NEW": (args.new, [load(r) for r in args.new])}
    every = set.intersection(*({int(im["index"]) for im in run["images"]} for _, runs in sides.values() for run in runs))
    print(f"images in every run: {len(every)}")
    print("| metric | side | run | mean over images of the per-image particle mean |\n|---|---|---|---|")
    rows = []
    for metric in args.metrics.split(","):
        pooled = {}
        for side, (names, runs) in sides.items():
            for name, run in zip(names, runs, strict=True):
                vals, _ = per_image([run], metric)
                if vals:
                    print(f"| {metric} | {side} | {name} | {np.mean([np.mean(vals[i]) for i in every if i in vals]):.4f} |")
            pooled[side] = per_image(runs, metric)
        measured = {side: sum(bool(per_image([run], metric)[0]) for run in runs) for side, (_, runs) in sides.items()}
        (b, b_drop), (n, n_drop) = pooled["BASE"], pooled["NEW"]
        common = sorted(i for i in every if i in b and i in n)
        if not common:
            rows.append(f"| {metric} | not measured on both sides | | | | | | |")
            continue
        diff = np.array([np.mean(n[i]) - np.mean(b[i]) for i in common])
        lo, hi = bootstrap(diff)
        rows.append(f"| {metric} | {measured['BASE']} / {measured['NEW']} | {len(common)} | {np.mean([np.mean(b[i]) for i in common]):.4f} | "
                    f"{np.mean([np.mean(n[i]) for i in common]):.4f} | {diff.mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                    f"{b_drop} / {n_drop} |")
    print(f"\nBASE {len(args.base)} run(s), NEW {len(args.new)} run(s); particles pooled per image over each side's runs")
    print("| metric | runs measured (BASE / NEW) | images | BASE | NEW | NEW - BASE | 95% CI | particles left out "
          "(BASE / NEW: not finished or not finite) |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.paired:
        table = [row for m in args.metrics.split(",") if (row := paired(sides["BASE"][1], sides["NEW"][1], m, args.within))]
        print(f"\nParticles paired with their twin (same random numbers): run k of BASE with run k of NEW\n"
              f"| metric | pairs | median abs(NEW - BASE) | share within {args.within:g} | same mode |\n|---|---|---|---|---|")
        print("\n".join(table))


if __name__ == "__main__":
    main()
