"""Mode-aware scores for phase retrieval: the 0 / 180 degree twins of the experiment plan (Exp 1-3).

Why a twin has the same measurement. The operator (:class:`cores.operators.PhaseRetrieval`) measures
y = |F(z)| with z = pad(x/2 + 1/2), the N x N image zero-padded by p on each side to M x M (M = N + 2p) and F the
centred orthonormal 2-D DFT. For a real z:

- translation: a circular shift of z by d multiplies F(z)[k] by exp(-2 pi i <k, d> / M), so |F| is unchanged;
- reversal: F(z(-n))[k] = conj(F(z)[k]), so |F(z reversed)| = |conj(F z)| = |F z|.

Reversal about the DFT's origin (n -> -n mod M) moves the window [p, p+N) to [p+1, p+N]: a 180-degree rotation
plus a one-pixel shift. The shift changes only phases, so the rotation inside the window, x[::-1, ::-1] (the
*twin*), has exactly the measurement of x, with no shift, for every N and p (the padding is symmetric). A shifted
copy has it too as long as nothing leaves the window: the operator would otherwise see a cropped, different image.

The set scored here, for an image u = x/2 + 1/2 in [0, 1]: every circular shift of z = pad(u), and of the padded
twin, whose content stays inside the window (:func:`window_shifts`); all channels move together. For a picture
that touches every border that is the identity for mode 0 and the rotation for mode 180; a background margin
(pixels at exactly -1, as Fashion-MNIST's black background) adds the translations that fit in it. Checked with the
operator in tests/test_twins.py: every member gives the same y to float precision, and a shift that crops does not.
In 2-D these trivial ambiguities (translation, reversal) are generically the only ones (Hayes 1982, IEEE TASSP
30(2)); a global sign flip is one too, but -u is not an image in [0, 1]. Not scored: each channel's |F| is
measured on its own, so an RGB particle may rotate or shift one channel and not the others; the prior makes
none, and such a particle would score mode "none".

A particle's mode: "0" when its PSNR against the ground truth (best over the shifts) reaches the threshold,
"180" when its PSNR against the twin does (the larger wins; a tie is "0"), "none" otherwise. The threshold is the
top-level ``mode_threshold_db`` (configs/default.yaml; docs/twins.md: the histogram of max(direct, twin) PSNR
and why the default sits at its gap).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from utils.metrics import PSNR_EPS, to01

MODES = ("0", "180", "none")
TWIN_METRIC = "psnr_twin_aware"  # summarised like psnr: best-of-n (oracle), mean-of-n
PARTICLE_FIELDS = ("psnr_0", "psnr_180", TWIN_METRIC, "mode")


def rotate(x: torch.Tensor) -> torch.Tensor:
    """The twin: x rotated by 180 degrees in its window (same measurement: module docstring)."""
    return x.flip(-2, -1)


def window_shifts(u: torch.Tensor, pad: int) -> torch.Tensor:
    """(M, M) bool: the circular shifts d = (dy, dx) of pad(u) (u: (C, N, N), zero = background) that keep every
    non-zero pixel inside the N x N window; shift d moves pixel n to n + d mod M, as ``torch.roll``."""
    n = u.shape[-1]
    m = n + 2 * pad
    inside = torch.zeros(m, dtype=torch.bool)
    inside[pad:pad + n] = True
    steps = torch.arange(m)
    moved_from = (steps[None, :] - steps[:, None]) % m  # [d, n]: the position that shift d brings to n

    def axis(occupied: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(m, dtype=torch.bool)
        padded[pad:pad + n] = occupied
        return ~(padded[moved_from] & ~inside).any(-1)

    nonzero = u.ne(0)
    return axis(nonzero.any(dim=(0, 2)))[:, None] & axis(nonzero.any(dim=(0, 1)))[None, :]


def best_psnr(a: torch.Tensor, ref: torch.Tensor, pad: int) -> torch.Tensor:
    """Per row of ``a`` (K, C, N, N) in [0, 1]: the highest PSNR (dB, data range 1, piq's formula) against ``ref``
    (C, N, N) in [0, 1] moved by any shift of :func:`window_shifts`. One FFT cross-correlation gives every shift:
    for a shift that keeps ref in the window, ||a - roll(ref)||^2 = ||a||^2 + ||ref||^2 - 2 <a, roll(ref)>."""
    a, ref = a.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    m = a.shape[-1] + 2 * pad
    za, zr = F.pad(a, (pad,) * 4), F.pad(ref, (pad,) * 4)
    corr = torch.fft.irfft2(torch.fft.rfft2(za) * torch.fft.rfft2(zr).conj(), s=(m, m)).sum(1)  # (K, M, M)
    sq = (a * a).flatten(1).sum(1)[:, None, None] + (ref * ref).sum()
    mse = ((sq - 2 * corr) / ref.numel()).clamp_min(0)
    mse = mse[:, window_shifts(ref, pad)]  # (K, number of shifts): the identity is always one
    return -10 * torch.log10(mse.min(1).values + PSNR_EPS)


def mode_of(psnr_0: float, psnr_180: float, threshold_db: float) -> str:
    """"0", "180" or "none" (module docstring)."""
    if max(psnr_0, psnr_180) < threshold_db:
        return "none"
    return "0" if psnr_0 >= psnr_180 else "180"


def particle_scores(gt: torch.Tensor, xs: torch.Tensor, pad: int, threshold_db: float) -> dict[str, list[Any]]:
    """Per row of ``xs`` (K, C, N, N) against ``gt`` (C, N, N), both in [-1, 1] (clamped as the Evaluator does):
    ``psnr_0`` (against the ground truth), ``psnr_180`` (against its twin), ``psnr_twin_aware`` (the larger)
    and ``mode``. ``pad`` is the operator's padding per side."""
    a, g = to01(xs), to01(gt)
    direct, twin = best_psnr(a, g, pad).tolist(), best_psnr(a, rotate(g), pad).tolist()
    return {"psnr_0": direct, "psnr_180": twin, "psnr_twin_aware": [max(d, t) for d, t in zip(direct, twin)],
            "mode": [mode_of(d, t, threshold_db) for d, t in zip(direct, twin)]}


def gt_twin_psnr(gt: torch.Tensor, pad: int) -> float:
    """PSNR of the ground truth against its own twin: at or above the threshold, the two modes are one."""
    g = to01(gt)
    return float(best_psnr(g[None], rotate(g), pad)[0])


def image_modes(particles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One image's modes from its particle records (only status ok particles are scored): how many found each
    mode, ``success`` (0 or 180 found), ``coverage`` (both found) and ``pick``, the particle with the lowest
    measurement error (meas_err, which does not see the ground truth), scored twin-aware."""
    scored = [p for p in particles if p["status"] == "ok"]
    found = {m: sum(p["mode"] == m for p in scored) for m in MODES}
    pick = min(scored, key=lambda p: p["meas_err"], default=None)
    return {"scored": len(scored), "found": found, "success": found["0"] + found["180"] > 0,
            "coverage": found["0"] > 0 and found["180"] > 0,
            "pick": None if pick is None else {k: pick[k] for k in ("sample", "meas_err", "psnr_twin_aware", "mode")}}


def run_modes(images: Sequence[dict[str, Any]], threshold_db: float) -> dict[str, Any]:
    """Over image records (with ``modes`` and ``gt_twin_psnr``): rates over images (an image without a scored
    particle counts as neither success nor coverage), the non-oracle pick's mean twin-aware PSNR (over the images
    with a pick), and how many images have a twin within the threshold of themselves (there 0 and 180 are one)."""
    n = len(images)
    summaries = [img["modes"] for img in images]
    picks = [s["pick"] for s in summaries if s["pick"] is not None]
    return {"threshold_db": threshold_db, "images": n, "scored_images": len(picks),
            "success_rate": sum(s["success"] for s in summaries) / n if n else None,
            "coverage_rate": sum(s["coverage"] for s in summaries) / n if n else None,
            "pick_success_rate": sum(p["mode"] != "none" for p in picks) / n if n else None,
            "pick_psnr_twin_aware": sum(p["psnr_twin_aware"] for p in picks) / len(picks) if picks else None,
            "particles": {m: sum(s["found"][m] for s in summaries) for m in MODES},
            "twin_ambiguous_images": sum(img["gt_twin_psnr"] >= threshold_db for img in images)}
