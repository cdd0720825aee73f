"""Counter-based per-particle streams (cores/noise.py CounterNoise): normal and uniform draws with the right
distribution, independent across particles and draws, a particle's draws independent of its batch, and the state
(counters) carried through select, reseed and a checkpoint; in the loop, a particle's result does not depend on its
batch and a run split at a level equals a straight run."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from cores.noise import CounterNoise, auto_kind, hash32, particle_noise, particle_seed
from cores.operators import PhaseRetrieval
from sampler import ParticleId, build_sampler, start_particles

SEEDS = [particle_seed(42, i, k) for i in range(10) for k in range(4)]


def test_hash32_is_the_reference_mixer():
    x = torch.tensor([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF], dtype=torch.int64)

    def reference(v):  # lowbias32 in plain Python integers
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    assert hash32(x).tolist() == [reference(int(v)) for v in x]


def test_draws_are_standard_normal_and_uniform_and_independent():
    noise = CounterNoise(SEEDS)
    z = torch.cat([noise.randn((2500,), torch.float64) for _ in range(4)], dim=1).numpy()  # 40 streams x 10,000
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and abs(stats.kurtosis(z.ravel())) < 0.05
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    corr = np.corrcoef(z)[np.triu_indices(len(SEEDS), 1)]
    assert np.abs(corr).max() < 5 / np.sqrt(z.shape[1])  # streams of different particles uncorrelated
    lag = np.corrcoef(z[:, :2500].ravel(), z[:, 2500:5000].ravel())[0, 1]
    assert abs(lag) < 5 / np.sqrt(z[:, :2500].size)  # successive draws of a stream uncorrelated
    z32 = CounterNoise(SEEDS).randn((10000,)).numpy()  # float32: Box-Muller in float32 (the fused draw's default)
    assert abs(z32.mean()) < 0.01 and abs(z32.std() - 1) < 0.01 and stats.kstest(z32.ravel(), "norm").pvalue > 1e-3
    u = CounterNoise(range(20000)).rand(torch.float64).numpy()
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3


def test_a_particles_draws_do_not_depend_on_its_batch_and_the_state_carries():
    batch = CounterNoise(SEEDS[:6])
    first = batch.randn((3, 5))
    second = batch.randn((3, 5))
    for k, seed in enumerate(SEEDS[:6]):
        alone = CounterNoise([seed])
        assert torch.equal(alone.randn((3, 5))[0], first[k]) and torch.equal(alone.randn((3, 5))[0], second[k])
    kept = batch.select([4, 1])
    assert torch.equal(kept.randn((3, 5)), _after(SEEDS[:6], [4, 1], draws=2))  # select keeps the counters
    saved = kept.state_dict()
    again = CounterNoise([SEEDS[4], SEEDS[1]])
    again.load_state_dict(saved)
    assert torch.equal(again.randn((7,)), kept.randn((7,)))
    fresh = kept.reseed({0: 123})
    assert torch.equal(fresh.randn((7,))[0], CounterNoise([123]).randn((7,))[0])
    with pytest.raises(ValueError, match="other particles"):
        CounterNoise([1]).load_state_dict(saved)
    with pytest.raises(ValueError, match="noise must be one of generator, counter"):
        particle_noise("philox", [1], "cpu")


def _after(seeds, keep, draws):
    """The (3, 5) draw of the particles ``keep`` after ``draws`` earlier draws."""
    noise = CounterNoise([seeds[i] for i in keep])
    for _ in range(draws):
        noise.randn((3, 5))
    return noise.randn((3, 5))


ANNEAL = {"name": "edm", "num_steps": 6, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": "mala"}


def run(d, y, seeds, kind="counter", **kw):
    s = build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE}, MCMC)
    noise = particle_noise(kind, seeds, "cpu")
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    ps = start_particles([ParticleId(0, 0, k) for k in range(len(seeds))], y.expand(len(seeds), *y.shape[1:]),
                         [0] * len(seeds), noise, x0)
    return s.sample(d, PhaseRetrieval(), ps, **kw)


def same_draws(a, b):
    """Two float32 draws of one stream: equal to the last bits (the compiled logarithm and sines may round otherwise)."""
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_fused_draws_are_the_eager_draws_and_xla_is_refused():
    """noise=counter-fused: the compiled draw gives the eager CounterNoise's numbers (the uniforms exactly, the
    float32 normals to rounding), through select (a prune to fewer particles) and reseed, with one compile for every
    particle count and (odd) draw size (about half a minute on 2 CPU cores)."""
    from torch._dynamo.utils import counters

    eager, fused = CounterNoise(SEEDS[:6]), particle_noise("counter-fused", SEEDS[:6], "cpu")
    for _ in range(2):
        same_draws(fused.randn((1, 3, 3)), eager.randn((1, 3, 3)))
        assert torch.equal(fused.rand(), eager.rand())
    graphs = counters["stats"]["unique_graphs"]
    eager, fused = eager.select([4, 1, 0, 5]).reseed({1: 7}), fused.select([4, 1, 0, 5]).reseed({1: 7})
    assert fused.fused and len(fused) == 4
    same_draws(fused.randn((1, 3, 3)), eager.randn((1, 3, 3)))
    same_draws(fused.randn((3, 5, 1)), eager.randn((3, 5, 1)))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for 4 particles or 15 values
    with pytest.raises(ValueError, match="use noise=counter there"):
        CounterNoise(SEEDS[:2], "meta", fused=True)


KERNEL_CHECK = """
import torch
from cores.counter_kernel import counter_normals_kernel
from cores.noise import CounterNoise, counter_normals
noise = CounterNoise([int(s) for s in SEEDS])
for n in (1, 2, 7, 2050, 2 * 1024 + 3):  # odd sizes drop the last sine; 2049 and more span two programs
    count = noise._draw()
    ref = counter_normals(noise._halves, count, noise._hashed(2 * ((n + 1) // 2)), n, torch.float32)
    got = counter_normals_kernel(noise._halves, count, n)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    half = counter_normals_kernel(noise._halves, count, n, torch.bfloat16)
    torch.testing.assert_close(half, ref.to(torch.bfloat16))  # the interpreter truncates; the GPU test checks rounding
try:
    counter_normals_kernel(noise._halves, count, 3, torch.float64)
except ValueError:
    print("ok")
"""


def test_triton_kernel_draws_the_counter_normals():
    """cores/counter_kernel.py (the fused draw on CUDA) run by Triton's interpreter on the CPU: the torch function's
    normals to float32 rounding (its own hash in uint32 against the int64 emulation), for odd and even sizes, one or
    two programs per particle, bfloat16 output; float64 refused."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    code = f"SEEDS = {SEEDS[:5]!r}\n" + KERNEL_CHECK
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1",
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_in_the_loop_results_are_batch_invariant_and_resume_exactly(gmm):
    d, y = gmm
    y = y[:1]
    together = run(d, y, SEEDS[:4])
    for k in range(4):
        torch.testing.assert_close(run(d, y, [SEEDS[k]]).x[0], together.x[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together.x, run(d, y, SEEDS[:4], kind="generator").x)  # other numbers than generators
    saved = []
    straight = run(d, y, SEEDS[:4], checkpoint=lambda st: saved.append(st()))
    buf = io.BytesIO()
    torch.save(saved[2], buf)
    buf.seek(0)
    resumed = run(d, y, SEEDS[:4], resume_from=torch.load(buf, weights_only=True))
    assert torch.equal(resumed.x, straight.x)


def test_auto_noise_is_the_fused_counter_on_cuda_only():
    assert auto_kind(torch.device("cuda", 0)) == "counter-fused"
    assert auto_kind("cpu") == "generator" and auto_kind("xla:0") == "generator"
