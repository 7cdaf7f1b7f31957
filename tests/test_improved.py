"""Beyond the paper: learned-range variance and L_hybrid (Nichol & Dhariwal 2021), v-prediction
(Salimans & Ho 2022) and the cosine schedule in training, each checked like the core."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from fakes import paper_diffusion

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.configs import Config, DiffusionConfig, config_from_dict, config_to_dict, get_config
from ddpm_lib.diffusion import HYBRID_LAMBDA
from ddpm_lib.generation import generate
from ddpm_lib.losses import mean_flat
from ddpm_lib.toy import LinearOptimalEps, discretized_gaussian, entropy_bits
from ddpm_lib.train import build_training_state, train_step


def improved_tiny() -> Config:
    """The tiny config with every option at once: cosine β, v-prediction, learned-range Σ, L_hybrid."""
    cfg = get_config("tiny")
    return dataclasses.replace(
        cfg, name="tiny-improved", model=dataclasses.replace(cfg.model, out_channels=6),
        diffusion=DiffusionConfig(schedule="cosine", T=100, mean_type="v", var_type="learned_range",
                                  loss_type="hybrid"))


# ---------------------------------------------------------------- learned-range variance (eq. 15)


def test_learned_range_at_plus_and_minus_one_is_the_fixed_variances_exactly():
    """v = −1 is σ² = β̃_t and v = +1 is σ² = β_t at every index; at index 0 (t = 1) that is β_1, not the
    β̃_2 that fixed_large borrows there, so the decoder's variance is learnable (a range [β̃_2, β_1])."""
    d = paper_diffusion(var_type="learned_range", loss_type="vlb")
    large, small = paper_diffusion(var_type="fixed_large"), paper_diffusion(var_type="fixed_small")
    x = torch.randn(1000, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.arange(1000)
    for v, fixed in ((1.0, large), (-1.0, small)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        got = d.p_mean_variance(lambda x_t, t, out=out: out, x, t)["log_variance"]
        want = fixed.p_mean_variance(lambda x_t, t: torch.zeros_like(x_t), x, t)["log_variance"]
        if v == 1.0:
            assert torch.equal(got[1:], want[1:])
            assert torch.allclose(got[0], torch.log(d.betas[0]).expand_as(got[0]), rtol=1e-12)
            assert got[0].mean() > want[0].mean() + 0.5  # β_1 = 1e-4 against β̃_2 ≈ 5.5e-5
        else:
            assert torch.equal(got, want)


def test_learned_range_interpolates_log_variances():
    d = paper_diffusion(var_type="learned_range", loss_type="vlb")
    t = torch.tensor([0, 1, 10, 500, 999])
    v = torch.zeros(5, 1, 1, 1, dtype=torch.float64)  # frac = 1/2: the geometric mean of β_t and β̃_t
    log_var = d.learned_range_log_variance(v, t).flatten()
    expected = 0.5 * (torch.log(d.betas[t]) + d.const("log_beta_tilde")[t])  # log β̃ at index 0: β̃_2
    assert torch.allclose(log_var, expected, rtol=1e-12)


def test_learned_range_trains_the_decoder_variance():
    """At index 0 the hybrid loss's L_0 term reaches the variance channel (a zero-width range would not)."""
    d = paper_diffusion(var_type="learned_range", loss_type="hybrid")
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    v = torch.zeros_like(x0, requires_grad=True)
    net = lambda x_t, t: torch.cat([torch.zeros_like(x_t), v], dim=1)  # noqa: E731
    d.training_losses(net, x0, t=torch.zeros(4, dtype=torch.long), noise=torch.zeros_like(x0)).sum().backward()
    assert v.grad.abs().sum() > 0


# ---------------------------------------------------------------- v-prediction (Salimans & Ho 2022)


def test_v_parameterization_round_trips_x0_and_eps():
    d = paper_diffusion(mean_type="v")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, eps)
    v = d.predict_v(x0, t, eps)
    a = d.alpha_bar[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-12)
    assert torch.allclose(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-10)
    p = d.p_mean_variance(lambda x, t: v, x_t, t, clip_denoised=False)
    assert torch.allclose(p["pred_x0"], x0, atol=1e-10)
    assert torch.allclose(p["pred_eps"], (1 - a).sqrt() * x_t + a.sqrt() * v, atol=1e-8)
    assert torch.allclose(p["pred_eps"], eps, atol=1e-8)


def test_simple_loss_of_v_prediction_is_the_squared_error_on_v():
    d = paper_diffusion(mean_type="v")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1, torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 400, 999])
    exact = d.training_losses(lambda x, t: d.predict_v(x0, t, noise), x0, t, noise)
    assert torch.allclose(exact, torch.zeros(4), atol=1e-10)
    zero = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    assert torch.allclose(zero, mean_flat(d.predict_v(x0, t, noise) ** 2), atol=1e-6)
    eps_loss = paper_diffusion().training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    assert not torch.allclose(zero, eps_loss)  # the target is v, not ε


