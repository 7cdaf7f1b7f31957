"""Data whose answers are known in closed form: yardsticks for the math and for the book.

For x_0 with per-dimension mean m and variance v (any distribution), x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε
(eq. 4) has variance v_t = ᾱ_t v + 1 − ᾱ_t, and the best *linear* estimate of ε from x_t is

    ε̂(x_t, t) = √(1 − ᾱ_t) (x_t − √ᾱ_t m) / v_t,

with x_0 error E[(x_0 − x̂_0)²] = v (1 − ᾱ_t) / v_t. For Gaussian x_0 it is the optimal (MMSE)
ε-predictor, the minimizer of L_simple (eq. 14), and −ε̂ / √(1 − ᾱ_t) is the exact score of q(x_t).
"""

from __future__ import annotations

import torch

from .diffusion import GaussianDiffusion
from .unet import timestep_embedding


class LinearOptimalEps:
    """A "model" ``(x_t, t) → ε̂``: the linear-MMSE ε-predictor for data of mean ``m``, variance ``v``."""

    def __init__(self, diffusion: GaussianDiffusion, m: float, v: float):
        self.alpha_bar = diffusion.alpha_bar
        self.m, self.v = m, v

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t.cpu()].to(x_t).reshape(-1, *[1] * (x_t.ndim - 1))
        v_t = a * self.v + 1 - a
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.m) / v_t

    def x0_mse(self) -> torch.Tensor:
        """E[(x_0 − x̂_0)²] at every index t, float64 [T]."""
        a = self.alpha_bar
        return self.v * (1 - a) / (a * self.v + 1 - a)


def discretized_gaussian(m: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """N(m, s²) rounded to the nearest of the 256 levels of [−1, 1] (edge levels take the tails).

    Returns the levels [256] and their probabilities [256], float64.
    """
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    inf = torch.tensor([torch.inf], dtype=torch.float64)
    edges = torch.cat([-inf, (levels[:-1] + levels[1:]) / 2, inf])
    cdf = torch.special.ndtr((edges - m) / s)
    return levels, cdf[1:] - cdf[:-1]


def entropy_bits(probs: torch.Tensor) -> float:
    """−Σ p log₂ p: the exact NLL, in bits per dimension, of data drawn independently from ``probs``."""
    p = probs[probs > 0]
    return float(-(p * p.log2()).sum())


class GaussianMixture2D:
    """A mixture of isotropic Gaussians in the plane: 2-D data whose noisy marginals stay mixtures.

    With components N(μ_k, s² I) and weights w_k, eq. 4 gives q(x_t) = Σ_k w_k N(√ᾱ_t μ_k, v_t I),
    v_t = ᾱ_t s² + 1 − ᾱ_t, so the exact score ∇ log q(x_t) and the optimal ε-predictor
    ε*(x_t, t) = −√(1 − ᾱ_t) ∇ log q(x_t) (§3.2) are known in closed form.
    """

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2 or self.means.shape[1] != 2:
            raise ValueError(f"means must have shape [K, 2], got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else (
            torch.as_tensor(weights, dtype=torch.float64) / torch.as_tensor(weights).sum())
        self.std = float(std)

    @classmethod
    def ring(cls, k: int = 8, radius: float = 0.7, std: float = 0.05) -> GaussianMixture2D:
        """``k`` equal components evenly spaced on a circle (the usual 2-D toy)."""
        angles = torch.arange(k, dtype=torch.float64) * (2 * torch.pi / k)
        return cls(radius * torch.stack([angles.cos(), angles.sin()], 1), std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points [n, 2], float64."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.std * noise

    def score(self, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
        """∇ log q(x_t) for x_t [B, 2] at ᾱ_t [B] (or a scalar): the responsibility-weighted pull
        of each component, −Σ_k r_k(x) (x − √ᾱ_t μ_k) / v_t."""
        a = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1)
        v = a * self.std**2 + 1 - a  # [B or 1, 1, 1]
        diff = x_t[:, None, :] - a.sqrt() * self.means.to(x_t)[None]  # [B, K, 2]
        log_r = self.weights.to(x_t).log()[None] - (diff**2).sum(-1) / (2 * v[:, :, 0])
        r = torch.softmax(log_r, dim=1)  # [B, K]
        return -(r[..., None] * diff).sum(1) / v[:, :, 0]

    def optimal_eps(self, diffusion: GaussianDiffusion):
        """A "model" (x_t, t) → ε*(x_t, t) = −√(1 − ᾱ_t) ∇ log q(x_t), the minimizer of L_simple."""
        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = diffusion.alpha_bar[t.cpu()].to(x_t)
            return -(1 - a).sqrt()[:, None] * self.score(x_t, a)
        return model


class MLPDenoiser(torch.nn.Module):
    """A small ε_θ(x_t, t) for low-dimensional data: an MLP on [x_t, sinusoidal embedding of t]."""

    def __init__(self, dim: int = 2, hidden: int = 128, emb_dim: int = 32, depth: int = 3):
        super().__init__()
        self.emb_dim = emb_dim
        layers: list[torch.nn.Module] = [torch.nn.Linear(dim + emb_dim, hidden), torch.nn.SiLU()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(hidden, hidden), torch.nn.SiLU()]
        layers.append(torch.nn.Linear(hidden, dim))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.emb_dim).to(x_t.dtype)
        return self.net(torch.cat([x_t, emb], dim=1))
