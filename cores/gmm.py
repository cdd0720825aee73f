"""Gaussian mixtures: an analytic prior with an exact denoiser, and exact posteriors for linear operators.

Prior: p(x) = sum_k w_k N(x; mu_k, s_k^2 I) on R^d. Noised by x_sigma = x + sigma n it stays a
mixture with variances v_k = s_k^2 + sigma^2, so (Tweedie / Bayes for Gaussians)

    D(x, sigma) = E[x_0 | x_sigma = x] = sum_k g_k(x) (sigma^2 mu_k + s_k^2 x) / v_k,
    g_k(x) proportional to w_k N(x; mu_k, v_k I).

With y = A x + e, e ~ N(0, diag(n^2)), each component's posterior is Gaussian (Bishop, PRML 2.116):
P_k = I / s_k^2 + A^T N^-1 A, C_k = P_k^-1, m_k = C_k (mu_k / s_k^2 + A^T N^-1 y), and the weights
are w_k N(y; A mu_k, s_k^2 A A^T + N) renormalised.

:func:`mixture_from_config` reads the mixture of a gmm model config (configs/model/gmm_toy.yaml):
generated blob images, or the user's own weights, means and stds, validated.
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class IsotropicMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I); means is (K, d)."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_resp(self, x: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised log responsibilities (B, K) at noise level sigma, and the variances (K,)."""
        mu = self.means.to(x)
        var = self.stds.to(x) ** 2 + sigma**2
        sq = (x * x).sum(1, keepdim=True) - 2 * x @ mu.T + (mu * mu).sum(1)
        log_r = self.weights.to(x).log() - 0.5 * sq.clamp_min(0) / var - 0.5 * self.dim * var.log()
        return log_r, var

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact E[x_0 | x_sigma = x] for x of shape (B, d)."""
        log_r, var = self._log_resp(x, sigma)
        g = torch.softmax(log_r, dim=1)
        s2 = self.stds.to(x) ** 2
        sigma2 = var - s2
        return (g * (sigma2 / var)) @ self.means.to(x) + (g * (s2 / var)).sum(1, keepdim=True) * x

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """grad log p_sigma(x) = sum_k g_k(x) (mu_k - x) / v_k, exact also at sigma = 0."""
        log_r, var = self._log_resp(x, sigma)
        g = torch.softmax(log_r, dim=1) / var
        return g @ self.means.to(x) - g.sum(1, keepdim=True) * x

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p_sigma(x) for x of shape (B, d)."""
        log_r, _ = self._log_resp(x, sigma)
        return torch.logsumexp(log_r, dim=1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws and their component labels."""
        labels = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[labels] + self.stds[labels, None] * eps, labels


@dataclass
class FullMixture:
    """sum_k weights[k] N(means[k], covs[k]) with full covariances (posteriors)."""

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        centred = self.means - self.mean()
        within = torch.einsum("k,kij->ij", self.weights, self.covs)
        return within + torch.einsum("k,ki,kj->ij", self.weights, centred, centred)

    def log_resp(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k N(x; m_k, C_k), shape (B, K)."""
        dist = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        return self.weights.log() + dist.log_prob(x[:, None, :].to(self.means))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most responsible component of each row of x."""
        return self.log_resp(x).argmax(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], eps), labels


def linear_posterior(prior: IsotropicMixture, matrix: torch.Tensor, y: torch.Tensor,
                     noise_std: float | torch.Tensor) -> FullMixture:
    """Exact posterior of the mixture prior under y = matrix @ x + N(0, diag(noise_std^2)), in float64."""
    a = matrix.double()
    y = y.double().reshape(-1)
    m, d = a.shape
    n2 = torch.as_tensor(noise_std, dtype=torch.float64).expand(m) ** 2
    s2 = prior.stds.double() ** 2
    mu = prior.means.double()
    eye = torch.eye(d, dtype=torch.float64)
    prec = eye / s2[:, None, None] + (a.T / n2) @ a
    covs = torch.linalg.inv(prec)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    means = torch.einsum("kij,kj->ki", covs, mu / s2[:, None] + (a.T @ (y / n2)))
    evidence_cov = s2[:, None, None] * (a @ a.T) + torch.diag(n2)
    log_ev = torch.distributions.MultivariateNormal(mu @ a.T, covariance_matrix=evidence_cov).log_prob(y)
    weights = torch.softmax(prior.weights.double().log() + log_ev, 0)
    return FullMixture(weights, means, covs)


def blob_patterns(n: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """n images in [-1, 1]: a dark background with three smooth bright bumps in the central half."""
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = torch.zeros(n, c, h, w)
    for i in range(n):
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=generator) - 0.5).tolist()
            width = 0.15 + 0.2 * float(torch.rand((), generator=generator))
            amp = 0.5 + 0.5 * torch.rand(c, 1, 1, generator=generator)
            out[i] += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return out.clamp(0, 1) * 2 - 1


BLOB_DEFAULTS = {"num_components": 3, "twins": True, "seed": 0, "component_std": 0.05}
WEIGHT_TOLERANCE = 1e-6


def _tensor(key: str, value: Any) -> torch.Tensor:
    """A config value (number, nested list, array, or path of a .npy file) as a float64 tensor."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"gmm '{key}': no such file {path.resolve()}")
        try:
            value = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"gmm '{key}': {path} is not a numeric .npy array ({err})") from err
    try:
        out = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"gmm '{key}' must be numbers (a scalar, a list or nested lists of equal length), "
                         f"got {reprlib.repr(value)}") from err
    if not torch.isfinite(out).all():
        raise ValueError(f"gmm '{key}' has non-finite values")
    return out


