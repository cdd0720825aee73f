"""Diagnose results/<name>/events.jsonl: does sigma propagate, decrease, and end without noise?

    python scripts/check_events.py results/<name>      (a run, or a sweep folder: each run<NNN>/ job)

For each (images, run) stream of level events: next_sigma of a level equals sigma of the next level,
sigma never increases except right after a K2 ``reheat`` event of that level, the last level has next_sigma = 0
(with K2: an early stop, at the threshold, or the preset's last level); also counts the levels used (and, with K2,
its ``mode: used`` records, which must agree), reheats, NaN particles and the mean acceptance of MH kernels. In a run that did not complete (status running, stale, interrupted, failed,
or no metrics.json) the stream it stopped in is reported as unfinished, with its last level, and is not an
error. Exits 1 if a check fails, or if a folder does not exist or is not a results folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.parse_metrics import find_runs, job_name, read_json, run_status  # noqa: E402


def level_events(run: Path, complete: bool) -> tuple[dict[tuple, list[dict]], set[tuple], list[str], bool]:
    """(streams, streams a file ends in, notes, ok) from events.jsonl and the events.rank<r>.jsonl of torchrun.

    A stream holds the level events and the schedule's events (``k2``, ``reheat``) of one (images, run).

    A line that is not JSON is an error, except the last line of a run that did not complete: it was cut off.
    """
    streams: dict[tuple, list[dict]] = defaultdict(list)
    last, notes, ok = set(), [], True
    for path in sorted(run.glob("events*.jsonl")):
        lines = path.read_text().splitlines()
        key = None
        for n, line in enumerate(lines, 1):
            try:
                ev = json.loads(line)
            except json.JSONDecodeError as err:
                if n == len(lines) and not complete:
                    notes.append(f"{path.name}: last line cut off (the run stopped while writing it)")
                else:
                    notes.append(f"{path.name} line {n}: not valid JSON ({err})")
                    ok = False
                continue
            if ev.get("event") in ("level", "k2", "reheat"):
                key = (tuple(ev["images"]), ev["run"])
                streams[key].append(ev)
        if key is not None:
            last.add(key)
    return streams, last, notes, ok


def configured_levels(run: Path) -> int | None:
    """The annealing levels of the run's config.yaml (written at its start, before any timing.json)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    return ((cfg.get("sampler") or {}).get("annealing_scheduler_config") or {}).get("num_steps")


def check(run: Path, prefix: str) -> bool:
    """Print the checks of one run's streams; False if one fails."""
    status, note = run_status(run)
    complete = status == "complete"
    if not complete:
        print(f"{prefix}status {status}: {note}")
    streams, ends, notes, ok = level_events(run, complete)
    for line in notes:
        print(prefix + line)
    if not streams:
        print(f"{prefix}no level events in events*.jsonl" + (" of a complete run" if complete else " yet"))
        return ok and not complete
    total = read_json(run / "timing.json").get("anneal_steps_cfg") or configured_levels(run)
    for (images, r), stream in streams.items():
        evs = [ev for ev in stream if ev["event"] == "level"]
        reheats = {ev["step"] for ev in stream if ev["event"] == "reheat"}
        k2 = [ev for ev in stream if ev["event"] == "k2"]
        used = sum(ev["mode"] == "used" for ev in k2)
        propagates = all(abs(a["next_sigma"] - b["sigma"]) < 1e-9 * max(1.0, b["sigma"]) for a, b in zip(evs, evs[1:]))
        monotone = all(ev["next_sigma"] <= ev["sigma"] or ev["step"] in reheats for ev in evs)
        ends_clean = evs[-1]["next_sigma"] == 0
        nan = sum(len(ev["nonfinite"]) for ev in evs)
        k2_txt, k2_ok = "", True
        if k2:
            stop = [ev for ev in k2 if ev["mode"] == "stop"]
            k2_ok = used == len(evs) and (not stop or stop[-1]["step"] == evs[-1]["step"])
            k2_txt = f", K2 used {used} levels" + (" (disagrees with the level events)" if used != len(evs) else "")
            if stop and stop[-1]["early_stop"]:
                at = stop[-1]["sigma"] <= stop[-1]["threshold"] * (1 + 1e-9)
                k2_ok &= at
                k2_txt += f", early stop at sigma {stop[-1]['sigma']:.4g} (threshold {stop[-1]['threshold']:.4g})" + (
                    "" if at else ": ABOVE the threshold")
            k2_txt += f", reheats {len(reheats)}"
        acc = [ev["acceptance"]["mean"] for ev in evs if ev.get("acceptance") and ev["acceptance"].get("n")]
        acc_txt = f", mean acceptance {sum(acc) / len(acc):.3f}" if acc else ""
        head = f"{prefix}images {images[0]}-{images[1]} run {r}: "
        if not ends_clean and not complete and (images, r) in ends:  # the run stopped in this stream
            of = f" of {total}" if total else ""
            print(f"{head}unfinished (last level {evs[-1]['step'] + 1}{of}), propagates={propagates}, "
                  f"monotone={monotone}, NaN particles {nan}{acc_txt}")
            ok &= propagates and monotone
            continue
        print(f"{head}{len(evs)} levels, propagates={propagates}, monotone={monotone}, "
              f"last next_sigma=0: {ends_clean}, NaN particles {nan}{acc_txt}{k2_txt}")
        ok &= propagates and monotone and ends_clean and k2_ok
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="results folders (runs or sweeps)")
    args = ap.parse_args()
    runs = [run for _, jobs in find_runs(args.runs) for run in jobs]
    ok = True
    for run in runs:
        ok &= check(run, f"{job_name(run)}: " if len(runs) > 1 else "")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
