#!/usr/bin/env python3
"""What a process pays before it can sample, with none of a run's own work: each step a fresh interpreter.

    python scripts/startup_floor.py [--device cuda] [--repeats 5] [--sampling-sec 58.9]

The steps add one cost at a time: the interpreter alone; ``import torch``; the device ready (its context and one
kernel); this repository's imports (posterior_sample, Hydra, the samplers); diffusers' UNet module (the ADM and LDM
models' classes, with whatever diffusers imports where transformers, peft or accelerate are installed). Each command
runs ``--repeats`` times after one unmeasured run (the file cache warm); a time runs from the process's launch to its
end, the interpreter's exit included. With ``--sampling-sec`` (a run's sampling time) each step is also printed as a
share of it: issue 15's start-up target is 5% of a 10-image run's sampling, so a step above 5% shows that no run in
its own process can meet the target, whatever the run's own code does.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(device: str) -> list[tuple[str, str]]:
    ready = f"import torch; torch.zeros(1, device={device!r}).sum().item()"
    return [("interpreter", "pass"), ("import torch", "import torch"), ("+ device ready", ready),
            ("+ this repository's imports", f"import posterior_sample; {ready}"),
            ("+ diffusers' UNet", f"import posterior_sample; from diffusers import UNet2DModel; {ready}")]


def wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="the device made ready (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sampling-sec", type=float, help="a run's sampling time: print each step as a share of it")
    args = ap.parse_args()
    if args.repeats < 1:
        sys.exit("startup_floor: --repeats must be at least 1")
    share = f" | share of {args.sampling_sec:g} s of sampling" if args.sampling_sec else ""
    print(f"| step ({sys.executable}, device {args.device}) | median s | min s | max s{share} |\n|---|---|---|---|"
          + ("---|" if share else ""))
    for name, code in steps(args.device):
        wall(code)
        times = [wall(code) for _ in range(args.repeats)]
        med = statistics.median(times)
        cells = f"{med:.3f} | {min(times):.3f} | {max(times):.3f}"
        print(f"| {name} | {cells}" + (f" | {100 * med / args.sampling_sec:.1f}%" if share else "") + " |",
              flush=True)


if __name__ == "__main__":
    main()
