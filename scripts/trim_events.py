#!/usr/bin/env python3
"""Shrink a run's events.jsonl for storage in the repository, keeping what the reports read:

    python scripts/trim_events.py RUN_DIR [RUN_DIR ...]

Per level event, the per-particle lists (``particles``, ``loss_per_particle``, ``acceptance_per_particle``) are
dropped and each measurement's ``repulsion.pair_dist`` keeps only its ``mean`` (to 5 decimals); every other field (sigma, step,
loss summary, elapsed_sec, phase, K2 and pruning records) is kept. ``scripts/suite_report.py`` and ``scripts/
parse_metrics.py --modes`` give the same tables and plots from a trimmed file. The file is rewritten in place.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PER_PARTICLE = ("particles", "loss_per_particle", "acceptance_per_particle")


def trim(event: dict) -> dict:
    if event.get("event") != "level":
        return event
    out = {k: v for k, v in event.items() if k not in PER_PARTICLE}
    pair = (out.get("repulsion") or {}).get("pair_dist")
    if pair:
        out["repulsion"] = {**out["repulsion"], "pair_dist": {g: {"mean": round(d["mean"], 5)} for g, d in pair.items()}}
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for run in map(Path, sys.argv[1:]):
        path = run / "events.jsonl"
        if not path.is_file():
            sys.exit(f"trim_events: {path} does not exist")
        lines = [json.dumps(trim(json.loads(line))) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
