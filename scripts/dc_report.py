#!/usr/bin/env python3
"""Exp 4 (hard data consistency) next to Exp 2: paired differences over images and, per particle, the change in
PSNR against the change in measurement loss (does a lower loss mean a better image on this task?).

    python scripts/dc_report.py BASE NEW [--out DIR] [--json]

BASE and NEW are two run folders of posterior_sample.py on the same images (typically +experiment=exp2_pruning and
+experiment=exp4_optimization). Printed as markdown:

1. **Scores**, NEW - BASE per image, mean over images with a 95% bootstrap interval (images resampled): the best of n
   per image (an **oracle**: chosen with the ground truth), the mean over particles, and for operators with a twin
   (phase retrieval) the non-oracle pick (lowest meas_err, scored twin-aware) and the success rate (Wilson interval).
2. **Cost**: sampling time, the phase that holds the levels after the start time (BASE ``refine`` / NEW ``optimize``)
   with its peak memory, and NEW's optimisation counts (AdamW updates in total and per particle, levels accepted,
   stopping rules, the optimiser's wall time and its share of sampling).
3. **Loss vs PSNR per particle**: particles present and finished in both runs (the same seeds: particle k of image i),
   the relative change of the measurement loss ||A x - y||^2 (meas_err^2) against the change of PSNR (twin-aware where
   the operator has a twin); the quadrant counts, the share of particles whose loss fell while the PSNR fell too, and
   the Pearson and Spearman correlations. With ``--out`` the pairs go to ``dc_pairs.csv`` and the scatter plot to
   ``dc_scatter.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parse_metrics import bootstrap, events, split_times, wilson  # noqa: E402
from utils.metrics import HIGHER_IS_BETTER as HIGHER  # noqa: E402


def load(run: Path) -> dict[str, Any]:
    """metrics.json and timing.json of a finished run; a clear error for anything else."""
    for name in ("metrics.json", "timing.json"):
        if not (run / name).is_file():
            sys.exit(f"dc_report: {run} has no {name}: give the folder of a posterior_sample.py run")
    metrics = json.loads((run / "metrics.json").read_text())
    if not metrics.get("images"):
        sys.exit(f"dc_report: {run} has no finished image (status {metrics.get('status')})")
    return {"metrics": metrics, "timing": json.loads((run / "timing.json").read_text()), "path": run}


def per_image(run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {img["index"]: img for img in run["metrics"]["images"]}


def score_rows(base: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired NEW - BASE rows over the images both finished (an image with no scored particle in either is left out)."""
    b, n = per_image(base), per_image(new)
    shared = sorted(set(b) & set(n))
    metrics = [m for m in HIGHER if all(m in b[i]["summary"] for i in shared) and all(m in n[i]["summary"] for i in shared)]
    rows = []
    for m in metrics:
        for kind, label in (("best", "best of n (oracle)"), ("mean", "mean over particles")):
            kept = [i for i in shared if b[i]["summary"][m]["n"] and n[i]["summary"][m]["n"]]
            if not kept:
                continue
            vb = np.array([b[i]["summary"][m][kind] for i in kept], dtype=float)
            vn = np.array([n[i]["summary"][m][kind] for i in kept], dtype=float)
            rows.append({"score": f"{m} {label}", "images": len(kept), "base": vb.mean(), "new": vn.mean(),
                         "diff": (vn - vb).mean(), "ci": bootstrap(vn - vb), "higher_is_better": HIGHER[m]})
    twin = [i for i in shared if "modes" in b[i] and "modes" in n[i]]
    if twin:
        picked = [i for i in twin if b[i]["modes"]["pick"] and n[i]["modes"]["pick"]]
        vb = np.array([b[i]["modes"]["pick"]["psnr_twin_aware"] for i in picked], dtype=float)
        vn = np.array([n[i]["modes"]["pick"]["psnr_twin_aware"] for i in picked], dtype=float)
        if picked:
            rows.append({"score": "psnr_twin_aware of the lowest-meas_err pick (no oracle)", "images": len(picked),
                         "base": vb.mean(), "new": vn.mean(), "diff": (vn - vb).mean(), "ci": bootstrap(vn - vb),
                         "higher_is_better": True})
        hits = [sum(bool(run[i]["modes"]["success"]) for i in twin) for run in (b, n)]
        rows.append({"score": "success rate (0 or 180 found; Wilson intervals)", "images": len(twin),
                     "rates": [h / len(twin) for h in hits], "cis": [list(wilson(h, len(twin))) for h in hits]})
    return rows


