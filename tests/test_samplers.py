"""DDIM (Song, Meng & Ermon 2021) against DDPM's posterior and closed-form Gaussian answers; seeded generation."""

from __future__ import annotations

import math

import fakes
import pytest
import torch
from torch import nn

from ddpm_lib import GaussianDiffusion, UNet, make_beta_schedule
from ddpm_lib.data import to_uint8
from ddpm_lib.generation import generate
from ddpm_lib.rng import image_generators
from ddpm_lib.samplers import (
    ddim_sample_loop,
    ddim_step,
    ddim_timesteps,
    sample_loop,
)
from ddpm_lib.toy import LinearOptimalEps


def TinyNet(T: int, c_in: int = 3, c_out: int = 3) -> fakes.TinyNet:  # noqa: N802 - the shared net, squashed
    """A fixed, nonlinear-enough stand-in for ε_θ: ``fakes.TinyNet`` through tanh."""
    return fakes.TinyNet(T, c_in, c_out, squash=True)


def tiny_unet(seed: int = 0) -> UNet:
    """The ``tiny`` UNet with random weights; its output layer is zero-initialized, so perturb it."""
    torch.manual_seed(seed)
    net = UNet.from_config("tiny").eval()
    nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


# ---------------------------------------------------------------- timesteps


def test_ddim_timesteps_follow_the_papers_two_spacings():
    assert ddim_timesteps(1000, 10) == list(range(900, -1, -100))  # the DDIM code's range(0, T, T // S)
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert ddim_timesteps(1000, 30) == [i * 1000 // 30 for i in range(30)][::-1]  # exactly S steps
    quad = ddim_timesteps(1000, 10, "quadratic")
    assert quad == [math.floor((i * math.sqrt(800) / 9) ** 2 + 1e-9) for i in range(10)][::-1]
    assert quad[0] == 800  # τ_S = 0.8 T, as in the DDIM code
    many = ddim_timesteps(1000, 50, "quadratic")  # repeats near 0 are dropped
    assert len(many) == 49 and many[-1] == 0 and all(a > b for a, b in zip(many, many[1:], strict=False))


# ---------------------------------------------------------------- one DDIM step


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_with_eta_1_is_the_ddpm_posterior(mean_type, clip):
    # DDIM §4.1: with η = 1 and s = t − 1, eq. 12 is q(x_{t−1} | x_t, x̂_0) (DDPM eqs. 6–7): mean μ̃_t, variance β̃_t.
    T = 1000
    d = GaussianDiffusion(make_beta_schedule("linear", T), mean_type=mean_type, var_type="fixed_small")
    net = TinyNet(T).double()
    x = 1.5 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in [999, 600, 100, 10, 1, 0]:
        tb = torch.full((4,), t, dtype=torch.long)
        step = ddim_step(d, net, x, t, t - 1, eta=1.0, clip_denoised=clip)
        ddpm = d.p_mean_variance(net, x, tb, clip_denoised=clip)
        assert torch.equal(step["pred_x0"], ddpm["pred_x0"])
        post_mean, post_var, _ = d.q_posterior(ddpm["pred_x0"], x, tb)
        torch.testing.assert_close(step["mean"], post_mean, rtol=0, atol=1e-10)
        assert step["variance"] == pytest.approx(post_var[0, 0, 0, 0].item(), rel=1e-12, abs=1e-300)
        if t > 0:  # Algorithm 2 with σ_t² = β̃_t (index 0 adds no noise, and β̃_1 = 0 anyway)
            assert step["variance"] == pytest.approx(d.const("beta_tilde")[t].item(), rel=1e-12)
        if mean_type != "mu" or not clip:  # a predicted μ̃ is used unclipped by DDPM
            torch.testing.assert_close(step["mean"], ddpm["mean"], rtol=0, atol=1e-10)


def test_ddim_with_eta_1_on_every_step_reproduces_algorithm_2():
    # Same noise, same path: DDIM(η = 1, all T steps) is Algorithm 2 with σ_t² = β̃_t, sample for sample.
    d = GaussianDiffusion(make_beta_schedule("linear", 50), var_type="fixed_small")
    net = TinyNet(50).double()
    x_T = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample_loop(d, net, x_T.shape, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(5))
    ddpm = sample_loop(d, net, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-9)


def test_ddim_uses_the_mean_part_of_a_learned_variance_output():
    T = 100
    learned = GaussianDiffusion(make_beta_schedule("linear", T), var_type="learned", loss_type="vlb")
    fixed = GaussianDiffusion(make_beta_schedule("linear", T))
    net = TinyNet(T, c_out=6)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_step(learned, net, x, 50, 40, eta=0.3)
    b = ddim_step(fixed, lambda x, t: net(x, t)[:, :3], x, 50, 40, eta=0.3)
    assert torch.equal(a["mean"], b["mean"]) and a["variance"] == b["variance"]


# ---------------------------------------------------------------- sampling loops


def test_ddim_with_eta_0_is_deterministic():
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    net = TinyNet(100)
    x_T = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = ddim_sample_loop(d, net, x_T.shape, 10, x_T=x_T)
    b = ddim_sample_loop(d, net, x_T.shape, 10, x_T=x_T, generator=g)
    assert torch.equal(a, b) and torch.equal(g.get_state(), state)  # η = 0 draws no noise at all
    c = ddim_sample_loop(d, net, x_T.shape, 10, x_T=x_T, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def gaussian_ddim_closed_form(alpha_bar: list[float], tau: list[int], m: float, v: float, eta: float):
    """Exact mean and variance of DDIM's output for N(m, v) data and the optimal linear ε̂, from x_T ~ N(0, 1).

    With ε̂ = √(1−ᾱ_t) u_t / v_t (u_t = x_t − √ᾱ_t m, v_t = ᾱ_t v + 1 − ᾱ_t), x̂_0 = m + √ᾱ_t v u_t / v_t and
    eq. 12 gives u_s = c u_t + σ z with c = (√(ᾱ_s ᾱ_t) v + √((1−ᾱ_s−σ²)(1−ᾱ_t))) / v_t. By Cauchy–Schwarz
    c ≤ √(v_s / v_t): each deterministic step loses a little variance, less the finer the steps.
    """
    mean, var = -math.sqrt(alpha_bar[tau[0]]) * m, 1.0  # of u_T
    for k, t in enumerate(tau):
        a_t, a_s = alpha_bar[t], alpha_bar[tau[k + 1]] if k + 1 < len(tau) else 1.0
        s2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        v_t = a_t * v + 1 - a_t
        c = (math.sqrt(a_s * a_t) * v + math.sqrt((1 - a_s - s2) * (1 - a_t))) / v_t
        mean, var = c * mean, c * c * var + s2
    return m + mean, var


def test_ddim_on_gaussian_data_gives_its_mean_and_variance():
    # N(m, v) data with its optimal ε-predictor (toy.LinearOptimalEps), DDIM with 50 steps and η = 0.
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    m, v = 0.2, 0.09
    model = LinearOptimalEps(d, m, v)
    x = ddim_sample_loop(d, model, (4000, 1, 2, 2), 50, clip_denoised=False,
                         generator=torch.Generator().manual_seed(0)).double().flatten()
    n = x.numel()
    tau, alpha_bar = ddim_timesteps(1000, 50), d.alpha_bar.tolist()
    exact_mean, exact_var = gaussian_ddim_closed_form(alpha_bar, tau, m, v, eta=0.0)
    # The samples are an affine map of x_T ~ N(0, 1): their mean and variance within sampling error
    # (standard errors √(var/n) = 0.002 and var·√(2/n) = 1.1%) of the exact values …
    assert abs(x.mean().item() - exact_mean) < 5 * math.sqrt(exact_var / n)
    assert x.var().item() == pytest.approx(exact_var, rel=5 * math.sqrt(2 / n))
    # … which are m and v up to DDIM's discretization: the mean to 0.3%, the variance 16% low with 50
    # uniform steps (7% with the quadratic spacing), 1% low with all 1000.
    assert exact_mean == pytest.approx(m, rel=3e-3)
    assert exact_var == pytest.approx(0.84 * v, rel=0.01)
    quad_var = gaussian_ddim_closed_form(alpha_bar, ddim_timesteps(1000, 50, "quadratic"), m, v, 0.0)[1]
    assert quad_var == pytest.approx(0.93 * v, rel=0.01)
    assert gaussian_ddim_closed_form(alpha_bar, ddim_timesteps(1000, 1000), m, v, 0.0)[1] == pytest.approx(v, rel=0.015)
    # With η > 0 the noise is part of it: sampled variance matches the closed form too.
    y = ddim_sample_loop(d, model, (4000, 1, 2, 2), 20, eta=0.7, clip_denoised=False,
                         generator=torch.Generator().manual_seed(1)).double().flatten()
    mean_07, var_07 = gaussian_ddim_closed_form(alpha_bar, ddim_timesteps(1000, 20), m, v, eta=0.7)
    assert abs(y.mean().item() - mean_07) < 5 * math.sqrt(var_07 / n)
    assert y.var().item() == pytest.approx(var_07, rel=5 * math.sqrt(2 / n))


def test_ddpm_sampler_is_exactly_algorithm_2_step_by_step():
    # The loop with sampler="ddpm" is x_T from the generator, then p_sample (Algorithm 2, line 4) for t = T … 1.
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = TinyNet(30)
    x, traj = sample_loop(d, net, (2, 3, 6, 6), sampler="ddpm", generator=torch.Generator().manual_seed(4),
                          keep_steps=[29, 3])
    g = torch.Generator().manual_seed(4)
    y, ref = torch.randn((2, 3, 6, 6), generator=g), {"t": [], "x_t": [], "pred_x0": []}
    for i in range(29, -1, -1):
        out = d.p_sample(net, y, torch.full((2,), i), generator=g)
        if i in (29, 3):
            ref["t"].append(i), ref["x_t"].append(y), ref["pred_x0"].append(out["pred_x0"])
        y = out["sample"]
    ref = {"t": torch.tensor(ref["t"]), "x_t": torch.stack(ref["x_t"]), "pred_x0": torch.stack(ref["pred_x0"])}
    assert torch.equal(x, y) and all(torch.equal(traj[k], ref[k]) for k in ref)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(steps=101), "steps"),
    (dict(steps=0), "steps"),
    (dict(eta=-0.1), "eta"),
    (dict(eta=1.5), "eta"),
    (dict(timesteps=[50, 50, 0]), "timesteps"),
    (dict(timesteps=[10, 20]), "timesteps"),
    (dict(timesteps=[100, 0]), "timesteps"),
    (dict(steps=5, timesteps=[5, 0]), "timesteps"),
    (dict(spacing="cubic"), "spacing"),
    (dict(keep_steps=[7], steps=10), "keep_steps"),
])
def test_bad_ddim_arguments_raise_naming_them(kwargs, arg):
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    with pytest.raises(ValueError, match=arg):
        ddim_sample_loop(d, TinyNet(100), (1, 3, 4, 4), **kwargs)