# ---------------------------------------------------------------- L_hybrid (Nichol & Dhariwal §3.1)


def test_hybrid_loss_is_simple_plus_lambda_T_vlb_with_a_stop_gradient_on_the_mean():
    T = 50
    betas = make_beta_schedule("linear", T)
    hybrid = GaussianDiffusion(betas, var_type="learned_range", loss_type="hybrid")
    vlb = GaussianDiffusion(betas, var_type="learned_range", loss_type="vlb")
    g = torch.Generator().manual_seed(3)
    x0 = (torch.rand(6, 1, 4, 4, generator=g) * 255).round() / 127.5 - 1
    noise = torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 5, 20, 40, 49])
    out = (torch.randn(6, 2, 4, 4, generator=g) * 0.3).requires_grad_()

    def model(x, t):
        return out

    loss_h = hybrid.training_losses(model, x0, t, noise)
    loss_s = mean_flat((noise - out[:, :1]) ** 2)
    loss_v = vlb.training_losses(model, x0, t, noise)
    assert HYBRID_LAMBDA == 0.001
    assert torch.allclose(loss_h, loss_s + 0.001 * T * loss_v, rtol=1e-6)

    (grad_h,) = torch.autograd.grad(loss_h.sum(), out)
    (grad_s,) = torch.autograd.grad(loss_s.sum(), out)
    (grad_v,) = torch.autograd.grad(loss_v.sum(), out)
    assert torch.equal(grad_h[:, :1], grad_s[:, :1])  # the mean learns from L_simple alone
    assert grad_v[:, :1].abs().sum() > 0  # (without the stop-gradient L_vlb would pull on it)
    assert torch.allclose(grad_h[:, 1:], 0.001 * T * grad_v[:, 1:], rtol=1e-5, atol=1e-9)
    assert grad_h[:, 1:].abs().sum() > 0  # the variance learns from λ L_vlb


def test_loss_and_variance_choices_that_cannot_train_are_refused():
    for var_type in ("learned", "learned_range"):  # L_simple gives a learned variance no gradient
        with pytest.raises(ValueError, match=f"var_type='{var_type}'.*'hybrid'"):
            paper_diffusion(var_type=var_type, loss_type="simple")
    for var_type in ("fixed_large", "fixed_small"):  # L_vlb's term would have nothing to train
        with pytest.raises(ValueError, match="loss_type='hybrid'.*fixed"):
            paper_diffusion(var_type=var_type, loss_type="hybrid")
    with pytest.raises(ValueError, match="out_channels=3 does not fit var_type='learned_range'"):
        Config("bad", diffusion=DiffusionConfig(var_type="learned_range", loss_type="hybrid"))


# ---------------------------------------------------------------- the bound stays a bound


@pytest.fixture(scope="module")
def gaussian_data():
    levels, probs = discretized_gaussian(0.1, 0.3)
    m = (levels * probs).sum().item()
    v = ((levels - m) ** 2 * probs).sum().item()
    g = torch.Generator().manual_seed(5)
    idx = torch.multinomial(probs, 600 * 16, replacement=True, generator=g)
    return levels[idx].reshape(600, 1, 4, 4), m, v, entropy_bits(probs)


