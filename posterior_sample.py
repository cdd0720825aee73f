"""Posterior sampling with DAPS / LatentDAPS: the one entry point (a Hydra app).

    python posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval \
        +sampler=edm_daps task_group=pixel_hmc num_samples=4 name=pr_demo

data -> operator -> measurement (seeded per image) -> model -> sampler (num_samples particles per
measurement, num_runs times) -> results/<name>/ (see README for every file). Everything is built and
checked before the first sampling step; a finished image's results are on disk before the next
chunk starts; Ctrl-C leaves metrics.json and timing.json for what finished.

Under ``torchrun --nproc_per_node=N`` each rank takes a contiguous slice of the images (seeds depend only
on the image and sample numbers, so results do not depend on the split); every rank writes its images'
files, rank 0 writes metrics.json / timing.json, logs and shows progress. Under Hydra multirun (-m) each
job writes to <save_dir>/<name>/run<NNN>/.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cores.models import build_model
from cores.noise import ParticleNoise, measurement_seed, particle_seed
from cores.operators import build_operator
from sampler import NOT_IMPLEMENTED, build_sampler
from utils.data import build_dataset
from utils.device import (Dist, barrier, device_info, eager_device, gather, get_device, init_distributed,
                          shutdown)
from utils.events import EventLog, PhaseTimer, dump_json, summarise
from utils.images import save_grid, save_png
from utils.metrics import Evaluator
from utils.results import Recorder

log = logging.getLogger("posterior_sample")
PLANNED_FLAGS = {  # flag: (value that means off, what it will switch on)
    "repulsion_scale": (0.0, "particle repulsion (Exp 1)"),
    "pruning_step": (-1, "particle pruning (Exp 2)"),
    "optimization_step": (-1, "hard data consistency (Exp 4)"),
}
GRID_MAX_IMAGES = 16
TRAJ_SNAPSHOTS = 10


class UserError(Exception):
    """A problem with the command line, config or files, reported without a traceback."""


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _require(cfg: DictConfig, key: str, example: str) -> dict:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"no {key} config selected: add +{key}={example} to the command line")
    return _container(cfg[key])


def _step(what: str, fn, *args, **kwargs):
    """Run a build step; turn configuration and file errors into a UserError naming the step."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, NotImplementedError, TypeError, KeyError) as err:
        raise UserError(f"{what}: {err}") from err