def _explicit_means(means: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, d) means from a (K, d) or (K, *shape) array, list or .npy path."""
    m = _tensor("means", means)
    d = math.prod(shape)
    if m.dim() < 2 or len(m) == 0 or (tuple(m.shape[1:]) != (d,) and tuple(m.shape[1:]) != shape):
        c, h, w = shape
        raise ValueError(f"gmm 'means' has shape {tuple(m.shape)}: expected (K, {d}) or (K, {c}, {h}, {w}) for "
                         f"shape {list(shape)}, with K >= 1 components")
    return m.reshape(len(m), d)


def _explicit_weights(weights: Any, k: int) -> torch.Tensor:
    """K positive weights summing to 1 (within WEIGHT_TOLERANCE); equal weights when None."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = _tensor("weights", weights)
    if w.shape != (k,):
        raise ValueError(f"gmm 'weights' has shape {tuple(w.shape)}: expected one weight per mean, ({k},)")
    if (w <= 0).any():
        raise ValueError(f"gmm 'weights' must be positive, got {w.tolist()}")
    if abs(float(w.sum()) - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"gmm 'weights' must sum to 1 (within {WEIGHT_TOLERANCE:g}), they sum to {float(w.sum())!r}")
    return w


def _explicit_stds(stds: Any, k: int) -> torch.Tensor:
    """K positive stds from one number or a list of K."""
    s = _tensor("stds", stds)
    if s.dim() == 0:
        s = s.expand(k).clone()
    if s.shape != (k,):
        raise ValueError(f"gmm 'stds' has shape {tuple(s.shape)}: expected one number or one per mean, ({k},)")
    if (s <= 0).any():
        raise ValueError(f"gmm 'stds' must be positive, got {s.tolist()}")
    return s


def mixture_from_config(shape: Sequence[int], weights: Any = None, means: Any = None, stds: Any = None,
                        num_components: int | None = None, twins: bool | None = None, seed: int | None = None,
                        component_std: float | None = None) -> IsotropicMixture:
    """The mixture of a gmm model config (float64), over images of ``shape`` (C, H, W).

    Either an explicit mixture: ``means`` (K lists of C*H*W numbers, or a .npy path of shape (K, C*H*W)
    or (K, C, H, W)), ``weights`` (K positive numbers summing to 1; equal when None) and ``stds`` (K
    positive numbers, or one for all); or generated blobs: ``num_components`` blob images
    (:func:`blob_patterns`, drawn with ``seed``) and, with ``twins``, their 180-degree rotations, equal
    weights, std ``component_std`` (BLOB_DEFAULTS for the keys left None). The two are exclusive.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"gmm 'shape' must be [C, H, W] with positive sizes, got {list(shape)}")
    blob = {"num_components": num_components, "twins": twins, "seed": seed, "component_std": component_std}
    if means is None:
        given = [key for key, v in (("weights", weights), ("stds", stds)) if v is not None]
        if given:
            raise ValueError(f"gmm {' and '.join(map(repr, given))} belong to an explicit mixture: give 'means' too "
                             f"(generated blobs take num_components, twins, seed and component_std)")
        cfg = {key: BLOB_DEFAULTS[key] if v is None else v for key, v in blob.items()}
        if int(cfg["num_components"]) < 1:
            raise ValueError(f"gmm 'num_components' must be at least 1, got {cfg['num_components']}")
        if not float(cfg["component_std"]) > 0:
            raise ValueError(f"gmm 'component_std' must be positive, got {cfg['component_std']}")
        blobs = blob_patterns(int(cfg["num_components"]), shape, torch.Generator().manual_seed(int(cfg["seed"])))
        if cfg["twins"]:
            blobs = torch.cat([blobs, blobs.flip(-2, -1)])
        k = blobs.shape[0]
        return IsotropicMixture(torch.full((k,), 1.0 / k, dtype=torch.float64), blobs.flatten(1).double(),
                                torch.full((k,), float(cfg["component_std"]), dtype=torch.float64))
    clash = [key for key, v in blob.items() if v is not None]
    if clash:
        raise ValueError(f"gmm 'means' (an explicit mixture) cannot be combined with the blob keys "
                         f"{', '.join(clash)}: set them to null")
    if stds is None:
        raise ValueError("gmm 'stds' is required with 'means': one positive number, or one per mean")
    m = _explicit_means(means, shape)
    return IsotropicMixture(_explicit_weights(weights, len(m)), m, _explicit_stds(stds, len(m)))
