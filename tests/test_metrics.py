"""FID and IS (§4, Table 1): the Fréchet distance against closed forms, the Inception Score at its
extremes, cached reference statistics, and the Inception replica's wiring (offline, no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import write_fake_cifar10

from ddpm_lib import metrics as M
from ddpm_lib.data import load_cifar10
from ddpm_lib.precision import _get, set_fp32_precision


def random_covariance(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


class CountingExtractor(M.RandomFeatures):
    def __init__(self) -> None:
        super().__init__(dim=16, classes=5)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return super().__call__(images)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_with_equal_covariances_is_the_squared_mean_difference():
    rng = np.random.default_rng(0)
    sigma = random_covariance(6, rng)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert M.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9)
    assert M.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_sums_squared_root_differences():
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])  # one variance zero
    mu1, mu2 = np.array([0.0, 1, 2, 3]), np.array([1.0, 1, 0, 3])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_commuting_covariances_uses_their_shared_eigenbasis():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(want, rel=1e-9)
    # symmetric in its two arguments
    assert M.frechet_distance(np.zeros(5), s2, np.zeros(5), s1) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = random_covariance(8, rng), random_covariance(8, rng)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_stays_real_for_singular_covariances():
    rng = np.random.default_rng(3)
    s1, s2 = random_covariance(10, rng, rank=3), random_covariance(10, rng, rank=4)  # fewer samples than dims
    d = M.frechet_distance(np.zeros(10), s1, np.zeros(10), s2)
    assert np.isfinite(d) and d > 0
    # √ of round-off-sized eigenvalues leaves ~1e-8 each: near zero, not exactly zero
    assert M.frechet_distance(np.zeros(10), s1, np.zeros(10), s1) == pytest.approx(0, abs=1e-6)


def test_fid_of_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 1.5, 0.5])
    mu1, mu2 = np.array([0.0, 0.5, 0, 0]), np.array([0.3, 0, 0, -0.2])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    x1 = rng.multivariate_normal(mu1, s1, 200_000)
    x2 = rng.multivariate_normal(mu2, s2, 200_000)
    got = M.frechet_distance(*M.feature_statistics(x1), *M.feature_statistics(torch.from_numpy(x2)))
    assert got == pytest.approx(want, rel=0.02)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_is_one_for_uniform_and_k_for_confident_balanced_predictions():
    k, n = 7, 700
    mean, std = M.inception_score(np.full((n, k), 1 / k), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    one_hot = np.eye(k)[np.arange(n) % k]  # every split holds each class equally often
    mean, std = M.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    # a confident but always-the-same classifier scores 1: IS rewards diversity too
    assert M.inception_score(np.eye(k)[np.zeros(n, int)], splits=10)[0] == pytest.approx(1.0)


def test_inception_score_takes_logits_or_probabilities_alike():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 20)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    from_logits = M.inception_score(torch.from_numpy(logits), splits=5)
    from_probs = M.inception_score(p, splits=5)
    assert from_logits == pytest.approx(from_probs, rel=1e-9)
    assert 1 < from_logits[0] < 20 and from_logits[1] > 0


def test_inception_score_rejects_more_splits_than_samples():
    with pytest.raises(ValueError, match="splits=10"):
        M.inception_score(np.full((5, 3), 1 / 3), splits=10)


# --------------------------------------------------------------------------- images and extractors


def test_images_are_accepted_channels_last_or_first_and_grey_becomes_rgb():
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    nchw = M.as_nchw(x)
    assert nchw.shape == (2, 3, 5, 6) and torch.equal(nchw, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.equal(M.as_nchw(nchw), nchw)
    grey = M.as_nchw(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert grey.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        M.as_nchw(np.zeros((2, 3, 4, 4), np.float32))


def test_extract_batches_without_changing_the_result():
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ext = M.RandomFeatures(dim=12, classes=4)
    f1, l1 = M.extract(x, ext, batch_size=3)
    f2, l2 = M.extract(x, ext, batch_size=10)
    assert f1.shape == (10, 12) and l1.shape == (10, 4)
    np.testing.assert_allclose(f1, f2, rtol=1e-12)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)


def test_inception_weights_missing_or_altered_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Inception weights are not at .*download=False"):
        M.InceptionV3(download=False)
    M.inception_weights_path().parent.mkdir(parents=True)
    M.inception_weights_path().write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="not the published Inception weights"):
        M.InceptionV3(download=False)


def test_inception_replica_gives_pool3_features_and_1008_logits(tmp_path, monkeypatch):
    """The wiring to torch-fidelity's module, with random weights (the real ones are not downloaded)."""
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as m:  # build the network once without any weights, to save a stand-in file
        m.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "w.pth")
    ext = M.InceptionV3(device="cpu", weights_path=tmp_path / "w.pth", download=False)
    assert ext.name == "inception-v3-compat"
    # Training or sampling may have set TF32 through torch's precision API first: no clash, and it is restored.
    set_fp32_precision(torch.device("cuda"), "tf32")
    before = _get()
    features, logits = M.extract(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), ext)
    assert _get() == before
    set_fp32_precision(torch.device("cuda"), "fp32")
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.isfinite(features).all() and np.isfinite(logits).all()


