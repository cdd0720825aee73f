#!/usr/bin/env python3
"""Profile one annealing level of a real run (torch.profiler): where a level's time goes, ODE and MCMC.

    python scripts/profile_level.py [--level 1] [--top 12] [--trace OUT.json] -- <posterior_sample.py overrides>

The run is built and sampled as ``posterior_sample.py`` would (its results go to the overrides' ``save_dir``); the
``--level``-th level (counted from 0, over the whole run) is recorded in two parts, each under its own profiler: the
PF-ODE solve to the level's prior mean (the network evaluations) and the kernel's ``run`` (the MCMC). Printed:

- MCMC steps of the level, and **top-level operator calls per step** (the host's dispatches; on a GPU each is about
  one kernel launch: the number that bounds a launch-bound loop);
- per part, the operators with the most host time (self CPU) and, on CUDA, the kernels with the most device time;
- wall time of each part and its share of the two.

``--trace OUT.json`` writes a Chrome trace (chrome://tracing, Perfetto) per part: OUT_ode.json and OUT_mcmc.json.
Example (Fashion-MNIST pixel prior, 20 images):

    python scripts/profile_level.py -- +data=test-fmnist +model=fmnist32ddpm +sampler=edm_daps +task=phase_retrieval \\
        task_group=fmnist_pixel data.end_id=20 batch_size=20 num_samples=4 eval_fn_list=[psnr] save_dir=/tmp/prof
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from posterior_sample import Run  # noqa: E402
from utils.build import build_run  # noqa: E402
from utils.config import CONFIGS  # noqa: E402
from utils.device import synchronize  # noqa: E402


def choices(overrides: list[str]) -> dict[str, str]:
    """The config groups chosen by ``+group=option`` overrides (what Hydra records as its choices)."""
    return {o[1:].split("=")[0]: o.split("=", 1)[1] for o in overrides if o.startswith("+") and "=" in o}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--level", type=int, default=1, help="which level's MCMC to record, counted over the run (0-based)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--trace", type=Path, help="write a Chrome trace of the level here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="default", overrides=args.overrides)
    parts = build_run(cfg, choices(args.overrides), [CONFIGS])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if parts.device.type == "cuda" else [])
    record: dict[str, dict] = {"ode": {}, "mcmc": {}}

    def profiled(part: str, fn):  # fn, its call of the recorded level under the profiler (its settings unchanged)
        def call(*a, **k):
            rec = record[part]
            level = rec.setdefault("calls", 0)
            rec["calls"] = level + 1
            if level != args.level:
                return fn(*a, **k)
            synchronize(parts.device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                out = fn(*a, **k)
                synchronize(parts.device)
            rec.update(prof=prof, sec=time.perf_counter() - t0)
            return out
        return call

    kernel, ode = parts.sampler.kernel, parts.sampler.ode
    cls = type(kernel)
    run = cls.run
    cls.run = profiled("mcmc", run)
    ode.solve = profiled("ode", ode.solve)
    try:
        code = Run(parts).execute()
    finally:
        cls.run = run
        del ode.solve
    if any("prof" not in rec for rec in record.values()):
        sys.exit(f"profile_level: the run made {record['ode'].get('calls', 0)} ODE solve(s) and "
                 f"{record['mcmc'].get('calls', 0)} level(s) of MCMC (exit code {code}); --level {args.level} was not "
                 f"reached")
    mcmc, steps = record["mcmc"], kernel.num_steps
    top = [e for e in mcmc["prof"].events() if e.name.startswith("aten::") and e.cpu_parent is None]
    print(f"device {parts.device}; level {args.level}: {steps} MCMC steps ({kernel.name}), wall {mcmc['sec']:.3f} s, "
          f"{mcmc['sec'] / steps * 1e3:.2f} ms per step")
    print(f"top-level operator calls: {len(top)} in the level, {len(top) / steps:.1f} per step")
    both = record["ode"]["sec"] + mcmc["sec"]
    print(f"ode: wall {record['ode']['sec']:.3f} s ({ode.num_steps} steps, {ode.solver}), "
          f"{record['ode']['sec'] / both:.1%} of the level's ODE + MCMC; mcmc {mcmc['sec'] / both:.1%}")
    for part, rec in record.items():
        print(f"\n== {part}")
        print(rec["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if parts.device.type == "cuda":
            print(rec["prof"].key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top))
        if args.trace:
            trace = args.trace.with_name(f"{args.trace.stem}_{part}{args.trace.suffix}")
            rec["prof"].export_chrome_trace(str(trace))
            print(f"trace: {trace}")


if __name__ == "__main__":
    main()
