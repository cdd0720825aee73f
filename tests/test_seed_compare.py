"""scripts/seed_compare.py: particles pooled per image over each side's runs, unfinished or non-finite ones left out
and counted, metrics a run did not measure skipped."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, name: str, psnr: list[list[float]], ssim: bool = True, modes: list[list[str]] | None = None,
         seed: int = 0) -> str:
    images = []
    for index, values in enumerate(psnr):
        particles = [{"sample": k, "run": 0, "status": "ok" if math.isfinite(v) else "nonfinite", "psnr": v,
                      **({"ssim": 0.5} if ssim else {}), **({"mode": modes[index][k]} if modes else {})}
                     for k, v in enumerate(values)]
        images.append({"index": index, "particles": particles})
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"seed": seed, "images": images}))
    return str(path)


def test_pooled_difference_and_left_out_particles(tmp_path):
    base = _run(tmp_path, "base", [[10.0, 12.0], [20.0, 20.0]])
    new1 = _run(tmp_path, "new1", [[12.0, 14.0], [21.0, float("nan")]], ssim=False)
    new2 = _run(tmp_path, "new2", [[12.0, 12.0], [21.0, 21.0]])
    out = subprocess.run([sys.executable, "scripts/seed_compare.py", "--base", base, "--new", new1, new2,
                          "--metrics", "psnr,ssim,lpips"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # image 0: NEW mean of 12, 14, 12, 12 = 12.5 vs 11 -> +1.5; image 1: 21 (the NaN left out) vs 20 -> +1.0
    assert "| psnr | 1 / 2 | 2 | 15.5000 | 16.7500 | +1.25000 | [+1.00000, +1.50000] | 0 / 1 |" in out
    assert "| ssim | 1 / 1 | 2 | 0.5000 | 0.5000 | +0.00000 |" in out  # new1 did not measure ssim: skipped, not dropped
    assert "| lpips | not measured on both sides |" in out


def test_paired_twins_gap_and_mode(tmp_path):
    """--paired: each particle against the particle of the same image, sample and run on the other side; runs of other
    seeds are refused."""
    base = _run(tmp_path, "base", [[10.0, 12.0, 5.0], [20.0, 20.0]], modes=[["0", "0", "none"], ["0", "180"]])
    new = _run(tmp_path, "new", [[10.05, 13.0, 5.0], [20.0, float("nan")]], modes=[["180", "0", "0"], ["0", "180"]])
    cmd = [sys.executable, "scripts/seed_compare.py", "--base", base, "--new", new, "--metrics", "psnr,ssim", "--paired"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # pairs finished on both sides: 4 (the NaN twin is not "ok"); gaps 0.05, 1.0, 0.0, 0.0: median 0.025, 3 of 4 within
    # 0.1 dB; modes kept 2 of 4 (image 1's and image 0's second), swapped 0 <-> 180 1 of 4 (none -> 0 is not a swap)
    assert "4 pairs finished on both sides, 0 particle(s) without a twin" in out
    assert "| psnr | 4 | 0.0250 | 0.750 |" in out and "| ssim | 4 | 0.0000 | - |" in out
    assert "| mode | 4 | 0.500 | 0.250 |" in out
    other_seed = _run(tmp_path, "other", [[10.0, 12.0, 5.0], [20.0, 20.0]], seed=1)
    refused = subprocess.run(cmd[:5] + [other_seed] + cmd[6:], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "differ in seed" in refused.stderr
    refused = subprocess.run(cmd[:3] + [base, base] + cmd[4:], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "as many --new runs as --base runs" in refused.stderr
