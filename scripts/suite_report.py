#!/usr/bin/env python3
"""The experiment suite's report: tables and plots from a results folder of commands_gpu/ (or commands_tpu/) runs.

    python scripts/suite_report.py RESULTS [--out DIR]

RESULTS holds run folders (and sweep folders) as the suite names them: ``exp<k>_<name>_<N>[_<prior>][_tpu]`` and the
K2 A/B's ``k2_ab_<N>...``, ``k2_ab_quality_<N>...``, ``k2_ab_speed_<N>...``. Written to DIR (default RESULTS/report):

- ``report.md``: the Exp 0-5 table (per run: images, the twin-aware best of n, an **oracle**, beside the non-oracle
  pick, mean with its 95% bootstrap interval over images, std, success and coverage rates with Wilson intervals,
  final pairwise distance, time and peak memory per phase, sampling seconds per image, levels used, hard data
  consistency's AdamW updates per particle and its share of sampling) and the K2 A/B table (each profile against the
  preset of the same slice: dPSNR with its interval, time and level ratios, the log's verdict);
- ``experiments.csv``, ``k2_ab.csv``: the same tables;
- plots (PNG): ``psnr_vs_time.png`` (oracle best and non-oracle pick against seconds per image, one point per run),
  ``memory_per_phase.png``, ``pair_distance_vs_sigma.png`` (mean pairwise distance per level, Exp 0 vs Exp 1 and any
  run that logs it), ``sigma_vs_level.png`` (the levels of the K2 A/B runs: preset vs K2), ``success_rate.png``.

A plot with nothing to show (no peak memory on the CPU, no K2 run) is left out and the report says so.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parse_metrics import (compare_paths, events, is_run, job_name, modes_row, read_json,  # noqa: E402
                           sweep_jobs)

K2_RUN = re.compile(r"k2_ab_(quality|speed)_(\d+)(.*)")
EXP_RUN = re.compile(r"exp\d_.*")
MISSING = "n/a"


def runs_in(root: Path) -> list[Path]:
    """The run folders directly under ``root`` (the jobs of a sweep folder are not experiments of the table)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and is_run(p))


def experiment_row(run: Path) -> dict[str, Any]:
    """parse_metrics' Exp 1-3 row, with the cost columns of the suite."""
    row = modes_row(run, job_name(run))
    metrics, timing = read_json(run / "metrics.json"), read_json(run / "timing.json")
    dc = metrics.get("hard_dc") or {}
    row.update({"sampling_sec_per_image": timing.get("sampling_per_image_sec"),
                "used_levels": timing.get("used_anneal_steps"),
                "hard_dc_updates_per_particle": dc.get("steps_per_particle_mean"),
                "hard_dc_share_of_sampling": dc.get("share_of_sampling")})
    return row


def k2_rows(root: Path) -> list[dict[str, Any]]:
    """Each K2 profile run against the preset run of its slice (k2_ab_<N><suffix>), by parse_metrics --compare."""
    rows = []
    for run in runs_in(root):
        match = K2_RUN.fullmatch(run.name)
        base = root / f"k2_ab_{match.group(2)}{match.group(3)}" if match else None
        if base is None:
            continue
        if not base.is_dir():
            rows.append({"run": run.name, "base": base.name, "verdict": f"no preset run {base.name}"})
            continue
        result = compare_paths(base, run, None, force=False)["comparisons"][0]
        psnr = (result.get("metrics") or {}).get("psnr") or {}
        mean = psnr.get("mean") or {}
        cost = result.get("cost") or {}
        rows.append({"run": run.name, "base": base.name, "images": psnr.get("images"),
                     "dpsnr": mean.get("diff"), "dpsnr 95% CI": mean.get("ci"),
                     "time_ratio": (cost.get("time") or {}).get("ratio"),
                     "steps_ratio": (cost.get("steps") or {}).get("ratio"), "verdict": result.get("verdict")})
    return rows


def level_series(run: Path, key: str) -> dict[float, list[float]] | list[tuple[int, float]]:
    """From the level events: ``sigma`` -> [(step, sigma)] of the first stream; ``pair_dist`` -> {sigma: [mean pair
    distance of each measurement]}."""
    if key == "sigma":
        first = None
        out = []
        for e in events(run):
            if e.get("event") != "level":
                continue
            stream = (str(e.get("images")), e.get("run"))
            first = first or stream
            if stream == first:
                out.append((e["step"], e["sigma"]))
        return out
    dist: dict[float, list[float]] = {}
    for e in events(run):
        pair = (e.get("repulsion") or {}).get("pair_dist") if e.get("event") == "level" else None
        for d in (pair or {}).values():
            if isinstance(d, dict) and isinstance(d.get("mean"), (int, float)):
                dist.setdefault(e["sigma"], []).append(d["mean"])
    return dist