class Run:
    """Everything a run needs, built and validated before any sampling."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.check_flags()
        data_cfg = _require(cfg, "data", "test-fmnist")
        model_cfg = _require(cfg, "model", "fmnist32ddpm")
        task_cfg = _require(cfg, "task", "phase_retrieval")
        sampler_cfg = _require(cfg, "sampler", "edm_daps")
        if cfg.task_group not in task_cfg:
            raise UserError(f"task_group={cfg.task_group} is not defined by the task config; "
                            f"choose one of {', '.join(task_cfg)}")
        group = task_cfg[cfg.task_group]
        self.dist: Dist = init_distributed(cfg.gpu, cfg.use_tpu)
        if not self.dist.main:
            logging.getLogger().setLevel(logging.WARNING)
        self.device = _step("device", get_device, cfg.gpu, cfg.use_tpu, self.dist)
        self.dataset = _step("data", build_dataset, data_cfg)
        self.shape = tuple(self.dataset[0].image.shape)
        self.operator = _step(f"operator (task.{cfg.task_group}.operator)", build_operator, group["operator"],
                              cfg.seed).to(self.device)
        _step("operator input", self.operator.check_input, self.shape)
        self.model = _step("model", build_model, model_cfg, self.device)
        if tuple(self.model.image_shape) != self.shape:
            raise UserError(f"data images are {self.shape} (C, H, W) but the model expects {self.model.image_shape}: "
                            f"choose data with the model's resolution and channels (data.resolution, data.channels)")
        self.sampler = _step("sampler", build_sampler, sampler_cfg, group["mcmc_sampler_config"])
        _step("sampler", self.sampler.check, self.model)
        self.evaluator = _step("eval_fn_list", Evaluator, list(cfg.eval_fn_list), eager_device(self.device),
                               self.shape)
        self.root = results_folder(cfg)
        if self.root.exists() and any(self.root.iterdir()) and not cfg.overwrite:
            raise UserError(f"results folder {self.root} already exists: choose another name=... "
                            f"or pass overwrite=true to replace it")
        n, d = len(self.dataset), self.dist
        self.shard = list(range(n * d.rank // d.world, n * (d.rank + 1) // d.world))

    def check_flags(self) -> None:
        cfg = self.cfg
        for key, (off, feature) in PLANNED_FLAGS.items():
            if cfg[key] != off:
                raise UserError(f"{key}={cfg[key]}: {feature} is {NOT_IMPLEMENTED}; leave {key}={off}")
        for key in ("num_samples", "num_runs", "batch_size"):
            if not isinstance(cfg[key], int) or cfg[key] < 1:
                raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")

    @property
    def particles_per_image(self) -> int:
        return self.cfg.num_runs * self.cfg.num_samples

    def header(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.sampler
        return {"name": cfg.name, "task": self.operator.name, "task_group": cfg.task_group,
                "particles_per_image": self.particles_per_image, "num_samples": cfg.num_samples,
                "num_runs": cfg.num_runs, "seed": cfg.seed, "eval": self.evaluator.status,
                "sampler": {"latent": s.latent, "anneal_steps": len(s.levels), "sigma_max": s.levels[0],
                            "sigma_min": s.levels[-1], "ode_steps": s.ode.num_steps, "ode_solver": s.ode.solver,
                            "mc_algo": s.mcmc.mc_algo, "mcmc_steps": s.mcmc.num_steps,
                            "prior_solver": s.mcmc.prior_solver, "likelihood": s.mcmc.likelihood,
                            "data_weight": s.mcmc.data_weight,
                            "network_evals_per_particle": s.network_evals_per_particle()},
                "device": device_info(self.device)}

    def execute(self) -> int:
        cfg, d = self.cfg, self.dist
        barrier(d)  # every rank has checked the folder before rank 0 replaces or creates it
        if d.main:
            if self.root.exists() and cfg.overwrite:
                log.warning("overwrite=true: removing %s", self.root)
                shutil.rmtree(self.root)
            (self.root / "samples").mkdir(parents=True, exist_ok=True)
            (self.root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        barrier(d)
        suffix = "" if d.main else f".rank{d.rank}"
        handler = logging.FileHandler(self.root / f"run{suffix}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self.events = EventLog(self.root / f"events{suffix}.jsonl")
        self.timer = PhaseTimer(self.device)
        self.recorder = Recorder(self.root, self.header(), self.metric_names())
        self.grid: list[dict[str, Any]] = []
        self.used_levels = self.images_done = 0
        self.t0 = time.perf_counter()
        status, code = "complete", 0
        try:
            for start in range(0, len(self.shard), cfg.batch_size):
                self.run_chunk([self.dataset[i] for i in self.shard[start:start + cfg.batch_size]])
        except KeyboardInterrupt:
            status, code = "interrupted", 130
            log.warning("interrupted: writing results of the %d finished image(s)", self.images_done)
        finally:
            self.timer.stop()
            self.finish(status)
            logging.getLogger().removeHandler(handler)
            if status == "complete":
                shutdown(d)
        return code

    def metric_names(self) -> list[str]:
        return [m for m in self.cfg.eval_fn_list if m not in self.evaluator.unavailable] + ["meas_err"]

    def run_chunk(self, items: list) -> None:
        cfg, dev = self.cfg, self.device
        gt = torch.stack([it.image for it in items]).to(dev)
        gens = [torch.Generator(device=eager_device(dev)).manual_seed(measurement_seed(cfg.seed, it.index))
                for it in items]
        with torch.no_grad():
            y = self.operator.measure(gt, gens)
        ns = cfg.num_samples
        samples = [[None] * self.particles_per_image for _ in items]
        status = [[None] * self.particles_per_image for _ in items]
        for run in range(cfg.num_runs):
            seeds = [particle_seed(cfg.seed, it.index, run * ns + j) for it in items for j in range(ns)]
            noise = ParticleNoise(seeds, dev)
            x_start = self.sampler.initial_state(noise, self.model.in_shape, dev)
            trajectory: dict[int, list] = {}
            self.timer.enter("explore")
            res = self.sampler.sample(self.model, self.operator, y.repeat_interleave(ns, 0), x_start, noise,
                                      callback=lambda ev: self.on_level(ev, items, run, trajectory),
                                      progress=self.progress(items, run))
            self.timer.enter(None)
            self.used_levels = max(self.used_levels, res.used_levels)
            for p in range(len(seeds)):
                i, k = divmod(p, ns)
                samples[i][run * ns + k] = res.x[p]
                status[i][run * ns + k] = (res.status[p], res.stopped_at[p])
            if cfg.save_traj:
                self.save_trajectory(items, run, trajectory)
        for i, it in enumerate(items):
            self.finish_image(it, gt[i], y[i], torch.stack(samples[i]), status[i])

    def progress(self, items: list, run: int):
        if not self.cfg.show_progress:
            return None
        desc = f"images {items[0].index}-{items[-1].index} run {run + 1}/{self.cfg.num_runs}"
        return lambda total: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def on_level(self, ev: dict[str, Any], items: list, run: int, trajectory: dict[int, list]) -> None:
        ns = self.cfg.num_samples
        self.timer.step()
        self.events.write({
            "event": "level", "phase": self.timer.current, "images": [items[0].index, items[-1].index], "run": run,
            "step": ev["step"], "sigma": ev["sigma"], "next_sigma": ev["next_sigma"],
            "particles": [f"{items[p // ns].index}:{run * ns + p % ns}" for p in ev["index"]],
            "loss": summarise(ev["loss"]), "loss_per_particle": ev["loss"],
            "acceptance": summarise(ev["acceptance"]) if ev["acceptance"] is not None else None,
            "acceptance_per_particle": ev["acceptance"],
            "nonfinite": [f"{items[p // ns].index}:{run * ns + p % ns}"
                          for p, ok in zip(ev["index"], ev["finite"]) if not ok]})
        if self.cfg.save_traj:
            T = len(self.sampler.levels)
            marks = {round(j * (T - 1) / (TRAJ_SNAPSHOTS - 1)) for j in range(TRAJ_SNAPSHOTS)}
            if ev["step"] in marks:
                with torch.no_grad():
                    pics = [self.model.decode(ev[k]).cpu() for k in ("x0hat", "x0y")]
                for row, p in enumerate(ev["index"]):
                    trajectory.setdefault(p, []).append((pics[0][row], pics[1][row]))

    def save_trajectory(self, items: list, run: int, trajectory: dict[int, list]) -> None:
        out = self.root / "trajectory"
        out.mkdir(exist_ok=True)
        ns = self.cfg.num_samples
        for p, snaps in trajectory.items():
            it, k = items[p // ns], run * ns + p % ns
            save_grid([[s[0] for s in snaps], [s[1] for s in snaps]], out / f"{it.index:05d}_particle{k:02d}.png")

    def finish_image(self, item, gt: torch.Tensor, y: torch.Tensor, xs: torch.Tensor, status: list) -> None:
        ok = [s == "ok" for s, _ in status]
        rows = [i for i, good in enumerate(ok) if good]
        scores: dict[str, list[float]] = {}
        if rows:
            good = xs[rows]
            y_norm = y.flatten().norm()
            with torch.no_grad():
                scores = self.evaluator(gt.expand(len(rows), *gt.shape), good,
                                        lambda x: self.operator.loss(x, y.expand(len(x), *y.shape)).sqrt() / y_norm)
        particles = []
        for k, (st, at) in enumerate(status):
            rec: dict[str, Any] = {"sample": k, "run": k // self.cfg.num_samples, "status": st, "stopped_at_level": at}
            for m in self.metric_names():
                rec[m] = scores[m][rows.index(k)] if st == "ok" else None
            particles.append(rec)
            if st == "ok" and self.cfg.save_samples:
                save_png(xs[k], self.root / "samples" / f"{item.index:05d}_particle{k:02d}.png")
        self.recorder.add_image({"index": item.index, "name": item.name, "particles": particles})
        self.images_done += 1
        if len(self.grid) < GRID_MAX_IMAGES:
            self.grid.append({"gt": gt.cpu(), "y": self.operator.view(y[None], gt.shape)[0].cpu(),
                              "x": [xs[k].cpu() if s == "ok" else None for k, (s, _) in enumerate(status)]})
        if self.dist.main:
            timing = self.timing("running")
            self.recorder.write("running", {"timing": timing})
            dump_json(timing, self.root / "timing.json")
            self.write_grid()

    def local_timing(self) -> dict[str, Any]:
        return {"rank": self.dist.rank, "device": str(self.device), "images_done": self.images_done,
                "wall_sec": time.perf_counter() - self.t0, "used_anneal_steps": self.used_levels,
                "phases": self.timer.summary()}

    def timing(self, status: str, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Wall-clock totals (slowest rank) and throughput over all ranks; per-phase times of rank 0."""
        ranks = ranks or [self.local_timing()]
        total = max(r["wall_sec"] for r in ranks)
        done = sum(r["images_done"] for r in ranks)
        phases = ranks[0]["phases"]
        sampling = max(sum(p["wall_sec"] for p in r["phases"].values()) for r in ranks)
        s = self.sampler
        out = {"status": status, "total_wall_sec": total, "images_done": done,
               "per_image_sec": total / done if done else None,
               "sampling_wall_sec": sampling, "sampling_per_image_sec": sampling / done if done else None,
               "particles_per_image": self.particles_per_image, "batch_size_images": self.cfg.batch_size,
               "ode_steps": s.ode.num_steps, "ode_solver": s.ode.solver, "anneal_steps_cfg": len(s.levels),
               "used_anneal_steps": max(r["used_anneal_steps"] for r in ranks), "mcmc_steps": s.mcmc.num_steps,
               "network_evals_per_particle": s.network_evals_per_particle(), "phases": phases,
               "world_size": self.dist.world}
        if self.dist.world > 1:
            out["ranks"] = ranks
        return out

    def write_grid(self) -> None:
        if not self.grid:
            return
        n = self.particles_per_image
        columns = [[g["gt"], g["y"], *g["x"]] for g in self.grid]
        rows = [[col[r] for col in columns] for r in range(2 + n)]
        save_grid(rows, self.root / "grid_results.png")

    def finish(self, status: str) -> None:
        self.events.close()
        ranks = gather(self.dist, self.local_timing()) if status == "complete" else None
        if not self.dist.main:
            return
        timing = self.timing(status, ranks)
        self.recorder.write(status, {"timing": timing,
                                     "peak_memory": {k: v.get("peak_memory_bytes", v.get("peak_memory"))
                                                     for k, v in timing["phases"].items()}})
        dump_json(timing, self.root / "timing.json")
        self.write_grid()
        agg = self.recorder.aggregate()
        summary = ", ".join(f"{m} best {a['best_of_n']:.3f} mean {a['mean_of_n']:.3f}" for m, a in agg.items())
        log.info("%s: %d image(s) in %.1f s (%s). %s", status, timing["images_done"], timing["total_wall_sec"],
                 self.root, summary)


def results_folder(cfg: DictConfig) -> Path:
    """<save_dir>/<name>, or <save_dir>/<name>/run<NNN> for job NNN of a Hydra multirun (sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    root = Path(cfg.save_dir) / cfg.name
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        root = root / f"run{HydraConfig.get().job.num:03d}"
    return root


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@hydra.main(version_base="1.3", config_path="configs", config_name="default")
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        run = Run(cfg)
    except UserError as err:
        log.error("%s", err)
        sys.exit(2)
    code = run.execute()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
