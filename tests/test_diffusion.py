"""The core math of ddpm_lib checked against independent derivations (paper §2–3)."""

import itertools
import math

import pytest
import torch
from fakes import TinyNet, paper_diffusion

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from ddpm_lib.samplers import sample_loop
from ddpm_lib.toy import LinearOptimalEps as OptimalEps
from ddpm_lib.toy import discretized_gaussian, entropy_bits

# ---------------------------------------------------------------- forward process


def test_closed_form_moments_equal_the_iterated_chain_exactly():
    # Iterate the moments of eq. 2 (m ← √(1−β) m, v ← (1−β) v + β) and compare with eq. 4.
    d = paper_diffusion()
    m, v = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for i, beta in enumerate(d.betas):
        m, v = (1 - beta).sqrt() * m, (1 - beta) * v + beta
        mean, var, _ = d.q_mean_variance(torch.full((1, 1), 0.7, dtype=torch.float64), torch.tensor([i]))
        assert torch.allclose(mean, m, rtol=1e-12) and torch.allclose(var, v, rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 10, 200, 1000])
def test_closed_form_agrees_with_sampling_the_chain(steps):
    d = paper_diffusion()
    g = torch.Generator().manual_seed(steps)
    N = 20_000
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64).repeat(N, 1)  # [N, 4]
    x = x0.clone()
    for i in range(steps):
        x = d.q_step(x, torch.full((N,), i), generator=g)
    x_direct = d.q_sample(x0, torch.full((N,), steps - 1), generator=g)
    mean, var, _ = d.q_mean_variance(x0[:1], torch.tensor([steps - 1]))
    for sample in (x, x_direct):
        # 5 standard errors: of the mean √(v/N), of the variance v √(2/(N−1)).
        assert ((sample.mean(0) - mean[0]).abs() < 5 * (var[0] / N).sqrt()).all()
        assert ((sample.var(0) - var[0]).abs() < 5 * var[0] * math.sqrt(2 / (N - 1))).all()


# ---------------------------------------------------------------- posterior


def test_posterior_matches_bayes_rule():
    # q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0): multiply the two Gaussians in x_{t−1}.
    d = paper_diffusion()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 5, 100, 500, 999])
    x0 = torch.rand(5, 3, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    a_prev = d.const("alpha_bar_prev")[t][:, None]
    alpha, beta = d.const("alphas")[t][:, None], d.betas[t][:, None]
    # prior on x_{t−1}: N(√ᾱ_{t−1} x0, 1 − ᾱ_{t−1}); likelihood of x_t: N(√α_t x_{t−1}, β_t).
    precision = 1 / (1 - a_prev) + alpha / beta
    mean = (a_prev.sqrt() * x0 / (1 - a_prev) + alpha.sqrt() * x_t / beta) / precision
    got_mean, got_var, got_logvar = d.q_posterior(x0, x_t, t)
    assert torch.allclose(got_mean, mean, rtol=1e-10)
    assert torch.allclose(got_var, (1 / precision).expand_as(got_var), rtol=1e-10)
    assert torch.allclose(got_logvar, got_var.log(), rtol=1e-10)


def test_posterior_at_first_step_returns_x0():
    # At the paper's t = 1 (index 0) x_{t−1} is x_0 itself: coefficient 1 on x_0, 0 on x_t.
    d = paper_diffusion()
    x0, x_t = torch.rand(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mean, var, logvar = d.q_posterior(x0, x_t, torch.tensor([0, 0]))
    assert torch.allclose(mean, x0) and torch.all(var == 0) and torch.isfinite(logvar).all()


# ---------------------------------------------------------------- parameterizations


def test_eps_mean_without_clipping_is_eq11():
    d = paper_diffusion()
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 300, 800, 999])
    p = d.p_mean_variance(lambda x, t: eps, x_t, t, clip_denoised=False)
    assert torch.allclose(p["mean"], d.mean_from_eps(x_t, t, eps), rtol=1e-9, atol=1e-12)
    assert torch.allclose(p["pred_eps"], eps)


