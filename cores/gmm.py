"""Gaussian mixtures: an analytic prior with an exact denoiser, and exact posteriors for linear operators.

Prior: p(x) = sum_k w_k N(x; mu_k, s_k^2 I) on R^d. Noised by x_sigma = x + sigma n it stays a
mixture with variances v_k = s_k^2 + sigma^2, so (Tweedie / Bayes for Gaussians)

    D(x, sigma) = E[x_0 | x_sigma = x] = sum_k g_k(x) (sigma^2 mu_k + s_k^2 x) / v_k,
    g_k(x) proportional to w_k N(x; mu_k, v_k I).

With y = A x + e, e ~ N(0, diag(n^2)), each component's posterior is Gaussian (Bishop, PRML 2.116):
P_k = I / s_k^2 + A^T N^-1 A, C_k = P_k^-1, m_k = C_k (mu_k / s_k^2 + A^T N^-1 y), and the weights
are w_k N(y; A mu_k, s_k^2 A A^T + N) renormalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
