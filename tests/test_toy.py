import math

import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.toy import GaussianMixture2D, MLPDenoiser


def test_mixture_score_matches_autograd_of_the_log_density():
    mix = GaussianMixture2D.ring(k=5, radius=0.6, std=0.1)
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    for a in (0.999, 0.5, 0.01):
        v = a * mix.std**2 + 1 - a
        d2 = ((x[:, None, :] - math.sqrt(a) * mix.means[None]) ** 2).sum(-1)
        logq = torch.logsumexp(mix.weights.log() - d2 / (2 * v), dim=1) - math.log(2 * math.pi * v)
        (grad,) = torch.autograd.grad(logq.sum(), x)
        assert torch.allclose(mix.score(x.detach(), torch.tensor(a, dtype=torch.float64)), grad, rtol=1e-10, atol=1e-12)


def test_optimal_eps_minimizes_l_simple():
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    mix = GaussianMixture2D.ring()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(20000, g)
    t = torch.full((20000,), 300)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    best = d.training_losses(mix.optimal_eps(d), x0, t, noise).mean()
    for scale in (0.9, 1.1):  # scaling the optimal predictor only makes the loss worse
        worse = d.training_losses(lambda x, t, s=scale: s * mix.optimal_eps(d)(x, t), x0, t, noise).mean()
        assert worse > best


def test_mlp_denoiser_maps_points_and_timesteps_to_points():
    net = MLPDenoiser()
    assert net(torch.zeros(4, 2), torch.tensor([0, 1, 2, 999])).shape == (4, 2)


def test_a_mixture_needs_2_d_means():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture2D(torch.zeros(3), 0.1)