# --------------------------------------------------------------------------- reference statistics


def test_cifar10_test_split_is_read_from_the_test_batch(tmp_path):
    train, test = write_fake_cifar10(tmp_path)
    ds = load_cifar10(tmp_path, False, "test")
    assert torch.equal(ds.images, torch.from_numpy(test))
    assert torch.equal(load_cifar10(tmp_path, False, "train").images, torch.from_numpy(train))
    with pytest.raises(ValueError, match="split='val'"):
        load_cifar10(tmp_path, split="val")


def test_missing_cifar10_test_batch_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing test_batch"):
        load_cifar10(tmp_path, False, "test")


def test_reference_statistics_are_computed_once_then_read_from_the_cache(tmp_path):
    train, test = write_fake_cifar10(tmp_path)
    ext = CountingExtractor()
    first = M.reference_statistics("cifar10", "train", ext, cache_dir=tmp_path, download=False, batch_size=7)
    calls = ext.calls
    assert calls == 5  # 30 images in batches of 7
    assert first.path == tmp_path / "fid_stats" / f"cifar10-train-{ext.name}.npz" and first.path.is_file()
    assert first.n == 30 and first.image_size == (32, 32) and first.extractor == ext.name
    mu, sigma = M.feature_statistics(M.extract(train, ext)[0])
    np.testing.assert_allclose(first.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(first.sigma, sigma, rtol=1e-10)

    ext.calls = 0
    again = M.reference_statistics("cifar10", "train", ext, cache_dir=tmp_path, download=False)
    assert ext.calls == 0
    np.testing.assert_array_equal(again.sigma, first.sigma)
    # another split or another extractor is another file
    other = M.reference_statistics("cifar10", "test", ext, cache_dir=tmp_path, download=False)
    assert ext.calls > 0 and other.n == 6 and other.path != first.path
    assert M.reference_stats_path("cifar10", "train", "x", tmp_path).name == "cifar10-train-x.npz"


# ---------------------------------------------------------------- fid_fashion (the shipped classifier's features)


def test_the_shipped_fashion_classifier_scores_what_its_record_says(fashion_test):
    import json

    record = json.loads(M.FASHION_WEIGHTS.with_suffix(".json").read_text())
    _, logits = M.extract(fashion_test.images, M.FashionFeatures(), batch_size=1000)
    accuracy = float((torch.from_numpy(logits.argmax(1)) == fashion_test.labels).double().mean())
    assert accuracy == pytest.approx(record["test_accuracy"], abs=1e-4) and accuracy > 0.88


def test_fid_fashion_sits_at_its_floor_for_real_images_and_far_above_it_for_noise(fashion_test, tmp_path):
    from ddpm_lib.evaluate import fashion_quality

    real = fashion_test.images[5000:5500]  # real test images: a perfect sampler
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    q_real = fashion_quality(real, cache_dir=tmp_path, download=False)
    q_noise = fashion_quality(noise, cache_dir=tmp_path, download=False)
    floor = q_real["floor_fid"]
    assert q_noise["floor_fid"] == floor  # the floor depends on n and the seed only
    assert q_real["fid"]["fashion-train"] < 2 * floor and q_noise["fid"]["fashion-train"] > 20 * floor
    assert sum(q_real["predicted_classes"]) == 500 and min(q_real["predicted_classes"]) > 0
    smaller = fashion_quality(torch.nn.functional.interpolate(real.float(), size=16).round().to(torch.uint8),
                              cache_dir=tmp_path, download=False)  # other sizes are resized to 28×28
    assert smaller["n"] == 500 and np.isfinite(smaller["fid"]["fashion-train"])


def test_eval_reports_fid_fashion_from_the_command_line(fashion_test, tmp_path, monkeypatch):
    import json

    from ddpm_lib.cli import main

    monkeypatch.setenv("DDPM_LIB_CACHE", str(tmp_path / "cache"))
    samples = tmp_path / "s.npz"
    np.savez(samples, images=fashion_test.images[:300].permute(0, 2, 3, 1).numpy())
    assert main(["eval", "--samples", str(samples), "--metrics", "fid_fashion", "--out", str(tmp_path / "r.json"),
                 "--no-progress", "--no-download"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["sample_quality_fashion"]
    assert report["n"] == 300 and set(report["fid"]) == {"fashion-train", "fashion-test"}
    assert report["fid"]["fashion-test"] < report["fid"]["fashion-train"] + 1  # they are test images
