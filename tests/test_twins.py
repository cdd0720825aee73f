"""Twin-aware scores of phase retrieval (utils/twins.py): the twin set is exactly the measurement's, the scores,
the mode threshold, the lowest-loss pick, the rates, and the fields a real run writes (and an inpainting run not)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import piq
import pytest
import torch
import torch.nn.functional as F

from cores.operators import Inpainting, PhaseRetrieval
from tests.test_cli import FAST, cli
from utils.results import Recorder, mode_threshold
from utils.twins import MODES, best_psnr, image_modes, mode_of, particle_scores, rotate, run_modes, window_shifts

N = 16
OP = PhaseRetrieval(oversample=2.0)
PAD = OP.pad(N)  # 4: the padded image is 24 x 24
MARGIN = {"top": 3, "bottom": 1, "left": 2, "right": 0}  # background rows / columns (x = -1) of the test image


def image(seed: int = 0, channels: int = 1, margin: dict[str, int] = MARGIN) -> torch.Tensor:
    """A random (C, N, N) image in [-1, 1], double precision, with background margins."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(channels, N, N, generator=g, dtype=torch.float64) * 2 - 1
    x[:, :margin["top"]] = x[:, N - margin["bottom"]:] = -1
    x[:, :, :margin["left"]] = x[:, :, N - margin["right"]:] = -1
    return x


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) inside its window: background (-1) comes in, what leaves the window is lost."""
    out = torch.full_like(x, -1.0)
    out[..., max(0, dy):N + min(0, dy), max(0, dx):N + min(0, dx)] = \
        x[..., max(0, -dy):N + min(0, -dy), max(0, -dx):N + min(0, -dx)]
    return out


def same_measurement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of the noiseless measurements of two images."""
    ya, yb = OP(a[None]), OP(b[None])
    return float((ya - yb).norm() / yb.norm())


