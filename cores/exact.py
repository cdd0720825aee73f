"""Problems with exact posteriors, for checking MCMC kernels and the DAPS loop (scripts/validate_posterior.py).

Prior: a 3-component isotropic Gaussian mixture on 4x4 one-channel images (d = 16), whose denoiser is
exact at every sigma (cores/gmm.py). With a linear operator A and y = A x + e, e ~ N(0, NOISE^2 I), the
posterior p(x_0 | y) is a Gaussian mixture in closed form (:func:`cores.gmm.linear_posterior`), and so is
the conditional of one DAPS level,

    p(x_0 | x_t, y)  proportional to  p(x_0) N(y; A x_0, NOISE^2 I) N(x_t; x_0, sigma_t^2 I),

(DAPS, Zhang et al. 2025, Sec. 3: p(x_0 | x_t, y) proportional to p(x_0 | x_t) p(y | x_0), with the exact
p(x_0 | x_t) of the mixture): x_t is d further linear measurements of x_0 with noise sigma_t.

The twin problem is phase retrieval (not linear): prior = an image and its 180-degree rotation, which have
the same likelihood; its exact posterior is computed by importance sampling from each component.

Errors of a set of samples against an exact mixture with mean m and covariance C:
mean = ||m_hat - m|| / sqrt(tr C); cov = ||C_hat - C||_F / ||C||_F; modes = total variation between the
fractions of samples assigned to each component and the same fractions for exact samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cores.gmm import FullMixture, IsotropicMixture, linear_posterior
from cores.mcmc import Kernel, KernelOutput, MCMCConfig, Target, make_target
from cores.models import GaussianMixtureDenoiser
from cores.noise import SharedNoise
from cores.operators import DenseGaussian, Inpainting, Operator, PhaseRetrieval, linear_matrix

SHAPE = (1, 4, 4)
DIM = 16
NOISE = 0.2  # measurement noise std of the linear problems
PROBLEMS = {"inpainting": 0.4, "dense": 0.4, "separated": 1.2}  # problem: spread of the prior means
PR_STD, PR_NOISE = 0.1, 0.05  # twin problem: component std of the prior, measurement noise std

KERNELS = ("langevin", "hmc", "mala", "hmc_mh", "da_hmc", "mh")
MH_KERNELS = ("mala", "hmc_mh", "da_hmc", "mh")
KERNEL_EXTRA = {"hmc": {"momentum": 0.7}, "hmc_mh": {"leapfrog_steps": 4}, "da_hmc": {"leapfrog_steps": 4}}
STATIONARY_SIGMA = 0.3
# Langevin-equivalent step sizes at the stationarity check's level; MALA accepts about 0.6 there, random-walk MH
# about 0.5. da_hmc's first-order surrogate ignores the data term's curvature, which dominates here: its second
# test rejects every step at 1e-2 and accepts about 0.8 (inpainting) and 0.3 (dense) at 2e-5.
STATIONARY_LR = {"langevin": 1e-2, "hmc": 1e-2, "mala": 1e-2, "hmc_mh": 1e-2, "da_hmc": 2e-5, "mh": 3e-3}


def make_prior(spread: float, seed: int = 0) -> GaussianMixtureDenoiser:
    """p(x) = 0.5 N(mu_0, 0.5^2 I) + 0.3 N(mu_1, 0.4^2 I) + 0.2 N(mu_2, 0.6^2 I), mu_k ~ N(0, spread^2 I) (seeded)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(3, DIM, generator=g, dtype=torch.float64)
    mix = IsotropicMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means,
                           torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64))
    return GaussianMixtureDenoiser(mix, SHAPE)


def mixture64(prior: GaussianMixtureDenoiser) -> IsotropicMixture:
    """The prior's mixture in float64."""
    return IsotropicMixture(prior.weights.double(), prior.means.double(), prior.stds.double())


@dataclass
class Problem:
    """A linear inverse problem: prior, operator, measurement (image-shaped, batch 1), dense matrix, exact posterior."""

    name: str
    prior: GaussianMixtureDenoiser
    operator: Operator
    y: torch.Tensor
    matrix: torch.Tensor
    exact: FullMixture


