"""The compiled MCMC step (``compile.mcmc``, cores/mcmc.py compiled_step): one trace serves every level, nothing breaks
the graph, and it returns the eager step's numbers; ``compile.*: auto`` resolves per device (utils/build.py).

Dynamo runs with the ``eager`` backend here (its trace, guards and graph breaks are what is tested; inductor's code
generation would cost the CPU tests a minute per kernel). Inductor's numbers are compared on the GPU by
scripts/speed_device.sh."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cores import mcmc
from cores.mcmc import DampedHMC, Langevin, Target
from cores.noise import particle_noise
from cores.operators import PhaseRetrieval
from utils.build import AUTO_COMPILE, UserError, resolve_compile


@pytest.fixture
def eager_dynamo(monkeypatch):
    """torch.compile with the eager backend, fresh caches and counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    plain = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: plain(fn, backend="eager"))
    torch._dynamo.reset()
    mcmc.compiled_step.cache_clear()
    counters.clear()
    yield counters
    mcmc.compiled_step.cache_clear()
    torch._dynamo.reset()


def _levels(kernel: mcmc.Kernel, n_levels: int = 4) -> list[torch.Tensor]:
    """``n_levels`` levels of phase retrieval on 3 random 8 x 8 images, each with its own r, lr, prior mean and
    closures, as the sampler builds them; the kernel's final states."""
    g = torch.Generator().manual_seed(0)
    op = PhaseRetrieval()
    x_true = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    y = op(x_true)
    noise = particle_noise("generator", [11, 12, 13], "cpu")
    x, out = torch.zeros(3, 1, 8, 8), []
    for level in range(n_levels):
        x0hat = x + 0.1 * torch.randn(x.shape, generator=g)
        target = Target(lambda z, yy=y: op.loss(z, yy), 100.0, 0.5 / (level + 1), x0hat,
                        gradient=lambda z, yy=y: op.gradient(z, yy))
        x = kernel.run(target, x0hat, noise, 1e-4 * (level + 1)).x
        out.append(x)
    return out


@pytest.mark.parametrize("kernel", [Langevin(num_steps=3, lr=1e-4), DampedHMC(num_steps=3, lr=1e-4, momentum=0.7)],
                         ids=["langevin", "hmc"])
def test_compiled_step_traces_once_and_matches_eager(eager_dynamo, kernel):
    eager = _levels(kernel)
    kernel.compile = "default"
    compiled = _levels(kernel)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not eager_dynamo["graph_break"], dict(eager_dynamo["graph_break"])
    # the first call traces with the level's floats as constants, the second makes them inputs; no level after
    assert eager_dynamo["stats"]["unique_graphs"] <= 2, dict(eager_dynamo["stats"])
    assert kernel.describe()["compile"] == "default"


def test_compiled_step_rejects_unknown_mode():
    with pytest.raises(ValueError, match="none, default"):
        mcmc.compiled_step(mcmc._langevin_step, "fast")


@pytest.mark.parametrize("device, expect", [("cpu", {"mcmc": "none", "network": "none"}), ("cuda", AUTO_COMPILE)])
def test_auto_compile_resolves_per_device(device, expect):
    cfg = OmegaConf.create({"compile": {"mcmc": "auto", "network": "auto"}})
    resolve_compile(cfg, torch.device(device))
    assert dict(cfg.compile) == expect


@pytest.mark.parametrize("compile_cfg, match", [({"mcmc": "reduce-overhead", "network": "none"}, "compile.mcmc must be"),
                                                ({"mcmc": "none", "network": "reduce-overhead"}, "compile.network must"),
                                                ({"mcmc": "none"}, "must have the keys")])
def test_bad_compile_settings_say_what_to_do(compile_cfg, match):
    with pytest.raises(UserError, match=match):
        resolve_compile(OmegaConf.create({"compile": compile_cfg}), torch.device("cpu"))
