"""The DAPS / LatentDAPS loop (Zhang et al., CVPR 2025, Algorithm 1), built from roles.

For annealing levels sigma_0 > sigma_1 > ... (a :class:`~cores.scheduler.Schedule`: preset, or adaptive):

1. x0hat = PF-ODE(x_t) from sigma_k down to the ODE's sigma_min (no grad);
2. x0y ~ pi_k(x_0) by the kernel's MCMC updates started at x0hat (cores/mcmc.py);
3. sigma_{k+1} = schedule.next(...); x_{k+1} = x0y + sigma_{k+1} n, and no noise after the last level.

LatentDAPS is the same loop on latents z, with A(decode(z)) in the likelihood and decode at the end.

Per-particle state (x, its measurement copy, its measurement index, its id, its random stream, any
feature's state) lives in :class:`Particles`, so removing particles (a NaN, later pruning) slices all of it
at once. The loop keeps no state between calls. It makes one host synchronisation per level: the
per-particle statistics of the level are copied to the host in one transfer (:func:`level_stats_to_host`),
handed to the schedule and emitted as a ``level`` event through the one callback.

Checkpoints: with a ``checkpoint`` callback the loop hands it, after each level, a function that returns everything
it needs to go on (:func:`loop_state`: host tensors and plain values, for ``torch.save``); calling it copies the
particles' state to the host, one more transfer, so a caller that saves less often than every level
(posterior_sample.py: ``checkpoint_every_sec``) does not pay it at the others; ``sample(..., resume_from=that)``
continues from there, bit for bit as if never stopped (:func:`resume`).

The schedule is the preset's (:class:`~cores.scheduler.PresetSchedule`) or, with ``sampler.k2_scheduler_config``,
K2-DAPS's (:class:`~cores.k2.K2Schedule`: the next level by the conditional ESS; one sigma for the whole batch).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, Callable, NamedTuple

import torch

from cores.k2 import K2Schedule, k2_settings
from cores.mcmc import Kernel, MCMCConfig, TargetSpec, make_target
from cores.models import Denoiser
from cores.noise import ParticleNoise, SharedNoise, branch_seed
from cores.operators import LatentOperator, Operator
from cores.pruning import Pruning, choose
from cores.pairwise import rms_distances
from cores.repulsion import Repulsion, distance_stats, level_tilt, repulsion_report
from cores.resample import STOPS, DCResult, HardDC
from cores.scheduler import PFODE, PresetSchedule, Schedule
from utils.config import check_keys, signature_keys
from utils.device import allow_sync, index_tensor, to_host

log = logging.getLogger(__name__)
Callback = Callable[[dict[str, Any]], None]


class ParticleId(NamedTuple):
    """Who a particle is: its image (dataset index), its run and its sample number within the image."""

    image: int
    run: int
    sample: int

    def __str__(self) -> str:
        return f"{self.image}:{self.sample}"


@dataclass
class Particles:
    """Everything that belongs to one particle, row by row; :meth:`select` slices every field.

    ``group`` is the index of the particle's measurement within the batch (on the device, for features that
    couple the particles of one measurement); ``ids`` says who each particle is; ``row`` is its row in the
    batch it started in; ``state`` holds per-particle tensors of features (momenta, optimiser state).
    """

    x: torch.Tensor
    y: torch.Tensor
    group: torch.Tensor
    ids: list[ParticleId]
    row: list[int]
    noise: ParticleNoise | SharedNoise
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: list[int]) -> "Particles":
        """The particles at positions ``keep``, every field sliced (a field of an unknown kind is an error)."""
        idx = index_tensor(keep, self.x.device)
        return Particles(**{f.name: _slice(getattr(self, f.name), keep, idx, f.name) for f in fields(self)})


def _slice(value: Any, keep: list[int], idx: torch.Tensor, name: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx.to(value.device))
    if isinstance(value, list):
        return [value[i] for i in keep]
    if isinstance(value, dict):
        return {k: _slice(v, keep, idx, f"{name}.{k}") for k, v in value.items()}
    if hasattr(value, "select"):
        return value.select(keep)
    raise TypeError(f"Particles.{name}: cannot slice a {type(value).__name__} per particle")


def start_particles(ids: list[ParticleId], y: torch.Tensor, group: list[int], noise: ParticleNoise | SharedNoise,
                    x: torch.Tensor, class_labels: torch.Tensor | None = None) -> Particles:
    """Particles at their initial state ``x``; ``y`` holds one measurement per particle, ``group`` its index,
    ``class_labels`` (class-conditional models) one label per particle."""
    if not len(ids) == len(y) == len(group) == len(noise) == len(x):
        raise ValueError(f"particles disagree in number: ids {len(ids)}, y {len(y)}, group {len(group)}, "
                         f"noise {len(noise)}, x {len(x)}")
    state = {} if class_labels is None else {"class_label": class_labels}
    return Particles(x, y, index_tensor(group, x.device), list(ids), list(range(len(ids))), noise, state)


@dataclass
class SampleResult:
    """Final states of all particles in their starting rows (rows of stopped particles are NaN), what happened to
    each, and what the run really did: levels visited, denoiser calls. ``pruned``: row -> the pruned particle's
    x0hat (image, on the host) at its prune level; ``parents``: row -> id of the survivor a branched clone copied;
    ``hard_dc``: row -> the particle's hard data consistency record (:meth:`Found.add_dc`), ``hard_dc_sec`` the
    optimisation's wall time."""

    x: torch.Tensor
    ids: list[ParticleId]
    status: list[str]
    stopped_at: list[int | None]
    levels: list[float]
    network_evals: int
    particle_network_evals: int
    pruned: dict[int, torch.Tensor] = field(default_factory=dict)
    parents: dict[int, str] = field(default_factory=dict)
    hard_dc: dict[int, dict[str, Any]] = field(default_factory=dict)
    hard_dc_sec: float = 0.0

    @property
    def used_levels(self) -> int:
        return len(self.levels)


