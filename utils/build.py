"""Building and validating a run, before any compute and without writing a file.

:func:`build_run` turns the composed config into the run's parts (device, data, operator, model, sampler,
evaluator, results folder, this rank's images); every configuration or file problem becomes a
:class:`UserError` of one line naming the key or file. :func:`check_name` and :func:`config_differences`
are the pure checks of the results folder's name and of a resumed run's config (utils/folder.py applies them).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from omegaconf import DictConfig, OmegaConf

from cores.models import Denoiser, build_model
from cores.noise import NOISE, auto_kind
from cores.operators import Operator, build_operator
from sampler import DAPS, build_sampler
from utils.config import CONFIGS, check_composed, check_experiment_order
from utils.data import Dataset, build_dataset
from utils.device import Dist, device_info, eager_device, get_device, init_distributed
from utils.metrics import Evaluator

log = logging.getLogger("posterior_sample")


class UserError(Exception):
    """A problem with the command line, config or files, reported without a traceback."""


# Keys that may differ between a run and its resume=true: where results go, what is shown, which device computes
# (devices agree to floating-point precision, not bit for bit) and how many images share a batch (each particle has
# its own random stream and each measurement its own seed, so results do not depend on the batch) unless the sampler
# couples the images of a batch (K2's batch median: RunParts.resume_free_keys). Every other key changes results: a
# resume with a different value is refused.
RESUME_FREE_KEYS = ("name", "save_dir", "overwrite", "resume", "show_progress", "save_traj", "gpu", "use_tpu",
                    "batch_size", "checkpoint_every_sec")


@dataclass
class RunParts:
    """Everything a run needs, built and checked."""

    cfg: DictConfig
    dist: Dist
    device: Any
    dataset: Dataset
    operator: Operator
    model: Denoiser
    sampler: DAPS
    evaluator: Evaluator
    root: Path
    shard: list[int]
    started_unix: float  # when build_run began: the job's start in a sweep

    @property
    def particles_per_image(self) -> int:
        return self.cfg.num_runs * self.cfg.num_samples

    def resume_free_keys(self) -> tuple[str, ...]:
        """The top-level keys that may change on resume=true (batch_size only if the sampler couples no batch)."""
        coupled = self.sampler.schedule.couples is not None
        return tuple(k for k in RESUME_FREE_KEYS if not (coupled and k == "batch_size"))

    def metric_names(self) -> list[str]:
        return [m for m in self.cfg.eval_fn_list if m not in self.evaluator.unavailable] + ["meas_err"]

    def header(self) -> dict[str, Any]:
        """The run's settings, for metrics.json."""
        cfg = self.cfg
        return {"name": cfg.name, "task": self.operator.name, "task_group": cfg.task_group,
                "particles_per_image": self.particles_per_image, "num_samples": cfg.num_samples,
                "num_runs": cfg.num_runs, "batch_size": cfg.batch_size, "seed": cfg.seed, "noise": cfg.noise,
                "num_images_planned": len(self.dataset),
                "eval": self.evaluator.status, "sampler": self.sampler.describe(), "device": device_info(self.device)}


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _require(cfg: DictConfig, key: str, example: str) -> dict:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"no {key} config selected: add +{key}={example} to the command line")
    return container(cfg[key])


