"""The DAPS loop: batch invariance, NaN isolation, one host sync per level, last level, particle slicing,
config errors."""
import dataclasses

import pytest
import torch

import sampler as sampler_mod
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.noise import ParticleNoise, particle_seed
from cores.operators import PhaseRetrieval
from cores.scheduler import PFODE, PresetSchedule
from sampler import DAPS, ParticleId, Particles, build_sampler, start_particles

ANNEAL = {"name": "edm", "num_steps": 4, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}


def mcmc(algo="hmc", **kw):
    cfg = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": algo, **kw}
    if algo == "hmc":
        cfg.setdefault("momentum", 0.5)
    return cfg


def make(algo="hmc", latent=False, **kw) -> DAPS:
    return build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE, "latent": latent},
                         mcmc(algo, **kw))


def particles(denoiser, sampler, seeds, ys):
    noise = ParticleNoise(seeds)
    x0 = sampler.initial_state(noise, denoiser.in_shape, torch.device("cpu"))
    return start_particles([ParticleId(0, 0, k) for k in range(len(seeds))], ys, [0] * len(seeds), noise, x0)


def run(denoiser, sampler, seeds, y, **kw):
    ys = y.expand(len(seeds), *y.shape[1:]).clone()
    return sampler.sample(denoiser, PhaseRetrieval(), particles(denoiser, sampler, seeds, ys), **kw)


@pytest.fixture(scope="module")
def pixel(pixel_model_dir):
    d = build_model({"name": "diffusers", "path": str(pixel_model_dir)})
    y = PhaseRetrieval()(torch.rand(1, 3, 16, 16) * 2 - 1)
    return d, y


@pytest.mark.parametrize("algo", ["hmc", "mala"])
def test_particles_do_not_depend_on_their_batch(pixel, algo):
    d, y = pixel
    s = make(algo)
    seeds = [particle_seed(42, 0, k) for k in range(4)]
    together = run(d, s, seeds, y).x
    for k, seed in enumerate(seeds):
        alone = run(d, s, [seed], y).x
        torch.testing.assert_close(together[k:k + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("algo", ["hmc", "langevin"])
def test_fused_arithmetic_traces_once_and_gives_the_eager_numbers(pixel, algo, compile_fused_as_on_cuda):
    """On CUDA the kernel's update, the posterior gradient and the closed-form gradient's spectrum kernel run compiled
    (utils.device.fused); forced here on the CPU with dynamo's eager backend: a run of 4 levels
    (each with its own step size and noise level, floats that dynamo does not specialise) traces each function once,
    a batch of another size reuses the traces, and the numbers are the eager run's."""
    d, y = pixel
    s = make(algo)
    seeds = [particle_seed(42, 0, k) for k in range(4)]  # not 3: dynamo would take the batch for the channels
    plain = run(d, s, seeds, y).x
    eager_compile = compile_fused_as_on_cuda()
    got = run(d, s, seeds, y).x
    graphs = eager_compile["stats"]["unique_graphs"]
    # the spectrum kernel twice (a level's last step computes the loss, the others skip it), the kernel's update and
    # the posterior gradient once (a chain's first step, at its prior mean, does not call it: Target.grad)
    assert graphs == 4, dict(eager_compile["stats"])
    run(d, s, seeds[:2], y)
    assert eager_compile["stats"]["unique_graphs"] == graphs
    assert torch.equal(got, plain)


@pytest.mark.parametrize("algo", ["hmc", "mala"])
def test_warm_up_traces_what_sampling_traces(pixel, algo, compile_fused_as_on_cuda):
    """What tests/test_gpu.py's sync check needs on CUDA, forced here on the CPU as in the test above: after
    ``DAPS.warm_up`` (two MCMC steps at zero, r = 1), sampling traces no fused function again (a trace inside the loop
    compiles there, which synchronises the GPU and costs the sampling clock)."""
    d, y = pixel
    s = make(algo)
    eager_compile = compile_fused_as_on_cuda()
    s.warm_up(d, PhaseRetrieval(), ParticleNoise([5, 6, 7, 8]), torch.device("cpu"))
    graphs = dict(eager_compile["stats"])
    run(d, s, [particle_seed(42, 0, k) for k in range(4)], y)
    assert dict(eager_compile["stats"]) == graphs


def test_latent_daps_runs_and_decodes(latent_model_dir):
    d = build_model({"name": "diffusers", "path": str(latent_model_dir)})
    s = make(latent=True)
    s.check(d)
    y = PhaseRetrieval()(torch.rand(1, 3, 16, 16) * 2 - 1)
    res = run(d, s, [1, 2], y)
    assert res.x.shape == (2, 3, 16, 16) and torch.isfinite(res.x).all() and res.status == ["ok", "ok"]


def test_nonfinite_particle_is_stopped_and_others_continue(pixel):
    d, y = pixel
    s = make()
    seeds = [11, 12, 13]
    ys = y.expand(3, *y.shape[1:]).clone()
    ys[1] = float("nan")
    events = []
    res = s.sample(d, PhaseRetrieval(), particles(d, s, seeds, ys), callback=events.append)
    levels = [e for e in events if e["event"] == "level"]
    assert res.status == ["ok", "nonfinite", "ok"] and res.stopped_at[1] == 0
    assert torch.isnan(res.x[1]).all() and torch.isfinite(res.x[[0, 2]]).all()
    assert levels[0]["finite"] == [True, False, True] and [i.sample for i in levels[1]["ids"]] == [0, 2]
    clean = run(d, s, [11, 13], y).x
    torch.testing.assert_close(res.x[[0, 2]], clean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["preset", "k2"])
def test_one_host_sync_per_level(pixel, monkeypatch, variant):
    """No .item()/.tolist()/.cpu()/bool() on tensors in the loop except the transfers the sampler declares per
    level (``host_syncs_per_level``: one for the level's statistics; a feature that needs more says so)."""
    d, y = pixel
    k2 = {"name": "k2", "warm_steps": 1}  # K2 decides levels 1-3 from the same transfer
    s = {"preset": lambda: make("mala"),
         "k2": lambda: build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                                      "k2_scheduler_config": k2}, mcmc("mala"))}[variant]()
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

    ps = particles(d, s, [1, 2], y.expand(2, *y.shape[1:]).clone())
    monkeypatch.setattr(sampler_mod, "to_host", counting_to_host)
    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    try:
        res = s.sample(d, PhaseRetrieval(), ps)
    finally:
        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, fn)
    assert len(calls) == s.host_syncs_per_level * res.used_levels and res.used_levels == ANNEAL["num_steps"]


