"""The DAPS loop: batch invariance, NaN isolation, one host sync per level, last level, config errors."""
import pytest
import torch

import sampler as sampler_mod
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.noise import ParticleNoise, particle_seed
from cores.operators import PhaseRetrieval
from sampler import DAPS, build_sampler

ANNEAL = {"name": "edm", "num_steps": 4, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}


def mcmc(algo="hmc", **kw):
    cfg = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": algo, **kw}
    if algo == "hmc":
        cfg.setdefault("momentum", 0.5)
    return cfg


def run(denoiser, sampler, seeds, y):
    noise = ParticleNoise(seeds)
    x0 = sampler.initial_state(noise, denoiser.in_shape, torch.device("cpu"))
    return sampler.sample(denoiser, PhaseRetrieval(), y.expand(len(seeds), *y.shape[1:]).clone(), x0, noise)


@pytest.fixture(scope="module")
def pixel(pixel_model_dir):
    d = build_model({"name": "diffusers", "path": str(pixel_model_dir)})
    y = PhaseRetrieval()(torch.rand(1, 3, 16, 16) * 2 - 1)
    return d, y


@pytest.mark.parametrize("algo", ["hmc", "mala"])
def test_particles_do_not_depend_on_their_batch(pixel, algo):
    d, y = pixel
    s = DAPS(ANNEAL, ODE, mcmc(algo))
    seeds = [particle_seed(42, 0, k) for k in range(4)]
    together = run(d, s, seeds, y).x
    for k, seed in enumerate(seeds):
        alone = run(d, s, [seed], y).x
        torch.testing.assert_close(together[k:k + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_latent_daps_runs_and_decodes(latent_model_dir):
    d = build_model({"name": "diffusers", "path": str(latent_model_dir)})
    s = DAPS(ANNEAL, ODE, mcmc(), latent=True)
    s.check(d)
    y = PhaseRetrieval()(torch.rand(1, 3, 16, 16) * 2 - 1)
    res = run(d, s, [1, 2], y)
    assert res.x.shape == (2, 3, 16, 16) and torch.isfinite(res.x).all() and res.status == ["ok", "ok"]


def test_nonfinite_particle_is_stopped_and_others_continue(pixel):
    d, y = pixel
    s = DAPS(ANNEAL, ODE, mcmc())
    seeds = [11, 12, 13]
    ys = y.expand(3, *y.shape[1:]).clone()
    ys[1] = float("nan")
    noise = ParticleNoise(seeds)
    events = []
    res = s.sample(d, PhaseRetrieval(), ys, s.initial_state(noise, d.in_shape, torch.device("cpu")), noise,
                   callback=events.append)
    assert res.status == ["ok", "nonfinite", "ok"] and res.stopped_at[1] == 0
    assert torch.isnan(res.x[1]).all() and torch.isfinite(res.x[[0, 2]]).all()
    assert events[0]["finite"] == [True, False, True] and events[1]["index"] == [0, 2]
    clean = run(d, s, [11, 13], y).x
    torch.testing.assert_close(res.x[[0, 2]], clean, rtol=1e-4, atol=1e-5)


def test_one_host_sync_per_level(pixel, monkeypatch):
    """No .item()/.tolist()/.cpu()/bool() on tensors in the loop except the one transfer per level."""
    d, y = pixel
    s = DAPS(ANNEAL, ODE, mcmc("mala"))
    calls = []
    real_to_host = sampler_mod.to_host
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "cpu", "__bool__", "numpy")}

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host synchronisation via Tensor.{name} inside the loop")
        return f

    def counting_to_host(t):
        calls.append(t.shape)
        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, fn)
        try:
            return real_to_host(t)
        finally:
            for name in originals:
                monkeypatch.setattr(torch.Tensor, name, forbidden(name))

    noise = ParticleNoise([1, 2])
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    ys = y.expand(2, *y.shape[1:]).clone()
    monkeypatch.setattr(sampler_mod, "to_host", counting_to_host)
    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    try:
        s.sample(d, PhaseRetrieval(), ys, x0, noise)
    finally:
        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, fn)
    assert len(calls) == len(s.levels)


def test_no_noise_after_the_last_level(pixel):
    d, y = pixel
    s = DAPS(ANNEAL, ODE, mcmc())
    events = []
    noise = ParticleNoise([5])
    res = s.sample(d, PhaseRetrieval(), y.clone(), s.initial_state(noise, d.in_shape, torch.device("cpu")), noise,
                   callback=events.append)
    assert events[-1]["next_sigma"] == 0.0
    torch.testing.assert_close(res.x, events[-1]["x0y"])
    assert [e["sigma"] for e in events] == s.levels


def test_step_size_decays_to_lr_min_ratio_at_the_last_level():
    k = MCMCConfig.from_dict(mcmc(lr_min_ratio=0.01)).kernel()
    assert k.lr_at(0.0) == pytest.approx(1e-4) and k.lr_at(1.0) == pytest.approx(1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown mc_algo"):
        MCMCConfig.from_dict(mcmc("ula"))
    with pytest.raises(ValueError, match="unknown mcmc_sampler_config keys"):
        MCMCConfig.from_dict({**mcmc(), "stepsize": 1})
    with pytest.raises(ValueError, match="unknown sampler keys"):
        build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE, "foo": 1}, mcmc())
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        DAPS(ANNEAL, ODE, mcmc(), k2_scheduler_config={"name": "k2"})
    cfg = MCMCConfig.from_dict(mcmc("mala", likelihood="gaussian"))
    assert cfg.data_weight == pytest.approx(0.5 / 0.05**2)
    assert MCMCConfig.from_dict(mcmc()).data_weight == pytest.approx(1 / 0.05**2)


def test_exact_prior_with_mh_needs_a_log_density(pixel):
    d, _ = pixel
    with pytest.raises(ValueError, match="log-density"):
        DAPS(ANNEAL, ODE, mcmc("mala", prior_solver="exact")).check(d)
    with pytest.raises(ValueError, match="latent"):
        DAPS(ANNEAL, ODE, mcmc(), latent=True).check(d)


@pytest.mark.parametrize("solver", ["score-t", "score-min"])
def test_other_prior_solvers_run(pixel, solver):
    d, y = pixel
    s = DAPS(ANNEAL, ODE, mcmc(prior_solver=solver))
    res = run(d, s, [3, 4], y)
    assert res.status == ["ok", "ok"] and torch.isfinite(res.x).all()
