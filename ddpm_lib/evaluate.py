"""Evaluation as in the paper (§4, Table 1, §4.3): sample quality (FID, IS), the test-set NLL bound
and the rate–distortion curve of progressive coding.

* ``sample_quality(images)`` — FID against reference splits (the paper: CIFAR10 train, 3.17; test,
  5.24) and the Inception Score (9.46 ± 0.11), from 50,000 samples.
* ``dataset_nll(model, diffusion, images)`` — Table 1's NLL column: the full bound L (eq. 5) in
  bits/dim averaged over a dataset (CIFAR10 test: ≤ 3.75), with its per-t decomposition.
* ``rate_distortion(bound)`` — §4.3, Fig. 5: the same terms read as a progressive code.
* ``run_eval(...)`` — all of it from a samples file and/or a checkpoint, written to a JSON report
  (the CLI's ``eval`` subcommand).

Time indices are 0-based (index i is the paper's t = i + 1), as everywhere in ``ddpm_lib``.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import metrics as M
from .base import Model, __version__, model_device
from .checkpoint import atomic_path, check_writable, write_text_atomic
from .data import NAMED_DATASETS, ImageFolder, TensorImages, load_split, resize_images, to_model_range
from .diffusion import GaussianDiffusion
from .loading import load_for_sampling

PAPER_N_SAMPLES = 50_000
DEFAULT_REFERENCES = (("cifar10", "train"), ("cifar10", "test"))
METRICS = ("fid", "is", "fid_fashion", "nll", "rd")
FASHION_REFERENCES = (("fashion", "train"), ("fashion", "test"))
BOUND_ABOUT = ("the bound L of eq. 5 in bits/dim (Table 1's NLL; the paper: ≤ 3.75 on CIFAR10 test), one x_t draw "
               "per image and t; nll_sem is the standard error over images; terms_bpd[i] is L_0 at i = 0 and "
               "L_{t-1} at t = i + 1 otherwise; x0_mse on the [-1, 1] scale")
RD_ABOUT = ("§4.3: rate[i] = bits/dim received when holding x_t (t = i + 1) = prior + sum of terms after i; "
            "distortion_rmse[i] = RMSE of x0_hat(x_t) on the 0-255 scale; remaining_bpd[i] = total - rate[i]. "
            "rate_bpd = rate[0] (paper 1.78), distortion_bpd = L_0 (paper 1.97), rmse = distortion_rmse[0] "
            "(paper 0.95)")

# --------------------------------------------------------------------------- sample quality


def sample_quality(images: np.ndarray | Tensor, references: Sequence[tuple[str, str]] = DEFAULT_REFERENCES,
                   extractor: M.FeatureExtractor | None = None, *, inception_score: bool = True,
                   splits: int = 10, batch_size: int = 250, cache_dir: str | os.PathLike | None = None,
                   download: bool = True, progress: bool = False) -> dict:
    """FID of uint8 samples [N, H, W, C] or [N, C, H, W] against each (dataset, split) in
    ``references``, and their Inception Score over ``splits`` parts.

    Returns ``{"n", "extractor", "fid": {"cifar10-train": …, …}, "reference_n": {…},
    "inception_score": {"mean", "std", "splits"}, "warnings": […]}``. Warns when n < 50,000: FID is
    biased upward at small n (the paper uses 50k), so only numbers at equal n compare. The default
    extractor is the TF-Inception replica (``metrics.InceptionV3``); reference statistics are cached.
    """
    images = M.as_nchw(images)
    n = int(images.shape[0])
    extractor = extractor if extractor is not None else M.InceptionV3(download=download)
    notes = []
    if n < PAPER_N_SAMPLES:
        notes.append(f"n = {n:,} < {PAPER_N_SAMPLES:,}: FID is biased upward at small n; the paper uses 50k")
    features, logits = M.extract(images, extractor, batch_size, progress)
    out: dict = {"n": n, "extractor": extractor.name, "fid": {}, "reference_n": {}}
    if references:
        mu, sigma = M.feature_statistics(features)
        for dataset, split in references:
            ref = M.reference_statistics(dataset, split, extractor, cache_dir=cache_dir, download=download,
                                         batch_size=batch_size, progress=progress)
            key = f"{dataset}-{split}"
            if ref.image_size != tuple(images.shape[2:]):
                notes.append(f"samples are {tuple(images.shape[2:])}, {key} images {ref.image_size}: "
                             "the FID also measures the difference in resolution")
            out["fid"][key] = M.frechet_distance(mu, sigma, ref.mu, ref.sigma)
            out["reference_n"][key] = ref.n
    if inception_score:
        mean, std = M.inception_score(logits, splits=splits, probs=False)
        out["inception_score"] = {"mean": mean, "std": std, "splits": splits}
    for note in notes:
        warnings.warn(note, stacklevel=2)
    out["warnings"] = notes
    return out


# --------------------------------------------------------------------------- the bound on a dataset


@dataclass
class BoundResult:
    """The bound L (eq. 5) over a dataset, in bits/dim.

    ``total`` [N] and ``prior`` [N] per image; ``terms`` [T] the mean over images of each term
    (index 0: the decoder L_0; index i ≥ 1: L_{t−1} at t = i + 1); ``x0_mse`` [T] the mean squared
    error of x̂_0 predicted from x_t, on the [−1, 1] scale. ``total.mean() = prior.mean() + terms.sum()``.
    """

    total: np.ndarray
    prior: np.ndarray
    terms: np.ndarray
    x0_mse: np.ndarray

    @property
    def n(self) -> int:
        return len(self.total)

    @property
    def nll_bpd(self) -> float:
        """The dataset's NLL bound, bits/dim: the mean of ``total`` (Table 1's NLL column)."""
        return float(self.total.mean())

    @property
    def nll_sem(self) -> float:
        """The standard error of ``nll_bpd`` over images (0 for a single image)."""
        return float(self.total.std(ddof=1) / math.sqrt(self.n)) if self.n > 1 else 0.0

    def summary(self) -> dict:
        return {"n": self.n, "nll_bpd": self.nll_bpd, "nll_sem": self.nll_sem,
                "prior_bpd": float(self.prior.mean()), "decoder_bpd": float(self.terms[0]),
                "terms_bpd": self.terms.tolist(), "x0_mse": self.x0_mse.tolist()}

    def save(self, path: str | os.PathLike) -> Path:
        """An npz with total, prior (per image), terms and x0_mse (per t), for the book's plots (written
        atomically: a full disk leaves no partial file)."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, total=self.total, prior=self.prior, terms=self.terms, x0_mse=self.x0_mse)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BoundResult:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["total"], z["prior"], z["terms"], z["x0_mse"])