@dataclass
class Found:
    """What the loop found about particles that is not per-particle state: the prune level, pruned particles' x0hat
    (by row), branched clones' parents (by row), each particle's hard data consistency record (by row, :meth:`add_dc`)
    and the optimisation's wall time; kept in the checkpoint."""

    pruned_at: int | None = None
    pruned: dict[int, torch.Tensor] = field(default_factory=dict)
    parents: dict[int, str] = field(default_factory=dict)
    hard_dc: dict[int, dict[str, Any]] = field(default_factory=dict)
    hard_dc_sec: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at, "pruned": dict(self.pruned), "parents": dict(self.parents),
                "hard_dc": {k: dict(v) for k, v in self.hard_dc.items()}, "hard_dc_sec": self.hard_dc_sec}

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> "Found":
        return cls(saved["pruned_at"], dict(saved["pruned"]), dict(saved["parents"]),  # checkpoints before Exp 4: none
                   {k: dict(v) for k, v in saved.get("hard_dc", {}).items()}, saved.get("hard_dc_sec", 0.0))

    def add_dc(self, rows: list[int], host: dict[str, list], sec: float) -> None:
        """Add one level's optimisation (host lists, one entry per particle of ``rows``) to each particle's record:
        levels optimised and accepted, updates (total and most in one level), time, the data loss before the first
        and after the last optimisation, and how often each stopping rule ended it."""
        self.hard_dc_sec += sec
        for k, row in enumerate(rows):
            rec = self.hard_dc.setdefault(row, {"levels": 0, "accepted": 0, "steps": 0, "steps_max": 0, "sec": 0.0,
                                                "first_loss_before": host["dc_loss_before"][k],
                                                **{f"stop_{s}": 0 for s in STOPS}})
            steps = int(host["dc_steps"][k])
            rec.update(levels=rec["levels"] + 1, accepted=rec["accepted"] + int(host["dc_accepted"][k]),
                       steps=rec["steps"] + steps, steps_max=max(rec["steps_max"], steps),
                       sec=rec["sec"] + host["dc_particle_sec"][k], last_loss_after=host["dc_loss_after"][k])
            rec[f"stop_{STOPS[int(host['dc_stop'][k])]}"] += 1


