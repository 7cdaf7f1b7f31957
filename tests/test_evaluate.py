"""Evaluation as in the paper (§4, §4.3): sample quality, the test-set bound, rate–distortion and the
JSON report — offline, with a stand-in feature extractor and a fake CIFAR10."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import write_fake_cifar10

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib import GaussianDiffusion, UNet, get_config, make_beta_schedule, metrics, toy
from ddpm_lib import evaluate as E
from ddpm_lib.data import load_cifar10

M_DATA, V_DATA = 0.1, 0.3 ** 2  # discretized N(0.1, 0.3²) pixels


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """cifar-10-batches-py (5 training batches and the test batch of 6 images each) in $DDPM_LIB_CACHE."""
    root = tmp_path / "cache"
    write_fake_cifar10(root, per_batch=6)
    monkeypatch.setenv("DDPM_LIB_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def toy_bound():
    """The bound of the paper's schedule (T = 1000) with the optimal ε-predictor on Gaussian pixels."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    _, probs = toy.discretized_gaussian(M_DATA, V_DATA ** 0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.multinomial(probs.float(), 32 * 48, replacement=True, generator=g).to(torch.uint8)
    model = toy.LinearOptimalEps(diffusion, M_DATA, V_DATA)
    bound = E.dataset_nll(model, diffusion, images.reshape(32, 3, 4, 4), batch_size=16, seed=0)
    return bound, model, toy.entropy_bits(probs)


def test_dataset_nll_is_the_prior_plus_every_term_and_bounds_the_entropy(toy_bound):
    bound, _, entropy = toy_bound
    assert bound.n == 32 and bound.terms.shape == (1000,) and bound.x0_mse.shape == (1000,)
    assert bound.nll_bpd == pytest.approx(bound.prior.mean() + bound.terms.sum(), rel=1e-12)
    assert 0 < bound.prior.mean() < 1e-4  # L_T ≈ 1e-5 (§4)
    # the bound sits above the data's exact NLL and, for the optimal predictor, close to it
    # (7.43 with 2,000 × 16 samples, README); 1,536 pixels here, standard error ≈ 0.06
    assert entropy - 3 * bound.nll_sem < bound.nll_bpd < entropy + 0.3
    assert 0.01 < bound.nll_sem < 0.2


def test_dataset_nll_batches_and_seed_reproduce():
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 50))
    model = toy.LinearOptimalEps(diffusion, M_DATA, V_DATA)
    images = torch.randint(100, 160, (6, 1, 4, 4), dtype=torch.uint8)
    a = E.dataset_nll(model, diffusion, images, batch_size=6, seed=3)
    b = E.dataset_nll(model, diffusion, images, batch_size=6, seed=3)
    c = E.dataset_nll(model, diffusion, images, batch_size=6, seed=4)
    np.testing.assert_array_equal(a.total, b.total)
    assert not np.array_equal(a.total, c.total)
    assert E.dataset_nll(model, diffusion, images, batch_size=4, seed=3, max_images=5).n == 5


def test_bound_round_trips_through_its_npz(toy_bound, tmp_path):
    bound = toy_bound[0]
    again = E.BoundResult.load(bound.save(tmp_path / "b.npz"))
    np.testing.assert_array_equal(again.terms, bound.terms)
    assert again.summary()["nll_bpd"] == bound.nll_bpd


def test_rate_grows_and_distortion_falls_as_decoding_proceeds(toy_bound):
    bound, model, _ = toy_bound
    rd = E.rate_distortion(bound)
    rate, rmse = rd["rate"], rd["distortion_rmse"]
    # decoding runs i = T-1 … 0: the rate only grows (each step's KL ≥ 0, up to float32 round-off)
    assert rate[-1] == pytest.approx(bound.prior.mean())
    assert np.all(np.diff(rate[::-1]) > -1e-6) and rate[0] > rate[500] > rate[900]
    # the distortion falls (checked on a grid coarser than the Monte Carlo noise), and follows the
    # closed-form MSE of the optimal predictor: from √v · 127.5 ≈ 38 at x_T to ≈ 1.3 at x_1
    grid = [999, 500, 200, 100, 50, 10, 0]
    assert np.all(np.diff(rmse[grid]) < 0)
    want = np.sqrt(model.x0_mse().numpy()) * 127.5
    np.testing.assert_allclose(rmse[grid], want[grid], rtol=0.06)
    # §4.3's numbers: rate = L_T + … + L_1, distortion = L_0, and they add up to the bound
    assert rd["rate_bpd"] == rate[0] and rd["distortion_bpd"] == bound.terms[0] == rd["remaining_bpd"][0]
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(bound.nll_bpd, rel=1e-12)
    assert rd["rmse"] == rmse[0]
    np.testing.assert_allclose(rate + rd["remaining_bpd"], rd["total_bpd"], rtol=1e-12)


