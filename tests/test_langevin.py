import math

import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.langevin import annealed_langevin_loop, langevin_step, sample_langevin, score_from_eps_model
from ddpm_lib.toy import LinearOptimalEps as OptimalEps


def test_score_from_optimal_eps_is_the_exact_gaussian_score():
    # For N(m, v) data q(x_t) = N(√ᾱ m, ᾱ v + 1 − ᾱ): its score is −(x − √ᾱ m) / (ᾱ v + 1 − ᾱ).
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    m, v = -0.3, 0.2
    model = OptimalEps(d, m, v)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 500, 999])
    a = d.alpha_bar[t].reshape(-1, 1, 1, 1)
    exact = -(x - a.sqrt() * m) / (a * v + 1 - a)
    assert torch.allclose(score_from_eps_model(d, model)(x, t), exact, rtol=1e-10)
    eps = model(x, t)
    assert torch.allclose(d.score_to_eps(d.eps_to_score(eps, t), t), eps, rtol=1e-12)


def test_ddpm_step_is_a_gradient_step_on_log_q():
    # §3.2: μ_θ = (x_t + β_t s_θ) / √α_t, so Algorithm 2 follows the learned score.
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    model = OptimalEps(d, 0.0, 0.5)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([5, 50, 900])
    mean = d.p_mean_variance(model, x, t, clip_denoised=False)["mean"]
    s = score_from_eps_model(d, model)(x, t)
    beta, alpha = d.betas[t].reshape(-1, 1, 1, 1), d.const("alphas")[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(mean, (x + beta * s) / alpha.sqrt(), rtol=1e-9)


def test_langevin_step_is_song_and_ermon_eq4():
    x, s, z = torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([0.5])
    assert torch.allclose(langevin_step(x, s, 0.04, z), torch.tensor([1.0 - 0.04 + 0.2 * 0.5]))


def test_langevin_at_one_level_reaches_the_marginal_q_xt():
    # Many steps at one noise level: x ← x + (α/2) s + √α z has, for the Gaussian marginal
    # N(μ, σ²), the stationary law N(μ, σ² / (1 − α / (4σ²))) (discretization bias included).
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    m, v, i, scale = 0.4, 0.05, 300, 0.5
    a = d.alpha_bar[i].item()
    mu, var = math.sqrt(a) * m, a * v + 1 - a
    step = scale * (1 - a)
    x = sample_langevin(d, OptimalEps(d, m, v), (20000, 1, 1, 1), timesteps=[i], n_steps_each=300,
                        step_scale=scale, generator=torch.Generator().manual_seed(0)).flatten()
    assert abs(x.mean().item() - mu) < 5 * math.sqrt(var / x.numel())
    assert x.var().item() == pytest.approx(var / (1 - step / (4 * var)), rel=5 * math.sqrt(2 / x.numel()))


def test_annealed_langevin_approximately_samples_gaussian_data():
    # Annealing down to the data: close, with the bias finite steps leave at low noise.
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    m, v = 0.4, 0.05
    x = sample_langevin(d, OptimalEps(d, m, v), (4000, 1, 1, 1), timesteps=range(0, 1000, 20),
                        n_steps_each=20, step_scale=0.5, generator=torch.Generator().manual_seed(0)).flatten()
    assert abs(x.mean().item() - m) < 0.02
    assert x.var().item() == pytest.approx(v, rel=0.3)


def test_annealed_langevin_keeps_history_and_checks_arguments():
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    score = lambda x, t: -x  # noqa: E731
    x, hist = annealed_langevin_loop(d, score, (2, 3), timesteps=[99, 50, 0], keep=True,
                                     generator=torch.Generator().manual_seed(0))
    assert hist.shape == (3, 2, 3) and torch.equal(hist[-1], x)
    with pytest.raises(ValueError, match="timesteps"):
        annealed_langevin_loop(d, score, (2, 3), timesteps=[100])



def test_score_of_an_x0_model_equals_the_score_of_the_matching_eps_model():
    # The same prediction expressed as x̂_0 or as ε̂ gives the same score (eq. 4 links them).
    d_eps = GaussianDiffusion(make_beta_schedule("linear", 1000))
    d_x0 = GaussianDiffusion(make_beta_schedule("linear", 1000), mean_type="x0")
    eps_model = OptimalEps(d_eps, 0.1, 0.2)
    x0_model = lambda x, t: d_eps.predict_x0_from_eps(x, t, eps_model(x, t))  # noqa: E731
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([3, 30, 300, 900])
    assert torch.allclose(score_from_eps_model(d_x0, x0_model)(x, t), score_from_eps_model(d_eps, eps_model)(x, t),
                          rtol=1e-8, atol=1e-10)
