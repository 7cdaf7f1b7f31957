import math

import pytest
import torch

from ddpm_lib.losses import discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(400_000, generator=g, dtype=torch.float64)
    logp = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))  # noqa: E731
    mc = (logp(x, m1, lv1) - logp(x, m2, lv2)).mean().item()
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    exact = normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item()
    assert mc == pytest.approx(exact, abs=5e-3)


def test_normal_kl_with_equal_variances_is_mean_matching_eq8():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    logvar = torch.full((100,), math.log(0.3))
    assert torch.allclose(normal_kl(m1, logvar, m2, logvar), (m1 - m2) ** 2 / (2 * 0.3), atol=1e-6)
    assert torch.all(normal_kl(m1, logvar, m1, logvar).abs() < 1e-7)


def test_decoder_probabilities_over_256_bins_sum_to_one():
    g = torch.Generator().manual_seed(2)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None].expand(256, 50)
    means = (torch.rand(50, generator=g, dtype=torch.float64) * 2.4 - 1.2).expand(256, 50)
    log_scales = (torch.rand(50, generator=g, dtype=torch.float64) * 6 - 7).expand(256, 50)
    p = discretized_gaussian_log_likelihood(levels, means, log_scales).exp()
    assert torch.allclose(p.sum(0), torch.ones(50, dtype=torch.float64), atol=1e-10)
    p32 = discretized_gaussian_log_likelihood(levels.float(), means.float(), log_scales.float()).exp()
    assert torch.allclose(p32.sum(0), torch.ones(50), atol=1e-4)


def test_decoder_edge_bins_are_open_ended():
    # A Gaussian far beyond +1 puts (almost) all its mass in the top bin.
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    means = torch.tensor([3.0, -3.0], dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, means, torch.full((2,), math.log(0.1), dtype=torch.float64))
    assert torch.all(lp > -1e-12)


def test_decoder_matches_bin_integral_in_the_interior():
    x = torch.tensor([0.2 - 2 / 255 * 3], dtype=torch.float64)
    mean, std = torch.tensor([0.1], dtype=torch.float64), 0.05
    expected = torch.special.ndtr((x + 1 / 255 - mean) / std) - torch.special.ndtr((x - 1 / 255 - mean) / std)
    lp = discretized_gaussian_log_likelihood(x, mean, torch.tensor([math.log(std)], dtype=torch.float64))
    assert torch.allclose(lp, expected.log(), rtol=1e-12)


def test_decoder_is_finite_far_in_the_tails():
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, torch.tensor([0.9, -0.9], dtype=torch.float64),
                                             torch.full((2,), math.log(1e-3), dtype=torch.float64))
    assert torch.isfinite(lp).all() and (lp < -1e4).all()


def test_decoder_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        discretized_gaussian_log_likelihood(torch.zeros(3), torch.zeros(4), torch.zeros(3))


def _exact_log_bin(x: float, mean: float, std: float) -> float:
    """log P(bin of x) under N(mean, std²), in 60-digit arithmetic (the reference for eq. 13)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    sign = -1 if x > mean else 1  # integrate on the tail side (mpmath's tiny numbers keep their digits there)
    z = lambda v: sign * (mpmath.mpf(v) - mean) / std  # noqa: E731
    a = z(x - 1 / 255) if x > -0.999 else (mpmath.inf if sign < 0 else -mpmath.inf)
    b = z(x + 1 / 255) if x < 0.999 else (-mpmath.inf if sign < 0 else mpmath.inf)
    return float(mpmath.log(abs(mpmath.ncdf(b) - mpmath.ncdf(a))))


@pytest.mark.parametrize("std", [0.0074, 0.02, 0.5])
def test_decoder_is_the_exact_bin_probability_far_into_the_tails(std):
    # The decoder's σ at t = 1 is about one bin (0.0074): bins 1 to 200 σ from the mean, on both sides.
    mean = 0.05
    offsets = [0.0, 0.5, 1, 3, 6, 8, 12, 20, 40, 80, 120, 200]
    xs = sorted({round((mean + s * z * std) * 127.5) / 127.5 for z in offsets for s in (1, -1)})
    xs = [x for x in xs if -1 <= x <= 1] + [-1.0, 1.0]
    x = torch.tensor(xs, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
    ref = torch.tensor([_exact_log_bin(v, mean, std) for v in xs], dtype=torch.float64)
    torch.testing.assert_close(lp, ref, rtol=1e-9, atol=1e-9)  # exact to float64, even at −20,000 nats
    if std < 0.01:
        assert ref.min() < -5000  # the test reaches deep into the tails


def test_decoder_gradients_are_finite_everywhere():
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for std in (1e-4, 0.0074, 1.0, 30.0):
        means = torch.full_like(x, 0.3).requires_grad_()
        log_scales = torch.full_like(x, math.log(std)).requires_grad_()
        lp = discretized_gaussian_log_likelihood(x, means, log_scales)
        g_mean, g_scale = torch.autograd.grad(lp.sum(), [means, log_scales])
        assert torch.isfinite(lp).all() and torch.isfinite(g_mean).all() and torch.isfinite(g_scale).all(), std
        for dtype in (torch.float32,):  # and in float32, as training computes it
            m32, s32 = means.detach().to(dtype).requires_grad_(), log_scales.detach().to(dtype).requires_grad_()
            lp32 = discretized_gaussian_log_likelihood(x.to(dtype), m32, s32)
            grads = torch.autograd.grad(lp32.sum(), [m32, s32])
            assert torch.isfinite(lp32).all() and all(torch.isfinite(g).all() for g in grads), std