def signed(mask: torch.Tensor) -> set[tuple[int, int]]:
    """The shifts of a window_shifts mask as signed (dy, dx)."""
    m = mask.shape[0]
    return {(dy - m if dy > m // 2 else dy, dx - m if dx > m // 2 else dx) for dy, dx in mask.nonzero().tolist()}


@pytest.mark.parametrize("channels", [1, 3])
def test_the_twin_set_is_exactly_the_shifts_and_rotation_that_keep_the_measurement(channels):
    x = image(channels=channels)
    u = (x + 1) / 2
    direct, twin = signed(window_shifts(u, PAD)), signed(window_shifts(rotate(u), PAD))
    # the margins: up 3, down 1, left 2, right 0; the rotated image has them mirrored
    assert direct == {(dy, dx) for dy in range(-3, 2) for dx in range(-2, 1)}
    assert twin == {(dy, dx) for dy in range(-1, 4) for dx in range(0, 3)}
    # exhaustively, with the operator: a translation keeps y exactly when it is in the set, else y moves by > 1%
    for dy in range(-5, 6):
        for dx in range(-5, 6):
            for members, y0 in ((direct, x), (twin, rotate(x))):
                err = same_measurement(translate(y0, dy, dx), x)
                assert (err < 1e-12) == ((dy, dx) in members) and (err < 1e-12 or err > 1e-2), (dy, dx, err)


def test_reversal_about_the_dft_origin_is_the_rotation_one_pixel_off():
    x = image(margin=dict.fromkeys(MARGIN, 0))  # touches every border: only the identity and the rotation fit
    u = (x + 1) / 2
    assert signed(window_shifts(u, PAD)) == {(0, 0)} == signed(window_shifts(rotate(u), PAD))
    z = F.pad(u, (PAD,) * 4)
    reversed_z = torch.roll(z.flip(-2, -1), (1, 1), (-2, -1))  # n -> -n mod M
    assert torch.equal(reversed_z[..., PAD + 1:PAD + N + 1, PAD + 1:PAD + N + 1], rotate(u))
    assert same_measurement(rotate(x), x) < 1e-12
    assert same_measurement(translate(rotate(x), 1, 1), x) > 1e-2  # that shift crops: not a twin
    assert same_measurement(x.flip(-1), x) > 1e-2  # a mirror is not one either


def test_best_psnr_is_the_best_over_the_set_with_piqs_formula():
    g = (image(1) + 1) / 2
    parts = torch.stack([(g + 0.05 * torch.randn(g.shape, generator=torch.Generator().manual_seed(k),
                                                 dtype=torch.float64)).clamp(0, 1) for k in range(3)])
    parts[1] = (translate(parts[1] * 2 - 1, -2, -1) + 1) / 2  # a shifted copy: its best shift is not the identity
    for ref in (g, rotate(g)):
        members = signed(window_shifts(ref, PAD))
        brute = torch.stack([piq.psnr(parts, ((translate(ref * 2 - 1, dy, dx) + 1) / 2).expand_as(parts),
                                      data_range=1.0, reduction="none") for dy, dx in members]).max(0).values
        torch.testing.assert_close(best_psnr(parts, ref, PAD), brute, rtol=0, atol=1e-6)
    assert float(best_psnr(g[None], g, PAD)[0]) == pytest.approx(80.0, abs=1e-4)  # piq's perfect score


def test_an_exact_twin_gets_mode_180_and_the_score_the_image_gets_for_mode_0():
    gt = image(2).float()
    x = (gt + 0.1 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    direct = float(piq.psnr((x[None] + 1) / 2, (gt[None] + 1) / 2, data_range=1.0))
    s = particle_scores(gt, torch.stack([x, rotate(x), gt, rotate(gt), translate(gt, 1, -2)]), PAD, 20.0)
    assert s["mode"] == ["0", "180", "0", "180", "0"]
    assert s["psnr_0"][0] == pytest.approx(direct, abs=1e-4) and s["psnr_180"][1] == pytest.approx(direct, abs=1e-4)
    assert s["psnr_twin_aware"][0] == pytest.approx(s["psnr_twin_aware"][1], abs=1e-6)
    assert s["psnr_twin_aware"][2:] == pytest.approx([80.0] * 3, abs=1e-4)  # the shifted copy too
    assert s["psnr_180"][0] < 20.0 and s["psnr_0"][1] < 20.0
    assert s["psnr_twin_aware"] == [max(a, b) for a, b in zip(s["psnr_0"], s["psnr_180"])]


@pytest.mark.parametrize("psnr_0, psnr_180, mode", [(25, 12, "0"), (12, 25, "180"), (19.99, 15, "none"),
                                                    (20, 5, "0"), (5, 20, "180"), (22, 22, "0")])
def test_the_mode_threshold_classifies(psnr_0, psnr_180, mode):
    assert mode_of(psnr_0, psnr_180, 20.0) == mode


@pytest.mark.parametrize("value", ["20", True, float("nan"), None])
def test_a_bad_threshold_is_refused(value):
    with pytest.raises(ValueError, match="mode_threshold_db must be a finite number"):
        mode_threshold(SimpleNamespace(mode_threshold_db=value))
    assert mode_threshold(SimpleNamespace(mode_threshold_db=18)) == 18.0


def particle(sample: int, mode: str | None, meas_err: float | None, psnr: float | None) -> dict:
    status = "ok" if mode is not None else "nonfinite"
    return {"sample": sample, "run": 0, "status": status, "psnr": psnr, "meas_err": meas_err,
            "psnr_twin_aware": psnr, "mode": mode}


IMAGES = [  # (particles, gt_twin_psnr)
    ([particle(0, "0", 0.3, 25.0), particle(1, "180", 0.2, 24.0), particle(2, None, None, None)], 10.0),
    ([particle(0, "none", 0.1, 15.0), particle(1, "0", 0.4, 27.0)], 21.0),
    ([particle(0, None, None, None), particle(1, None, None, None)], 12.0),
]


def test_pick_is_the_lowest_loss_particle_and_the_rates_count_images():
    summaries = [image_modes(parts) for parts, _ in IMAGES]
    assert [s["pick"] and s["pick"]["sample"] for s in summaries] == [1, 0, None]  # not the oracle's 0 and 1
    assert summaries[0]["pick"] == {"sample": 1, "meas_err": 0.2, "psnr_twin_aware": 24.0, "mode": "180"}
    assert [(s["success"], s["coverage"], s["scored"]) for s in summaries] == [(True, True, 2), (True, False, 2),
                                                                               (False, False, 0)]
    assert summaries[1]["found"] == {"0": 1, "180": 0, "none": 1}
    records = [{"modes": s, "gt_twin_psnr": t} for s, (_, t) in zip(summaries, IMAGES)]
    assert run_modes(records, 20.0) == {
        "threshold_db": 20.0, "images": 3, "scored_images": 2, "success_rate": 2 / 3, "coverage_rate": 1 / 3,
        "pick_success_rate": 1 / 3, "pick_psnr_twin_aware": 19.5, "particles": {"0": 2, "180": 1, "none": 1},
        "twin_ambiguous_images": 1}


def test_recorder_writes_the_modes_and_labels_the_oracle(tmp_path):
    rec = Recorder(tmp_path, {"name": "t", "particles_per_image": 3}, ["psnr", "meas_err", "psnr_twin_aware"], 20.0)
    for i, (parts, twin) in enumerate(IMAGES):
        rec.add_image({"index": i, "name": str(i), "particles": parts, "gt_twin_psnr": twin})
    rec.write("complete")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["modes"] == run_modes(metrics["images"], 20.0) and metrics["modes"]["coverage_rate"] == 1 / 3
    assert metrics["aggregate"]["psnr_twin_aware"]["best_of_n"] == 26.0  # (25 + 27) / 2: the oracle
    md = (tmp_path / "eval.md").read_text()
    assert "| psnr_twin_aware best-of-n (oracle) | 26.0000 | 2 |" in md
    assert "| psnr_twin_aware of the lowest-meas_err pick (no oracle) | 19.5000 | 2 |" in md
    assert "| coverage rate (both found) | 0.3333 | 3 |" in md
    assert "1 image(s) are within the threshold of their own twin" in md


def test_a_real_run_has_the_fields_for_phase_retrieval_and_not_for_inpainting(tmp_path):
    common = ["+data=gmm-toy", "+model=gmm_toy", "+sampler=edm_daps", "data.end_id=2", "num_samples=2",
              "eval_fn_list=[psnr]", f"save_dir={tmp_path}", *FAST]
    r = cli([*common, "+task=phase_retrieval", "task_group=pixel_hmc", "mode_threshold_db=15", "name=pr"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "pr" / "metrics.json").read_text())
    assert metrics["modes"] == run_modes(metrics["images"], 15.0) and metrics["modes"]["images"] == 2
    assert set(metrics["aggregate"]) == {"psnr", "meas_err", "psnr_twin_aware"}
    for img in metrics["images"]:
        assert isinstance(img["gt_twin_psnr"], float) and img["modes"] == image_modes(img["particles"])
        for p in img["particles"]:
            assert p["mode"] in MODES and p["psnr_twin_aware"] == max(p["psnr_0"], p["psnr_180"])
            assert p["psnr_0"] >= p["psnr"] - 1e-3  # the identity is one of the shifts
    assert "## Modes" in (tmp_path / "pr" / "eval.md").read_text()

    r = cli([*common, "+task=inpainting", "task_group=pixel", "task.pixel.operator.mask_len_range=[4,5]", "name=inp"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "inp" / "metrics.json").read_text())
    assert "modes" not in metrics and set(metrics["aggregate"]) == {"psnr", "meas_err"}
    for img in metrics["images"]:
        assert {"modes", "gt_twin_psnr"}.isdisjoint(img)
        assert all({"psnr_0", "psnr_180", "psnr_twin_aware", "mode"}.isdisjoint(p) for p in img["particles"])
    assert "Modes" not in (tmp_path / "inp" / "eval.md").read_text()
    assert not Inpainting.has_twin and PhaseRetrieval.has_twin