def test_sample_quality_warns_at_small_n_and_scores_the_data_itself_near_zero(fake_cifar10):
    train = load_cifar10(download=False).images
    ext = metrics.RandomFeatures(dim=8, classes=4)
    with pytest.warns(UserWarning, match="FID is biased upward at small n; the paper uses 50k"):
        q = E.sample_quality(train.permute(0, 2, 3, 1).numpy(), extractor=ext, splits=3, download=False)
    assert q["n"] == 30 and set(q["fid"]) == {"cifar10-train", "cifar10-test"}
    assert q["fid"]["cifar10-train"] == pytest.approx(0, abs=1e-8)  # the reference set itself
    assert q["fid"]["cifar10-test"] > 1e-3
    assert q["reference_n"] == {"cifar10-train": 30, "cifar10-test": 6}
    assert q["inception_score"]["splits"] == 3 and q["inception_score"]["mean"] >= 1
    with pytest.warns(UserWarning) as caught:
        q = E.sample_quality(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), (("cifar10", "test"),), ext,
                             inception_score=False, download=False)
    assert any("resolution" in str(w.message) for w in caught) and "inception_score" not in q


@pytest.fixture
def tiny_checkpoint(tmp_path):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    return ckpt_io.save_ema(tmp_path / "run" / ckpt_io.EMA_NAME, UNet.from_config(cfg.model).eval(), 7, cfg)


def test_run_eval_writes_a_json_report_of_samples_and_a_checkpoint(fake_cifar10, tiny_checkpoint, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "eval" / "report.json"
    with pytest.warns(UserWarning, match="50k"):
        report = E.run_eval(out, samples=samples, checkpoint=tiny_checkpoint, extractor=metrics.RandomFeatures(),
                            max_images=4, batch_size=4, splits=2, device="cpu", download=False)
    assert json.loads(out.read_text()) == report
    assert report["metrics"] == ["fid", "is", "nll", "rd"]
    assert {"what", "date", "versions", "device"} <= set(report) and report["versions"]["torch"] == torch.__version__
    assert report["samples"]["n"] == 12 and set(report["sample_quality"]["fid"]) == {"cifar10-train", "cifar10-test"}
    assert report["checkpoint"] == {"path": str(tiny_checkpoint), "config": "tiny", "step": 7, "T": 100}
    bound = report["bound"]
    assert bound["data"] == "cifar10-test" and bound["n"] == 4 and len(bound["terms_bpd"]) == 100
    assert bound["nll_bpd"] == pytest.approx(bound["prior_bpd"] + sum(bound["terms_bpd"]), rel=1e-9)
    assert bound["nll_bpd"] > 1  # an untrained model codes poorly
    assert E.BoundResult.load(bound["npz"]).n == 4
    rd = report["rate_distortion"]
    assert len(rd["rate"]) == len(rd["distortion_rmse"]) == 100
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(bound["nll_bpd"], rel=1e-9)


def test_run_eval_runs_only_the_metrics_asked_for(fake_cifar10, tmp_path):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.warns(UserWarning):
        report = E.run_eval(tmp_path / "r.json", samples=samples, metrics=["is"], splits=2,
                            extractor=metrics.RandomFeatures(), download=False)
    assert report["metrics"] == ["is"] and report["sample_quality"]["fid"] == {}
    assert report["sample_quality"]["inception_score"]["mean"] == pytest.approx(1.0)  # identical images


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to evaluate"),
    ({"metrics": ["fid"]}, "fid, is and fid_fashion need samples"),
    ({"metrics": ["nll"]}, "need a checkpoint"),
    ({"metrics": ["bpd"]}, "unknown metrics"),
])
def test_run_eval_says_what_is_missing(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        E.run_eval(tmp_path / "r.json", **kwargs)


def test_samples_file_must_hold_uint8_images(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="under 'images'"):
        E.load_samples(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        E.load_samples(tmp_path / "b.npz")
    with pytest.raises(FileNotFoundError):
        E.load_samples(tmp_path / "missing.npz")