class OptimalV:
    """The linear-MMSE predictor for Gaussian data written as v, with a constant learned-range channel."""

    def __init__(self, d: GaussianDiffusion, m: float, v: float, range_value: float):
        self.d, self.eps, self.range_value = d, LinearOptimalEps(d, m, v), range_value

    def __call__(self, x_t, t):
        eps = self.eps(x_t, t)
        v = self.d.predict_v(self.d.predict_x0_from_eps(x_t, t, eps), t, eps)
        return torch.cat([v, torch.full_like(v, self.range_value)], dim=1)


def test_bound_with_v_prediction_and_learned_range_is_a_valid_bound(gaussian_data):
    x0, m, v, entropy = gaussian_data
    fixed = paper_diffusion(var_type="fixed_large")
    d = paper_diffusion(mean_type="v", var_type="learned_range", loss_type="hybrid")
    ref = fixed.vlb_bpd(LinearOptimalEps(fixed, m, v), x0, clip_denoised=False,
                        generator=torch.Generator().manual_seed(6))
    same = d.vlb_bpd(OptimalV(d, m, v, 1.0), x0, clip_denoised=False, generator=torch.Generator().manual_seed(6))
    # v = 1 with the same predictor is the paper's fixed_large model: the same bound, term by term, but
    # for the decoder L_0 (index 0), whose variance is β_1 here and β̃_2 in fixed_large
    assert torch.allclose(same["terms"][:, 1:], ref["terms"][:, 1:], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(same["terms"][:, 0], ref["terms"][:, 0])
    assert same["total"].mean() < entropy + 0.5
    for range_value in (1.0, 0.0, -1.0):
        out = d.vlb_bpd(OptimalV(d, m, v, range_value), x0, clip_denoised=False,
                        generator=torch.Generator().manual_seed(7))
        total = out["total"]
        se = total.std() / math.sqrt(len(total))
        assert total.mean() + 4 * se >= entropy  # never (significantly) below the exact NLL, whatever the variance


# ---------------------------------------------------------------- in training, sampling and checkpoints


def test_cosine_schedule_reaches_training_through_the_config():
    cfg = improved_tiny()
    d = GaussianDiffusion.from_config(cfg.diffusion)
    assert torch.equal(d.betas, make_beta_schedule("cosine", 100))
    assert not torch.equal(d.betas, make_beta_schedule("linear", 100))


def test_improved_options_train_and_sample(tmp_path):
    cfg = improved_tiny()
    state = build_training_state(cfg, torch.device("cpu"))
    assert (state.diffusion.mean_type, state.diffusion.var_type, state.diffusion.loss_type) == (
        "v", "learned_range", "hybrid")
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = state.model.conv_out.weight.detach().clone()
    losses = [train_step(state, images, s)[0].item() for s in range(3)]
    assert all(math.isfinite(x) for x in losses)
    after = state.model.conv_out.weight.detach()
    assert (after[3:] - before[3:]).abs().sum() > 0  # the variance channels were trained
    for sampler, steps in (("ddpm", None), ("ddim", 5)):
        x = generate(state.ema, state.diffusion, 2, sampler=sampler, steps=steps, progress=False)
        assert x.shape == (2, 16, 16, 3) and x.dtype == torch.uint8
    ckpt_io.save_ema(tmp_path / "ema.safetensors", state.ema, 3, cfg)  # the options ride in the checkpoint
    _, stored, _ = ckpt_io.ema_state_dict(tmp_path / "ema.safetensors")
    assert stored == cfg and stored.diffusion.schedule == "cosine"


def test_configs_round_trip_the_new_fields_and_old_configs_load_with_defaults():
    for cfg in (improved_tiny(), get_config("cifar10_cond"), get_config("fashion_cond")):
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    # The paper's configs are written as before these fields existed, and such old configs load.
    old = config_to_dict(get_config("cifar10"))
    assert "num_classes" not in old["model"] and "label_drop" not in old["train"]
    loaded = config_from_dict(old)
    assert loaded == get_config("cifar10") and loaded.model.num_classes is None
    cond = config_to_dict(get_config("cifar10_cond"))  # a conditional config records both
    assert cond["model"]["num_classes"] == 10 and cond["train"]["label_drop"] == 0.1