def test_no_noise_after_the_last_level(pixel):
    d, y = pixel
    s = make()
    events = []
    res = run(d, s, [5], y, callback=events.append)
    levels = [e for e in events if e["event"] == "level"]
    assert levels[-1]["next_sigma"] == 0.0
    torch.testing.assert_close(res.x, levels[-1]["x0y"])
    assert [e["sigma"] for e in levels] == s.schedule.levels == res.levels
    assert [e["phase"] for e in events if e["event"] == "phase"] == ["explore", None]
    # network evaluations are counted as they happen: ODE steps per level (none at or below the ODE's sigma_min)
    assert res.network_evals == sum(s.ode.network_evals(sig) for sig in res.levels) == 2 * ANNEAL["num_steps"]
    assert res.particle_network_evals == res.network_evals


def test_step_size_decays_to_lr_min_ratio_at_the_last_level():
    k = MCMCConfig.from_dict(mcmc(lr_min_ratio=0.01)).kernel()
    assert k.lr_at(0.0) == pytest.approx(1e-4) and k.lr_at(1.0) == pytest.approx(1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown mc_algo"):
        MCMCConfig.from_dict(mcmc("ula"))
    with pytest.raises(ValueError, match="unknown mcmc_sampler_config keys"):
        MCMCConfig.from_dict({**mcmc(), "stepsize": 1})
    with pytest.raises(ValueError, match=r"unknown key sampler.foo"):
        build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE, "foo": 1}, mcmc())
    with pytest.raises(ValueError, match=r"annealing_scheduler_config.num_step \(did you mean num_steps\?\)"):
        build_sampler({"annealing_scheduler_config": {**ANNEAL, "num_step": 3}, "diffusion_scheduler_config": ODE},
                      mcmc())
    with pytest.raises(ValueError, match=r"unknown key sampler.hard_dc.max_iter \(did you mean max_iters\?\)"):
        build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                       "hard_dc": {"step": 200, "max_iter": 5}}, mcmc())
    cfg = MCMCConfig.from_dict(mcmc("mala", likelihood="gaussian"))
    assert cfg.data_weight == pytest.approx(0.5 / 0.05**2)
    assert MCMCConfig.from_dict(mcmc()).data_weight == pytest.approx(1 / 0.05**2)


def test_exact_prior_with_mh_needs_a_log_density(pixel):
    d, _ = pixel
    with pytest.raises(ValueError, match="log-density"):
        make("mala", prior_solver="exact").check(d)
    with pytest.raises(ValueError, match="latent"):
        make(latent=True).check(d)


@pytest.mark.parametrize("solver", ["score-t", "score-min"])
def test_other_prior_solvers_run(pixel, solver):
    d, y = pixel
    s = make(prior_solver=solver)
    res = run(d, s, [3, 4], y)
    assert res.status == ["ok", "ok"] and torch.isfinite(res.x).all()


def test_select_slices_every_field(pixel):
    """Introspection: every field of Particles (and every feature state tensor) is sliced by select."""
    d, y = pixel
    s = make()
    ps = particles(d, s, [1, 2, 3, 4], y.expand(4, *y.shape[1:]).clone())
    ps.group = torch.tensor([0, 0, 1, 1])
    ps.state = {"momentum": torch.arange(4.0)[:, None], "opt": {"exp_avg": torch.arange(4.0)}}
    kept = ps.select([1, 3])
    for f in dataclasses.fields(Particles):
        value = getattr(kept, f.name)
        assert len(value) == 2, f"Particles.{f.name} was not sliced"
    assert kept.ids == [ParticleId(0, 0, 1), ParticleId(0, 0, 3)] and kept.row == [1, 3]
    assert kept.group.tolist() == [0, 1] and kept.noise.seeds == [2, 4]
    assert kept.state["momentum"].flatten().tolist() == [1.0, 3.0] and kept.state["opt"]["exp_avg"].tolist() == [1, 3]
    torch.testing.assert_close(kept.x, ps.x[[1, 3]])
    ps.state = {"bad": object()}
    with pytest.raises(TypeError, match="Particles.state.bad"):
        ps.select([0])


def test_preset_schedule_role():
    sched = PresetSchedule.from_config(ANNEAL)
    assert sched.start() == pytest.approx(10.0) and sched.planned_levels == 4
    assert [sched.next(k, 0.0, {}) for k in range(4)][-1] is None
    assert sched.progress(0, 10.0) == 0.0 and sched.progress(3, 0.1) == 1.0
    with pytest.raises(ValueError, match="must not increase"):
        PresetSchedule([1.0, 2.0])
    assert isinstance(make().ode, PFODE)
