"""Turn results/<name>/metrics.json (+ timing.json) of one or more runs into a table.

    python scripts/parse_metrics.py results/exp0_* [--csv out.csv] [--plot out.png]

A sweep folder (python posterior_sample.py -m ...) contributes its run<NNN>/ jobs.

Columns: images, particles per image, best-of-n (an oracle: chosen with the ground truth) and mean-of-n
of each metric, NaN particles, seconds per image, used annealing levels, peak memory per phase.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def runs_in(paths: list[Path]) -> list[Path]:
    """Results folders: each given folder with a metrics.json, or the run<NNN>/ jobs of a sweep folder."""
    found = []
    for p in paths:
        if (p / "metrics.json").is_file():
            found.append(p)
        else:
            found += sorted(q.parent for q in p.glob("run*/metrics.json"))
    return found


def row(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else {}
    name = f"{run.parent.name}/{run.name}" if run.name.startswith("run") and run.name[3:].isdigit() else run.name
    out = {"run": name, "status": metrics["status"], "images": metrics["num_images_done"],
           "particles": metrics["particles_per_image"], "nan_particles": metrics["nonfinite_particles"]}
    for m, agg in metrics["aggregate"].items():
        out[f"{m}_best"], out[f"{m}_mean"] = agg["best_of_n"], agg["mean_of_n"]
    out["sec_per_image"] = timing.get("per_image_sec")
    out["used_levels"] = timing.get("used_anneal_steps")
    for phase, peak in (metrics.get("peak_memory") or {}).items():
        out[f"peak_{phase}_GB"] = peak / 1e9 if isinstance(peak, (int, float)) else None
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="results folders")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--plot", type=Path, help="bar chart of best-of-n and mean-of-n PSNR")
    args = ap.parse_args()
    rows = [row(r) for r in runs_in(args.runs)]
    if not rows:
        raise SystemExit("no metrics.json in the given folders (or in their run*/ sweep jobs)")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
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