def number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def plots(root: Path, out: Path, rows: list[dict[str, Any]], k2: list[dict[str, Any]]) -> list[str]:
    """Write the plots; returns one line per plot (written, or why not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    said = []

    def save(fig: Any, name: str, what: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        said.append(f"![{what}]({name})")

    timed = [r for r in rows if number(r.get("sampling_sec_per_image")) is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, marker, label in (("psnr_twin_aware_best (oracle)", "o", "best of n (oracle)"),
                                   ("pick_psnr_twin_aware (no oracle)", "x", "lowest-loss pick (no oracle)")):
            pts = [(r["sampling_sec_per_image"], r[key], r["run"]) for r in timed if number(r.get(key)) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6)
        ax.set_xlabel("sampling seconds per image")
        ax.set_ylabel("psnr_twin_aware (dB)")
        ax.legend(fontsize=7)
        save(fig, "psnr_vs_time.png", "PSNR vs seconds per image")
    mem = [(r["run"], {k[5:-3]: r[k] for k in r if k.startswith("peak_") and number(r[k]) is not None}) for r in rows]
    mem = [(name, phases) for name, phases in mem if phases]
    if mem:
        phases = list(dict.fromkeys(p for _, ph in mem for p in ph))
        fig, ax = plt.subplots(figsize=(max(6, len(mem) * 0.8), 4))
        width = 0.8 / len(phases)
        for k, phase in enumerate(phases):
            ax.bar([i + k * width for i in range(len(mem))], [ph.get(phase, 0) for _, ph in mem], width, label=phase)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mem))], [n for n, _ in mem], rotation=45, ha="right",
                      fontsize=6)
        ax.set_ylabel("peak memory (GB)")
        ax.legend(fontsize=7)
        save(fig, "memory_per_phase.png", "peak memory per phase")
    else:
        said.append("memory_per_phase.png: no run recorded peak memory (the CPU does not track it)")
    dists = [(r.name, level_series(r, "pair_dist")) for r in runs_in(root) if EXP_RUN.fullmatch(r.name)]
    dists = [(n, d) for n, d in dists if d]
    if dists:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, d in dists:
            sig = sorted(d, reverse=True)
            ax.plot(sig, [sum(d[s]) / len(d[s]) for s in sig], label=name)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("sigma (level)")
        ax.set_ylabel("mean pairwise RMS distance")
        ax.legend(fontsize=6)
        save(fig, "pair_distance_vs_sigma.png", "pairwise distance vs sigma")
    levels = [(r.name, level_series(r, "sigma")) for r in runs_in(root) if r.name.startswith("k2_ab")]
    levels = [(n, s) for n, s in levels if s]
    if levels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, series in levels:
            ax.plot([s for s, _ in series], [v for _, v in series], marker=".", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("level")
        ax.set_ylabel("sigma")
        ax.legend(fontsize=6)
        save(fig, "sigma_vs_level.png", "sigma vs level, preset vs K2")
    else:
        said.append("sigma_vs_level.png: no K2 A/B run (k2_ab_*) in the folder")
    rated = [r for r in rows if number(r.get("success_rate")) is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(max(6, len(rated) * 0.8), 4))
        ax.bar(range(len(rated)), [r["success_rate"] for r in rated])
        for i, r in enumerate(rated):
            ci = r.get("success 95% CI (Wilson)")
            if isinstance(ci, str) and ci.startswith("["):
                lo, hi = (float(v) for v in ci.strip("[]").split(","))
                ax.plot([i, i], [lo, hi], color="black")
        ax.set_xticks(range(len(rated)), [r["run"] for r in rated], rotation=45, ha="right", fontsize=6)
        ax.set_ylabel("success rate (0 or 180 found), 95% Wilson")
        ax.set_ylim(0, 1.05)
        save(fig, "success_rate.png", "success rate per experiment")
    return said


def shown(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(shown(x) for x in v) + "]"
    return str(v)


def table(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(shown(r.get(c)) for c in cols) + " |" for r in rows)]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({c: shown(r.get(c)) for c in cols} for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="the suite's results folder (SAVE_DIR)")
    ap.add_argument("--out", type=Path, help="where to write the report (default RESULTS/report)")
    args = ap.parse_args()
    if not args.results.is_dir():
        sys.exit(f"suite_report: {args.results} is not a folder")
    runs = [r for r in runs_in(args.results) if EXP_RUN.fullmatch(r.name)]
    sweeps = [p for p in args.results.iterdir() if p.is_dir() and sweep_jobs(p)]
    if not runs and not any(r.name.startswith("k2_ab") for r in runs_in(args.results)):
        sys.exit(f"suite_report: {args.results} holds no suite run (exp<k>_... or k2_ab_...)")
    out = args.out or args.results / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [experiment_row(r) for r in runs]
    k2 = k2_rows(args.results)
    write_csv(rows, out / "experiments.csv")
    write_csv(k2, out / "k2_ab.csv")
    lines = [f"# Suite report: {args.results}", "", "## Exp 0-5", "",
             "Best of n is an oracle (chosen per image with the ground truth); the pick is the particle with the lowest "
             "measurement loss (no oracle). Intervals: 95%, bootstrap over images (means), Wilson (rates).", ""]
    lines += table(rows) if rows else ["(no exp run)"]
    lines += ["", "## K2 A/B (each profile against the preset of its slice; the log's rule)", ""]
    lines += table(k2) if k2 else ["(no K2 A/B run)"]
    if sweeps:
        lines += ["", "Sweeps: " + ", ".join(p.name for p in sweeps) + " (python scripts/parse_metrics.py --compare "
                  "BASE SWEEP ranks their jobs)."]
    lines += ["", "## Plots", "", *plots(args.results, out, rows, k2)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