def dataset_nll(model: Model, diffusion: GaussianDiffusion, images: TensorImages | Tensor | np.ndarray, *,
             batch_size: int = 100, seed: int = 0, device: str | torch.device | None = None,
             clip_denoised: bool = True, max_images: int | None = None, progress: bool = False,
             labels: Tensor | None = None) -> BoundResult:
    """Table 1's NLL: the full bound (eq. 5, ``GaussianDiffusion.vlb_bpd``) in bits/dim over uint8
    images [N, C, H, W], one draw of x_t ~ q(x_t | x_0) per image and t (T network calls per batch).

    The noise comes from one CPU generator seeded with ``seed``: the same images, batch size and
    seed give the same numbers on any device. ``max_images`` keeps the first images only. With
    ``labels`` [N] a class-conditional network gets image i's class (``model(x, t, y=…)``): the bound
    is then on −log p(x | y); without, such a network sees the null label (its unconditional half).
    """
    x = images.images if isinstance(images, TensorImages) else torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
    if labels is not None and tuple(labels.shape) != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}] (one per image), got {list(labels.shape)}")
    if max_images is not None:
        x = x[:max_images]
        labels = labels[:max_images] if labels is not None else None
    device = torch.device(device) if device is not None else model_device(model)
    g = torch.Generator().manual_seed(seed)
    total, prior, terms, mse = [], [], 0.0, 0.0
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="NLL bound, images", unit="batch")
    for s in starts:
        x0 = to_model_range(x[s:s + batch_size]).to(device)
        net = model if labels is None else functools.partial(model, y=labels[s:s + batch_size].to(device))
        r = diffusion.vlb_bpd(net, x0, clip_denoised=clip_denoised, generator=g, progress=progress)  # a bar over t
        total.append(r["total"].cpu().numpy())
        prior.append(r["prior"].cpu().numpy())
        terms = terms + r["terms"].sum(0).cpu().numpy()
        mse = mse + r["x0_mse"].sum(0).cpu().numpy()
    n = x.shape[0]
    return BoundResult(np.concatenate(total), np.concatenate(prior), terms / n, mse / n)


