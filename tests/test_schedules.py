import math

import pytest
import torch

from ddpm_lib.schedules import alpha_bar, make_beta_schedule, snr


def test_linear_schedule_is_the_papers():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_schedule_ends_near_pure_noise():
    # ᾱ_T for the paper's schedule: about 4.0e-5, so x_T carries almost no signal (L_T ≈ 1e-5 bits/dim).
    a_T = alpha_bar(make_beta_schedule("linear", 1000))[-1].item()
    assert 3.5e-5 < a_T < 4.5e-5


def test_linear_schedule_rescales_for_shorter_chains():
    a_T = alpha_bar(make_beta_schedule("linear", 100))[-1].item()
    assert a_T < 1e-3


def test_cosine_schedule_follows_its_alpha_bar_formula():
    T, s = 1000, 0.008
    betas = make_beta_schedule("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    unclipped = betas < 0.999
    assert torch.allclose(alpha_bar(betas)[unclipped], expected[unclipped], rtol=1e-10)
    assert betas.max() <= 0.999 and betas.min() > 0


def test_snr_decreases_monotonically():
    for name in ("linear", "cosine"):
        assert (snr(make_beta_schedule(name, 1000)).diff() < 0).all()


@pytest.mark.parametrize("bad", ["quadratic", "Linear", ""])
def test_unknown_schedule_names_the_valid_ones(bad):
    with pytest.raises(ValueError, match="linear"):
        make_beta_schedule(bad, 1000)


def test_bad_T_is_rejected():
    with pytest.raises(ValueError, match="T"):
        make_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="T=10"):
        make_beta_schedule("linear", 10)
