"""Per-level checkpoints of the DAPS loop: ``sample()`` split at any level through ``checkpoint`` /
``resume_from`` (saved and read back as a run saves it) equals one straight ``sample()`` bit for bit, with the preset
schedule, with K2 (whose EMA is state) and with repulsion, pruning and branched clones (new streams), a stopped (NaN)
particle included."""
import io

import pytest
import torch

from cores.noise import ParticleNoise, particle_seed
from cores.operators import PhaseRetrieval
from sampler import ParticleId, build_sampler, start_particles

ANNEAL = {"name": "edm", "num_steps": 8, "sigma_max": 10.0, "sigma_min": 0.1}
ODE = {"name": "edm", "num_steps": 2, "sigma_min": 0.01}
MCMC = {"num_steps": 3, "lr": 1e-4, "tau": 0.05, "lr_min_ratio": 0.1, "mc_algo": "hmc", "momentum": 0.5}
K2 = {"name": "k2", "target_cess": 0.9, "max_step_factor": 10.0, "ema_alpha": 0.5, "warm_steps": 2, "min_sigma": 0.001}


def make(schedule: str):
    """preset, k2, branch (the preset with repulsion and a prune to 1 particle refilled by clones at level 4), or
    hard_dc (hard data consistency from level 4 on with AdamW moments kept between levels, ReSample's resampling, and
    a prune to 2 at that level)."""
    particles = {"branch": {"repulsion": {"scale": 2.0, "until_sigma": 1.0, "until_t": None},
                            "pruning": {"step": 600, "keep": 1, "branch": True}},
                 "hard_dc": {"hard_dc": {"step": 600, "max_iters": 12, "patience": 4, "lr": 0.01, "warm_start": True},
                             "pruning": {"step": 600, "keep": 2}}}.get(schedule, {})
    return build_sampler({"annealing_scheduler_config": ANNEAL, "diffusion_scheduler_config": ODE,
                          "k2_scheduler_config": K2 if schedule == "k2" else None, **particles}, MCMC)


def fresh(d, s, y):
    """Two measurements, three particles each, the second particle's measurement NaN (it stops at level 0)."""
    groups = [0, 0, 0, 1, 1, 1]
    ys = y[groups].clone()
    ys[1] = float("nan")
    noise = ParticleNoise([particle_seed(7, g, k) for k, g in enumerate(groups)])
    x0 = s.initial_state(noise, d.in_shape, torch.device("cpu"))
    return start_particles([ParticleId(g, 0, k) for k, g in enumerate(groups)], ys, groups, noise, x0)


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def levels(events):
    """The level events without device tensors and wall times."""
    def untimed(v):
        return {k: x for k, x in v.items() if k not in ("sec", "particle_sec")} if isinstance(v, dict) else v

    return [{k: untimed(v) for k, v in e.items() if k not in ("x0hat", "x0y")} for e in events if e["event"] == "level"]


@pytest.mark.parametrize("schedule", ["preset", "k2", "branch", "hard_dc"])
def test_sample_split_at_any_level_equals_a_straight_sample(gmm, schedule):
    d, y = gmm
    s = make(schedule)
    saved, events = [], []
    straight = s.sample(d, PhaseRetrieval(), fresh(d, s, y), callback=events.append,
                        checkpoint=lambda st: saved.append(round_trip(st())))
    assert straight.status.count("nonfinite") == 1 and len(saved) == straight.used_levels
    if schedule == "k2":
        assert any(e.get("mode") == "cess" for e in events) and saved[-1]["schedule"]["ema"] is not None
    pruned_at = saved[-1]["found"]["pruned_at"]
    if schedule == "branch":
        assert pruned_at is not None and straight.parents and straight.pruned
    for k in (0, 3, straight.used_levels - 2, straight.used_levels - 1):
        s2 = make(schedule)  # a new process: nothing of the first call is left but the checkpoint
        later = []
        res = s2.sample(d, PhaseRetrieval(), fresh(d, s2, y), callback=later.append, resume_from=saved[k])
        assert torch.equal(res.x.isnan(), straight.x.isnan()), k
        assert torch.equal(res.x.nan_to_num(), straight.x.nan_to_num()), k
        assert (res.status, res.stopped_at, res.levels) == (straight.status, straight.stopped_at, straight.levels)
        assert (res.network_evals, res.particle_network_evals) == \
            (straight.network_evals, straight.particle_network_evals)
        assert levels(later) == levels(events)[k + 1:], k  # only the levels after k were computed again
        phase = [e["phase"] for e in events if e["event"] == "phase" and e["step"] <= k + 1][-1]
        assert later[0] == {"event": "phase", "phase": phase, "step": k + 1}
        assert res.parents == straight.parents and res.pruned.keys() == straight.pruned.keys()
        assert res.hard_dc.keys() == straight.hard_dc.keys()
        assert all(res.hard_dc[r]["steps"] == straight.hard_dc[r]["steps"] for r in res.hard_dc)


def test_a_checkpoint_of_other_particles_is_refused(gmm):
    d, y = gmm
    s = make("preset")
    saved = []
    s.sample(d, PhaseRetrieval(), fresh(d, s, y), checkpoint=lambda st: saved.append(st()))
    other = fresh(d, s, y)
    other.ids[0] = ParticleId(5, 0, 0)
    with pytest.raises(ValueError, match="another batch"):
        s.sample(d, PhaseRetrieval(), other, resume_from=saved[2])


def test_the_chunk_checkpoint_is_saved_at_most_every_every_sec(tmp_path, monkeypatch):
    """``checkpoint_every_sec``: a chunk's first level's checkpoint is written, the next ones only once the interval
    has passed, and the state (the particles' copy to the host) is not even made for the levels in between; 0 saves
    every level."""
    import utils.folder as folder

    clock = [100.0]
    monkeypatch.setattr(folder.time, "monotonic", lambda: clock[0])
    made = []

    def make(step):
        return lambda: (made.append(step), {"step": step})[1]
    every = folder.ChunkCheckpoint(tmp_path / "c" / "chunk.pt", every_sec=30)
    for step, now in enumerate([100.0, 110.0, 129.9, 130.0, 131.0, 170.0]):
        clock[0] = now
        every.save_due(make(step))
    assert made == [0, 3, 5] and torch.load(every.path, weights_only=True) == {"step": 5}
    every.clear()  # the chunk's images are saved: the next chunk's first level is saved at once
    clock[0] = 171.0
    every.save_due(make(6))
    assert made == [0, 3, 5, 6]
    made.clear()
    always = folder.ChunkCheckpoint(tmp_path / "d" / "chunk.pt")
    for step in range(3):
        always.save_due(make(step))
    assert made == [0, 1, 2]
