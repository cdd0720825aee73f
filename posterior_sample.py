"""Posterior sampling with DAPS / LatentDAPS: the one entry point (a Hydra app).

    python posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval \
        +sampler=edm_daps task_group=pixel_hmc num_samples=4 name=pr_demo

data -> operator -> measurement (seeded per image) -> model -> sampler (num_samples particles per
measurement, num_runs times) -> results/<name>/ (see README for every file). Everything is built and
checked before the first sampling step; a finished image's results are on disk before the next
chunk starts. The recorded status is the truth: ``complete`` only when every planned image finished,
``failed`` (with the error) on an exception, ``interrupted`` on SIGINT / SIGTERM (exit 130 / 143), and
``running`` with a heartbeat while it goes on. ``resume=true`` continues an interrupted or failed run in
its folder: finished images are kept, the chunk in flight continues from its checkpoint (saved after its first level,
then at most every ``checkpoint_every_sec`` seconds),
the others are sampled with the same seeds.

Under ``torchrun --nproc_per_node=N`` each rank takes a contiguous slice of the images (seeds depend only
on the image and sample numbers, so results do not depend on the split); every rank writes its images'
files, rank 0 writes metrics.json / timing.json, logs and shows progress. Under Hydra multirun (-m) each
job writes to <save_dir>/<name>/run<NNN>/ with its own status; a job refused for its config is recorded
as failed in its folder and the other jobs still run.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, NoReturn

import hydra
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from cores.noise import measurement_seed, particle_noise, particle_seed
from sampler import ParticleId, start_particles
from utils import folder
from utils.build import KEPT, RunParts, UserError, build_run, results_folder, sweep_job
from utils.device import barrier, eager_device, gather, shutdown, synchronize
from utils.events import EventLog, PhaseTimer
from utils.observer import RunLog, RunObserver, setup_logging
from utils.results import GRID_MAX_IMAGES, RunResults

log = logging.getLogger("posterior_sample")
EXIT_FAILED, EXIT_REFUSED = 1, 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run: what finished is written, then the process exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class JobFailed(CompactHydraException):
    """A sweep job that failed or was refused: Hydra records it, runs the other jobs, and exits 1 at the end."""


class StopSignals:
    """While a run samples, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, once: a signal that
    arrives while the run writes its results is logged and ignored (SIGKILL still stops at once). A Python handler
    that a job system installed for SIGUSR1 / SIGUSR2 (submitit: SLURM's time limit or preemption) still runs; if it
    raises, the run is recorded as interrupted by that signal. Outside the main thread nothing changes."""

    OWN = (signal.SIGINT, signal.SIGTERM)
    CHAINED = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.caught: str | None = None
        self.finishing = False
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.OWN:
                self.saved[sig] = signal.signal(sig, self.stop)
            for sig in self.CHAINED:
                previous = signal.getsignal(sig)
                if callable(previous):
                    self.saved[sig] = signal.signal(sig, self.chain(previous))
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self.saved.items():
            signal.signal(sig, previous)

    def stop(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.finishing or self.caught:
            log.warning("%s received while the run writes its results: ignored", name)
            return
        self.caught = name
        raise Interrupted(signum)

    def chain(self, previous: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            try:
                previous(signum, frame)
            except BaseException:
                self.caught = self.caught or signal.Signals(signum).name
                raise
        return handler


class Run:
    """Samples a built run's unfinished images chunk by chunk; the observer and the results do the rest.

    ``Run(parts)`` checks the results folder (a UserError when it may not be used); :meth:`open` creates it, or
    cleans it (overwrite=true), or takes up an earlier attempt (resume=true); :meth:`execute` samples and records the
    outcome."""

    def __init__(self, parts: RunParts, run_log: RunLog | None = None):
        self.parts, self.cfg = parts, parts.cfg
        self.resumed = folder.check(parts.root, self.cfg, parts.resume_free_keys())
        self.run_log = run_log or RunLog()
        self.opened = False

    def open(self) -> None:
        """Make the folder ready (rank 0), then open run.log, events and results on every rank."""
        parts, d, root = self.parts, self.parts.dist, self.parts.root
        barrier(d)  # every rank has checked the folder before rank 0 changes it
        if d.main:
            self.prepare_folder()
        barrier(d)
        suffix = "" if d.main else f".rank{d.rank}"
        self.run_log.open(root / f"run{suffix}.log")
        self.events = EventLog(root / f"events{suffix}.jsonl")
        self.timer = PhaseTimer(parts.device)
        self.results = RunResults(parts, self.timer, resumed=self.resumed is not None)
        self.observer = RunObserver(self.events, self.timer, parts.model, parts.sampler.schedule.planned_levels,
                                    root / "trajectory" if self.cfg.save_traj else None, self.cfg.show_progress,
                                    self.results.heartbeat)
        self.checkpoint = folder.ChunkCheckpoint(root / "checkpoint" / f"chunk{suffix}.pt",
                                                 self.cfg.checkpoint_every_sec)
        self.resume_chunk = self.checkpoint.load() if self.resumed is not None else None
        finished = self.results.recorder.finished()
        items = [parts.dataset[i] for i in parts.shard]
        self.todo = [it for it in items if it.index not in finished]
        if self.resumed is not None:
            log.info("resume=true: %d of %d image(s) finished earlier are kept; sampling the other %d", len(finished),
                     len(parts.dataset), len(parts.dataset) - len(finished))
        if d.main:
            done = [it for it in items if it.index in finished][:GRID_MAX_IMAGES]
            if done:
                gt, y = self.measure(done)
                for i, it in enumerate(done):
                    self.results.restore_image(it, gt[i], y[i])
            self.results.write("running")
        self.opened = True

    def prepare_folder(self) -> None:
        """Rank 0: remove the old folder (overwrite=true) and create this run's, or keep the finished images of the
        earlier attempt, the checkpoints of the chunks it had in flight that this run continues, and the events of
        both, and drop the events of the other unfinished images (resume=true)."""
        root, parts = self.parts.root, self.parts
        if self.resumed is None:
            if self.cfg.overwrite and folder.inspect(root) is not None:
                folder.remove(root)
            folder.create(root, "run", self.cfg)
        else:
            finished = {int(p.stem) for p in (root / "per_image").glob("*.json")}
            chunks = {path.name[len("chunk"):-len(".pt")]: folder.usable_checkpoint(
                          path, finished, self.cfg.batch_size, parts.dist.world, eager_device(parts.device).type)
                      for path in sorted((root / "checkpoint").glob("chunk*.pt"))}
            for path in sorted(root.glob("events*.jsonl")):
                dropped = folder.resume_events(path, finished, chunks.get(path.name[len("events"):-len(".jsonl")]))
                if dropped:
                    log.info("resume=true: %s: removed %d line(s) of images that are sampled again", path.name, dropped)
        (root / "samples").mkdir(exist_ok=True)

    def execute(self) -> int:
        """Sample every unfinished image of this rank and record the outcome. Returns the exit code: 0 (complete),
        1 (failed: the error is in metrics.json, timing.json and run.log) or 128 + the signal (interrupted)."""
        if not self.opened:
            self.open()
        status, code, reason, reraise = "complete", 0, None, None
        with StopSignals() as signals:
            try:
                try:
                    with self.results.stage("warm_up"):
                        self.warm_up()
                    for items in self.chunks():
                        self.run_chunk(items)
                finally:
                    signals.finishing = True  # from here on a signal no longer interrupts: the results get written
            except (Interrupted, KeyboardInterrupt) as stop:
                status, code = "interrupted", 128 + getattr(stop, "signum", signal.SIGINT)
                reason = signal.Signals(code - 128).name
                log.warning("interrupted (%s): writing the results of the %d finished image(s)", reason,
                            self.results.done_before + self.results.images_done)
            except BaseException as err:  # noqa: BLE001 - every failure is recorded before the process ends
                if signals.caught:  # a job system's handler (submitit) stopped the run: let it finish its exit
                    status, reason, reraise = "interrupted", signals.caught, err
                    log.warning("interrupted (%s, handled by the job system): writing the results", reason)
                else:
                    status, code, reason = "failed", EXIT_FAILED, f"{type(err).__name__}: {err}"
                    log.error("failed: %s", reason, exc_info=err)
            code = self.close(status, code, reason)
        if reraise is not None:
            raise reraise
        return code

    def warm_up(self) -> None:
        """Compile, before the sampling clock starts, what sampling would otherwise compile inside it, for a full
        chunk's particles: the networks of a compiled model (``model.compile``) and, with a fused noise draw (``noise:
        counter-fused``, what ``auto`` is on CUDA) or on CUDA, two MCMC steps (:meth:`DAPS.warm_up`: the draw, the
        operator's gradient and the kernel's fused arithmetic). Those have dynamic sizes; the networks compile once
        more, inside sampling, for a smaller last chunk, a prune or K2's particle count."""
        if not self.todo:
            return
        parts, dev = self.parts, self.parts.device
        model, op = parts.model, parts.operator
        n = min(self.cfg.batch_size, len(self.todo)) * self.cfg.num_samples
        if model.compiled != "none":
            start = time.perf_counter()
            model.warm_up(n)
            log.info("model.compile=%s: compiled the networks for %d particles in %.1f s", model.compiled, n,
                     time.perf_counter() - start)
        noise, cuda = particle_noise(self.cfg.noise, list(range(n)), dev), dev.type == "cuda"
        if not (noise.fused or cuda):  # nothing else compiles (XLA would trace a graph that sampling does not reuse)
            return
        start = time.perf_counter()
        parts.sampler.warm_up(model, op, noise, dev)
        synchronize(dev)
        log.info("warm-up: two MCMC steps (%s, %s noise, the %s gradient) for %d particles in %.1f s",
                 parts.sampler.kernel.name, self.cfg.noise, op.name, n, time.perf_counter() - start)

    def chunks(self) -> Iterator[list]:
        bs = self.cfg.batch_size
        for start in range(0, len(self.todo), bs):
            yield self.todo[start:start + bs]

    def measure(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground truth and measurement of ``items`` (each image's noise from its own seed)."""
        dev = self.parts.device
        gt = torch.stack([it.image for it in items]).to(dev)
        gens = [torch.Generator(device=eager_device(dev)).manual_seed(measurement_seed(self.cfg.seed, it.index))
                for it in items]
        with torch.no_grad():
            return gt, self.parts.operator.measure(gt, gens)

    def run_chunk(self, items: list) -> None:
        """Sample the particles of ``items`` (num_samples per image together, num_runs times), then score each image.
        The chunk is checkpointed after its first level, then at most every ``checkpoint_every_sec`` seconds; a
        checkpoint of this chunk from an earlier attempt is continued."""
        parts, cfg, dev = self.parts, self.cfg, self.parts.device
        gt, y = self.measure(items)
        ns, position = cfg.num_samples, {it.index: i for i, it in enumerate(items)}
        samples: dict[int, dict[int, tuple]] = {it.index: {} for it in items}
        chunk = {"images": [it.index for it in items], "batch_size": cfg.batch_size, "world": parts.dist.world,
                 "run": 0, "done": []}
        saved = self.continued(chunk["images"])
        for run in range(cfg.num_runs):
            if saved is not None and run < saved["run"]:  # finished before the interrupt: in the checkpoint
                out = saved["done"][run]
            else:
                ids = [ParticleId(it.index, run, run * ns + j) for it in items for j in range(ns)]
                group = [position[pid.image] for pid in ids]
                noise = particle_noise(cfg.noise, [particle_seed(cfg.seed, pid.image, pid.sample) for pid in ids], dev)
                x_start = parts.sampler.initial_state(noise, parts.model.in_shape, dev)
                labels = None
                if parts.model.class_conditional:
                    labels = parts.model.image_labels([it.index for it in items], [it.name for it in items])[group]
                particles = start_particles(ids, y[group], group, noise, x_start, labels)
                self.observer.begin([it.index for it in items], run, cfg.num_runs)
                chunk["run"] = run
                res = parts.sampler.sample(parts.model, parts.operator, particles, callback=self.observer,
                                           progress=self.observer.progress(),
                                           checkpoint=lambda state: self.checkpoint.save_due(
                                               lambda: {**chunk, "sample": state()}),
                                           resume_from=saved["sample"] if saved and run == saved["run"] else None)
                self.results.add_sampling(res.used_levels, res.network_evals, res.particle_network_evals,
                                          res.hard_dc_sec)
                out = {"ids": [list(pid) for pid in res.ids], "x": res.x.cpu(), "status": res.status,
                       "stopped_at": res.stopped_at, "pruned": res.pruned, "parents": res.parents,
                       "hard_dc": res.hard_dc}
                self.observer.save_trajectory()
            chunk["done"].append(out)
            for row, pid in enumerate(map(ParticleId._make, out["ids"])):
                stopped = (out["status"][row], out["stopped_at"][row])
                found = {"pruned_x0hat": out["pruned"].get(row), "parent": out["parents"].get(row),
                         "hard_dc": out.get("hard_dc", {}).get(row)}
                samples[pid.image][pid.sample] = (pid, out["x"][row].to(dev), stopped, found)
        for i, it in enumerate(items):
            done = [samples[it.index][k] for k in sorted(samples[it.index])]
            self.results.finish_image(it, gt[i], y[i], torch.stack([d[1] for d in done]), [d[2] for d in done],
                                      [d[0] for d in done], [d[3] for d in done])
        self.results.batch_done()
        self.checkpoint.clear()

    def continued(self, images: list[int]) -> dict | None:
        """The checkpoint of the chunk of ``images`` that an earlier attempt had in flight, if there is one."""
        saved, self.resume_chunk = self.resume_chunk, None
        if saved is None:
            return None
        if saved["images"] != images:
            log.info("resume=true: the checkpoint of images %d-%d is not the chunk of images %d-%d: not continued",
                     saved["images"][0], saved["images"][-1], images[0], images[-1])
            return None
        log.info("resume=true: images %d-%d continue from their checkpoint (run %d, after level %d)", images[0],
                 images[-1], saved["run"] + 1, saved["sample"]["step"] + 1)
        return saved

    def close(self, status: str, code: int, reason: str | None) -> int:
        """Stop the timer and the event log, write the final files (rank 0) and say how the run ended. ``reason``: the
        error of a failed run, the signal that interrupted one."""
        try:
            self.timer.stop()
        except Exception as err:  # noqa: BLE001 - a failed device may not synchronise; the results are still written
            log.warning("the device could not be synchronised at the end (%s): the last phase's time is not counted",
                        err)
        self.events.close()
        try:
            status = self.finish(status, reason)
        except OSError as err:
            log.error("could not write the final results to %s: %s", self.parts.root, err)
            status = "failed"
        finally:
            self.run_log.close()
        if status == "complete":
            shutdown(self.parts.dist)
        return EXIT_FAILED if status == "failed" else code

    def finish(self, status: str, reason: str | None) -> str:
        """The final metrics.json, timing.json, eval.md and grid (rank 0), and the run's last log line; returns the
        status (complete becomes failed if an image of another rank has no results)."""
        parts = self.parts
        ranks = gather(parts.dist, self.results.local_timing()) if status == "complete" else None
        if not parts.dist.main:
            return status
        planned, finished = len(parts.dataset), len(self.results.recorder.finished())
        if status == "complete" and finished < planned:
            status, reason = "failed", f"MissingResults: {planned - finished} of {planned} image(s) have no results"
            log.error("failed: %s", reason)
        timing = self.results.finish(status, ranks, reason if status == "failed" else None)
        log.info("outside sampling: %s (the final write included)",
                 ", ".join(f"{name} {sec:.2f} s" for name, sec in self.results.stages.items()))
        agg = self.results.recorder.aggregate()
        summary = ", ".join(f"{m} best {a['best_of_n']:.3f} mean {a['mean_of_n']:.3f}" for m, a in agg.items())
        if status == "complete":
            log.info("complete: %d image(s) in %.1f s (%s). %s", finished, timing["total_wall_sec"], parts.root,
                     summary)
        else:
            why = f" ({reason})" if status == "interrupted" else f": {reason}"
            log.warning("%s%s: %d of %d image(s) finished in %.1f s (%s); resume=true continues it. %s", status, why,
                        finished, planned, timing["total_wall_sec"], parts.root, summary)
        return status


def refused(cfg: DictConfig, err: UserError, run_log: RunLog) -> str:
    """A run refused before sampling: one error line and exit 2; a sweep job is also recorded as failed in its own
    folder (when that folder is new), and its error for Hydra is returned (the other jobs still run)."""
    log.error("%s", err)
    if not sweep_job():
        run_log.close()
        sys.exit(EXIT_REFUSED)
    root = results_folder(cfg)
    try:
        if folder.record_refused_job(root, cfg, err):
            run_log.open(root / "run.log")
    except UserError as unwritable:
        log.error("%s", unwritable)
    run_log.close()
    return f"{root}: {err}"


def start_and_execute(cfg: DictConfig, run_log: RunLog) -> tuple[int, str | None]:
    """Build, open and execute the run: its exit code and, for a sweep's job that was refused or failed, its error.
    Only a complete job hands its model on to the next job of a sweep (:class:`utils.build.KeptForSweep`)."""
    try:
        parts = build_run(cfg)
        if not parts.dist.main:
            logging.getLogger().setLevel(logging.WARNING)
        run = Run(parts, run_log)
        run.open()
    except UserError as err:
        code, error = EXIT_REFUSED, refused(cfg, err, run_log)
    else:
        code = run.execute()
        failed = code == EXIT_FAILED and sweep_job()
        error = f"{parts.root}: failed (the error is in its metrics.json and run.log)" if failed else None
    if code:
        KEPT.clear()
    return code, error


@hydra.main(version_base="1.3", config_path="configs", config_name="default")
def main(cfg: DictConfig) -> None:
    setup_logging()
    code, error = start_and_execute(cfg, RunLog())
    if error is not None:  # raised here, where no frame holds the job's parts: Hydra keeps a sweep's errors to its end
        raise JobFailed(error)
    if code:
        sys.exit(code)


def observed() -> bool:
    """Whether a profiler, tracer or coverage tool watches this process (it writes its output after the script)."""
    monitoring = getattr(sys, "monitoring", None)
    return (sys.getprofile() is not None or sys.gettrace() is not None
            or (monitoring is not None and any(monitoring.get_tool(i) for i in range(6))))


def exit_without_teardown() -> NoReturn:
    """End the process after ``main`` returned (every result file is written and closed by then) as the interpreter
    would, without its last part: wait for the other non-daemon threads and run the exit handlers (inductor's compile
    workers, logging, torch_xla's client), then end, skipping the teardown of every module and of torch's objects,
    which took about 1 s after a run on this project's 2-core CPU machine and more on the H100's host
    (docs/benchmarks.md, "Tenth session"). A run that fails or is interrupted, or one under a profiler or coverage
    tool (:func:`observed`), or with ``POSTERIOR_SAMPLE_FULL_EXIT=1`` in the environment (a memory tracker that writes
    its output at the interpreter's end), exits the usual way."""
    if observed() or os.environ.get("POSTERIOR_SAMPLE_FULL_EXIT") == "1":
        sys.exit(0)
    threading._shutdown()  # what the interpreter's exit does first (Py_FinalizeEx), then the atexit handlers
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)  # C stdio's buffers too (NCCL's or XLA's log lines when piped)
    except (OSError, TypeError, AttributeError):  # a closed pipe; a platform without a C library handle
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
