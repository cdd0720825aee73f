"""Noise-level schedules and probability-flow ODE solvers.

Everything here works in the variance-exploding parametrisation of EDM (Karras et al. 2022):
x_sigma = x_0 + sigma * n.  A schedule is a decreasing 1-D float64 tensor of noise levels; the
PF-ODE in this parametrisation is (EDM eq. 4 with s(t) = 1, sigma(t) = t)

    dx / dsigma = (x - D(x, sigma)) / sigma,

so VP, VE and EDM schedules differ only in where they place the levels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from utils.config import check_keys
from utils.device import end_step

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def parse_poly(timestep: str) -> float:
    """'poly-7' -> 7.0 (the exponent rho of EDM eq. 5)."""
    kind, _, rho = timestep.partition("-")
    if kind != "poly" or not rho:
        raise ValueError(f"timestep must look like 'poly-7', got {timestep!r}")
    return float(rho)


def poly_levels(num_steps: int, sigma_max: float, sigma_min: float, rho: float) -> list[float]:
    """EDM eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, both ends included."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)]


def edm_sigmas(num_steps: int, sigma_max: float, sigma_min: float, timestep: str = "poly-7") -> torch.Tensor:
    """EDM eq. 5 as a float64 tensor (see :func:`poly_levels`)."""
    return torch.tensor(poly_levels(num_steps, sigma_max, sigma_min, parse_poly(timestep)), dtype=torch.float64)


