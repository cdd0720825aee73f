"""The XLA path on PJRT CPU (make test-xla): operators, the sampler loop and posterior_sample.py use_tpu=true."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

import torch_xla.debug.metrics as met  # noqa: E402

from cores.models import build_model  # noqa: E402
from cores.noise import ParticleNoise  # noqa: E402
from cores.operators import DenseGaussian, DownSampling, GaussianBlur, Inpainting, PhaseRetrieval  # noqa: E402
from sampler import build_sampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Acquire the XLA device at collection: autograd's engine sizes its per-device queues at its first backward,
# so an XLA backward after a CPU-only one fails with an internal assert unless XLA was initialised first.
XLA = torch_xla.device()
OPS = {"phase_retrieval": PhaseRetrieval, "inpainting": lambda: Inpainting("random", resolution=8, seed=1),
       "down_sampling": lambda: DownSampling(scale_factor=2), "gaussian_blur": lambda: GaussianBlur(5, 1.0),
       "dense_gaussian": lambda: DenseGaussian(12, 3 * 8 * 8, seed=1)}


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


@pytest.mark.parametrize("name", OPS)
def test_operator_gradients_match_the_cpu(name):
    op = OPS[name]()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    y = op(torch.rand(3, 3, 8, 8) * 2 - 1)
    g_cpu, l_cpu = op.gradient(x, y)
    g_xla, l_xla = op.to(XLA).gradient(x.to(XLA), y.to(XLA))
    torch.testing.assert_close(g_xla.cpu(), g_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_xla.cpu(), l_cpu, rtol=1e-4, atol=1e-4)


def run(model_dir, device, levels, algo="hmc", latent=False, callback=None, mcmc_steps=3):
    d = build_model({"name": "diffusers", "path": str(model_dir)}, device)
    s = build_sampler({"annealing_scheduler_config": {"name": "edm", "num_steps": levels, "sigma_max": 10.0,
                                                      "sigma_min": 0.1},
                       "diffusion_scheduler_config": {"name": "edm", "num_steps": 2, "sigma_min": 0.01, "solver": "heun"},
                       "latent": latent},
                      {"num_steps": mcmc_steps, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": algo,
                       **({"momentum": 0.5} if algo == "hmc" else {})})
    op = PhaseRetrieval().to(device)
    y = op(torch.linspace(-1, 1, 3 * 16 * 16).view(1, 3, 16, 16).to(device)).expand(2, -1, -1, -1).clone()
    noise = ParticleNoise([5, 6], device)
    return s.sample(d, op, s.particles(y, noise, d.in_shape, device), callback=callback)


def test_sampler_matches_the_cpu(pixel_model_dir):
    """The same noise (CPU generators) on both devices gives the same particles."""
    cpu = run(pixel_model_dir, torch.device("cpu"), 3, "mala").x
    xla = run(pixel_model_dir, XLA, 3, "mala").x
    torch.testing.assert_close(xla.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_levels_reuse_their_compiled_graph(pixel_model_dir):
    """Sigma and step sizes enter the graphs as data, so the first levels' step graphs serve the following
    levels: the middle levels compile nothing (per-level recompilation would add graphs at every level).
    Graphs compiled after each of 10 levels, measured: 5, 6, 6, ..., 6, 7 (the second level's first ODE step
    also adds the previous level's noise; the last level adds none), the same in every run."""
    met.clear_all()
    per_level = []
    res = run(pixel_model_dir, XLA, 10, "hmc", callback=lambda ev: ev["event"] == "level" and per_level.append(compiles()))
    assert res.status == ["ok", "ok"] and per_level[0] > 0
    assert per_level[8] == per_level[1], per_level


@pytest.mark.parametrize("algo", ["langevin", "hmc", "mala", "hmc_mh", "mh"])
def test_more_mcmc_steps_compile_nothing_new(pixel_model_dir, algo):
    """Each MCMC and ODE step is its own graph (utils.device.end_step cuts at the loop-carried tensors): a
    level's steps do not unroll into one graph that grows with num_steps, so a run with more steps reuses
    the graphs of a run with fewer. A kernel that left a loop-carried tensor out of its cut would fail here."""
    run(pixel_model_dir, XLA, 3, algo, mcmc_steps=3)
    met.clear_all()
    res = run(pixel_model_dir, XLA, 3, algo, mcmc_steps=9)
    assert res.status == ["ok", "ok"]
    assert compiles() == 0, met.short_metrics_report()


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_sampler_stays_on_the_device(kind, pixel_model_dir, latent_model_dir):
    """No operation falls back to the host (torch_xla counts each fallback as aten::<op>, and a fallback copies
    its inputs off the device inside the step): the phase retrieval FFT is matrix products on XLA
    (cores.fourier). The one exception is the VAE decoder's nearest-neighbour upsampling backward in latent
    runs, which torch_xla 2.9 lowers for TPU (and Neuron) devices only and runs on the host elsewhere, as here
    on PJRT CPU. Without fallbacks the only device-to-host copies are the level statistics, one per level."""
    latent = kind == "latent"
    met.clear_all()
    res = run(latent_model_dir if latent else pixel_model_dir, XLA, 4, "hmc", latent=latent)
    fallbacks = {name for name in met.counter_names() if name.startswith("aten::")}
    copies = met.metric_data("TransferFromDeviceTime")[0]
    assert res.status == ["ok", "ok"] and torch.isfinite(res.x.cpu()).all()
    if latent:
        assert fallbacks == {"aten::upsample_nearest2d_backward"}
    else:
        assert fallbacks == set() and copies == 4


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_posterior_sample_use_tpu(tmp_path, kind, pixel_model_dir, latent_model_dir, image_dir):
    model = pixel_model_dir if kind == "pixel" else latent_model_dir
    sampler = "edm_daps" if kind == "pixel" else "latent_edm_daps"
    group = "pixel_hmc" if kind == "pixel" else "ldm"
    r = subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), "+model.name=diffusers",
                        f"+model.path={model}", "+data.name=image", f"+data.root={image_dir}", "+data.resolution=16",
                        "+data.end_id=1", "+task=phase_retrieval", f"+sampler={sampler}", f"task_group={group}",
                        "num_samples=2", "sampler.annealing_scheduler_config.num_steps=4",
                        "sampler.diffusion_scheduler_config.num_steps=2", "use_tpu=true", "show_progress=false",
                        f"save_dir={tmp_path}", "name=xla"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PJRT_DEVICE": "CPU"})
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "xla"
    metrics = json.loads((root / "metrics.json").read_text())
    timing = json.loads((root / "timing.json").read_text())
    assert metrics["status"] == "complete" and metrics["device"]["type"] == "xla"
    assert metrics["images"][0]["particles"][0]["status"] == "ok"
    assert timing["used_anneal_steps"] == 4 and (root / "grid_results.png").is_file()
    assert metrics["peak_memory"]["explore"]["available"] is False  # PJRT CPU has no memory info
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "level"] == [0, 1, 2, 3]
