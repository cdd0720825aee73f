"""Diagnose results/<name>/events.jsonl: does sigma propagate, decrease, and end without noise?

    python scripts/check_events.py results/<name>

For each (images, run) stream of level events: next_sigma of a level equals sigma of the next level,
sigma never increases, the last level has next_sigma = 0; also counts levels, NaN particles and the
mean acceptance of MH kernels. Exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    streams: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(args.run.glob("events*.jsonl")):  # events.jsonl, and events.rank<r>.jsonl under torchrun
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") == "level":
                streams[(tuple(ev["images"]), ev["run"])].append(ev)
    ok = True
    for (images, run), evs in streams.items():
        propagates = all(abs(a["next_sigma"] - b["sigma"]) < 1e-9 * max(1.0, b["sigma"]) for a, b in zip(evs, evs[1:]))
        monotone = all(ev["next_sigma"] <= ev["sigma"] for ev in evs)
        ends_clean = evs[-1]["next_sigma"] == 0
        nan = sum(len(ev["nonfinite"]) for ev in evs)
        acc = [ev["acceptance"]["mean"] for ev in evs if ev.get("acceptance") and ev["acceptance"].get("n")]
        acc_txt = f", mean acceptance {sum(acc) / len(acc):.3f}" if acc else ""
        print(f"images {images[0]}-{images[1]} run {run}: {len(evs)} levels, propagates={propagates}, "
              f"monotone={monotone}, last next_sigma=0: {ends_clean}, NaN particles {nan}{acc_txt}")
        ok &= propagates and monotone and ends_clean
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
