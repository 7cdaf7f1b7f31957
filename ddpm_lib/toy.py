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