# --------------------------------------------------------------------------- rate–distortion (§4.3)


def rate_distortion(bound: BoundResult) -> dict:
    """§4.3 (Fig. 5, Table 4): the bound read as a progressive code (Algorithms 3–4).

    The sender transmits x_T with p(x_T) (L_T bits, ``prior``), then x_{t−1} given x_t with
    p_θ(x_{t−1} | x_t) for t = T … 2 (L_{t−1} bits each), and last x_0 with the decoder (L_0). A
    receiver holding x_t estimates x̂_0 from it (eq. 15). Arrays are indexed by the 0-based step i
    (x_t with t = i + 1); decoding runs from i = T − 1 down to 0. In bits/dim, means over images:

    * ``rate[i]`` — bits received when the receiver holds x_t: prior + Σ_{j > i} terms[j]; grows
      as decoding proceeds.
    * ``distortion_rmse[i]`` — the RMSE of x̂_0(x_t) on the [0, 255] scale, √(mean x0_mse[i]) · 127.5
      (the root of the squared error averaged over all pixels of all images).
    * ``remaining_bpd[i]`` — bits still to send to code x_0 losslessly given x_t,
      Σ_{j ≤ i} terms[j] = total − rate[i].

    Scalars, the paper's §4.3 numbers (CIFAR10): ``rate_bpd`` = rate[0] = L_T + … + L_1 (1.78),
    ``distortion_bpd`` = remaining_bpd[0] = L_0 (1.97), ``rmse`` = distortion_rmse[0] (0.95), and
    ``total_bpd`` their sum (3.75).
    """
    terms, prior = np.asarray(bound.terms, np.float64), float(np.mean(bound.prior))
    remaining = np.cumsum(terms)  # Σ_{j ≤ i} terms[j]
    rate = prior + terms.sum() - remaining
    rmse = np.sqrt(np.asarray(bound.x0_mse, np.float64)) * 127.5
    return {"rate": rate, "distortion_rmse": rmse, "remaining_bpd": remaining,
            "rate_bpd": float(rate[0]), "distortion_bpd": float(terms[0]), "rmse": float(rmse[0]),
            "total_bpd": float(prior + terms.sum())}


