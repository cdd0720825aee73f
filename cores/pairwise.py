"""Pairwise quantities among the particles of a batch, restricted to particles of one measurement where asked
(repulsion, the KSD, pruning's distances): all from Gram matrices, never an N x N x D tensor."""
from __future__ import annotations

import torch


def same_group_pairs(group: torch.Tensor) -> torch.Tensor:
    """(N, N) mask of the pairs (i, j), i != j, of one measurement."""
    eye = torch.eye(len(group), dtype=torch.bool, device=group.device)
    return (group[:, None] == group[None, :]) & ~eye


def pairwise_sq(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||x_i - a_j||^2 for all i, j (flattened states)."""
    xf, af = x.flatten(1), a.flatten(1)
    return (xf.pow(2).sum(1)[:, None] + af.pow(2).sum(1)[None, :] - 2 * xf @ af.T).clamp_min(0)


def rms_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j|| / sqrt(D): the RMS distance per coordinate between every two particles."""
    return (pairwise_sq(x, x) / x[0].numel()).sqrt()