def phase(run: dict[str, Any], name: str) -> dict[str, Any]:
    return run["timing"].get("phases", {}).get(name, {})


def cost(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Sampling time, the after-start phase (BASE refine, NEW optimize) and NEW's optimisation counts."""
    start = next((e["step"] for e in events(new["path"]) if e.get("event") == "phase" and e.get("phase") == "optimize"),
                 None)
    out = {"start_step": start, "base_from_start_sec": None, "new_from_start_sec": None,
           "base_sampling_sec": base["timing"].get("sampling_wall_sec"),
           "new_sampling_sec": new["timing"].get("sampling_wall_sec"),
           "base_refine": phase(base, "refine"), "new_optimize": phase(new, "optimize"),
           "hard_dc": new["metrics"].get("hard_dc")}
    if start is not None:  # the same levels in both runs: from the optimisation's first level on
        out["base_from_start_sec"] = (split_times(base["path"], start) or (None, None))[1]
        out["new_from_start_sec"] = (split_times(new["path"], start) or (None, None))[1]
    if not out["hard_dc"]:
        sys.exit(f"dc_report: NEW ({new['path']}) ran no hard data consistency (metrics.json has no hard_dc): "
                 "give the Exp 4 run as NEW")
    return out


def particle_pairs(base: dict[str, Any], new: dict[str, Any], psnr_key: str) -> list[dict[str, Any]]:
    """Particles finished in both runs: (image, sample), relative loss change, PSNR change."""
    b, n = per_image(base), per_image(new)
    pairs = []
    for i in sorted(set(b) & set(n)):
        pb = {p["sample"]: p for p in b[i]["particles"] if p["status"] == "ok"}
        for p in n[i]["particles"]:
            q = pb.get(p["sample"])
            if p["status"] != "ok" or q is None or None in (p.get(psnr_key), q.get(psnr_key), p.get("meas_err"),
                                                             q.get("meas_err")):
                continue
            loss_b, loss_n = q["meas_err"] ** 2, p["meas_err"] ** 2
            pairs.append({"image": i, "sample": p["sample"], "loss_base": loss_b, "loss_new": loss_n,
                          "rel_loss_change": (loss_n - loss_b) / loss_b if loss_b > 0 else math.nan,
                          "psnr_base": q[psnr_key], "psnr_new": p[psnr_key], "psnr_change": p[psnr_key] - q[psnr_key]})
    return pairs


def ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    return r


def relation(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Quadrant counts and correlations of (relative loss change, PSNR change)."""
    ok = [p for p in pairs if math.isfinite(p["rel_loss_change"])]
    x = np.array([p["rel_loss_change"] for p in ok])
    y = np.array([p["psnr_change"] for p in ok])
    out: dict[str, Any] = {"particles": len(ok),
                           "loss_down_psnr_up": int(((x < 0) & (y > 0)).sum()),
                           "loss_down_psnr_down": int(((x < 0) & (y <= 0)).sum()),
                           "loss_up_psnr_up": int(((x >= 0) & (y > 0)).sum()),
                           "loss_up_psnr_down": int(((x >= 0) & (y <= 0)).sum())}
    if len(ok) > 2 and x.std() > 0 and y.std() > 0:
        out["pearson"] = float(np.corrcoef(x, y)[0, 1])
        out["spearman"] = float(np.corrcoef(ranks(x), ranks(y))[0, 1])
    if len(ok):
        worst = min(ok, key=lambda p: p["psnr_change"])
        out["worst"] = {k: worst[k] for k in ("image", "sample", "rel_loss_change", "psnr_change")}
    return out


def scatter(pairs: list[dict[str, Any]], path: Path, psnr_key: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * p["rel_loss_change"] for p in pairs]
    y = [p["psnr_change"] for p in pairs]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(x, y, s=10, alpha=0.6)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("measurement loss change, NEW vs BASE (%)")
    ax.set_ylabel(f"{psnr_key} change, NEW - BASE (dB)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(base: dict[str, Any], new: dict[str, Any], rows: list[dict[str, Any]], spend: dict[str, Any],
             rel: dict[str, Any], psnr_key: str) -> str:
    out = [f"# {new['path'].name} (NEW) vs {base['path'].name} (BASE)", "",
           "NEW - BASE per image; mean over images with a 95% bootstrap interval. Best of n is an oracle (chosen per "
           "image with the ground truth).", "", "| score | images | BASE | NEW | NEW - BASE [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        if "rates" in r:
            cells = [f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for v, ci in zip(r["rates"], r["cis"])]
            out.append(f"| {r['score']} | {r['images']} | {cells[0]} | {cells[1]} | {r['rates'][1] - r['rates'][0]:+.3f} |")
        else:
            out.append(f"| {r['score']} | {r['images']} | {r['base']:.4f} | {r['new']:.4f} | {r['diff']:+.4f} "
                       f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] |")
    dc, br, no = spend["hard_dc"], spend["base_refine"], spend["new_optimize"]
    gib = lambda rec: num(rec["peak_memory_bytes"] / 2**30, 2) if "peak_memory_bytes" in rec else "n/a"  # noqa: E731
    out += ["", "| cost | BASE | NEW |", "|---|---|---|",
            f"| sampling wall time (s) | {num(spend['base_sampling_sec'], 1)} | {num(spend['new_sampling_sec'], 1)} |",
            f"| levels {spend['start_step']} to the end, the same in both (s, from the level events) | "
            f"{num(spend['base_from_start_sec'], 1)} | {num(spend['new_from_start_sec'], 1)} |",
            "| levels after the start time: phase (BASE's refine starts after its prune level) | refine | optimize |",
            f"| ... wall time (s) | {num(br.get('wall_sec'), 1)} | {num(no.get('wall_sec'), 1)} |",
            f"| ... levels | {num(br.get('steps'))} | {num(no.get('steps'))} |",
            f"| ... peak memory (GiB) | {gib(br)} | {gib(no)} |",
            f"| optimiser wall time (s), share of sampling | | {num(dc.get('wall_sec'), 1)}, "
            f"{num(dc.get('share_of_sampling'), 3)} |",
            f"| AdamW updates: total, per particle mean / max, most in one level | | {dc['steps_total']}, "
            f"{dc['steps_per_particle_mean']:.1f} / {dc['steps_per_particle_max']}, {dc['steps_per_level_max']} |",
            f"| particle-levels optimised / accepted | | {dc['levels']} / {dc['accepted_levels']} |",
            "| stops (tol / rise / max) | | " + " / ".join(str(dc.get(f"stop_{s}", 0)) for s in ("tol", "rise", "max"))
            + " |"]
    out += ["", f"Per particle ({rel['particles']} finished in both runs, the same seeds): measurement loss "
                f"||A x - y||^2 change vs {psnr_key} change. With pruning, NEW prunes on its optimised losses, so the "
                "particles kept in both runs are a selected subset.", "",
            "| loss down, PSNR up | loss down, PSNR down | loss up, PSNR up | loss up, PSNR down | Pearson | Spearman |",
            "|---|---|---|---|---|---|",
            f"| {rel['loss_down_psnr_up']} | {rel['loss_down_psnr_down']} | {rel['loss_up_psnr_up']} | "
            f"{rel['loss_up_psnr_down']} | {num(rel.get('pearson'))} | {num(rel.get('spearman'))} |"]
    if "worst" in rel:
        w = rel["worst"]
        out.append(f"\nLowest PSNR change: image {w['image']} particle {w['sample']}, {w['psnr_change']:+.2f} dB at a "
                   f"loss change of {100 * w['rel_loss_change']:+.1f}%.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="the Exp 2 run folder (BASE)")
    ap.add_argument("new", type=Path, help="the Exp 4 run folder (NEW)")
    ap.add_argument("--out", type=Path, help="folder for dc_pairs.csv and dc_scatter.png")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args()
    base, new = load(args.base), load(args.new)
    twin = "modes" in new["metrics"]
    psnr_key = "psnr_twin_aware" if twin else "psnr"
    rows, spend = score_rows(base, new), cost(base, new)
    pairs = particle_pairs(base, new, psnr_key)
    rel = relation(pairs)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "dc_pairs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(pairs[0]) if pairs else ["image"])
            w.writeheader()
            w.writerows(pairs)
        scatter(pairs, args.out / "dc_scatter.png", psnr_key, f"{new['path'].name} vs {base['path'].name}: "
                f"{rel['particles']} particles")
    if args.json:
        print(json.dumps({"scores": rows, "cost": spend, "relation": rel}, indent=2))
    else:
        print(markdown(base, new, rows, spend, rel, psnr_key))


if __name__ == "__main__":
    main()
