"""Pinned final states: the embedded priors, 3 particles, 4 levels, pixel and latent, the official damped
``hmc`` and the MH kernel ``mala``. ``tests/data/regression_pins.pt`` was computed on main at af9e5f8, before
the sampler was rebuilt from roles (commit "Sampler roles"), so these tests show that the rebuild changed no
result. Same arithmetic on another CPU may differ in the last bits: rtol 1e-4."""
from pathlib import Path

import pytest
import torch

from cores.models import build_model
from cores.noise import ParticleNoise, particle_seed
from cores.operators import PhaseRetrieval
from sampler import ParticleId, build_sampler, start_particles

ROOT = Path(__file__).resolve().parents[1]
PINS = torch.load(ROOT / "tests" / "data" / "regression_pins.pt", weights_only=True)
SAMPLER = {"annealing_scheduler_config": {"name": "edm", "num_steps": 4, "sigma_max": 10.0, "sigma_min": 0.1},
           "diffusion_scheduler_config": {"name": "edm", "num_steps": 2, "sigma_min": 0.01}}


@pytest.mark.parametrize("kind,folder", [("pixel", "fmnist32_ddpm"), ("latent", "fmnist32_ldm")])
@pytest.mark.parametrize("algo", ["hmc", "mala"])
def test_final_states_equal_the_pins_from_before_the_rebuild(kind, folder, algo):
    d = build_model({"name": "diffusers", "path": str(ROOT / "checkpoints" / folder)})
    mcmc = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": algo}
    if algo == "hmc":
        mcmc["momentum"] = 0.5
    s = build_sampler({**SAMPLER, "latent": kind == "latent"}, mcmc)
    y = PhaseRetrieval()(PINS["gt"])
    noise = ParticleNoise([particle_seed(42, 0, k) for k in range(3)])
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    particles = start_particles([ParticleId(0, 0, k) for k in range(3)], y.expand(3, *y.shape[1:]).clone(),
                                [0, 0, 0], noise, x0)
    res = s.sample(d, PhaseRetrieval(), particles)
    torch.testing.assert_close(res.x, PINS[f"{kind}_{algo}"], rtol=1e-4, atol=1e-5)