# --------------------------------------------------------------------------- the CLI's entry point


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """uint8 images [N, H, W, C] from an ``.npz`` (key ``images``) or an ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise ValueError(f"{path} holds {z.files}; expected uint8 images [N, H, W, C] under 'images'")
                images = z["images"]
    except (ValueError, OSError, EOFError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path} is not a samples file ({e}); pickled objects are never loaded") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
    return images


def bound_images(data: str, split: str, image_size: int, channels: int,
                 cache_dir: str | os.PathLike | None = None, download: bool = True) -> TensorImages:
    """The images whose NLL bound is measured: a named data set (``split`` train/test), a
    samples-style ``.npz``/``.npy`` file, or a folder of images; resized to the model's size."""
    if data in NAMED_DATASETS:
        ds = load_split(data, split, cache_dir, download)
        return TensorImages(resize_images(ds.images, image_size), name=f"{data}-{split}", labels=ds.labels)
    if Path(data).suffix in (".npz", ".npy"):
        x = M.as_nchw(load_samples(data))[:, :channels]
        return TensorImages(resize_images(x, image_size), name=str(data))
    folder = ImageFolder(data, image_size, channels)
    return TensorImages(torch.stack([folder[i] for i in range(len(folder))]), name=str(data))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str]:
    out = {"ddpm_lib": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import torch_fidelity
        out["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        pass
    return out


def _wanted(metrics: Iterable[str] | None, samples, checkpoint) -> set[str]:
    """The metrics to compute (default: fid + is with samples, nll + rd with a checkpoint), checked."""
    wanted = set(metrics) if metrics is not None else (
        ({"fid", "is"} if samples is not None else set()) | ({"nll", "rd"} if checkpoint is not None else set()))
    unknown = wanted - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if not wanted:
        raise ValueError("nothing to evaluate: give samples (for fid, is) and/or a checkpoint (for nll, rd)")
    if wanted & {"fid", "is", "fid_fashion"} and samples is None:
        raise ValueError("fid, is and fid_fashion need samples (an .npz of uint8 images under 'images')")
    if wanted & {"nll", "rd"} and checkpoint is None:
        raise ValueError("nll and rd need a checkpoint")
    return wanted


def fashion_quality(images: np.ndarray | Tensor, *, seed: int = 0, batch_size: int = 250,
                    cache_dir: str | os.PathLike | None = None, download: bool = True, progress: bool = False,
                    extractor: M.FeatureExtractor | None = None) -> dict:
    """``fid_fashion``: the FID of uint8 samples against Fashion-MNIST's train and test splits in the features
    of the shipped Fashion-MNIST classifier (``metrics.FashionFeatures``), offline, with its floor: the FID of
    as many real test images (drawn with ``seed``) against the training split, which is what a perfect
    sampler would score at this n (FID is biased upward at small n). Also the classifier's class histogram of
    the samples (a sampler that drops classes shows it)."""
    extractor = extractor if extractor is not None else M.FashionFeatures()
    images = M.as_nchw(images)
    n = int(images.shape[0])
    test = load_split("fashion", "test", cache_dir, download).images
    if n > len(test):
        raise ValueError(f"{n:,} samples, but the floor needs as many real test images (Fashion-MNIST has "
                         f"{len(test):,})")
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    with warnings.catch_warnings():  # the small-n bias is what the floor measures: no warning about it
        warnings.simplefilter("ignore", UserWarning)
        q = sample_quality(images, FASHION_REFERENCES, extractor, inception_score=False, batch_size=batch_size,
                           cache_dir=cache_dir, download=download, progress=progress)
        floor = sample_quality(test[pick], FASHION_REFERENCES[:1], extractor, inception_score=False,
                               batch_size=batch_size, cache_dir=cache_dir, download=download)
    _, logits = M.extract(images, extractor, batch_size)
    counts = np.bincount(logits.argmax(1), minlength=10)
    return {"n": n, "extractor": extractor.name, "fid": q["fid"], "reference_n": q["reference_n"],
            "floor_fid": floor["fid"]["fashion-train"], "floor_seed": seed,
            "predicted_classes": counts.tolist(),
            "about": f"FID in the 128 hidden features of the shipped Fashion-MNIST classifier; floor_fid: {n} real "
                     "test images against the training split, the score of a perfect sampler at this n; "
                     "predicted_classes: how many samples the classifier puts in each class"}


def _quality_report(images: np.ndarray, wanted: set[str], references, extractor: M.FeatureExtractor,
                    **kw) -> dict:
    """The report's ``sample_quality`` section (FID against ``references``, IS)."""
    q = sample_quality(images, references if "fid" in wanted else (), extractor, inception_score="is" in wanted,
                       **kw)
    return {"sample_quality": q | {
                "about": "FID (Heusel et al. 2017) between the samples' and each reference split's features; "
                         "IS (Salimans et al. 2016) as mean ± std over splits. The paper: 50k samples, "
                         "FID 3.17 against CIFAR10 train, 5.24 against test, IS 9.46 ± 0.11."}}


def _bound_report(checkpoint, wanted: set[str], out_json: Path, dev: torch.device, *, data: str | None, split: str,
                  max_images: int | None, batch_size: int, seed: int, cache_dir, download: bool,
                  progress: bool) -> dict:
    """The report's ``checkpoint``, ``bound`` and ``rate_distortion`` sections; the per-t arrays are saved
    beside the report as ``<out_json stem>.bound.npz``."""
    loaded = load_for_sampling(checkpoint, dev)
    mc = loaded.config.model
    data = data if data is not None else loaded.config.train.dataset
    ds = bound_images(data, split, mc.image_size, mc.in_channels, cache_dir, download)
    labels = ds.labels if mc.num_classes is not None else None
    bound = dataset_nll(loaded.model, loaded.diffusion, ds, batch_size=batch_size, seed=seed, device=dev,
                        max_images=max_images, progress=progress, labels=labels)
    npz = bound.save(out_json.with_suffix(".bound.npz"))
    conditioning = (None if mc.num_classes is None else "the images' class labels: a bound on -log p(x | y)"
                    if labels is not None else "the null label (the model's unconditional half): the data "
                    "has no labels")
    out = {"checkpoint": {"path": str(checkpoint), "config": loaded.config.name, "step": loaded.step,
                          "T": loaded.diffusion.num_timesteps},
           "bound": {"data": ds.name, "split": split if data in NAMED_DATASETS else None,
                     "seed": seed, "npz": str(npz), "conditioning": conditioning, **bound.summary(),
                     "about": BOUND_ABOUT}}
    if "nll" not in wanted:
        for key in ("terms_bpd", "x0_mse"):
            out["bound"].pop(key)
    if "rd" in wanted:
        rd = rate_distortion(bound)
        out["rate_distortion"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rd.items()} | {
            "about": RD_ABOUT}
    return out


def run_eval(out_json: str | os.PathLike, *, samples: str | os.PathLike | None = None,
             checkpoint: str | os.PathLike | None = None, metrics: Iterable[str] | None = None,
             references: Sequence[tuple[str, str]] = DEFAULT_REFERENCES, data: str | None = None,
             split: str = "test", max_images: int | None = None, batch_size: int = 100, seed: int = 0,
             splits: int = 10, device: str | torch.device | None = None,
             extractor: M.FeatureExtractor | None = None, cache_dir: str | os.PathLike | None = None,
             download: bool = True, progress: bool = False) -> dict:
    """Evaluate samples and/or a checkpoint and write a JSON report to ``out_json``; returns it.

    Args:
        samples: an ``.npz`` of uint8 images [N, H, W, C] under ``images`` (or an ``.npy``), for
            ``fid`` and ``is``.
        checkpoint: a run directory, ``ema.safetensors`` or ``ckpt.safetensors`` (EMA weights),
            for ``nll`` and ``rd``.
        metrics: any of ``fid``, ``is``, ``nll``, ``rd`` (rate–distortion; shares the bound's pass
            with ``nll``). Default: fid + is with samples, nll + rd with a checkpoint.
        references: (dataset, split) pairs for FID; default CIFAR10 train (the paper's 3.17) and test.
        data, split, max_images: the images of the bound: default the checkpoint's training dataset
            (a named data set) at ``split``; or an ``.npz`` / ``.npy`` / folder of images.
        batch_size: images per batch for the feature extractor and for the bound.
        seed: the noise of the bound's x_t draws. splits: IS splits.
        device: where the model and Inception run (default CUDA when available).
        extractor: the feature extractor (default Inception, ``metrics.InceptionV3``).
        cache_dir: datasets and reference statistics (default ``data.default_cache_dir()``).
        download: allow fetching CIFAR10 and the Inception weights when missing.

    With a checkpoint, the bound's per-t arrays are also saved next to the report as
    ``<out_json stem>.bound.npz`` (``BoundResult.save``).
    """
    wanted = _wanted(metrics, samples, checkpoint)
    check_writable(Path(out_json).parent)  # before the work, not after it
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {
        "what": "ddpm_lib evaluation (Ho et al. 2020, §4): " + ", ".join(m for m in METRICS if m in wanted),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "device": _device_name(dev), "metrics": [m for m in METRICS if m in wanted],
    }
    sample_metrics = wanted & {"fid", "is", "fid_fashion"}
    images = load_samples(samples) if sample_metrics else None  # checked before any network loads
    if images is not None:
        report["samples"] = {"path": str(samples), "n": int(images.shape[0]), "shape": list(images.shape)}
    if wanted & {"fid", "is"}:
        extractor = extractor if extractor is not None else M.InceptionV3(device=dev, download=download)
        report |= _quality_report(images, wanted, references, extractor, splits=splits,
                                  batch_size=batch_size, cache_dir=cache_dir, download=download, progress=progress)
    if "fid_fashion" in wanted:
        report["sample_quality_fashion"] = fashion_quality(images, seed=seed, batch_size=batch_size,
                                                           cache_dir=cache_dir, download=download, progress=progress)
    if wanted & {"nll", "rd"}:
        report |= _bound_report(checkpoint, wanted, Path(out_json), dev, data=data, split=split,
                                max_images=max_images, batch_size=batch_size, seed=seed, cache_dir=cache_dir,
                                download=download, progress=progress)
    write_text_atomic(Path(out_json), json.dumps(report, indent=1) + "\n")
    return report