def test_every_parameterization_agrees_on_the_same_prediction():
    # The same x̂_0 expressed as ε, x_0, μ̃ (§3.2) or v (Salimans & Ho 2022) gives the same p_θ mean.
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    x0_hat = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 50, 500, 999])
    assert MEAN_TYPES == ("eps", "x0", "mu", "v")
    d_eps, d_x0, d_mu, d_v = (paper_diffusion(mean_type=m) for m in MEAN_TYPES)
    eps = d_eps.predict_eps_from_x0(x_t, t, x0_hat)
    mu = d_x0.q_posterior(x0_hat, x_t, t)[0]
    v = d_v.predict_v(x0_hat, t, eps)
    means = [d.p_mean_variance(lambda x, t, o=o: o, x_t, t, clip_denoised=False)
             for d, o in ((d_eps, eps), (d_x0, x0_hat), (d_mu, mu), (d_v, v))]
    for p in means[1:]:
        assert torch.allclose(p["mean"], means[0]["mean"], rtol=1e-8, atol=1e-10)
        assert torch.allclose(p["pred_x0"], x0_hat, rtol=1e-6, atol=1e-8)


def test_fixed_variances_are_beta_and_beta_tilde():
    d_large, d_small = paper_diffusion(var_type="fixed_large"), paper_diffusion(var_type="fixed_small")
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    v_large = d_large.p_mean_variance(lambda x, t: x, x, t)["variance"][:, 0, 0, 0]
    v_small = d_small.p_mean_variance(lambda x, t: x, x, t)["variance"][:, 0, 0, 0]
    bt = d_large.const("beta_tilde")
    # index 0 (t = 1): both use β̃_2, the official code's choice (β̃_1 = 0); elsewhere β_t and β̃_t.
    assert torch.allclose(v_large, torch.stack([bt[1], d_large.betas[1], d_large.betas[999]]))
    assert torch.allclose(v_small, torch.stack([bt[1], bt[1], bt[999]]))


def test_clipping_keeps_predicted_x0_in_range():
    d = paper_diffusion()
    x_t = torch.full((1, 1, 2, 2), 5.0)
    p = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x_t, torch.tensor([10]))
    assert p["pred_x0"].max() <= 1.0
    p = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x_t, torch.tensor([10]), clip_denoised=False)
    assert p["pred_x0"].max() > 1.0


# ---------------------------------------------------------------- the bound on Gaussian data


@pytest.fixture(scope="module")
def gaussian_bound():
    """vlb_bpd of the optimal ε-predictor on discretized Gaussian data, with its analytic expectation."""
    d = paper_diffusion(var_type="fixed_large")
    levels, probs = discretized_gaussian(0.1, 0.3)
    m = (levels * probs).sum().item()
    v = ((levels - m) ** 2 * probs).sum().item()
    g = torch.Generator().manual_seed(5)
    B = 2000
    idx = torch.multinomial(probs, B * 16, replacement=True, generator=g)
    x0 = levels[idx].reshape(B, 1, 4, 4)
    out = d.vlb_bpd(OptimalEps(d, m, v), x0, clip_denoised=False, generator=g)
    return d, m, v, out, entropy_bits(probs)


def test_bound_terms_match_their_analytic_expectation(gaussian_bound):
    d, m, v, out, _ = gaussian_bound
    mse_x0 = OptimalEps(d, m, v).x0_mse()  # E[(x_0 − x̂_0)²] of the linear-MMSE predictor
    beta, bt, c = d.betas, d.const("beta_tilde"), d.const("coef_x0")
    # E[L_{t−1}] = ½ (log σ²/β̃ + β̃/σ² − 1 + coef² E[(x0 − x̂0)²] / σ²) nats per dim, σ² = β_t.
    expected = 0.5 * (torch.log(beta / bt) + bt / beta - 1 + c**2 * mse_x0 / beta) / math.log(2)
    terms = out["terms"][:, 1:]
    se = terms.std(0) / math.sqrt(terms.shape[0])
    assert ((terms.mean(0) - expected[1:]).abs() <= 5 * se + 1e-9).all()
    assert terms.sum(1).mean().item() == pytest.approx(expected[1:].sum().item(), rel=1e-2)
    assert torch.allclose(out["total"], out["prior"] + out["terms"].sum(1))


