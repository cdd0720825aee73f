"""CUDA checks (run on a GPU machine: pytest -m gpu): no hidden host synchronisation, batch invariance, a CLI run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cores.models import build_model
from cores.noise import ParticleNoise, particle_noise
from cores.operators import PhaseRetrieval
from sampler import build_sampler
from utils.device import forbid_sync

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ANNEAL = {"name": "edm", "num_steps": 6, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 4, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1}


@pytest.mark.parametrize("kind, algo, noise_kind", [("pixel", "hmc", "generator"), ("pixel", "hmc", "counter-fused"),
                                                ("pixel", "mala", "generator"), ("latent", "hmc_mh", "generator")])
def test_loop_syncs_only_through_to_host(kind, algo, noise_kind, pixel_model_dir, latent_model_dir):
    """No synchronising CUDA call and nothing compiled inside sampling, with per-particle generators and with the
    default CUDA streams (counter-fused: the Triton draw)."""
    dev = torch.device("cuda")
    d = build_model({"name": "diffusers", "path": str(pixel_model_dir if kind == "pixel" else latent_model_dir)}, dev)
    s = build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                       "latent": kind == "latent"}, {**MCMC, "mc_algo": algo})
    op = PhaseRetrieval().to(dev)
    y = op(torch.rand(1, 3, 16, 16, device=dev) * 2 - 1).expand(4, -1, -1, -1).clone()
    noise = particle_noise(noise_kind, [1, 2, 3, 4], dev)
    # the fused kernels compile here, as before a run's clock
    s.warm_up(d, op, particle_noise(noise_kind, [5, 6, 7, 8], dev), dev)
    particles = s.particles(y, noise, d.in_shape, dev)
    torch.cuda.synchronize()
    graphs = dict(torch._dynamo.utils.counters["stats"])
    with forbid_sync():  # any synchronising CUDA call outside utils.device.to_host raises
        res = s.sample(d, op, particles)
    assert res.status == ["ok"] * 4 and torch.isfinite(res.x).all()
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # nothing traced (compiled) inside the sampling


@pytest.mark.parametrize("tf32", [False, True])
def test_batch_invariance_on_cuda(pixel_model_dir, tf32, capsys):
    """fp32 convolutions: a particle's result does not depend on its batch (to rounding). With cuDNN's default TF32
    convolutions the per-batch-size kernels round differently and the chaotic dynamics amplify it: measured, not hidden."""
    dev = torch.device("cuda")
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        d = build_model({"name": "diffusers", "path": str(pixel_model_dir)}, dev)
        s = build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE},
                          {**MCMC, "mc_algo": "hmc", "momentum": 0.5})
        op = PhaseRetrieval().to(dev)
        y = op(torch.rand(1, 3, 16, 16, device=dev, generator=torch.Generator(dev).manual_seed(0)) * 2 - 1)

        def run(seeds):
            noise = ParticleNoise(seeds, dev)
            ys = y.expand(len(seeds), -1, -1, -1).clone()
            return s.sample(d, op, s.particles(ys, noise, d.in_shape, dev)).x

        together = run([7, 8, 9])
        alone = torch.cat([run([seed]) for seed in (7, 8, 9)])
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    diff = float((together - alone).abs().max())
    with capsys.disabled():
        print(f"\nbatch invariance on CUDA, TF32 convolutions {'on' if tf32 else 'off'}: max |together - alone| = {diff:.2e}")
    if not tf32:
        assert diff < 1e-3
    else:
        assert diff < 0.1


def test_cli_on_cuda_records_peak_memory(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "posterior_sample.py"), "+data=gmm-toy", "+model=gmm_toy",
                        "+task=phase_retrieval", "+sampler=edm_daps", "task_group=pixel_hmc", "num_samples=4",
                        "sampler.annealing_scheduler_config.num_steps=20", "show_progress=false", "gpu=0",
                        f"save_dir={tmp_path}", "name=gpu"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    assert metrics["device"]["type"] == "cuda" and metrics["peak_memory"]["explore"] > 0


def test_channels_last_networks_compile_without_graph_breaks(pixel_model_dir, latent_model_dir):
    """``channels_last`` + ``compile`` in bfloat16 and float16: the UNet (and the decoder's forward and backward) trace
    as whole graphs on this device's torch, and give finite values. (An uncommitted group norm of the ninth session
    used ``max(..., default=)``, which the device's torch 2.11 broke the graph at and the CPU's torch 2.14 traces: a
    graph break per norm made the ADM UNet 3x slower, docs/benchmarks.md.) On this small random-weight decoder the
    gradient in float16 (10 mantissa bits) is closer to float32's than in bfloat16 (7 bits)."""
    dev = torch.device("cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grads = {}
    for dtype in ("float32", "bfloat16", "float16"):
        torch.manual_seed(0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for path in (pixel_model_dir, latent_model_dir):
            d = build_model({"name": "diffusers", "path": str(path), "dtype": dtype, "channels_last": dtype != "float32",
                             "compile": "none" if dtype == "float32" else "default"}, dev)
            assert d.compiled == ("none" if dtype == "float32" else "default")
            x = torch.randn(2, *d.in_shape, device=dev)
            with torch.no_grad():
                assert torch.isfinite(d.denoise(x, 1.0)).all()
            if d.latent:
                z = x.detach().requires_grad_(True)
                (grads[dtype],) = torch.autograd.grad(d.decode(z).square().sum(), z)
                assert torch.isfinite(grads[dtype]).all()
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        assert compiled == 0 if dtype == "float32" else compiled > 0, (dtype, compiled)  # this dtype's networks traced
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    err = {k: ((grads[k] - grads["float32"]).norm() / grads["float32"].norm()).item() for k in ("bfloat16", "float16")}
    assert err["float16"] < err["bfloat16"] < 0.1, err


def test_fused_counter_draws_on_cuda_are_the_eager_draws():
    """noise=counter-fused on CUDA (the Triton kernel for float32, the compiled torch function for float64): the eager
    CPU streams' numbers to float32 rounding, through a select and a reseed; one value per particle (Triton makes a
    size of 1 a constant); bfloat16 and float16 draws are the float32 draws rounded to nearest."""
    from unittest import mock

    import cores.counter_kernel as kernel
    from cores.noise import CounterNoise, particle_seed

    seeds = [particle_seed(3, i, k) for i in range(3) for k in range(2)]
    gpu, cpu = CounterNoise(seeds, "cuda", fused=True), CounterNoise(seeds)
    with mock.patch.object(kernel, "counter_normals_kernel", wraps=kernel.counter_normals_kernel) as launched:
        for shape in ((3, 17, 19), (1, 2048 * 2 + 1), (1,)):
            torch.testing.assert_close(gpu.randn(shape).cpu(), cpu.randn(shape), rtol=2e-6, atol=2e-6)
        assert launched.call_count == 3
    gpu, cpu = gpu.select([5, 0, 2]).reseed({1: 11}), cpu.select([5, 0, 2]).reseed({1: 11})
    torch.testing.assert_close(gpu.randn((4, 4)).cpu(), cpu.randn((4, 4)), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gpu.randn((5,), torch.float64).cpu(), cpu.randn((5,), torch.float64))
    halves, count = gpu._halves, gpu._draw()
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(kernel.counter_normals_kernel(halves, count, 1001, dtype),
                           kernel.counter_normals_kernel(halves, count, 1001).to(dtype))
