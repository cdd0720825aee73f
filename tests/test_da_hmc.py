"""Delayed-acceptance HMC (mc_algo=da_hmc, cores/mcmc.py eqs. DA0-DA2): the exact loss only for proposals that pass
the surrogate's test, a second test that corrects a bad surrogate, per-particle streams and the config wiring.

The toy targets: L(x) = ||x - c||^2 (identity operator) with the Gaussian prior N(0, r^2 I) of prior_solver=gaussian.
"""
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cores.exact as E
from cores.mcmc import DelayedAcceptanceHMC, MCMCConfig, Target
from cores.noise import ParticleNoise, SharedNoise
from sampler import build_sampler
from utils.config import CONFIGS

SHAPE = (1, 2, 2)


class CountingLoss:
    """||x - c||^2 per particle, counting full-batch calls and the rows that ``loss_rows`` evaluates."""

    def __init__(self, c: torch.Tensor):
        self.c, self.full_calls, self.rows = c, 0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.full_calls += 1
        return (x - self.c).pow(2).flatten(1).sum(1)

    def loss_rows(self, x_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.rows += len(rows)
        return (x_rows - self.c[rows]).pow(2).flatten(1).sum(1)


def toy(n: int, w: float, r: float = 1.0, rows: bool = True) -> tuple[Target, CountingLoss]:
    c = torch.linspace(-1, 1, n * 4).view(n, *SHAPE)
    loss = CountingLoss(c)
    zeros = torch.zeros(n, *SHAPE)
    return Target(loss, w, r, zeros, anchor=zeros, loss_rows=loss.loss_rows if rows else None), loss


def test_stage_two_evaluates_only_the_rows_that_passed_stage_one():
    """A long leapfrog step (h = 1.2 r) makes the surrogate's test reject part of the proposals: the exact loss is
    evaluated for exactly the others (through loss_rows), and the full batch twice: its gradient at the anchor and its
    value at the chain's start."""
    n, steps = 64, 5
    target, loss = toy(n, w=0.5)
    out = DelayedAcceptanceHMC(num_steps=steps, lr=0.72, leapfrog_steps=3).run(target, torch.zeros(n, *SHAPE),
                                                                            SharedNoise(0, n), 0.72)
    passed = round(float(out.stage1_acceptance.sum()) * steps)
    assert 0 < passed < n * steps, passed
    assert loss.rows == passed and loss.full_calls == 2
    assert (out.acceptance <= out.stage1_acceptance).all()
    torch.testing.assert_close(out.loss, (out.x - loss.c).pow(2).flatten(1).sum(1))  # the exact loss of the states


def test_without_loss_rows_the_batch_is_evaluated_only_when_a_proposal_passed():
    target, loss = toy(1, w=0.5, rows=False)
    steps = 12
    out = DelayedAcceptanceHMC(num_steps=steps, lr=0.72, leapfrog_steps=3).run(target, torch.zeros(1, *SHAPE),
                                                                            SharedNoise(1, 1), 0.72)
    passed = round(float(out.stage1_acceptance[0]) * steps)
    assert 0 < passed < steps and loss.full_calls == 2 + passed


def test_an_exact_surrogate_accepts_every_proposal_that_passed_stage_one():
    """With a loss linear in x the first-order surrogate is the target itself: DA2's ratio is 1."""
    n = 32
    g = torch.linspace(-2, 2, n * 4).view(n, *SHAPE)
    zeros = torch.zeros(n, *SHAPE)
    target = Target(lambda x: 3.0 + (g * x).flatten(1).sum(1), 0.5, 1.0, zeros, anchor=torch.ones(n, *SHAPE))
    out = DelayedAcceptanceHMC(num_steps=6, lr=0.72, leapfrog_steps=3).run(target, zeros, SharedNoise(2, n), 0.72)
    assert 0 < float(out.acceptance.mean()) < 1
    torch.testing.assert_close(out.acceptance, out.stage1_acceptance)


def test_stage_two_rejects_the_proposals_of_a_bad_surrogate():
    """w = 1e4 pins the chain at c, but the first-order surrogate at c is flat (grad L(c) = 0): it sees the wide prior
    only, so its trajectories pass DA1 and DA2 rejects every one of them (exp(-w |x' - c|^2) is tiny)."""
    n = 16
    target, loss = toy(n, w=1e4)
    target.anchor = loss.c
    out = DelayedAcceptanceHMC(num_steps=5, lr=1e-2, leapfrog_steps=4).run(target, loss.c, SharedNoise(3, n), 1e-2)
    assert float(out.stage1_acceptance.mean()) > 0.9
    assert float(out.acceptance.max()) == 0.0
    assert torch.equal(out.x, loss.c) and loss.rows == round(float(out.stage1_acceptance.sum()) * 5)


def test_a_deliberately_wrong_surrogate_still_keeps_the_level_conditional():
    """The mixture level of the stationarity table with da_hmc's anchor moved 0.5 away in every coordinate: the
    second test rejects much of what the (now worse) surrogate proposes, and the chains, started at exact draws,
    are still exact draws after 38 steps (errors at the Monte Carlo floor)."""
    p, n = E.make_problem("inpainting", 0), 1000
    out, cond = E.stationary_run(p, "da_hmc", n, 40, 0, anchor_offset=0.5)
    acc, stage1 = float(out.acceptance.mean()), float(out.stage1_acceptance.mean())
    assert 0.2 < acc < 0.8 * stage1, (acc, stage1)
    ref = E.reference_freq(cond, 0)
    err, fl = E.errors(out.x, cond, ref), E.floor(cond, ref, n, 0)
    assert err["mean"] <= 1.5 * fl["mean"] + 0.02, (err, fl)
    assert err["cov"] <= 1.5 * fl["cov"] + 0.02, (err, fl)
    assert err["modes"] <= fl["modes"] + 0.03, (err, fl)


def test_particles_do_not_depend_on_their_batch():
    """Each particle draws its momenta and both uniforms from its own stream, whichever rows pass stage 1."""
    seeds = [11, 12, 13, 14]
    kernel = DelayedAcceptanceHMC(num_steps=6, lr=0.72, leapfrog_steps=3)

    c = torch.linspace(-1, 1, 16).view(4, *SHAPE)

    def run(idx: list[int]) -> torch.Tensor:
        loss, zeros = CountingLoss(c[idx]), torch.zeros(len(idx), *SHAPE)
        target = Target(loss, 0.5, 1.0, zeros, anchor=zeros, loss_rows=loss.loss_rows)
        return kernel.run(target, zeros, ParticleNoise([seeds[i] for i in idx]), 0.72).x

    together = run([0, 1, 2, 3])
    alone = torch.cat([run([i]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_config_builds_da_hmc_from_the_command_line(caplog):
    """++task.<group>.mcmc_sampler_config.mc_algo=da_hmc: leapfrog_steps is shared with hmc_mh, momentum is hmc's."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="default", overrides=[
            "+task=phase_retrieval", "+sampler=edm_daps", "++task.pixel_hmc.mcmc_sampler_config.mc_algo=da_hmc",
            "++task.pixel_hmc.mcmc_sampler_config.leapfrog_steps=3"])
    mc = OmegaConf.to_container(cfg.task.pixel_hmc.mcmc_sampler_config, resolve=True)
    s = build_sampler(OmegaConf.to_container(cfg.sampler, resolve=True), mc)
    assert isinstance(s.kernel, DelayedAcceptanceHMC) and s.kernel.leapfrog_steps == 3 and s.kernel.needs_log_prob
    assert "momentum is used only by mc_algo=hmc" in caplog.text
    info = s.describe()
    assert info["mc_algo"] == "da_hmc" and info["grad_evals_per_level"] == 1
    assert info["max_loss_evals_per_level"] == mc["num_steps"] + 1 and "linearised" in info["surrogate"]
    with pytest.raises(ValueError, match="da_hmc"):
        MCMCConfig.from_dict({"num_steps": 1, "lr": 1.0, "mc_algo": "da-hmc"})


def test_the_surrogate_needs_an_anchor():
    target = Target(lambda x: x.flatten(1).sum(1), 1.0, 1.0, torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match="anchor"):
        DelayedAcceptanceHMC(num_steps=1, lr=0.1).run(target, torch.zeros(2, *SHAPE), SharedNoise(0, 2), 0.1)
    assert DelayedAcceptanceHMC(num_steps=7, lr=0.1).describe()["max_loss_evals_per_level"] == 8
