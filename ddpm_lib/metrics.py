"""Sample-quality metrics of §4 (Table 1): FID (Heusel et al. 2017) and the Inception Score
(Salimans et al. 2016), with the paper's protocol.

Both compare images through a feature extractor: any callable that maps a batch of uint8 images
[b, 3, H, W] to ``(features [b, D], logits [b, K])`` and has a ``name`` (used to key cached
statistics). The default, ``InceptionV3``, is torch-fidelity's ``inception-v3-compat``: a bit-exact
PyTorch port of the TensorFlow Inception graph that the FID and IS reference code use (so numbers
match the paper's: pool3 features, 2048-d, for FID; the 1008 unbiased logits for IS). Its weights
are downloaded by torch.hub on first use into ``$TORCH_HOME/hub/checkpoints`` — only when asked,
never in the tests, which plug in ``RandomFeatures`` instead.

The paper's protocol: 50,000 samples; FID against the CIFAR10 *training* set (3.17; against the
test set 5.24); IS over 10 splits (9.46 ± 0.11). Reference statistics (μ, Σ of a dataset's
features) are computed once and cached in ``default_cache_dir()/fid_stats/`` (``reference_statistics``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .data import default_cache_dir, load_split
from .precision import fp32_precision

# --------------------------------------------------------------------------- the metrics themselves


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of features [N, D] in float64: the mean and the unbiased (N − 1) covariance, as in the
    reference FID code."""
    f = np.asarray(features.cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N ≥ 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigen-decomposition)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, the FID):

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

    Computed in float64 without a non-symmetric matrix square root: Σ1 Σ2 has the same eigenvalues
    as the symmetric PSD matrix √Σ1 Σ2 √Σ1, so Tr (Σ1 Σ2)^{1/2} = Σ_i √λ_i(√Σ1 Σ2 √Σ1). This stays
    real and stable when a covariance is singular (fewer samples than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: μ {mu1.shape} {mu2.shape}, Σ {sigma1.shape} {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits_or_probs: np.ndarray | Tensor, splits: int = 10,
                    probs: bool | None = None) -> tuple[float, float]:
    """The Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), as (mean, std) over
    ``splits`` contiguous parts of the N predictions, p(y) being each part's mean of p(y|x).

    ``logits_or_probs`` [N, K] are class logits (softmax taken here) or probabilities; ``probs``
    says which, or ``None`` to detect probabilities (non-negative rows summing to 1). The paper's
    9.46 ± 0.11 is over 10 splits of 50,000 samples.
    """
    x = np.asarray(logits_or_probs.cpu() if isinstance(logits_or_probs, Tensor) else logits_or_probs,
                   dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"predictions must be [N, K], got shape {x.shape}")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(f"splits={splits} must lie in 1 … N = {x.shape[0]}")
    if probs is None:
        probs = bool((x >= 0).all() and np.allclose(x.sum(1), 1.0, atol=1e-6))
    if probs:
        with np.errstate(divide="ignore"):
            log_p = np.log(x)
    else:
        log_p = x - x.max(1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    n = x.shape[0]
    scores = []
    for i in range(splits):
        part_p, part_log_p = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        with np.errstate(divide="ignore", invalid="ignore"):  # p(y) = 0 only where every p(y|x) = 0
            log_marginal = np.log(part_p.mean(0, keepdims=True))
            kl = np.where(part_p > 0, part_p * (part_log_p - log_marginal), 0.0).sum(1)  # 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- feature extractors


class FeatureExtractor(Protocol):
    """uint8 images [b, 3, H, W] → (features [b, D], logits [b, K]); ``name`` keys cached statistics."""

    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_weights_path() -> Path:
    """Where torch.hub keeps the Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


class InceptionV3:
    """torch-fidelity's ``inception-v3-compat`` (the TF-Inception replica behind the paper's FID/IS):
    pool3 features [b, 2048] and unbiased logits [b, 1008] (the logits the IS reference code uses).

    Images of any size are resized to 299 × 299 inside, as in the TensorFlow graph (bilinear, TF1
    style). Weights: ``weights_path`` (a state dict of tensors), else the torch.hub cache
    (``inception_weights_path()``), downloaded there when ``download`` is true; the cached file's
    SHA-256 is checked against the published one. A clear error when they are missing offline.
    Runs in float32 with TF32 off, so GPU features match the reference closely.
    """

    name = "inception-v3-compat"

    def __init__(self, device: str | torch.device | None = None, weights_path: str | os.PathLike | None = None,
                 download: bool = True) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("FID and IS need torch-fidelity: pip install torch-fidelity") from e
        if weights_path is not None:  # the user's file: accept it if it holds tensors only
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist")
            torch.load(path, map_location="cpu", weights_only=True)
        else:  # the torch.hub cache: the published file, checked by its SHA-256
            path = inception_weights_path()
            if not path.is_file():
                if not download:
                    raise FileNotFoundError(
                        f"the Inception weights are not at {path} and download=False; fetch {INCEPTION_URL} "
                        f"there (or allow the download) to compute FID and IS")
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix=INCEPTION_SHA256)
                except OSError as e:
                    raise RuntimeError(f"could not download the Inception weights from {INCEPTION_URL} "
                                       f"(offline?): {e}. Put the file at {path} and retry.") from e
            elif _sha256(path) != INCEPTION_SHA256:
                raise ValueError(f"{path} is not the published Inception weights (SHA-256 differs from "
                                 f"{INCEPTION_SHA256}); delete it to download them again")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with fp32_precision("fp32"):  # true fp32, whatever training or sampling set before
            return self.net(images.to(self.device))


class RandomFeatures:
    """A stand-in extractor (offline, fast; NOT comparable with published FIDs): images average-pooled
    to ``size`` × ``size``, scaled to [−1, 1], then a fixed random projection to ``dim`` features
    (tanh) and ``classes`` logits. For tests and for showing how FID and IS behave."""

    def __init__(self, dim: int = 64, classes: int = 10, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        d_in = 3 * size * size
        self.size = size
        self.proj = torch.randn(d_in, dim, generator=g, dtype=torch.float64) / d_in ** 0.5
        self.head = torch.randn(dim, classes, generator=g, dtype=torch.float64) * 3 / dim ** 0.5
        self.name = f"random-d{dim}-k{classes}-s{size}-seed{seed}"

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.double(), self.size) / 127.5 - 1
        features = torch.tanh(x.flatten(1) @ self.proj)
        return features, features @ self.head


FASHION_WEIGHTS = Path(__file__).parent / "weights" / "fashion_classifier.safetensors"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of Fashion-MNIST's training pixels on [0, 1]


class FashionClassifier(torch.nn.Module):
    """A small CNN for 28×28 grey Fashion-MNIST images: two 3×3 conv + max-pool stages (32, 64 channels), a
    128-unit hidden layer (the features of ``fid_fashion``) and 10 class logits. ``forward`` takes pixels
    scaled to [0, 1], [b, 1, 28, 28]; trained by ``tools/train_fashion_classifier.py``."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.hidden(self.conv((x - FASHION_MEAN) / FASHION_STD))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FashionFeatures:
    """``fid_fashion``'s extractor: the shipped ``FashionClassifier``'s 128 hidden features and its logits, from
    uint8 images [b, 3, H, W] (grey repeated to RGB by ``as_nchw``: the first channel is used), resized to
    28 × 28 when they are another size. Offline: the weights ship in ``ddpm_lib/weights/``."""

    def __init__(self, weights_path: str | os.PathLike = FASHION_WEIGHTS, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"the Fashion-MNIST classifier {path} does not exist: train it with "
                                    "python tools/train_fashion_classifier.py")
        self.device = torch.device(device)
        self.net = FashionClassifier()
        self.net.load_state_dict(load_file(str(path)))
        self.net = self.net.to(self.device).eval()
        self.name = f"fashion-classifier-{_sha256(path)[:12]}"  # statistics are cached per weights

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images[:, :1].to(self.device, torch.float32) / 255.0
        if x.shape[-2:] != (28, 28):
            x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True,
                                                align_corners=False)
        features = self.net.features(x)
        return features, self.net.head(features)


