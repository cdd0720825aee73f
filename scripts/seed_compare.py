#!/usr/bin/env python3
"""Compare two sets of runs per image, with each side's particles pooled over its runs (runs that differ in their
random numbers, or with --paired in another respect under the same random numbers):

    python scripts/seed_compare.py --base RUN [RUN ...] --new RUN [RUN ...] [--metrics psnr,psnr_twin_aware,ssim]
                                   [--paired [--within 0.1]]

A RUN is a results folder or its metrics.json. Per image and side: the mean of the metric over every finished
particle of every run of that side (particles whose status is not "ok", or whose value is missing or not finite, are
counted and left out). Prints each run's mean over images (the spread between seeds), then NEW - BASE over the images
that every run has: its mean and a 95% percentile bootstrap interval over images (10,000 resamples, numpy seed 0).
One seed per side compares two draws; pooling seeds narrows the interval by the images' seed-to-seed variance.

``--paired``: the k-th BASE run and the k-th NEW run drew the same random numbers (the same seed, another precision or
compile), so each particle has a twin on the other side (same image, sample and run); runs whose recorded seed or
noise differ are refused. Per metric: how far the twins end apart (median |NEW - BASE| over the pairs finished on
both sides with finite values) and, for PSNR metrics, the share within ``--within`` dB; then phase retrieval's twin
images (the particles' ``mode``: 0, 180 or none): the share of pairs in the same mode, and the share swapped between
0 and 180. Particles without a twin are counted.
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


def twin_pairs(base: list[dict], new: list[dict], names: list[tuple[str, str]]) -> tuple[list[tuple[dict, dict]], int]:
    """The (BASE, NEW) particle pairs of ``--paired``, both finished ("ok"), over runs paired in order, and how many
    particles have no twin. Refuses runs whose recorded seed or noise differ and particles without sample / run keys."""
    pairs, alone = [], 0
    for b_run, n_run, (b_name, n_name) in zip(base, new, names, strict=True):
        for key in ("seed", "noise"):
            if key not in b_run or key not in n_run:
                print(f"--paired: {b_name if key not in b_run else n_name} records no {key}: the pairing of "
                      f"{b_name} with {n_name} is not checked for it", file=sys.stderr)
            elif b_run[key] != n_run[key]:
                raise SystemExit(f"--paired: {b_name} and {n_name} differ in {key} ({b_run[key]} and {n_run[key]}): "
                                 f"give the --new runs in the order of their --base twins")
        sides = []
        for run, name in ((b_run, b_name), (n_run, n_name)):
            table = {}
            for image in run["images"]:
                for p in image["particles"]:
                    if "sample" not in p or "run" not in p:
                        raise SystemExit(f"--paired: {name} has particles without sample / run keys")
                    table[(int(image["index"]), p["sample"], p["run"])] = p
            sides.append(table)
        b_side, n_side = sides
        alone += len(b_side.keys() ^ n_side.keys())
        pairs += [(p, n_side[k]) for k, p in b_side.items()
                  if k in n_side and p.get("status") == "ok" and n_side[k].get("status") == "ok"]
    return pairs, alone


def paired_row(pairs: list[tuple[dict, dict]], metric: str, within: float) -> str | None:
    """One row of the paired table: the twins' median |difference| and, for PSNR metrics, the share within ``within``
    dB, over the pairs where both values are finite."""
    gaps = np.array([abs(q[metric] - p[metric]) for p, q in pairs if p.get(metric) is not None
                     and q.get(metric) is not None and math.isfinite(p[metric]) and math.isfinite(q[metric])])
    if not gaps.size:
        return None
    share = f"{np.mean(gaps <= within):.3f}" if metric.startswith("psnr") else "-"
    return f"| {metric} | {gaps.size} | {float(np.median(gaps)):.4f} | {share} |"


def mode_row(pairs: list[tuple[dict, dict]]) -> str:
    """Phase retrieval's twin images per pair (``mode``: 0, 180 or none, where recorded): the share that kept their
    mode and the share that swapped between 0 and 180."""
    modes = [(p["mode"], q["mode"]) for p, q in pairs if "mode" in p and "mode" in q]
    if not modes:
        return "| mode | 0 | n/a | n/a |"
    same = sum(a == b for a, b in modes) / len(modes)
    swapped = sum({a, b} == {"0", "180"} for a, b in modes) / len(modes)
    return f"| mode | {len(modes)} | {same:.3f} | {swapped:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--new", nargs="+", required=True)
    ap.add_argument("--metrics", default=DEFAULT_METRICS)
    ap.add_argument("--paired", action="store_true", help="the k-th runs of both sides share their random numbers: "
                    "also compare each particle with its twin")
    ap.add_argument("--within", type=float, default=0.1, help="--paired: the PSNR gap (dB) counted as ending together")
    args = ap.parse_args()
    if args.paired and len(args.base) != len(args.new):
        raise SystemExit(f"--paired pairs the k-th runs: give as many --new runs as --base runs "
                         f"({len(args.base)} and {len(args.new)})")
    sides = {"BASE": (args.base, [load(r) for r in args.base]), "NEW": (args.new, [load(r) for r in args.new])}
    if args.paired:  # refused before anything is printed
        pairs, alone = twin_pairs(sides["BASE"][1], sides["NEW"][1], list(zip(args.base, args.new)))
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
                    f"{np.mean([np.mean(n[i]) for i in common]):.4f} | {diff.mean():+.5f} | [{lo:+.5f}, {hi:+.5f}] | "
                    f"{b_drop} / {n_drop} |")
    print(f"\nBASE {len(args.base)} run(s), NEW {len(args.new)} run(s); particles pooled per image over each side's runs")
    print("| metric | runs measured (BASE / NEW) | images | BASE | NEW | NEW - BASE | 95% CI | particles left out "
          "(BASE / NEW: not finished or not finite) |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.paired:
        table = [row for m in args.metrics.split(",") if (row := paired_row(pairs, m, args.within))]
        print(f"\nParticles paired with their twin (same random numbers): run k of BASE with run k of NEW; "
              f"{len(pairs)} pairs finished on both sides, {alone} particle(s) without a twin\n"
              f"| metric | pairs | median abs(NEW - BASE) | share within {args.within:g} dB (PSNR) |\n|---|---|---|---|")
        print("\n".join(table))
        print("\n| twin image | pairs | same mode (0, 180 or none) | swapped 0 <-> 180 |\n|---|---|---|---|")
        print(mode_row(pairs))


if __name__ == "__main__":
    main()