def test_bound_is_no_lower_than_the_exact_nll(gaussian_bound):
    d, m, v, out, entropy = gaussian_bound
    total = out["total"]
    se = total.std() / math.sqrt(len(total))
    # The data's exact NLL is its entropy (in bits per dimension): the bound must not go below it,
    # and with the optimal predictor it should not be far above.
    assert total.mean() - 4 * se >= entropy
    assert total.mean() < entropy + 0.5


def test_prior_term_is_about_1e_5_bits_per_dim():
    d = paper_diffusion()
    x0 = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    prior = d.prior_bpd(x0).item()
    assert 1e-6 < prior < 3e-5


def test_a_worse_predictor_gives_a_larger_bound(gaussian_bound):
    d, m, v, out, _ = gaussian_bound
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(200, 1, 4, 4, generator=g) * 255).round() / 127.5 - 1
    worse = d.vlb_bpd(lambda x, t: torch.zeros_like(x), x0.double(), clip_denoised=False, generator=g)
    assert worse["total"].mean() > out["total"].mean() + 0.5


# ---------------------------------------------------------------- training and sampling


COMBOS = list(itertools.product(MEAN_TYPES, VAR_TYPES, LOSS_TYPES))


@pytest.mark.parametrize("mean_type,var_type,loss_type", COMBOS)
def test_every_table2_combination_trains_and_samples(mean_type, var_type, loss_type):
    betas = make_beta_schedule("linear", 40)
    learned = var_type in ("learned", "learned_range")
    if learned and loss_type == "simple":
        with pytest.raises(ValueError, match="learned"):
            GaussianDiffusion(betas, mean_type, var_type, loss_type)
        return
    if not learned and loss_type == "hybrid":
        with pytest.raises(ValueError, match="hybrid"):
            GaussianDiffusion(betas, mean_type, var_type, loss_type)
        return
    d = GaussianDiffusion(betas, mean_type, var_type, loss_type)
    torch.manual_seed(0)
    net = TinyNet(40, c_out=6 if learned else 3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    loss = d.training_losses(net, x0, generator=g)
    assert loss.shape == (8,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    if learned:  # the variance channels receive gradient from the bound
        assert net.conv.weight.grad[3:].abs().sum() > 0
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.step()
    x = d.p_sample(net, torch.randn(4, 3, 8, 8, generator=g), torch.tensor([39, 10, 1, 0]), generator=g)
    assert x["sample"].shape == (4, 3, 8, 8) and torch.isfinite(x["sample"]).all()
    with torch.no_grad():  # an untrained learned log-variance can blow up over a whole chain
        net.conv.weight.mul_(0.1)
    samples = sample_loop(d, net, (2, 3, 8, 8), generator=g)
    assert torch.isfinite(samples).all()


def test_simple_loss_is_eq14():
    d = paper_diffusion()
    net = TinyNet(1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 5, 500, 999])
    x_t = d.alpha_bar[t].sqrt().float()[:, None, None, None] * x0 + (
        1 - d.alpha_bar[t]).sqrt().float()[:, None, None, None] * noise
    expected = ((noise - net(x_t, t)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(d.training_losses(net, x0, t, noise), expected, atol=1e-6)


def test_vlb_training_loss_times_T_plus_prior_is_the_bound():
    # E_t[T · loss_vlb(t)] + L_T = the bound of eq. 5: check it with every t drawn once, same noise.
    T = 40
    d = GaussianDiffusion(make_beta_schedule("linear", T), loss_type="vlb")
    net = TinyNet(T)
    x0 = ((torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).round() / 127.5 - 1)
    torch.manual_seed(0)
    bound = d.vlb_bpd(net, x0, clip_denoised=False, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    per_t = torch.zeros(T, dtype=torch.float64)
    for i in range(T - 1, -1, -1):  # the same noise order as vlb_bpd
        per_t[i] = d.training_losses(net, x0, torch.tensor([i]), generator=g).double().item()
    assert torch.allclose(per_t, bound["terms"][0], atol=1e-5)


def test_sampling_is_reproducible_from_a_generator():
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = TinyNet(30)
    a = sample_loop(d, net, (2, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    b = sample_loop(d, net, (2, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    c = sample_loop(d, net, (2, 3, 8, 8), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_keeps_intermediate_steps():
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = TinyNet(30)
    g = torch.Generator().manual_seed(0)
    x, traj = sample_loop(d, net, (2, 3, 8, 8), generator=g, keep_steps=[29, 15, 0])
    assert traj["t"].tolist() == [29, 15, 0]
    assert traj["x_t"].shape == traj["pred_x0"].shape == (3, 2, 3, 8, 8)
    again = sample_loop(d, net, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="keep_steps"):
        sample_loop(d, net, (2, 3, 8, 8), keep_steps=[30])


def test_ancestral_sampling_recovers_gaussian_data():
    # Algorithm 2 with the optimal ε-predictor for N(m, v) data must produce N(m, v) samples.
    d = paper_diffusion(var_type="fixed_small")
    m, v = 0.2, 0.09
    x = sample_loop(d, OptimalEps(d, m, v), (4000, 1, 2, 2), clip_denoised=False,
                        generator=torch.Generator().manual_seed(0)).flatten()
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / n)
    assert x.var().item() == pytest.approx(v, rel=0.05)


# ---------------------------------------------------------------- argument checking


@pytest.mark.parametrize("arg,value", [("mean_type", "score"), ("var_type", "big"), ("loss_type", "l1")])
def test_unknown_names_raise_and_list_the_valid_values(arg, value):
    with pytest.raises(ValueError, match=arg) as err:
        paper_diffusion(**{arg: value})
    valid = {"mean_type": MEAN_TYPES, "var_type": VAR_TYPES, "loss_type": LOSS_TYPES}[arg]
    assert all(v in str(err.value) for v in valid)


def test_bad_betas_and_shapes_raise():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    d = paper_diffusion()
    with pytest.raises(ValueError, match="t must be"):
        d.q_sample(torch.zeros(2, 3), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="model output"):
        d.p_mean_variance(lambda x, t: x[:, :1], torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0-based indices in 0 … 999"):
        d.q_sample(torch.zeros(2, 3), torch.tensor([1, 1000]))  # the paper's t = 1000 is index 999
    with pytest.raises(ValueError, match="0-based"):
        d.q_sample(torch.zeros(2, 3), torch.tensor([-1, 5]))
    with pytest.raises(ValueError, match="x_T has shape"):
        sample_loop(d, lambda x, t: x, (2, 3), x_T=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), torch.zeros(2, 4))


def test_sampling_can_start_from_an_intermediate_step():
    # Starting at index i from the x_t that the full chain reached there gives the full chain's result.
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = TinyNet(30)
    x, traj = sample_loop(d, net, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0), keep_steps=[12])
    g = torch.Generator().manual_seed(0)
    torch.randn((2, 3, 8, 8), generator=g)  # x_T
    for _ in range(29, 12, -1):  # the noise of steps 29 … 13
        torch.randn((2, 3, 8, 8), generator=g)
    tail = sample_loop(d, net, (2, 3, 8, 8), generator=g, x_T=traj["x_t"][0], t_start=12)
    assert torch.equal(tail, x)
    with pytest.raises(ValueError, match="t_start"):
        sample_loop(d, net, (2, 3, 8, 8), t_start=30)
