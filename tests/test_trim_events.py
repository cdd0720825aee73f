"""scripts/trim_events.py: the stored events.jsonl lose their per-particle lists, and the reports read the same."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from parse_metrics import final_pair_dists  # noqa: E402
from suite_report import level_series  # noqa: E402


def test_trimmed_events_keep_what_the_reports_read(tmp_path):
    events = [{"event": "phase", "phase": "explore", "images": [0, 1]}]
    for step, sigma in enumerate((10.0, 1.0, 0.1)):
        events.append({"event": "level", "step": step, "sigma": sigma, "images": [0, 1], "run": 0,
                       "particles": ["0:0", "0:1", "1:0", "1:1"], "loss": {"n": 4, "mean": 1.5 / (step + 1)},
                       "loss_per_particle": [1.0, 2.0, 1.5, 1.5], "acceptance_per_particle": [1, 1, 0, 1],
                       "repulsion": {"gamma": 2.0, "pair_dist": {"0": {"mean": 0.123456789 * (step + 1), "min": 0.1},
                                                                 "1": {"mean": 2.0, "min": 1.0}}}})
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    before = (level_series(tmp_path, "sigma"), final_pair_dists(tmp_path))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "trim_events.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trimmed = [json.loads(line) for line in path.read_text().splitlines()]
    assert trimmed[0] == events[0] and len(trimmed) == len(events)
    for e in trimmed[1:]:
        assert not {"particles", "loss_per_particle", "acceptance_per_particle"} & set(e)
        assert e["repulsion"]["gamma"] == 2.0 and set(e["repulsion"]["pair_dist"]["0"]) == {"mean"}
        assert "loss" in e and "sigma" in e
    assert level_series(tmp_path, "sigma") == before[0]
    assert final_pair_dists(tmp_path) == [round(0.123456789 * 3, 5), 2.0] and before[1] == [0.123456789 * 3, 2.0]
    assert level_series(tmp_path, "pair_dist")[10.0] == [0.12346, 2.0]
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "trim_events.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
