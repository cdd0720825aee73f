"""Run observers: the JSONL event log and the per-phase wall-time / peak-memory timer."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from utils.device import peak_memory, reset_peak_memory, synchronize


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def dump_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (tmp file + rename), NaN written as null, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False))
    tmp.replace(path)


class EventLog:
    """Line-buffered JSON lines; every line carries the seconds since the log was opened."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1, encoding="utf-8")
        self.t0 = time.perf_counter()

    def write(self, event: dict[str, Any]) -> None:
        record = {"elapsed_sec": round(time.perf_counter() - self.t0, 4), **event}
        self.file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")

    def close(self) -> None:
        self.file.close()


def drop_unfinished(path: Path, finished: set[int]) -> int:
    """Remove from an events file the lines of chunks with an image not in ``finished`` (a resumed run samples those
    images again, and their new lines replace these); a line cut off by a kill goes too. Returns the lines removed."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            images = json.loads(line).get("images")
        except json.JSONDecodeError:
            dropped += 1
            continue
        if images is None or all(i in finished for i in range(images[0], images[1] + 1)):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def summarise(values: list[float]) -> dict[str, float | int | None]:
    """min / median / max / mean of the finite values, and how many were not finite."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return {"n": 0, "nonfinite": len(values)}
    n = len(finite)
    median = finite[n // 2] if n % 2 else 0.5 * (finite[n // 2 - 1] + finite[n // 2])
    return {"n": n, "nonfinite": len(values) - n, "min": finite[0], "median": median, "max": finite[-1],
            "mean": sum(finite) / n}


class PhaseTimer:
    """Wall time, steps and peak memory per phase ('explore', 'refine', 'optimize').

    Entering a phase synchronises the device (so the time of queued work lands in the phase that
    queued it) and resets the peak-memory counter; totals accumulate over image chunks.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.start = 0.0

    def enter(self, name: str | None) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self.current is not None:
            rec = self.phases[self.current]
            rec["wall_sec"] += now - self.start
            mem = peak_memory(self.device)
            if mem["available"]:
                rec["peak_memory_bytes"] = max(rec.get("peak_memory_bytes", 0), mem["peak_bytes"])
            else:
                rec["peak_memory"] = mem
        self.current, self.start = name, now
        if name is not None:
            self.phases.setdefault(name, {"wall_sec": 0.0, "steps": 0})
            reset_peak_memory(self.device)

    def step(self, n: int = 1) -> None:
        if self.current is not None:
            self.phases[self.current]["steps"] += n

    def stop(self) -> None:
        self.enter(None)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.phases.items()}
