"""scripts/dc_report.py on a small synthetic pair of runs: paired differences, the per-particle loss / PSNR quadrants,
the CSV and the scatter plot, and the refusal of a NEW run without hard data consistency."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dc_report.py"


def particle(sample, psnr, meas_err, status="ok"):
    ok = status == "ok"
    return {"sample": sample, "status": status, "psnr": psnr if ok else None, "meas_err": meas_err if ok else None}


def image(index, particles):
    scored = [p for p in particles if p["status"] == "ok"]
    summary = {m: {"n": len(scored), "best": (max if m == "psnr" else min)(p[m] for p in scored),
                   "mean": sum(p[m] for p in scored) / len(scored)} for m in ("psnr", "meas_err")}
    return {"index": index, "particles": particles, "summary": summary}


def write_run(folder: Path, images, hard_dc=None, phases=None):
    folder.mkdir(parents=True)
    metrics = {"status": "complete", "images": images, **({"hard_dc": hard_dc} if hard_dc else {})}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "timing.json").write_text(json.dumps({"sampling_wall_sec": 10.0, "phases": phases or {}}))


DC = {"particles": 4, "levels": 8, "accepted_levels": 6, "steps_total": 400, "steps_per_particle_mean": 100.0,
      "steps_per_particle_max": 150, "steps_per_level_max": 80, "stop_tol": 0, "stop_rise": 5, "stop_max": 3,
      "wall_sec": 4.0, "share_of_sampling": 0.3}


def test_report(tmp_path):
    write_run(tmp_path / "exp2", [image(0, [particle(0, 20.0, 0.20), particle(1, 15.0, 0.30)]),
                                  image(1, [particle(0, 18.0, 0.25), particle(1, 17.0, 0.25, "pruned")])],
              phases={"refine": {"wall_sec": 2.0, "steps": 3}})
    write_run(tmp_path / "exp4", [image(0, [particle(0, 21.0, 0.10), particle(1, 14.0, 0.20)]),
                                  image(1, [particle(0, 19.0, 0.30), particle(1, 30.0, 0.10)])], DC,
              {"optimize": {"wall_sec": 6.0, "steps": 4}})
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "exp2"), str(tmp_path / "exp4"), "--out",
                        str(tmp_path / "rep"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    best = next(s for s in out["scores"] if s["score"] == "psnr best of n (oracle)")
    assert best["diff"] == 6.5 and best["images"] == 2  # image 0: 21 - 20; image 1: 30 - 18 (the pruned one unscored)
    rel = out["relation"]  # the pruned BASE particle (image 1, sample 1) has no pair
    assert rel["particles"] == 3
    assert (rel["loss_down_psnr_up"], rel["loss_down_psnr_down"], rel["loss_up_psnr_up"]) == (1, 1, 1)
    rows = list(csv.DictReader(open(tmp_path / "rep" / "dc_pairs.csv")))
    assert len(rows) == 3 and (tmp_path / "rep" / "dc_scatter.png").stat().st_size > 1000
    md = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "exp2"), str(tmp_path / "exp4")],
                        capture_output=True, text=True).stdout
    assert "| stops (tol / rise / max) | | 0 / 5 / 3 |" in md and "oracle" in md


def test_new_without_hard_dc_is_refused(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name, [image(0, [particle(0, 20.0, 0.2)])])
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "ran no hard data consistency" in r.stderr
