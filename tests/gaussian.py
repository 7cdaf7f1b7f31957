"""Gaussian data, where the optimal denoiser is known in closed form: a yardstick for the math.

For x_0 with per-dimension mean m and variance v (any distribution), x_t = √ᾱ x_0 + √(1 − ᾱ) ε has
variance v_t = ᾱ v + 1 − ᾱ, and the best *linear* estimate of ε from x_t is
ε̂ = √(1 − ᾱ) (x_t − √ᾱ m) / v_t, with x_0 error E[(x_0 − x̂_0)²] = v (1 − ᾱ) / v_t. For Gaussian x_0
this is the optimal (MMSE) predictor, and −ε̂ / √(1 − ᾱ) is the exact score of q(x_t).
"""

from __future__ import annotations

import torch

from ddpm_lib import GaussianDiffusion


class OptimalEps:
    """model(x_t, t) → the linear-MMSE ε̂ for data of mean ``m`` and variance ``v``."""

    def __init__(self, diffusion: GaussianDiffusion, m: float, v: float):
        self.alpha_bar = diffusion.alpha_bar
        self.m, self.v = m, v

    def marginal_var(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t.cpu()]
        return a * self.v + 1 - a

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t.cpu()].to(x_t).reshape(-1, *[1] * (x_t.ndim - 1))
        v_t = a * self.v + 1 - a
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.m) / v_t


def discretized_gaussian(m: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 levels of [-1, 1] and the probability of each when N(m, s²) is rounded to the nearest
    level (edge levels take the tails), in float64."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    edges = torch.cat([torch.tensor([-torch.inf]), (levels[:-1] + levels[1:]) / 2,
                       torch.tensor([torch.inf])]).to(torch.float64)
    cdf = torch.special.ndtr((edges - m) / s)
    return levels, cdf[1:] - cdf[:-1]
