"""The results folder of a run: per-image JSON, metrics.json, eval.md and timing.json.

Everything is rewritten (atomically) each time an image finishes, so an interrupted run leaves the
metrics of every finished image. Metrics of a stopped (NaN/Inf) particle are null and excluded from
the statistics; the statistics say how many particles they cover.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from utils.events import dump_json
from utils.metrics import HIGHER_IS_BETTER


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
    """Collects finished images and keeps the result files up to date."""

    def __init__(self, root: Path, header: dict[str, Any], metric_names: list[str]):
        self.root, self.header, self.metric_names = root, header, metric_names
        self.images: list[dict[str, Any]] = []
        (root / "per_image").mkdir(parents=True, exist_ok=True)

    def add_image(self, record: dict[str, Any]) -> None:
        """Record one finished image: {'index', 'name', 'particles': [{'sample', 'status', <metric>: value}]}."""
        record["summary"] = {m: particle_stats([p.get(m) for p in record["particles"]], HIGHER_IS_BETTER[m])
                             for m in self.metric_names}
        record["nonfinite_particles"] = sum(p["status"] != "ok" for p in record["particles"])
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

    def write(self, status: str, extra: dict[str, Any] | None = None) -> None:
        """metrics.json and eval.md for the images finished so far (by any process)."""
        self.load()
        metrics = {"status": status, **self.header, **(extra or {}), "num_images_done": len(self.images),
                   "nonfinite_particles": sum(img["nonfinite_particles"] for img in self.images),
                   "aggregate": self.aggregate(), "images": self.images}
        dump_json(metrics, self.root / "metrics.json")
        (self.root / "eval.md").write_text(self.markdown(status))

    def markdown(self, status: str) -> str:
        agg = self.aggregate()
        lines = [f"# {self.header.get('name', 'run')} ({status})", "",
                 f"{len(self.images)} image(s), {self.header.get('particles_per_image')} particle(s) each; "
                 f"best-of-n is an oracle (chosen per image and metric with the ground truth).", "",
                 "| metric | best-of-n | mean-of-n | mean std over particles | images |",
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
        nonfinite = sum(img["nonfinite_particles"] for img in self.images)
        if nonfinite:
            lines.append(f"\n{nonfinite} particle(s) stopped for NaN/Inf and excluded from the scores.")
        return "\n".join(lines) + "\n"
