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

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cores.noise import ParticleNoise, measurement_seed, particle_seed
from sampler import ParticleId, start_particles
from utils.build import RunParts, UserError, build_run
from utils.device import barrier, eager_device, gather, shutdown
from utils.events import EventLog, PhaseTimer
from utils.observer import RunObserver
from utils.results import RunResults

log = logging.getLogger("posterior_sample")


class Run:
    """Samples a built run's images chunk by chunk; the observer and the results do the rest."""

    def __init__(self, parts: RunParts):
        self.parts, self.cfg = parts, parts.cfg
        if parts.root.exists() and any(parts.root.iterdir()) and not self.cfg.overwrite:
            raise UserError(f"results folder {parts.root} already exists: choose another name=... "
                            f"or pass overwrite=true to replace it")

    def prepare_folder(self) -> None:
        cfg, d, root = self.cfg, self.parts.dist, self.parts.root
        barrier(d)  # every rank has checked the folder before rank 0 replaces or creates it
        if d.main:
            if root.exists() and cfg.overwrite:
                log.warning("overwrite=true: removing %s", root)
                shutil.rmtree(root)
            (root / "samples").mkdir(parents=True, exist_ok=True)
            (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        barrier(d)

    def execute(self) -> int:
        parts, cfg, d = self.parts, self.cfg, self.parts.dist
        self.prepare_folder()
        suffix = "" if d.main else f".rank{d.rank}"
        handler = logging.FileHandler(parts.root / f"run{suffix}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        events = EventLog(parts.root / f"events{suffix}.jsonl")
        timer = PhaseTimer(parts.device)
        self.observer = RunObserver(events, timer, parts.model, parts.sampler.schedule.planned_levels,
                                    parts.root / "trajectory" if cfg.save_traj else None, cfg.show_progress)
        self.results = RunResults(parts, timer)
        status, code = "complete", 0
        try:
            for start in range(0, len(parts.shard), cfg.batch_size):
                self.run_chunk([parts.dataset[i] for i in parts.shard[start:start + cfg.batch_size]])
        except KeyboardInterrupt:
            status, code = "interrupted", 130
            log.warning("interrupted: writing results of the %d finished image(s)", self.results.images_done)
        finally:
            timer.stop()
            events.close()
            self.finish(status)
            logging.getLogger().removeHandler(handler)
            if status == "complete":
                shutdown(d)
        return code

    def run_chunk(self, items: list) -> None:
        """Sample the particles of ``items`` (num_samples per image together, num_runs times), then score each image."""
        parts, cfg, dev = self.parts, self.cfg, self.parts.device
        gt = torch.stack([it.image for it in items]).to(dev)
        gens = [torch.Generator(device=eager_device(dev)).manual_seed(measurement_seed(cfg.seed, it.index))
                for it in items]
        with torch.no_grad():
            y = parts.operator.measure(gt, gens)
        ns, position = cfg.num_samples, {it.index: i for i, it in enumerate(items)}
        samples: dict[int, dict[int, torch.Tensor]] = {it.index: {} for it in items}
        status: dict[int, dict[int, tuple]] = {it.index: {} for it in items}
        for run in range(cfg.num_runs):
            ids = [ParticleId(it.index, run, run * ns + j) for it in items for j in range(ns)]
            group = [position[pid.image] for pid in ids]
            noise = ParticleNoise([particle_seed(cfg.seed, pid.image, pid.sample) for pid in ids], dev)
            x_start = parts.sampler.initial_state(noise, parts.model.in_shape, dev)
            labels = None
            if parts.model.class_conditional:
                labels = parts.model.image_labels([it.index for it in items], [it.name for it in items])[group]
            particles = start_particles(ids, y[group], group, noise, x_start, labels)
            self.observer.begin([it.index for it in items], run, cfg.num_runs)
            res = parts.sampler.sample(parts.model, parts.operator, particles, callback=self.observer,
                                       progress=self.observer.progress())
            self.results.add_sampling(res.used_levels, res.network_evals, res.particle_network_evals)
            for row, pid in enumerate(res.ids):
                samples[pid.image][pid.sample] = res.x[row]
                status[pid.image][pid.sample] = (res.status[row], res.stopped_at[row])
            self.observer.save_trajectory()
        for i, it in enumerate(items):
            order = sorted(samples[it.index])
            self.results.finish_image(it, gt[i], y[i], torch.stack([samples[it.index][k] for k in order]),
                                      [status[it.index][k] for k in order])

    def finish(self, status: str) -> None:
        ranks = gather(self.parts.dist, self.results.local_timing()) if status == "complete" else None
        if not self.parts.dist.main:
            return
        timing = self.results.finish(status, ranks)
        agg = self.results.recorder.aggregate()
        summary = ", ".join(f"{m} best {a['best_of_n']:.3f} mean {a['mean_of_n']:.3f}" for m, a in agg.items())
        log.info("%s: %d image(s) in %.1f s (%s). %s", status, timing["images_done"], timing["total_wall_sec"],
                 self.parts.root, summary)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@hydra.main(version_base="1.3", config_path="configs", config_name="default")
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        parts = build_run(cfg)
        if not parts.dist.main:
            logging.getLogger().setLevel(logging.WARNING)
        run = Run(parts)
    except UserError as err:
        log.error("%s", err)
        sys.exit(2)
    code = run.execute()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
