"""Noise schedules β_1 … β_T (paper §2 and §4; Nichol & Dhariwal 2021 for the cosine one).

Schedules are computed in float64, as in the official code: ᾱ_t is a product of up to 1000
numbers close to 1, and float32 loses the small values of 1 − ᾱ_t at early t.

Time indices are 0-based, as in the official code: ``betas[i]`` is the paper's β_t with t = i + 1.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The paper's schedule (§4): β rising linearly from 1e-4 to 0.02 over T = 1000 steps.

    For T ≠ 1000 both ends are scaled by 1000 / T (as in Nichol & Dhariwal 2021), so that the chain
    still ends near pure noise (ᾱ_T ≈ 4e-5 at T = 1000); at T = 1000 this is the paper's schedule.
    """
    scale = 1000.0 / T
    if scale * beta_end >= 1.0:
        raise ValueError(f"T={T} is too small for the linear schedule: β_T = {scale * beta_end:g} ≥ 1")
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) · π/2).

    β_t = 1 − ᾱ_t / ᾱ_{t−1}, clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_beta_schedule(name: str, T: int = 1000) -> torch.Tensor:
    """β_1 … β_T as a float64 tensor of shape [T]. ``name`` is one of ``SCHEDULES``."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if name == "linear":
        return linear_beta_schedule(T)
    if name == "cosine":
        return cosine_beta_schedule(T)
    raise ValueError(f"schedule name={name!r} is unknown; valid names: {SCHEDULES}")


def alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (§2, below eq. 4), in float64."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def snr(betas: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of q(x_t | x_0): SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    a = alpha_bar(betas)
    return a / (1 - a)