def as_nchw(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images [N, H, W, C] or [N, C, H, W] (C = 1 or 3) → a uint8 tensor [N, 3, H, W].

    Channels-last is recognised by a last axis of 1 or 3 when axis 1 is neither. One channel
    (e.g. the digits) is repeated to RGB, since the extractors take RGB.
    """
    x = torch.as_tensor(images) if not isinstance(images, Tensor) else images
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C] or [N, C, H, W], got {x.dtype} {list(x.shape)}")
    if x.shape[1] not in (1, 3):
        if x.shape[3] not in (1, 3):
            raise ValueError(f"cannot find the channel axis (1 or 3 channels) in shape {list(x.shape)}")
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def extract(images: np.ndarray | Tensor, extractor: FeatureExtractor, batch_size: int = 250,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] and logits [N, K] (float64 NumPy) of uint8 images, ``batch_size`` at a time."""
    x = as_nchw(images)
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"features ({extractor.name})")
    feats, logits = [], []
    for s in starts:
        f, lg = extractor(x[s:s + batch_size])
        feats.append(f.detach().double().cpu().numpy())
        logits.append(lg.detach().double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


# --------------------------------------------------------------------------- reference statistics

@dataclass
class ReferenceStats:
    """μ [D] and Σ [D, D] of a dataset split's features, with the image count, the images' (H, W)
    and the extractor's name."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    image_size: tuple[int, int]
    extractor: str
    path: Path | None = None


def reference_stats_path(dataset: str, split: str, extractor_name: str,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/fid_stats/<dataset>-<split>-<extractor>.npz`` (cache: ``default_cache_dir()``)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "fid_stats" / f"{dataset}-{split}-{extractor_name}.npz"


def reference_statistics(dataset: str = "cifar10", split: str = "train", extractor: FeatureExtractor | None = None,
                         *, cache_dir: str | os.PathLike | None = None, download: bool = True,
                         batch_size: int = 250, progress: bool = False,
                         load_images: Callable[[], Tensor] | None = None) -> ReferenceStats:
    """FID statistics of a whole dataset split (the paper: all 50,000 CIFAR10 training images),
    computed once and cached as an npz; later calls read the cache and run no extractor.

    ``load_images`` overrides where the images come from (default ``load_split``).
    """
    extractor = extractor if extractor is not None else InceptionV3(download=download)
    path = reference_stats_path(dataset, split, extractor.name, cache_dir)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return ReferenceStats(z["mu"], z["sigma"], int(z["n"]), tuple(int(s) for s in z["image_size"]),
                                  str(z["extractor"]), path)
    images = load_images() if load_images is not None else load_split(dataset, split, cache_dir, download).images
    images = as_nchw(images)
    features, _ = extract(images, extractor, batch_size, progress)
    mu, sigma = feature_statistics(features)
    size = (int(images.shape[2]), int(images.shape[3]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=len(features), image_size=np.array(size), extractor=extractor.name)
    os.replace(tmp, path)
    return ReferenceStats(mu, sigma, len(features), size, extractor.name, path)