class CountingDenoiser:
    """The denoiser seen by the loop: counts network calls (``denoise`` and ``score``) as they happen."""

    def __init__(self, denoiser: Denoiser):
        self.inner, self.calls, self.particle_calls = denoiser, 0, 0

    def _count(self, x: torch.Tensor) -> None:
        self.calls += 1
        self.particle_calls += x.shape[0]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self._count(x)
        return self.inner.denoise(x, sigma)

    def score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self._count(x)
        return self.inner.score(x, sigma)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def level_stats_to_host(stats: dict[str, torch.Tensor | None]) -> dict[str, list | None]:
    """Per-particle statistics of a level (1-D tensors, or None when a kernel has none) in one host transfer."""
    present = [k for k, v in stats.items() if v is not None]
    rows = to_host(torch.stack([stats[k].float() for k in present]))
    host: dict[str, list | None] = {k: None for k in stats}
    host.update(zip(present, rows))
    return host


def drop_nonfinite(state: Particles, finite: list[float], step: int, sigma: float, status: list[str],
                   stopped_at: list[int | None]) -> Particles:
    """Stop the particles whose state is NaN/Inf (reported, their rows stay NaN); the others go on."""
    dead = [i for i, ok in enumerate(finite) if not ok]
    if not dead:
        return state
    for i in dead:
        status[state.row[i]], stopped_at[state.row[i]] = "nonfinite", step
    names = [str(state.ids[i]) for i in dead]
    log.warning("%d particle(s) produced NaN/Inf at level %d (sigma=%.4g) and were stopped: %s%s",
                len(dead), step, sigma, names[:8], " ..." if len(dead) > 8 else "")
    return state.select([i for i, ok in enumerate(finite) if ok])


def _to_cpu(value: Any) -> Any:
    """A copy on the host of a tensor, or of the tensors of a dict (feature state)."""
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    with allow_sync():
        return value.detach().to("cpu", copy=True)