def test_ddpm_sampler_refuses_ddim_arguments():
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    for kwargs in (dict(steps=10), dict(eta=1.0)):
        with pytest.raises(ValueError, match="sampler='ddpm' runs all T=100 steps"):
            sample_loop(d, TinyNet(100), (1, 3, 4, 4), sampler="ddpm", **kwargs)


# ---------------------------------------------------------------- many images from one seed


@pytest.mark.parametrize("sampler, kw", [("ddpm", {}), ("ddim", dict(steps=4, eta=0.5))])
def test_generate_is_the_same_for_any_batch_size(sampler, kw):
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net, shape = TinyNet(30), (3, 8, 8)
    a = generate(net, d, 5, sampler=sampler, seed=0, batch_size=2, image_shape=shape, progress=False, **kw)
    b = generate(net, d, 5, sampler=sampler, seed=0, batch_size=3, image_shape=shape, progress=False, **kw)
    c = generate(net, d, 5, sampler=sampler, seed=1, batch_size=3, image_shape=shape, progress=False, **kw)
    assert a.dtype == torch.uint8 and a.shape == (5, 8, 8, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({img.numpy().tobytes() for img in a}) == 5  # every image its own noise
    # image 2 on its own: the loop with that image's generator alone
    x = sample_loop(d, net, (1, *shape), sampler=sampler, generator=image_generators(0, [2]), **kw)
    assert torch.equal(a[2:3], to_uint8(x).permute(0, 2, 3, 1))


def test_generate_takes_the_image_shape_from_the_unet():
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    images = generate(tiny_unet(), d, 3, sampler="ddim", steps=3, batch_size=2, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 16, 16, 3)
    assert images.float().std() > 10  # the perturbed output layer makes real (not blank) images


def test_generate_in_bf16_is_close_to_fp32():
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = tiny_unet()
    a = generate(net, d, 2, sampler="ddim", steps=3, progress=False)
    b = generate(net, d, 2, sampler="ddim", steps=3, precision="bf16", progress=False)
    assert b.dtype == torch.uint8 and b.shape == a.shape
    assert (a.int() - b.int()).abs().float().mean() < 4  # 256 levels; bf16 keeps ~3 significant digits


def test_generate_with_compile_matches_eager_and_records_it(tmp_path, monkeypatch):
    """``compile=True`` runs torch.compile'd kernels (here on the CPU): the same images up to rounding,
    and the job of a file says so, so a rerun without it does not mix the two."""
    import json

    import numpy as np

    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net, shape = TinyNet(30), (3, 8, 8)
    eager = generate(net, d, 3, sampler="ddim", steps=3, image_shape=shape, progress=False)
    compiled_what, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_what.append(m) or real_compile(m, **kw))
    out = tmp_path / "s.npz"
    compiled = generate(net, d, 3, sampler="ddim", steps=3, image_shape=shape, progress=False, compile=True,
                        out_path=out)
    assert compiled_what == [net]  # the network itself went through torch.compile, once
    assert (eager.int() - compiled.int()).abs().max() <= 1
    job = json.loads(str(np.load(out)["job"]))
    assert job["compile"] is True
    # an unfinished compiled job, continued without compile: refused, naming the difference
    partial = tmp_path / "t.npz.partial"
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps(job))
    with pytest.raises(ValueError, match="compile"):
        generate(net, d, 3, sampler="ddim", steps=3, image_shape=shape, progress=False, out_path=tmp_path / "t.npz")


def test_generate_leaves_the_callers_model_as_it_was():
    """Sampling runs in eval mode (dropout off) but hands the model back in the modes it came in, with
    its weights where they were."""
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    net = tiny_unet().train()
    net.down[0].eval()  # a mix of modes, restored module by module
    modes = [m.training for m in net.modules()]
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    generate(net, d, 2, sampler="ddim", steps=2, progress=False)
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(weights[k], v) and v.device.type == "cpu" for k, v in net.state_dict().items())
    dropout = UNet.from_config("tiny")  # tiny has no dropout: give it some, which eval mode must switch off
    for m in dropout.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    dropout.train()
    a = generate(dropout, d, 1, sampler="ddim", steps=2, progress=False)
    assert torch.equal(a, generate(dropout, d, 1, sampler="ddim", steps=2, progress=False)) and dropout.training