def _step(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a build step; turn configuration and file errors into a UserError naming the step."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, NotImplementedError, TypeError, KeyError) as err:
        raise UserError(f"{what}: {err}") from err


class KeptForSweep:
    """What a sweep's job built that the next job in the same process takes as it is, when built from the same config.

    Hydra's default launcher runs a sweep's (``-m``) jobs one after another in one process (joblib's workers also
    take several jobs each): a job whose model config and device equal the last job's takes that model as built,
    its weights loaded and its networks compiled for the shapes seen so far, and likewise the evaluator (LPIPS'
    network) for the same metrics, device and image size; the warnings logged while building it are logged again, so
    that every job's run.log has them. One object per role is kept: a job with another config lets go of the kept one
    before building its own (device memory). Only a job that completes hands its objects on (posterior_sample.py
    clears them after any other outcome: a ``sample`` that raised may leave class labels set on the model). Single
    runs keep nothing."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[str, Any, list[logging.LogRecord]]] = {}

    def take(self, role: str, key: Any, build: Callable[[], Any]) -> Any:
        """The object kept for ``role`` if it was built under ``key`` (compared as JSON), else ``build()``, kept."""
        text = json.dumps(key, sort_keys=True, default=str)
        held = self.kept.pop(role, None)
        if held is not None and held[0] == text:
            log.info("sweep: the %s built by an earlier job of this process is reused (same config)", role)
            obj, warnings = held[1], held[2]
            for record in warnings:
                logging.getLogger(record.name).handle(record)
        else:
            del held  # the last reference to the object of another config: freed before the build
            caught = BufferingHandler(capacity=math.inf)  # every record while attached, none flushed
            caught.setLevel(logging.WARNING)
            logging.getLogger().addHandler(caught)
            try:
                obj = build()
            finally:
                logging.getLogger().removeHandler(caught)
            warnings = caught.buffer
        self.kept[role] = (text, obj, warnings)
        return obj

    def clear(self) -> None:
        self.kept.clear()


KEPT = KeptForSweep()


def sweep_reuse(role: str, key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, or in a sweep's job the object an earlier job of this process built under the same ``key``."""
    return KEPT.take(role, key, build) if sweep_job() else build()


def check_name(name: Any) -> None:
    """``name`` is one non-empty path component: results go to <save_dir>/<name>/, and overwrite=true removes it."""
    text = str(name) if isinstance(name, (str, int, float)) and not isinstance(name, bool) else None
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise UserError(f"name={name!r} is not a folder name: results go to <save_dir>/<name>/, so name must be one "
                        f"non-empty path component (no '/', not '.' or '..'), e.g. name=pr_demo")


# Keys that runs written before them lack, with the value that behaves as those runs did: a config.yaml without the
# key matches a command that sets it to this value (e.g. model.compile=none resumes a run from before model.compile).
ADDED_KEYS = {"noise": "generator", "model.compile": "none", "model.channels_last": False,
              "model.decoder_attention": "sdpa"}


def config_differences(saved: Mapping[str, Any], cfg: DictConfig, free: Sequence[str] = RESUME_FREE_KEYS
                       ) -> list[str]:
    """The keys (dotted, with both values) in which ``cfg`` differs from a run's saved config.yaml, outside the
    top-level keys ``free``; compared after the same YAML round trip, so 1e-5 equals 1.0e-05. A key of
    :data:`ADDED_KEYS` absent from the saved config counts as its old behaviour's value."""
    now = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    old, new = _flat(dict(saved)), _flat(now)
    added = {k: v for k, v in ADDED_KEYS.items() if k not in old and k in new}
    old.update(added)
    keys = [k for k in dict.fromkeys([*old, *new]) if k.split(".")[0] not in free]
    saved_as = {k: f"absent, as {v!r}" for k, v in added.items()}
    return [f"{k} (saved {saved_as.get(k) or _show(old.get(k, _ABSENT))}, now {_show(new.get(k, _ABSENT))})"
            for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


_ABSENT = object()


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def check_counts(cfg: DictConfig) -> None:
    for key in ("num_samples", "num_runs", "batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    every = cfg.get("checkpoint_every_sec", 0)
    if not isinstance(every, (int, float)) or isinstance(every, bool) or not 0 <= every < math.inf:
        raise UserError(f"checkpoint_every_sec must be a number of seconds >= 0 (0: after every level), got {every!r}")
    if cfg.noise not in (*NOISE, "auto"):
        raise UserError(f"noise must be auto or one of {', '.join(NOISE)}, got {cfg.noise!r}")


def sweep_job() -> bool:
    """True inside a job of a Hydra multirun (-m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def results_folder(cfg: DictConfig) -> Path:
    """<save_dir>/<name>, or <save_dir>/<name>/run<NNN> for job NNN of a Hydra multirun (sweep)."""
    from hydra.core.hydra_config import HydraConfig

    root = Path(cfg.save_dir) / str(cfg.name)
    return root / f"run{HydraConfig.get().job.num:03d}" if sweep_job() else root


def hydra_choices() -> tuple[Mapping[str, str | None], Sequence[Path]]:
    """The selected option of each config group and the config folders searched (outside Hydra: none, ours)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, (CONFIGS,)
    rt = HydraConfig.get().runtime
    folders = [Path(s.path) for s in rt.config_sources if s.schema == "file"]
    return dict(rt.choices), [CONFIGS, *folders]


def build_run(cfg: DictConfig, choices: Mapping[str, str | None] | None = None,
              search: Sequence[Path] | None = None) -> RunParts:
    """Check the config and build every part of the run (nothing is sampled, no file is written). In a sweep's job
    the model and evaluator of the previous job in this process are reused when their configs match
    (:class:`KeptForSweep`)."""
    started = time.time()
    check_name(cfg.get("name"))
    if cfg.get("overwrite") and cfg.get("resume"):
        raise UserError("overwrite=true and resume=true contradict each other: resume=true continues the run in "
                        "its folder, overwrite=true deletes that folder first; pass one of them")
    if choices is None:
        choices, search = hydra_choices()
    _step("config", check_composed, cfg, choices, search or (CONFIGS,))
    _step("config", check_experiment_order, cfg, choices, search or (CONFIGS,))
    data_cfg = _require(cfg, "data", "test-fmnist")
    model_cfg = _require(cfg, "model", "fmnist32ddpm")
    task_cfg = _require(cfg, "task", "phase_retrieval")
    sampler_cfg = _require(cfg, "sampler", "edm_daps")
    if cfg.task_group not in task_cfg:
        raise UserError(f"task_group={cfg.task_group} is not defined by the task config; "
                        f"choose one of {', '.join(task_cfg)}")
    group = task_cfg[cfg.task_group]
    sampler = _step("sampler", build_sampler, sampler_cfg, group["mcmc_sampler_config"])
    if cfg.num_samples is None:  # written back, so config.yaml and the results header show the number used
        cfg.num_samples = sampler.schedule.default_particles
        if cfg.num_samples > 1:
            log.info("num_samples=null: %d particles per measurement (K2 measures a CESS among a measurement's "
                     "particles; the K2 log's 4 runs as one batch)", cfg.num_samples)
    check_counts(cfg)
    dist = init_distributed(cfg.gpu, cfg.use_tpu)
    device = _step("device", get_device, cfg.gpu, cfg.use_tpu, dist)
    if cfg.noise == "auto":  # written back, so config.yaml and the results header show the streams used
        cfg.noise = auto_kind(device)
    dataset = _step("data", build_dataset, data_cfg)
    shape = tuple(dataset[0].image.shape)
    operator = _step(f"operator (task.{cfg.task_group}.operator)", build_operator, group["operator"], cfg.seed)
    operator = operator.to(device)
    _step("operator input", operator.check_input, shape)
    model = sweep_reuse("model", [model_cfg, str(device)], lambda: _step("model", build_model, model_cfg, device))
    if tuple(model.image_shape) != shape:
        raise UserError(f"data images are {shape} (C, H, W) but the model expects {model.image_shape}: "
                        f"choose data with the model's resolution and channels (data.resolution, data.channels)")
    _step("sampler", sampler.check, model, cfg.num_samples)
    metrics, eval_device = list(cfg.eval_fn_list), eager_device(device)
    evaluator = sweep_reuse("evaluator", [metrics, str(eval_device), shape],
                            lambda: _step("eval_fn_list", Evaluator, metrics, eval_device, shape))
    n = len(dataset)
    shard = list(range(n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world))
    return RunParts(cfg, dist, device, dataset, operator, model, sampler, evaluator, results_folder(cfg), shard,
                    started)