def ve_sigmas(num_steps: int, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """Song et al. 2021 VE SDE: geometric levels sigma_max (sigma_min / sigma_max)^(i/(N-1))."""
    r = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return sigma_max * (sigma_min / sigma_max) ** r


def vp_sigma(t: torch.Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> torch.Tensor:
    """VP SDE noise level in the VE parametrisation: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_time(sigma: torch.Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> torch.Tensor:
    """Inverse of :func:`vp_sigma` (EDM appendix, VP preconditioning): t in [0, 1]."""
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d


def vp_sigmas(num_steps: int, sigma_max: float, sigma_min: float, beta_min: float = 0.1,
              beta_d: float = 19.9) -> torch.Tensor:
    """VP levels: sigma(t) at t uniform between t(sigma_max) and t(sigma_min)."""
    t_max = vp_time(torch.tensor(sigma_max, dtype=torch.float64), beta_min, beta_d)
    t_min = vp_time(torch.tensor(sigma_min, dtype=torch.float64), beta_min, beta_d)
    return vp_sigma(torch.linspace(float(t_max), float(t_min), num_steps, dtype=torch.float64), beta_min, beta_d)


def sigma_schedule(name: str, num_steps: int, sigma_max: float, sigma_min: float, timestep: str = "poly-7",
                   **vp_kwargs: float) -> torch.Tensor:
    """Levels of the named schedule ('edm', 've' or 'vp') from sigma_max down to sigma_min, both included."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not sigma_max >= sigma_min > 0:
        raise ValueError(f"need sigma_max >= sigma_min > 0, got {sigma_max} and {sigma_min}")
    if num_steps == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    if name == "edm":
        return edm_sigmas(num_steps, sigma_max, sigma_min, timestep)
    if name == "ve":
        return ve_sigmas(num_steps, sigma_max, sigma_min)
    if name == "vp":
        return vp_sigmas(num_steps, sigma_max, sigma_min, **vp_kwargs)
    raise ValueError(f"unknown schedule {name!r}: choose one of edm, ve, vp")


def _drift(denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - denoise(x, sigma)) / sigma


def euler_step(denoise: Denoise, x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """One explicit Euler step of the PF-ODE from s to s_next."""
    return x + (s_next - s) * _drift(denoise, x, s)


def heun_step(denoise: Denoise, x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """Heun's 2nd-order step (EDM Algorithm 1, no churn); Euler when s_next is 0."""
    h = s_next - s
    d = _drift(denoise, x, s)
    x_euler = x + h * d
    if s_next == 0:
        return x_euler
    return x + 0.5 * h * (d + _drift(denoise, x_euler, s_next))


def rk4_step(denoise: Denoise, x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """Classical 4th-order Runge-Kutta step of the PF-ODE (needs s_next > 0)."""
    h = s_next - s
    k1 = _drift(denoise, x, s)
    k2 = _drift(denoise, x + 0.5 * h * k1, s + 0.5 * h)
    k3 = _drift(denoise, x + 0.5 * h * k2, s + 0.5 * h)
    k4 = _drift(denoise, x + h * k3, s_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS = {"euler": euler_step, "heun": heun_step, "rk4": rk4_step}
EVALS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


class PFODE:
    """Reverse PF-ODE from a level sigma down to ``sigma_min`` in ``num_steps`` steps of the given solver.

    The grid of each solve is an EDM poly-rho schedule from sigma to sigma_min (the official DAPS
    diffusion scheduler). A level already at or below sigma_min needs no integration: x is returned.
    """

    def __init__(self, num_steps: int = 5, sigma_min: float = 0.01, timestep: str = "poly-7",
                 solver: str = "euler", name: str = "edm"):
        if solver not in SOLVERS:
            raise ValueError(f"unknown ODE solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        if name != "edm":
            raise ValueError(f"diffusion_scheduler_config.name must be 'edm', got {name!r}")
        if num_steps < 1:
            raise ValueError(f"diffusion_scheduler_config.num_steps must be >= 1, got {num_steps}")
        self.rho = parse_poly(timestep)
        self.num_steps, self.sigma_min, self.timestep, self.solver = num_steps, sigma_min, timestep, solver
        self.step = SOLVERS[solver]

    def grid(self, sigma: float) -> list[float]:
        if sigma <= self.sigma_min:
            return [sigma]
        return poly_levels(self.num_steps + 1, sigma, self.sigma_min, self.rho)

    def network_evals(self, sigma: float) -> int:
        return (len(self.grid(sigma)) - 1) * EVALS_PER_STEP[self.solver]

    @torch.no_grad()
    def solve(self, denoise: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
        grid = self.grid(sigma)
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = self.step(denoise, x, s, s_next)
            end_step(x)
        return x


def step_ratio(step: int, num_levels: int) -> float:
    """Progress through the annealing used for step-size decay: step / (T - 1), 0 for a single level."""
    return step / (num_levels - 1) if num_levels > 1 else 0.0



class Schedule:
    """Role of an annealing schedule: which noise levels the DAPS loop visits.

    The loop asks :meth:`start` for the first level, then after each level :meth:`next` with the level's
    host-side per-particle statistics (lists: ``loss``, ``acceptance``, ``finite``, ``group`` and those of
    :meth:`level_stats`; see
    sampler.py); ``None`` means that level was the last one (no noise is added after it). :meth:`progress` in
    [0, 1] drives the MCMC step-size decay. A schedule may keep state for one ``sample()`` call (an adaptive rule,
    like k-diffusion's step-size controller); :meth:`start` resets it, :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it (a checkpoint of the loop; plain values only). :meth:`events` gives the events about the
    last decision; :meth:`level_stats` adds device-side per-particle statistics the schedule needs to the level's one
    host transfer; :meth:`check_particles` refuses a batch the schedule cannot use, before compute;
    ``default_particles`` is num_samples when the user leaves it null; ``needs_acceptance``: the schedule reads
    MH acceptance rates (a kernel without an MH test is refused); ``couples`` says which particles the schedule
    makes depend on each other (None: none).
    """

    couples: str | None = None
    default_particles = 1
    needs_acceptance = False

    def start(self) -> float:
        raise NotImplementedError

    def check_particles(self, per_measurement: int) -> None:
        """Refuse, before any compute, batches whose largest number of particles of one measurement is this."""

    def state_dict(self) -> dict:
        """The state kept since :meth:`start` (numbers, strings, None, lists and dicts of them); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (after :meth:`start`)."""

    def events(self) -> list[dict]:
        """Events about the last :meth:`next`, emitted after the level's (none for a fixed schedule)."""
        return []

    def level_stats(self, target: Any, x: torch.Tensor, group: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-particle statistics (1-D device tensors) of the level's final states ``x`` under ``target``
        (cores/mcmc.py), for :meth:`next`; none by default."""
        return {}

    def next(self, step: int, sigma: float, stats: dict[str, list]) -> float | None:
        raise NotImplementedError

    def progress(self, step: int, sigma: float) -> float:
        raise NotImplementedError

    @property
    def planned_levels(self) -> int:
        """Levels the schedule plans for (an upper bound for adaptive ones): progress bars, snapshot marks."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


ANNEALING_KEYS = ("name", "num_steps", "sigma_max", "sigma_min", "timestep", "beta_min", "beta_d")


class PresetSchedule(Schedule):
    """A fixed list of decreasing levels sigma_0 > ... > sigma_{T-1} (EDM, VE or VP; :func:`sigma_schedule`)."""

    def __init__(self, levels: list[float]):
        self.levels = [float(s) for s in levels]
        if not self.levels or any(s <= 0 for s in self.levels):
            raise ValueError(f"annealing levels must be a non-empty list of positive noise levels, got {levels}")
        if any(b > a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError("annealing levels must not increase")

    @classmethod
    def from_config(cls, cfg: dict) -> "PresetSchedule":
        """From ``sampler.annealing_scheduler_config`` (keys: :data:`ANNEALING_KEYS`)."""
        check_keys(cfg, ANNEALING_KEYS, "sampler.annealing_scheduler_config")
        return cls(sigma_schedule(**cfg).tolist())

    def start(self) -> float:
        return self.levels[0]

    def next(self, step: int, sigma: float, stats: dict[str, list]) -> float | None:
        return self.levels[step + 1] if step + 1 < len(self.levels) else None

    def progress(self, step: int, sigma: float) -> float:
        return step_ratio(step, len(self.levels))

    @property
    def planned_levels(self) -> int:
        return len(self.levels)

    def describe(self) -> dict:
        return {"name": "preset", "anneal_steps": len(self.levels), "sigma_max": self.levels[0],
                "sigma_min": self.levels[-1]}
