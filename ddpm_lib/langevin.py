"""The link to Langevin dynamics and score matching (paper §3.2 and §5).

With ε-prediction, the network estimates the score of the noisy marginal q(x_t):
∇ log q(x_t) ≈ s_θ(x_t, t) = −ε_θ(x_t, t) / √(1 − ᾱ_t). Algorithm 2's step then reads

    x_{t−1} = (x_t + β_t s_θ(x_t, t)) / √α_t + σ_t z,

a gradient step on log q plus noise: Langevin-like dynamics with a learned gradient of the data
density. Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) instead runs several plain
Langevin steps x ← x + (α/2) s_θ(x, t) + √α z at each of a decreasing list of noise levels; this
module gives both readings one score function so the book can set them side by side.

Time indices are 0-based as everywhere in ddpm_lib: index i is the paper's t = i + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import Model, model_device
from .diffusion import GaussianDiffusion
from .rng import randn

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_from_eps_model(diffusion: GaussianDiffusion, model: Model) -> Score:
    """s_θ(x_t, t) = −ε̂(x_t, t) / √(1 − ᾱ_t) (§3.2). ε̂ is the model's prediction of the noise, read
    directly for ε-prediction and derived through eq. 4 for the other mean types (unclipped x̂_0)."""

    def score(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False)["pred_eps"]
        return diffusion.eps_to_score(eps, t)

    return score


def langevin_step(x: torch.Tensor, score: torch.Tensor, step_size: torch.Tensor | float,
                  noise: torch.Tensor) -> torch.Tensor:
    """One Langevin step: x + (α/2) ∇ log p(x) + √α z (Song & Ermon 2019, eq. 4)."""
    step_size = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    return x + 0.5 * step_size * score + step_size.sqrt() * noise


@torch.no_grad()
def annealed_langevin_loop(
    diffusion: GaussianDiffusion,
    score: Score,
    shape: Sequence[int],
    timesteps: Sequence[int] | None = None,
    n_steps_each: int = 5,
    step_scale: float = 0.1,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    keep: bool = False,
):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on the marginals q(x_t).

    For each index t in ``timesteps`` (largest first; default every step from T−1 down to 0), run
    ``n_steps_each`` Langevin steps with step size α_t = step_scale · (1 − ᾱ_t), proportional to the
    noise variance at that level as in Song & Ermon's α_i ∝ σ_i². Starts from N(0, I) (q(x_T) for
    the paper's schedule). Returns the final x; with ``keep=True`` also a tensor [K, *shape] of x after
    each level.
    """
    if n_steps_each < 1 or step_scale <= 0:
        raise ValueError(f"n_steps_each must be ≥ 1 and step_scale > 0, got {n_steps_each}, {step_scale}")
    T = diffusion.num_timesteps
    ts = list(range(T - 1, -1, -1)) if timesteps is None else sorted((int(i) for i in timesteps), reverse=True)
    if any(not 0 <= i < T for i in ts):
        raise ValueError(f"timesteps must lie in 0 … {T - 1}")
    if device is None:
        device = x_init.device if x_init is not None else torch.device("cpu")
    x = x_init.to(device) if x_init is not None else randn(shape, generator, device)
    one_minus_alpha_bar = 1.0 - diffusion.alpha_bar
    history = []
    for i in ts:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
        alpha = step_scale * float(one_minus_alpha_bar[i])
        for _ in range(n_steps_each):
            x = langevin_step(x, score(x, t), alpha, randn(shape, generator, device, x.dtype))
        if keep:
            history.append(x)
    return (x, torch.stack(history)) if keep else x


def sample_langevin(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], **kwargs):
    """``annealed_langevin_loop`` with the score of an ε-prediction model, on the model's device."""
    kwargs.setdefault("device", model_device(model))
    return annealed_langevin_loop(diffusion, score_from_eps_model(diffusion, model), shape, **kwargs)
