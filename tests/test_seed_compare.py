"""scripts/seed_compare.py: particles pooled per image over each side's runs, unfinished or non-finite ones left out
and counted, metrics a run did not measure skipped."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, name: str, psnr: list[list[float]], ssim: bool = True) -> str:
    images = []
    for index, values in enumerate(psnr):
        particles = [{"status": "ok" if math.isfinite(v) else "nonfinite", "psnr": v, **({"ssim": 0.5} if ssim else {})}
                     for v in values]
        images.append({"index": index, "particles": particles})
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"images": images}))
    return str(path)


def test_pooled_difference_and_left_out_particles(tmp_path):
    base = _run(tmp_path, "base", [[10.0, 12.0], [20.0, 20.0]])
    new1 = _run(tmp_path, "new1", [[12.0, 14.0], [21.0, float("nan")]], ssim=False)
    new2 = _run(tmp_path, "new2", [[12.0, 12.0], [21.0, 21.0]])
    out = subprocess.run([sys.executable, "scripts/seed_compare.py", "--base", base, "--new", new1, new2,
                          "--metrics", "psnr,ssim,lpips"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # image 0: NEW mean of 12, 14, 12, 12 = 12.5 vs 11 -> +1.5; image 1: 21 (the NaN left out) vs 20 -> +1.0
    assert "| psnr | 1 / 2 | 2 | 15.5000 | 16.7500 | +1.2500 | [+1.0000, +1.5000] | 0 / 1 |" in out
    assert "| ssim | 1 / 1 | 2 | 0.5000 | 0.5000 | +0.0000 |" in out  # new1 did not measure ssim: skipped, not dropped
    assert "| lpips | not measured on both sides |" in out


def test_paired_twins_gap_and_mode(tmp_path):
    """--paired: each particle against the particle of the same image, sample and run on the other side."""
    def run(name, values, modes):
        images = [{"index": i, "particles": [{"sample": s, "run": 0, "status": "ok" if math.isfinite(v) else "nonfinite",
                                              "psnr": v, "mode": m} for s, (v, m) in enumerate(zip(vals, ms))]}
                  for i, (vals, ms) in enumerate(zip(values, modes))]
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": images}))
        return str(tmp_path / f"{name}.json")

    base = run("base", [[10.0, 12.0], [20.0, 20.0]], [["0", "0"], ["0", "180"]])
    new = run("new", [[10.05, 13.0], [20.0, float("nan")]], [["0", "180"], ["0", "180"]])
    cmd = [sys.executable, "scripts/seed_compare.py", "--base", base, "--new", new, "--metrics", "psnr", "--paired"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # pairs: |0.05|, |1.0|, |0.0| (the NaN twin left out); within 0.1: 2 of 3; same mode: 2 of the 3 usable pairs
    assert "| psnr | 3 | 0.0500 | 0.667 | 0.667 |" in out
    refused = subprocess.run(cmd[:3] + [base, base] + cmd[4:], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "as many --new runs as --base runs" in refused.stderr
