"""The one way to get a network ready to sample: from a run directory or checkpoint, from the paper's
released weights by name, or one of the book's models that ship inside the package.

``load_for_sampling`` returns a ``LoadedModel``: the EMA network (eval mode), its ``GaussianDiffusion``,
the config and the training step. The sampling CLI, the evaluation and the book all load through it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import pretrained
from .base import resolve_device
from .configs import Config, get_config
from .diffusion import GaussianDiffusion
from .unet import UNet

WEIGHTS_DIR = Path(__file__).parent / "weights"
BOOK_MODELS = ("fashion", "fashion_cond")


@dataclass
class LoadedModel:
    """EMA weights ready for Algorithm 2: the network, its diffusion, the config and the step."""

    model: UNet
    diffusion: GaussianDiffusion
    config: Config
    step: int


def load_for_sampling(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedModel:
    """The EMA model of a run directory, an ``ema.safetensors`` or a ``ckpt.safetensors`` (eval mode);
    or, when ``path`` is not a local file and names released weights (``pretrained.PRETRAINED``,
    e.g. "google/ddpm-cifar10-32", with the diffusion of the config listed there), those weights from the Hub
    (``pretrained.load_pretrained``; online the first time) with ``step`` −1 (unknown)."""
    device = resolve_device(device)
    if str(path) in pretrained.PRETRAINED and not os.path.exists(path):
        model = pretrained.load_pretrained(str(path))
        base = get_config(pretrained.PRETRAINED[str(path)]["config"])
        cfg = dataclasses.replace(base, name=str(path), model=model.config)
        return LoadedModel(model.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion), cfg, -1)
    weights, cfg, step = ckpt_io.ema_state_dict(path)
    broken = [name for name, w in weights.items() if w.is_floating_point() and not bool(torch.isfinite(w).all())]
    if broken:
        raise ckpt_io.CheckpointError(
            f"{path}: {len(broken)} of its {len(weights)} weight tensors hold NaN or infinite values (e.g. "
            f"{broken[0]}): the run diverged before this checkpoint; use an earlier one (--keep-every keeps copies)")
    model = UNet.from_config(cfg.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ckpt_io.CheckpointError(f"{path}: the weights do not fit config {cfg.name!r}: {e}") from e
    return LoadedModel(model.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion), cfg, step)


def load_book_model(device: str | torch.device = "cpu", name: str = "fashion") -> LoadedModel:
    """One of the book's small models, EMA weights, trained on Fashion-MNIST (28×28, grey) by
    ``tools/train_book_model.py``: ``"fashion"`` (1.1M parameters, T = 1000, the paper's β, ε-prediction,
    σ² = β_t) or ``"fashion_cond"`` (the same network conditioned on the 10 classes, for classifier-free
    guidance).

    They ship inside the package (``ddpm_lib/weights/``), so they load offline and in Colab.
    """
    if name not in BOOK_MODELS:
        raise ValueError(f"name={name!r} is not a book model; choose one of {BOOK_MODELS}")
    return load_for_sampling(WEIGHTS_DIR / f"{name}.safetensors", device)