def make_problem(kind: str, seed: int = 0) -> Problem:
    """Random inpainting ('inpainting') or an 8 x 16 Gaussian matrix ('dense', 'separated'); truth between two modes.

    The ground truth is (mu_0 + mu_1) / 2, so the posterior has two modes of comparable weight;
    'separated' spreads the prior means three times further apart than 'dense'.
    """
    prior = make_prior(PROBLEMS[kind], seed)
    if kind == "inpainting":
        op: Operator = Inpainting("random", resolution=4, mask_prob_range=(0.5, 0.51), sigma=NOISE, seed=seed)
    else:
        op = DenseGaussian(num_measurements=8, dim=DIM, sigma=NOISE, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_true = 0.5 * (prior.means[0] + prior.means[1]).double()
    matrix = linear_matrix(op, SHAPE)
    y = matrix @ x_true + NOISE * torch.randn(matrix.shape[0], generator=g, dtype=torch.float64)
    exact = linear_posterior(mixture64(prior), matrix, y, NOISE)
    y_img = y.float().view(1, *op(torch.zeros(1, *SHAPE)).shape[1:])
    return Problem(kind, prior, op, y_img, matrix, exact)


def level_conditional(p: Problem, xt: torch.Tensor, sigma: float) -> FullMixture:
    """p(x_0 | x_t, y) of one DAPS level: the posterior with x_t as d extra measurements of x_0 with noise sigma.

    p(x_0 | x_t, y) is proportional to p(x_0) N(y; A x_0, NOISE^2 I) N(x_t; x_0, sigma^2 I), i.e. the linear
    posterior (cores/gmm.py) of the stacked system [A; I] x_0 = [y; x_t] with noise stds [NOISE; sigma].
    ``xt`` is one flattened state of d values.
    """
    d = p.matrix.shape[1]
    stacked = torch.cat([p.matrix, torch.eye(d, dtype=torch.float64)])
    noise_std = torch.cat([torch.full((p.matrix.shape[0],), NOISE), torch.full((d,), sigma)]).double()
    return linear_posterior(mixture64(p.prior), stacked, torch.cat([p.y.double().flatten(), xt.double()]), noise_std)


def errors(x: torch.Tensor, exact: FullMixture, ref_freq: torch.Tensor) -> dict[str, float]:
    """Errors (mean, cov, modes; see the module docstring) of the finite rows of x against ``exact``.

    Stopped particles are NaN rows: they are left out and counted ('nonfinite'). ``ref_freq`` holds the
    fractions of exact samples per component (:func:`reference_freq`).
    """
    x = x.double().flatten(1)
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    if len(x) < 2:
        return {"mean": math.nan, "cov": math.nan, "modes": math.nan, "nonfinite": int((~finite).sum())}
    m, c = exact.mean(), exact.cov()
    m_hat, c_hat = x.mean(0), torch.cov(x.T)
    freq = torch.bincount(exact.assign(x), minlength=len(exact.weights)).double() / len(x)
    return {"mean": float((m_hat - m).norm() / c.trace().sqrt()),
            "cov": float((c_hat - c).norm() / c.norm()),
            "modes": float(0.5 * (freq - ref_freq).abs().sum()), "nonfinite": int((~finite).sum())}


def reference_freq(exact: FullMixture, seed: int, n: int = 200_000) -> torch.Tensor:
    """Fractions of n exact samples assigned to each component (the reference of the 'modes' error)."""
    x, _ = exact.sample(n, torch.Generator().manual_seed(seed + 99))
    return torch.bincount(exact.assign(x), minlength=len(exact.weights)).double() / n


def floor(exact: FullMixture, ref: torch.Tensor, n: int, seed: int, repeats: int = 5) -> dict[str, float]:
    """Mean errors of n exact draws over a few repeats (the Monte Carlo floor)."""
    rows = [errors(exact.sample(n, torch.Generator().manual_seed(seed + 1000 + r))[0], exact, ref)
            for r in range(repeats)]
    return {k: sum(r[k] for r in rows) / repeats for k in ("mean", "cov", "modes")}


def mcmc_dict(kernel: str, lr: float, budget: int, prior_solver: str, tau: float, lr_min_ratio: float = 1.0) -> dict:
    """mcmc_sampler_config of ``kernel`` costing ``budget`` exact evaluations of the data term per level (Gaussian
    likelihood): gradients, and for da_hmc, whose trajectories use its surrogate, one gradient and losses (one at
    the start, at most one per step)."""
    steps = {"hmc_mh": (budget - 1) // KERNEL_EXTRA["hmc_mh"]["leapfrog_steps"], "da_hmc": budget - 2}
    steps = max(1, steps.get(kernel, budget))
    return {"num_steps": steps, "lr": lr, "tau": tau, "lr_min_ratio": lr_min_ratio, "mc_algo": kernel,
            "prior_solver": prior_solver, "prior_sigma_min": 0.0, "likelihood": "gaussian",
            **KERNEL_EXTRA.get(kernel, {})}


def stationary_run(p: Problem, kernel: str, n: int, budget: int, seed: int, anchor_offset: float = 0.0
                   ) -> tuple[KernelOutput, FullMixture]:
    """Kernel stationarity: n chains start at exact draws of p(x_0 | x_t, y) at sigma_t = STATIONARY_SIGMA.

    x_t is an exact posterior draw plus sigma_t noise. An exact kernel keeps the conditional, so the chains
    after ``budget`` evaluations (:func:`mcmc_dict`) are still exact draws. The level's x0hat (da_hmc's
    linearisation point) is the prior's denoiser D(x_t, sigma_t), a function of x_t alone as in DAPS (an anchor
    that depended on the chains' random starts would break the exactness of a surrogate built at it);
    ``anchor_offset`` shifts it in every coordinate (a deliberately bad surrogate). Returns the kernel's output
    (chains, per-chain acceptance rates) and the conditional.
    """
    g = torch.Generator().manual_seed(seed + 7)
    xt = p.exact.sample(1, g)[0][0] + STATIONARY_SIGMA * torch.randn(DIM, generator=g, dtype=torch.float64)
    cond = level_conditional(p, xt, STATIONARY_SIGMA)
    x0 = cond.sample(n, torch.Generator().manual_seed(seed + 8))[0].float().view(n, *SHAPE)
    cfg = MCMCConfig.from_dict(mcmc_dict(kernel, STATIONARY_LR[kernel], budget, "exact", NOISE))
    y = p.y.expand(n, *p.y.shape[1:])
    xt_img = xt.float().view(1, *SHAPE).expand(n, *SHAPE)
    x0hat = p.prior.denoise(xt_img, STATIONARY_SIGMA) + anchor_offset
    target = make_target(cfg, p.prior, lambda x: p.operator.loss(x, y), xt_img, x0hat, STATIONARY_SIGMA)
    return cfg.kernel().run(target, x0, SharedNoise(seed + 9, n), cfg.lr), cond


class ExactConditional(Kernel):
    """Exact draws of each level's conditional p(x_0 | x_t, y) (:func:`level_conditional`) in place of MCMC.

    With prior_solver=exact the target's Gaussian factor is centred at x_t (``target.prior_mean``) with
    std r = sigma_t, which is all the conditional needs. A DAPS loop with this kernel tests the loop alone
    (levels, noise injection, no noise after the last level).
    """

    def __init__(self, problem: Problem, seed: int):
        super().__init__(num_steps=1, lr=1.0)
        self.problem, self.generator = problem, torch.Generator().manual_seed(seed)

    def run(self, target: Target, x: torch.Tensor, noise, lr: float) -> KernelOutput:
        xt = target.prior_mean.flatten(1)
        draws = [level_conditional(self.problem, row, target.r).sample(1, self.generator)[0] for row in xt]
        return KernelOutput(torch.cat(draws).float().view_as(x), torch.zeros(len(x)))


@dataclass
class TwinProblem:
    """Phase retrieval with a two-image prior; ``weights`` and ``mode_means`` of the exact posterior, and the
    smaller of the two importance samples' effective sizes."""

    prior: GaussianMixtureDenoiser
    operator: PhaseRetrieval
    y: torch.Tensor
    weights: torch.Tensor
    mode_means: torch.Tensor
    ess: float


def make_twin_problem(seed: int = 0, draws: int = 200_000) -> TwinProblem:
    """Phase retrieval, prior = an image and its 180-degree twin; exact posterior by importance sampling.

    For each component k, ``draws`` prior draws x_i ~ N(mu_k, PR_STD^2 I) with weights
    w_i = exp(-||A(x_i) - y||^2 / (2 PR_NOISE^2)) give the evidence Z_k = mean_i w_i and the within-mode
    posterior mean sum_i w_i x_i / sum_i w_i; the posterior weights are Z_k / sum_j Z_j (equal prior weights).
    """
    g = torch.Generator().manual_seed(seed + 21)
    base = torch.rand(1, *SHAPE, generator=g) * 1.6 - 0.8
    base[:, :, 0, 0] = 0.9
    means = torch.cat([base, base.flip(-2, -1)]).flatten(1)
    prior = GaussianMixtureDenoiser(IsotropicMixture(torch.full((2,), 0.5), means, torch.full((2,), PR_STD)), SHAPE)
    op = PhaseRetrieval(oversample=2.0, sigma=PR_NOISE)
    x_true = (means[0] + PR_STD * torch.randn(DIM, generator=g)).view(1, *SHAPE)
    y0 = op(x_true)
    y = y0 + PR_NOISE * torch.randn(y0.shape, generator=g)
    log_ev, mode_means, ess = [], [], []
    for k in range(2):
        xs = (means[k] + PR_STD * torch.randn(draws, DIM, generator=g)).view(-1, *SHAPE)
        logw = -op.loss(xs, y.expand(draws, *y.shape[1:])).double() / (2 * PR_NOISE**2)
        log_ev.append(torch.logsumexp(logw, 0) - math.log(draws))
        w = torch.softmax(logw, 0)
        mode_means.append(w @ xs.flatten(1).double())
        ess.append(float(1 / (w**2).sum()))
    weights = torch.softmax(torch.stack(log_ev), 0)
    return TwinProblem(prior, op, y, weights, torch.stack(mode_means), min(ess))


def twin_scores(tp: TwinProblem, x: torch.Tensor) -> dict[str, float]:
    """Fractions of samples nearest to each prior mean, and within-mode mean errors in units of PR_STD sqrt(d)."""
    x = x.flatten(1).double()
    labels = torch.cdist(x, tp.prior.means.double()).argmin(1)
    freq = torch.bincount(labels, minlength=2).double() / len(x)
    err = [float((x[labels == k].mean(0) - tp.mode_means[k]).norm() / (PR_STD * math.sqrt(DIM)))
           if (labels == k).any() else math.inf for k in range(2)]
    return {"true": float(freq[0]), "twin": float(freq[1]), "mean_err_true": err[0], "mean_err_twin": err[1]}


TWIN_STD = 0.5  # twin problem on a linear operator: component std of the prior


@dataclass
class TwinLinearProblem:
    """Many measurements of one twin-mode linear problem (:func:`make_twin_linear_problem`): ``y`` holds one
    measurement per row (image-shaped), ``exact`` each one's exact posterior (its components in the prior's order),
    ``labels`` the prior component each ground truth was drawn from."""

    prior: GaussianMixtureDenoiser
    operator: DenseGaussian
    matrix: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor
    exact: list[FullMixture]

    @property
    def weights(self) -> torch.Tensor:
        """Exact posterior component weights, one row per measurement, shape (M, K)."""
        return torch.stack([e.weights for e in self.exact])


def make_twin_linear_problem(measurements: int, weights: tuple[float, ...] = (0.5, 0.5), separation: float = 4.0,
                             seed: int = 0, num_measurements: int = 8) -> TwinLinearProblem:
    """Twin components the measurement cannot tell apart (the linear analogue of phase retrieval's 180-degree twin).

    A is an ``num_measurements`` x 16 Gaussian matrix (DenseGaussian, noise NOISE). The prior has 2 or 4 components
    of std TWIN_STD: a base mean mu ~ N(0, I) plus offsets in the null space of A: mu -+ delta_1 / 2 (two twins),
    or mu -+ delta_1 / 2 -+ delta_2 / 2 (four: the corners of a square), with delta_i orthogonal null-space
    directions of length ``separation``. Since A delta_i = 0, every component predicts the same y, and the evidence
    N(y; A mu_k, s^2 A A^T + NOISE^2 I) (cores/gmm.py) is the same for all: for any y the exact posterior weights
    equal the prior ``weights``, and the components' posteriors are shifted copies of one Gaussian. Ground truths
    are prior draws, y = A x + N(0, NOISE^2 I); ``exact`` is :func:`cores.gmm.linear_posterior` of each y.
    """
    k = len(weights)
    if k not in (2, 4):
        raise ValueError(f"twin problems have 2 or 4 components, got weights {weights}")
    op = DenseGaussian(num_measurements=num_measurements, dim=DIM, sigma=NOISE, seed=seed)
    matrix = linear_matrix(op, SHAPE)
    null = torch.linalg.svd(matrix).Vh[num_measurements:]  # orthonormal basis of the null space of A
    g = torch.Generator().manual_seed(seed + 41)
    dirs = torch.linalg.qr((torch.randn(2, len(null), generator=g, dtype=torch.float64) @ null).T).Q.T
    mu = torch.randn(DIM, generator=g, dtype=torch.float64)
    signs = torch.tensor([[-1.0], [1.0]] if k == 2 else [[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=torch.float64)
    means = mu + 0.5 * separation * signs @ dirs[:signs.shape[1]]
    mix = IsotropicMixture(torch.tensor(weights, dtype=torch.float64), means,
                           torch.full((k,), TWIN_STD, dtype=torch.float64))
    x, labels = mix.sample(measurements, g)
    y = x @ matrix.T + NOISE * torch.randn(measurements, num_measurements, generator=g, dtype=torch.float64)
    exact = [linear_posterior(mix, matrix, row, NOISE) for row in y]
    return TwinLinearProblem(GaussianMixtureDenoiser(mix, SHAPE), op, matrix, y.float(), labels, exact)


def coverage_probability(weights: torch.Tensor, n: int, threshold: float = 0.05) -> float:
    """P(n independent exact draws land in every component of weight >= ``threshold``), by inclusion-exclusion:
    sum over subsets S of those components of (-1)^|S| (1 - w(S))^n."""
    w = [float(v) for v in weights if v >= threshold]
    total = 0.0
    for mask in range(1 << len(w)):
        s = sum(v for i, v in enumerate(w) if mask >> i & 1)
        total += (-1) ** bin(mask).count("1") * max(0.0, 1.0 - s) ** n
    return total