def _to_device(value: Any, device: torch.device) -> Any:
    return {k: _to_device(v, device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)


def loop_state(state: Particles, step: int, next_sigma: float | None, status: list[str],
               stopped_at: list[int | None], levels: list[float], schedule: Schedule, net: CountingDenoiser
               ) -> dict[str, Any]:
    """What the loop needs to continue after level ``step`` (the particles' x already carry the noise of level
    ``next_sigma``): tensors on the host, lists, dicts, numbers, strings and None only (``torch.load(...,
    weights_only=True)`` reads it back)."""
    return {"step": step, "next_sigma": next_sigma, "x": _to_cpu(state.x), "ids": [list(i) for i in state.ids],
            "row": list(state.row), "status": list(status), "stopped_at": list(stopped_at), "levels": list(levels),
            "noise": state.noise.state_dict(), "state": _to_cpu(state.state), "schedule": schedule.state_dict(),
            "network_evals": net.calls, "particle_network_evals": net.particle_calls}


def resume(particles: Particles, saved: dict[str, Any], schedule: Schedule, net: CountingDenoiser
           ) -> tuple[Particles, float | None, int, list[str], list[int | None], list[float]]:
    """The loop's state from :func:`loop_state` for the batch ``particles`` it started with (the same ids, rows
    and measurements): (particles, sigma, step, status, stopped_at, levels) of the next level."""
    state = particles.select(saved["row"])
    if [list(i) for i in state.ids] != saved["ids"] or len(saved["status"]) != len(particles):
        raise ValueError("resume_from belongs to another batch of particles")
    state.x = saved["x"].to(particles.x.device, particles.x.dtype)
    if isinstance(state.noise, ParticleNoise):  # branched clones run on streams of their own seeds
        state.noise = state.noise.reseed({k: seed for k, (seed, old) in enumerate(zip(saved["noise"]["seeds"],
                                                                                        state.noise.seeds)) if seed != old})
    state.noise.load_state_dict(saved["noise"])
    state.state = _to_device(saved["state"], particles.x.device)
    schedule.load_state_dict(saved["schedule"])
    net.calls, net.particle_calls = saved["network_evals"], saved["particle_network_evals"]
    return (state, saved["next_sigma"], saved["step"] + 1, list(saved["status"]), list(saved["stopped_at"]),
            list(saved["levels"]))


class DAPS:
    """DAPS with any schedule; ``latent`` runs LatentDAPS. Build it from config with :func:`build_sampler`."""

    host_syncs_per_level = 1

    def __init__(self, schedule: Schedule, ode: PFODE, kernel: Kernel, target: TargetSpec, latent: bool = False,
                 repulsion: Repulsion | None = None, pruning: Pruning | None = None, hard_dc: HardDC | None = None):
        self.schedule, self.ode, self.kernel, self.target, self.latent = schedule, ode, kernel, target, bool(latent)
        self.repulsion, self.pruning, self.hard_dc = repulsion or Repulsion(), pruning or Pruning(), hard_dc or HardDC()

    def check(self, denoiser: Denoiser, particles_per_measurement: int | None = None) -> None:
        """Refuse combinations that cannot run, before any compute (``particles_per_measurement``: num_samples,
        which K2 needs to be at least 2)."""
        if particles_per_measurement is not None:
            self.schedule.check_particles(particles_per_measurement)
        if self.schedule.needs_acceptance and not self.kernel.needs_log_prob:
            raise ValueError(f"the K2 reheating trigger low_acceptance reads MH acceptance rates, but mc_algo="
                             f"{self.kernel.name} has no MH test: use an MH kernel (mala, hmc_mh, mh, da_hmc) or "
                             "drop low_acceptance from sampler.k2_scheduler_config.reheat.triggers")
        if denoiser.latent != self.latent:
            kind = "latent" if denoiser.latent else "pixel"
            raise ValueError(f"model is a {kind} model but the sampler has latent={self.latent}: use "
                             f"+sampler={'latent_edm_daps' if denoiser.latent else 'edm_daps'}")
        if self.kernel.needs_log_prob and self.target.prior_solver == "exact" and not denoiser.has_log_prob:
            raise ValueError(f"mc_algo={self.kernel.name} with prior_solver=exact needs the prior's log-density, "
                             "which only analytic models (gmm) have; use prior_solver=gaussian")

    def describe(self) -> dict[str, Any]:
        """What the results header and timing.json say about the sampler (settings, not measurements)."""
        return {"latent": self.latent, "schedule": self.schedule.describe(), "ode_steps": self.ode.num_steps,
                "ode_solver": self.ode.solver, "ode_sigma_min": self.ode.sigma_min, **self.kernel.describe(),
                **self.target.describe(), "repulsion": self.repulsion.describe(), "pruning": self.pruning.describe(),
                "hard_dc": {**self.hard_dc.describe(), **self.hard_dc.settings(self.latent)}, "couples": self.schedule.couples or "none (each particle is independent of its batch)"}

    def level_operator(self, operator: Operator, denoiser: Denoiser) -> Operator:
        """The operator the MCMC sees: ``operator`` itself, or for LatentDAPS ``operator`` after the decoder."""
        return LatentOperator(operator, denoiser.decode) if self.latent else operator

    def warm_up(self, denoiser: Denoiser, operator: Operator, noise: ParticleNoise | SharedNoise,
                device: torch.device) -> None:
        """Two MCMC steps of the kernel for ``len(noise)`` particles at zero, under a level's target (the operator's
        gradient, the prior term, the noise's draws), so that what a level compiles on CUDA (``utils.device.fused``'s
        kernels, a fused noise draw) compiles here, before the sampling clock; two steps, because a level's last step
        computes the loss and the others skip it (two traces of the operator's spectrum kernel)."""
        op = self.level_operator(operator, denoiser)
        x = torch.zeros(len(noise), *denoiser.in_shape, device=device)
        y = operator(torch.zeros(len(noise), *denoiser.image_shape, device=device))
        target = make_target(self.target, denoiser, lambda v: op.loss(v, y), x, x, 1.0,
                             gradient=partial(op.gradient, y=y))
        replace(self.kernel, num_steps=2).run(target, x, noise, self.kernel.lr)

    def initial_state(self, noise: ParticleNoise | SharedNoise, shape: tuple[int, ...], device: torch.device
                      ) -> torch.Tensor:
        return (noise.randn(shape) * self.schedule.start()).to(device)

    def particles(self, y: torch.Tensor, noise: ParticleNoise | SharedNoise, shape: tuple[int, ...],
                  device: torch.device, group: list[int] | None = None) -> Particles:
        """Particles started from noise at the first level, one row of ``y`` each; ``group`` is each particle's
        measurement (default: all of one measurement), and the ids are (group, 0, row) (for tests and scripts; the
        run names its particles itself)."""
        group = [0] * len(noise) if group is None else list(group)
        ids = [ParticleId(g, 0, k) for k, g in enumerate(group)]
        return start_particles(ids, y, group, noise, self.initial_state(noise, shape, device))

    def sample(self, denoiser: Denoiser, operator: Operator, particles: Particles, callback: Callback | None = None,
               progress: Callable[[int], Any] | None = None,
               checkpoint: Callable[[Callable[[], dict]], Any] | None = None,
               resume_from: dict[str, Any] | None = None) -> SampleResult:
        """Run the loop for a batch of particles (:func:`start_particles`).

        ``callback`` receives typed events: ``phase`` (``phase``: the phase that starts, None at the end) and,
        once per level, ``level`` with the level's host-side statistics (``loss``, ``acceptance``, ``finite``),
        the particles' ``ids`` and the device tensors ``x0hat`` and ``x0y``, followed by the schedule's events of
        that level (K2: ``k2`` records, ``reheat``). ``checkpoint`` receives after each level a function to call
        during the callback, which returns :func:`loop_state`; ``resume_from``, one such state of a call with the
        same ``particles``, continues that call after its level (the result is the same bit for bit).
        """
        self.schedule.check_particles(max(Counter(pid.image for pid in particles.ids).values(), default=0))
        emit = callback or (lambda event: None)
        net = CountingDenoiser(denoiser)
        op = self.level_operator(operator, denoiser)
        state, total = particles, len(particles)
        status, stopped_at = ["ok"] * total, [None] * total
        levels: list[float] = []
        found = Found()
        sigma, step = self.schedule.start(), 0
        sigma_max = sigma
        sigma_off = self.repulsion.cutoff(denoiser) if self.repulsion.on else None
        sigma_prune = denoiser.sigma_at_time(self.pruning.step) if self.pruning.on else None
        sigma_dc = denoiser.sigma_at_time(self.hard_dc.step) if self.hard_dc.on else None
        if resume_from is not None:
            state, sigma, step, status, stopped_at, levels = resume(particles, resume_from, self.schedule, net)
            found = Found.from_state(resume_from["found"])
        if self.hard_dc.on and not self.latent and operator.has_twin:
            log.warning("hard data consistency in pixel space on %s: the plan warns that pixel-space optimisation "
                        "harms phase retrieval; use a latent model to optimise z", operator.name)
        dc_first = next((k for k, s in enumerate(levels) if s <= sigma_dc), None) if sigma_dc is not None else None
        bar = progress(self.schedule.planned_levels) if progress else None
        if bar is not None and step:
            bar.update(step)
        phase = None
        while sigma is not None and len(state):
            if sigma_dc is not None and dc_first is None and sigma <= sigma_dc:
                dc_first = step
            optimizing = dc_first is not None
            now = "optimize" if optimizing else "refine" if found.pruned_at is not None else "explore"
            if now != phase:
                phase = now
                emit({"event": "phase", "phase": phase, "step": step})
            if "class_label" in state.state:  # labels are per-particle state: they follow every select
                denoiser.condition(state.state["class_label"])
            # 1. reverse diffusion to the level's prior mean
            x0hat = self.ode.solve(net.denoise, state.x, sigma)
            # 2. MCMC on the level's conditional pi_k (data term + Gaussian around x0hat), tilted by the repulsion
            #    from the other particles of the measurement at the level's start while it is on (cores/repulsion.py;
            #    off once hard data consistency has started)
            loss = lambda x, yy=state.y: op.loss(x, yy)  # noqa: E731
            loss_rows = lambda x, rows, yy=state.y: op.loss(x, yy[rows])  # noqa: E731
            gamma = self.repulsion.strength(sigma, sigma_max, sigma_off) if self.repulsion.on and not optimizing else 0.0
            tilt = ratio = None
            if gamma > 0:
                tilt, ratio = level_tilt(self.repulsion, gamma, x0hat.detach(), state.group, loss, self.target.data_weight)
            gradient = partial(op.gradient, y=state.y)  # the closed form where the operator has one
            target = make_target(self.target, net, loss, state.x, x0hat, sigma, tilt=tilt, loss_rows=loss_rows,
                                 gradient=gradient)
            out = self.kernel.run(target, x0hat, state.noise, self.kernel.lr_at(self.schedule.progress(step, sigma)))
            x0y, level_loss = out.x, out.loss
            # 3. hard data consistency (cores/resample.py): each particle's x pulled onto its measurement by AdamW
            dc: DCResult | None = None
            if optimizing and self.hard_dc.due(step, dc_first):
                dc, take = self.optimise(state, loss_rows, out, x0hat)
                view = take.view(-1, *([1] * (out.x.dim() - 1)))
                x0y, level_loss = torch.where(view, dc.x, out.x), torch.where(take, dc.loss_after, out.loss)
            # 4. the level's statistics, with those the schedule asks for: the one host synchronisation of the level
            extra = {} if tilt is None else {"bandwidth": tilt.h, "gamma": tilt.gamma, "force_ratio": ratio}
            if dc is not None:
                extra.update(dc_loss_before=dc.loss_before, dc_loss_after=dc.loss_after, dc_steps=dc.steps,
                             dc_stop=dc.stop, dc_accepted=take)
            host = level_stats_to_host({"loss": level_loss, "acceptance": out.acceptance,
                                        "finite": torch.isfinite(x0y).flatten(1).all(1), "group": state.group,
                                        **distance_stats(x0y, state.group), **extra,
                                        **self.schedule.level_stats(target, x0y, state.group)})
            # 5. the next level (preset or K2)
            next_sigma = self.schedule.next(step, sigma, host)
            levels.append(sigma)
            event = {"event": "level", "step": step, "sigma": sigma, "next_sigma": next_sigma or 0.0,
                     "ids": list(state.ids), "loss": host["loss"], "acceptance": host["acceptance"],
                     "finite": host["finite"], "repulsion": repulsion_report(host, gamma), "x0hat": x0hat, "x0y": x0y}
            if dc is not None:
                host["dc_particle_sec"] = dc.particle_sec.tolist()
                found.add_dc(list(state.row), host, dc.sec)
                event["hard_dc"] = {"sec": dc.sec, **{k[3:]: host[k] for k in host if k.startswith("dc_")},
                                    "stop": [STOPS[int(s)] for s in host["dc_stop"]]}
            emit(event)
            for schedule_event in self.schedule.events():
                emit(schedule_event)
            # 6. particles that produced NaN/Inf stop here; at the prune level the promising ones go on
            state.x = x0y
            if dc is not None:  # the level's DAPS samples and choices, sliced with the particles until the map back
                state.state.update(dc_daps=out.x, dc_take=take)
            alive = [i for i, ok in enumerate(host["finite"]) if ok]
            state = drop_nonfinite(state, host["finite"], step, sigma, status, stopped_at)
            if sigma_prune is not None and found.pruned_at is None and sigma <= sigma_prune and len(state):
                state = self.prune(state, [host["loss"][i] for i in alive], x0hat[index_tensor(alive, x0hat.device)],
                                   denoiser, step, sigma, status, stopped_at, found, emit)
                if phase == "explore":  # the refine phase starts right after the prune
                    phase = "refine"
                    emit({"event": "phase", "phase": phase, "step": step + 1})
            # 7. the next level's noise (after an optimisation: continue or ReSample's resampling); none after the last
            if "dc_daps" in state.state:
                daps, take = state.state.pop("dc_daps"), state.state.pop("dc_take")
                state.x = self.hard_dc.map_to(state.x, daps, take, sigma, next_sigma, state.noise.randn_like)
            elif next_sigma is not None:
                state.x = state.x + next_sigma * state.noise.randn_like(state.x)
            if bar is not None:
                finite_loss = [v for v, ok in zip(host["loss"], host["finite"]) if ok]
                bar.set_postfix(sigma=f"{sigma:.3g}", loss=f"{min(finite_loss) if finite_loss else math.nan:.3g}")
                bar.update(1)
            if checkpoint is not None:
                checkpoint(lambda: {**loop_state(state, step, next_sigma, status, stopped_at, levels, self.schedule,
                                                 net), "found": found.state_dict()})
            sigma, step = next_sigma, step + 1
        if bar is not None:
            bar.close()
        emit({"event": "phase", "phase": None, "step": step})
        out_x = torch.full((total, *denoiser.image_shape), math.nan, device=particles.x.device)
        if len(state):
            with torch.no_grad():
                final = denoiser.decode(state.x) if self.latent else state.x
            out_x[index_tensor(state.row, out_x.device)] = final.detach().to(out_x.dtype)
        if "class_label" in particles.state:
            denoiser.condition(None)
        return SampleResult(out_x, list(particles.ids), status, stopped_at, levels, net.calls, net.particle_calls,
                            found.pruned, found.parents, found.hard_dc, found.hard_dc_sec)

    def optimise(self, state: Particles, loss_rows: Callable, out: Any, x0hat: torch.Tensor
                 ) -> tuple[DCResult, torch.Tensor]:
        """This level's hard data consistency (cores/resample.py) from the DAPS samples ``out.x``, and which particles
        take it; with ``warm_start`` the AdamW moments are per-particle state (``state.state``: hard_dc_m/v/t)."""
        rule = self.hard_dc
        moments = None
        if rule.warm_start:
            moments = {k: state.state[f"hard_dc_{k}"] for k in "mvt" if f"hard_dc_{k}" in state.state}
        start = out.x if rule.start == "sample" else x0hat
        dc = rule.optimise(loss_rows, start, out.x, state.y[0].numel(), self.latent, moments)
        if moments is not None:
            state.state.update({f"hard_dc_{k}": v for k, v in moments.items()})
        return dc, rule.accepted(dc)

    def prune(self, state: Particles, losses: list[float], x0hat: torch.Tensor, denoiser: Denoiser, step: int,
              sigma: float, status: list[str], stopped_at: list[int | None], found: "Found", emit: Callback
              ) -> Particles:
        """The pruning of cores/pruning.py at this level: per measurement keep by loss and distance (images: latents
        decoded), the others end ``pruned`` with their x0hat kept; with ``branch`` clones of the survivors take the
        dropped particles' slots with fresh streams. Emits ``prune`` (the loop then starts the ``refine`` phase)."""
        rule = self.pruning
        with torch.no_grad():
            images = denoiser.decode(state.x) if self.latent else state.x
            dist = to_host(rms_distances(images))
        by_group: dict[int, list[int]] = {}
        for i, pid in enumerate(state.ids):
            by_group.setdefault(pid.image, []).append(i)
        kept_all, clones, record = [], [], []
        for image, pos in by_group.items():
            kept = [pos[k] for k in choose([losses[i] for i in pos], [[dist[i][j] for j in pos] for i in pos],
                                           rule.keep, rule.close, rule.loss_tol, rule.fill, rule.order)]
            dropped = [i for i in pos if i not in kept]
            kept_all += kept
            if rule.branch and kept:
                clones += [(kept[k % len(kept)], i) for k, i in enumerate(dropped)]
            record.append({"image": image, "kept": [str(state.ids[i]) for i in kept],
                           "dropped": [str(state.ids[i]) for i in dropped], "loss": {str(state.ids[i]): losses[i]
                                                                                     for i in pos}})
            with torch.no_grad():
                pics = denoiser.decode(x0hat[index_tensor(dropped, x0hat.device)]) if dropped else None
            for k, i in enumerate(dropped):
                status[state.row[i]], stopped_at[state.row[i]] = "pruned", step
                found.pruned[state.row[i]] = pics[k].detach().cpu()
        new = state.select(kept_all + [parent for parent, _ in clones])
        if clones:
            slots = {len(kept_all) + k: slot for k, (_, slot) in enumerate(clones)}
            for pos, slot in slots.items():
                new.ids[pos], new.row[pos] = state.ids[slot], state.row[slot]
                status[state.row[slot]], stopped_at[state.row[slot]] = "ok", None
                parent = clones[pos - len(kept_all)][0]
                found.parents[state.row[slot]] = str(state.ids[parent])
                found.hard_dc.pop(state.row[slot], None)  # the clone carries its parent's record, not the dropped one's
                if state.row[parent] in found.hard_dc:
                    found.hard_dc[state.row[slot]] = dict(found.hard_dc[state.row[parent]])
            if isinstance(state.noise, ParticleNoise):
                new.noise = new.noise.reseed({pos: branch_seed(state.noise.seeds[slot], 1) for pos, slot in slots.items()})
        found.pruned_at = step
        emit({"event": "prune", "step": step, "sigma": sigma, "measurements": record,
              "branched": {str(state.ids[slot]): str(state.ids[parent]) for parent, slot in clones}})
        return new


SAMPLER_KEYS = ("latent", "annealing_scheduler_config", "diffusion_scheduler_config", "k2_scheduler_config",
                "repulsion", "pruning", "hard_dc")


def build_sampler(sampler_cfg: dict, mcmc_cfg: dict) -> DAPS:
    """The sampler of ``cfg.sampler`` with the task group's ``mcmc_sampler_config``: the one place that reads
    the sampler's config."""
    cfg = dict(sampler_cfg)
    check_keys(cfg, SAMPLER_KEYS, "sampler")
    mcmc = MCMCConfig.from_dict(mcmc_cfg)
    ode_cfg = dict(cfg["diffusion_scheduler_config"])
    check_keys(ode_cfg, signature_keys(PFODE), "sampler.diffusion_scheduler_config")
    schedule: Schedule = PresetSchedule.from_config(dict(cfg["annealing_scheduler_config"]))
    k2 = k2_settings(cfg.get("k2_scheduler_config"))
    if k2 is not None:  # K2-DAPS wraps the preset: warm-up levels, floor, level count
        schedule = K2Schedule(schedule, **k2)
    return DAPS(schedule, PFODE(**ode_cfg), mcmc.kernel(), mcmc.target_spec(), latent=cfg.get("latent", False),
                repulsion=Repulsion.from_config(cfg.get("repulsion")), pruning=Pruning.from_config(cfg.get("pruning")),
                hard_dc=HardDC.from_config(cfg.get("hard_dc")))
