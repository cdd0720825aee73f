"""Kernel Stein discrepancy with the inverse multiquadric (IMQ) kernel, per measurement (K2 reheating's signal).

For particles x_1..x_n of one measurement with scores s_i = grad log pi(x_i) of the level's target pi
(cores/mcmc.py ``Target.grad``), the squared KSD is the U-statistic (Liu, Lee & Jordan 2016, eq. 14;
Gorham & Mackey 2017 for the IMQ kernel, which makes the KSD control weak convergence):

    KSD^2 = 1 / (n (n - 1)) sum_{i != j} u(x_i, x_j),
    u(x, y) = s(x).s(y) k(x, y) + s(x).grad_y k(x, y) + grad_x k(x, y).s(y) + tr(grad_x grad_y k(x, y)),

with k(x, y) = (c^2 + ||x - y||^2)^beta, beta in (-1, 0) (default c = 1, beta = -1/2). With d = x - y and
q = c^2 + ||d||^2 in D dimensions:

    grad_x k = 2 beta q^(beta-1) d = -grad_y k,
    tr(grad_x grad_y k) = -2 beta (D q^(beta-1) + 2 (beta - 1) q^(beta-2) ||d||^2),

so u(x_i, x_j) = k s_i.s_j - 2 beta q^(beta-1) d.(s_i - s_j) - 2 beta (D q^(beta-1) + 2 (beta-1) q^(beta-2) ||d||^2)
(the cross terms: s_i.grad_y k + grad_x k.s_j = 2 beta q^(beta-1) d.(s_j - s_i)). Everything comes from the
particles' Gram matrices of x and s, so one call costs O(N^2 D) for N particles, which is small next to an MCMC
step for the particle counts DAPS uses. Zero (in expectation) when the particles are draws of pi; it grows when
they are stuck or biased.
"""
from __future__ import annotations

import torch

from cores.pairwise import pairwise_sq, same_group_pairs


def imq_ksd_rows(x: torch.Tensor, score: torch.Tensor, group: torch.Tensor, c: float = 1.0, beta: float = -0.5
                 ) -> torch.Tensor:
    """Per particle i, mean_{j != i, same group} u(x_i, x_j) (module docstring); a measurement's KSD^2 is the mean of
    its particles' rows. NaN for a particle alone in its group (no pair)."""
    if not -1 < beta < 0 or c <= 0:
        raise ValueError(f"IMQ kernel needs c > 0 and beta in (-1, 0), got c={c}, beta={beta}")
    xf, sf = x.flatten(1).double(), score.flatten(1).double()
    dim = xf.shape[1]
    ss, xs = sf @ sf.T, xf @ sf.T                          # Gram matrices: s_i.s_j, x_i.s_j
    sq = pairwise_sq(xf, xf)                               # ||x_i - x_j||^2
    q = c**2 + sq
    # d.(s_i - s_j) with d = x_i - x_j: x_i.s_i - x_i.s_j - x_j.s_i + x_j.s_j
    d_ds = xs.diag()[:, None] - xs - xs.T + xs.diag()[None, :]
    u = (q.pow(beta) * ss - 2 * beta * q.pow(beta - 1) * d_ds
         - 2 * beta * (dim * q.pow(beta - 1) + 2 * (beta - 1) * q.pow(beta - 2) * sq))
    pair = same_group_pairs(group)
    count = pair.sum(1)
    rows = (u * pair).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, rows, torch.full_like(rows, float("nan"))).to(x.dtype)
