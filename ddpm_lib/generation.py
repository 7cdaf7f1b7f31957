"""Many images from one seed: ``generate``, the sampling job behind ``python -m ddpm_lib sample``.

Image i draws its x_T and every z from its own CPU generator seeded by (seed, i)
(``rng.image_generators``). An image is thus the same whatever the batch size, its position in a
batch, or whether the job was interrupted and resumed; and the same on CPU and GPU up to the network's
arithmetic. The noise of a batch is drawn on the CPU, one small ``randn`` per image, and copied to the
GPU without waiting for it (``non_blocking``), so it overlaps the network's forward pass.
With ``noise="device"`` image i's noise comes instead from ``rng.ImageNoise`` (Philox keyed by the same
per-image seed), computed on the model's device: the same promises, other streams (so other images than
``noise="cpu"`` for a seed), and no per-image work on the host. With
``out_path`` the job is resumable (``jobs.run_to_file``).

The caller's model is left as it was: it is put in eval mode for the job and its modes restored after;
when the job needs it elsewhere (another device, or channels_last for compiled CUDA sampling) it runs
on a copy.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .base import Model, model_device
from .data import to_model_range, to_uint8
from .diffusion import GaussianDiffusion
from .graphed import GraphedSampler
from .guidance import check_guidance_scale, num_classes_of, resolve_class_labels
from .jobs import OUTPUT_SUFFIXES, run_batches, run_to_file
from .precision import Autocast, check_precision, fp32_precision
from .rng import ImageNoise, image_generators
from .samplers import sample_loop, sampling_timesteps

NOISE_SOURCES = ("cpu", "device")  # where each image's noise is made (``generate``'s ``noise``)


def weights_fingerprint(model: Model) -> str:
    """SHA-256 of a module's state dict (names and bytes); a callable's class name otherwise."""
    if not isinstance(model, nn.Module):
        return type(model).__qualname__
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_shape(model: Model, image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is not None:
        return tuple(int(s) for s in image_shape)
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("image_shape is required for a model without a .config (C, H, W)")
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def _same_device(a: torch.device, b: torch.device) -> bool:
    current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return a.type == b.type and (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current)


@contextmanager
def sampling_model(model: Model, device: torch.device, channels_last: bool = False) -> Iterator[Model]:
    """``model`` ready to sample on ``device`` in eval mode (dropout would break the seed's promise),
    without changing the caller's model: a copy when it must move or change memory format, and the
    training flags of its modules restored afterwards."""
    if not isinstance(model, nn.Module):
        yield model
        return
    net = model
    if not _same_device(model_device(model), device) or channels_last:
        net = copy.deepcopy(model).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, training in modes:
            m.train(training)


def _check_args(n: int, chunk_size: int, batch_size: int | None, seed: int, out_path) -> None:
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    for name, value, low in (("chunk_size", chunk_size, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if out_path is not None and Path(out_path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"out_path {out_path}: the suffix must be one of {OUTPUT_SUFFIXES}")


def _noise(source: str, seed: int, indices: Sequence[int], device: torch.device):
    """The images' noise: one CPU generator each, or ``ImageNoise`` on ``device``, keyed by (seed, index)."""
    return image_generators(seed, indices) if source == "cpu" else ImageNoise.for_images(seed, indices, device)


def _labels(model: Model, class_labels, guidance_scale: float, n: int) -> Tensor | None:
    """Image i's class (``guidance.resolve_class_labels``), or None for unconditional sampling."""
    num_classes = num_classes_of(model)
    if num_classes is None and (class_labels is not None or guidance_scale != 0):
        raise ValueError("class labels (--class-label) and guidance (--guidance-scale) need a class-conditional "
                         "checkpoint; this model is unconditional (no num_classes in its config)")
    if class_labels is None:
        if guidance_scale != 0:
            raise ValueError(f"guidance_scale={guidance_scale:g} needs class_labels (--class-label): guidance "
                             "steers towards a class")
        return None
    return resolve_class_labels(class_labels, n, num_classes)


def _job(model: Model, diffusion: GaussianDiffusion, n: int, tau: list[int], labels: Tensor | None,
         shape: tuple[int, int, int], **args) -> dict:
    """What determines the images of a job (written to, and checked against, ``<out>.partial/job.json``)."""
    job = {"format": "ddpm_lib-samples", "version": 1, "n": n, "chunk_size": args["chunk_size"],
           "sampler": args["sampler"], "steps": len(tau),
           "spacing": args["spacing"] if args["sampler"] == "ddim" else None, "eta": float(args["eta"]),
           "seed": args["seed"], "clip_denoised": args["clip_denoised"], "precision": args["precision"],
           "image_shape": list(shape), "T": diffusion.num_timesteps, "weights": weights_fingerprint(model)}
    if args["compile"]:  # only when set, so that jobs without it keep their old description
        job["compile"] = True
    if args["graph"]:  # likewise
        job["graph"] = True
    if args["noise"] != "cpu":  # likewise
        job["noise"] = args["noise"]
    if labels is not None:  # only for conditional jobs, so unconditional jobs keep their old description
        job["class_labels"] = hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest()
        job["guidance_scale"] = args["guidance_scale"]
    return job


def _batch_sampler(diffusion: GaussianDiffusion, net: Model, shape: tuple[int, int, int], labels: Tensor | None,
                   device: torch.device, precision: str, noise: str, seed: int, graph: bool, progress: bool,
                   **sampling):
    """``generate``'s batch function: images ``indices`` as uint8 [b, H, W, C], by ``samplers.sample_loop`` or,
    with ``graph``, by a ``GraphedSampler`` (one per batch size). ``sampling``: the sampler's own arguments."""
    graphed: dict[int, GraphedSampler] = {}

    def sample(indices: Sequence[int]) -> np.ndarray:
        y = None if labels is None else labels[list(indices)].to(device)
        with fp32_precision(precision):
            if graph:
                b = len(indices)
                if b not in graphed:
                    graphed[b] = GraphedSampler(diffusion, net, (b, *shape), conditional=y is not None,
                                                device=device, **sampling)
                x = graphed[b](ImageNoise.for_images(seed, indices).keys, y=y)
            else:
                x = sample_loop(diffusion, net, (len(indices), *shape), generator=_noise(noise, seed, indices, device),
                                device=device, y=y, progress=progress, **sampling)  # a bar over each batch's steps
        return to_uint8(x.float()).permute(0, 2, 3, 1).cpu().numpy()

    return sample


def generate(model: Model, diffusion: GaussianDiffusion, n: int, *, sampler: str = "ddpm",
             steps: int | None = None, spacing: str = "uniform", eta: float = 0.0, seed: int = 0,
             batch_size: int | None = None, device: torch.device | str | None = None, precision: str = "fp32",
             clip_denoised: bool = True, image_shape: Sequence[int] | None = None,
             out_path: str | Path | None = None, chunk_size: int = 1000, progress: bool = True,
             class_labels: int | str | Sequence[int] | Tensor | None = None, guidance_scale: float = 0.0,
             compile: bool = False, noise: str = "cpu", graph: bool = False) -> Tensor:
    """``n`` images as uint8 [n, H, W, C] (CPU), the same for a given seed whatever ``batch_size``.

    ``sampler``, ``steps``, ``spacing``, ``eta`` as in ``samplers.sample_loop``. The model runs on ``device``
    (default: where its weights are) in eval mode, in ``precision`` (fp32, tf32 or bf16 autocast),
    ``batch_size`` images at a time (default min(n, chunk_size)); ``image_shape`` (C, H, W) defaults to
    ``model.config``. With ``out_path`` (``.npz``: ``images`` and the ``job``, plus a grid of the first 64
    beside it; ``.png``: a grid of all) the job runs in resumable chunks of ``chunk_size`` (``jobs``).

    A class-conditional model samples image i from class ``class_labels[i]``: one int for all, ``"cycle"``
    (i mod K) or n labels, with classifier-free guidance of strength ``guidance_scale`` (w ≥ 0); without
    labels it samples its unconditional half (the null label ∅). ``compile=True`` runs the network through
    ``torch.compile`` (on CUDA with channels_last, as in training): in ``benchmarks/bench.py``'s sampling
    loop that took 256 cifar10 images × 1000 steps from 34.5 s to 11.8 s in bf16 on one H200. Compiled
    kernels round differently from eager ones, so labels, guidance and compile enter the job. ``noise``: "cpu"
    (per-image CPU generators, the default) or "device" (``rng.ImageNoise`` on ``device``; see above).
    ``graph=True`` (CUDA, with ``noise="device"``) replays each sampling step from a CUDA graph
    (``graphed.GraphedSampler``, one per batch size), the same images up to the rounding of autotuned kernels.
    """
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
    _check_args(n, chunk_size, batch_size, seed, out_path)
    device = torch.device(device) if device is not None else model_device(model)
    if graph and noise != "device":
        raise ValueError('graph=True needs noise="device": per-image CPU generators cannot be captured in a graph')
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True needs a CUDA device, got {device}")
    check_precision(precision)
    tau = sampling_timesteps(diffusion.num_timesteps, sampler, steps, None, spacing, eta)
    guidance_scale = check_guidance_scale(guidance_scale)
    labels = _labels(model, class_labels, guidance_scale, n)
    shape = _image_shape(model, image_shape)
    batch_size = batch_size or min(n, chunk_size)
    with sampling_model(model, device, channels_last=compile and device.type == "cuda") as net:
        net = torch.compile(net, dynamic=False) if compile else net
        net = Autocast(net, device.type, torch.bfloat16) if precision == "bf16" else net

        sample = _batch_sampler(diffusion, net, shape, labels, device, precision, noise, seed, graph, progress,
                                sampler=sampler, steps=steps, spacing=spacing, eta=eta, clip_denoised=clip_denoised,
                                guidance_scale=guidance_scale)
        if out_path is None:
            return torch.from_numpy(run_batches(sample, list(range(n)), batch_size, progress, 0, n))
        job = _job(model, diffusion, n, tau, labels, shape, chunk_size=chunk_size, sampler=sampler, spacing=spacing,
                   eta=eta, seed=seed, clip_denoised=clip_denoised, precision=precision, compile=compile,
                   guidance_scale=guidance_scale, noise=noise, graph=graph)
        return torch.from_numpy(run_to_file(Path(out_path), job, sample, batch_size, progress))


def sample_images(model: nn.Module, diffusion: GaussianDiffusion, n: int, *, batch_size: int | None = None,
                  seed: int = 0, progress: bool = False, class_labels=None,
                  guidance_scale: float = 0.0) -> Tensor:
    """``n`` samples of Algorithm 2 as a CPU float tensor [n, C, H, W] on the 256 levels of [-1, 1]:
    ``generate`` with ``sampler="ddpm"``, so the images do not depend on ``batch_size`` (default all at once).
    ``class_labels`` and ``guidance_scale`` are for a class-conditional model (see ``generate``)."""
    images = generate(model, diffusion, n, sampler="ddpm", seed=seed, batch_size=batch_size, progress=progress,
                      class_labels=class_labels, guidance_scale=guidance_scale)
    return to_model_range(images.permute(0, 3, 1, 2))
