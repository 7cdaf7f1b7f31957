"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598).

Beyond the paper: one network ε_θ(x_t, t, y) is trained on labelled images, with the label replaced by
the null label ∅ a fraction of the time (``TrainConfig.label_drop``; ``train.drop_labels``), so it
predicts both the conditional ε_θ(x_t, y) and the unconditional ε_θ(x_t, ∅). Sampling then uses
(Ho & Salimans, eq. 6)

    ε̃_θ(x_t, y) = (1 + w) ε_θ(x_t, y) − w ε_θ(x_t, ∅),

with guidance strength w ≥ 0: w = 0 is plain conditional sampling, larger w trades diversity for
samples more typical of their class. This is the convention of Ho & Salimans; others (GLIDE, Imagen,
diffusers' ``guidance_scale``) write s = 1 + w, ε̃ = ε(x, ∅) + s (ε(x, y) − ε(x, ∅)), so their s = 1 is
our w = 0.

``Guided`` wraps a conditional network into a plain ``model(x_t, t)``. It is applied in one place, the
sampling loop (``samplers.sample_loop``, Algorithm 2 and DDIM alike, which every other sampler calls),
so the steps guide without knowing about it. The conditional and unconditional predictions come from one forward
pass over the batch doubled. The combination is applied to the network's mean output (its first C
channels); a learned variance, if any, is taken from the conditional half. For every mean type the
combination equals guidance on ε: ε̂ is an affine function of the output (x̂_0, v or μ̃) whose weights
on the output and on x_t do not depend on y, and (1 + w) − w = 1, so combining outputs and combining
the ε̂ derived from them give the same ε̃ (before x̂_0 is clipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_guidance_scale(scale: float) -> float:
    """``scale`` as a float; ValueError unless it is a finite number ≥ 0 (w of Ho & Salimans, eq. 6)."""
    try:
        w = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale={scale!r} must be a number >= 0") from None
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance_scale={scale!r} must be a finite number >= 0 (w = 0: no guidance; "
                         "Ho & Salimans' w, i.e. s − 1 in the s = 1 + w convention)")
    return w


def num_classes_of(model: nn.Module) -> int | None:
    """``model.config.num_classes`` (None for an unconditional network or a callable without a config)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "num_classes", None)


class Guided(nn.Module):
    """ε̃_θ(x_t, t) = (1 + w) ε_θ(x_t, t, y) − w ε_θ(x_t, t, ∅) (Ho & Salimans 2022, eq. 6) as a model.

    Args:
        model: a class-conditional network ``model(x, t, y=…)``, e.g. a ``UNet`` with ``num_classes``.
        y: the class of each image, an integer tensor [B] (or one int for all images).
        scale: the guidance strength w ≥ 0; w = 0 calls ``model(x, t, y=y)`` once and returns it unchanged.
        null_label: the index of ∅; default ``model.config.num_classes``.

    ``forward(x, t)`` returns the guided output, of the network's shape; ``.config`` is the network's.
    """

    def __init__(self, model: nn.Module, y: Tensor | int, scale: float = 0.0, null_label: int | None = None):
        super().__init__()
        if null_label is None:
            null_label = num_classes_of(model)
        if null_label is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes set); "
                             "this one is unconditional")
        self.model, self.scale, self.null_label = model, check_guidance_scale(scale), int(null_label)
        if isinstance(y, Tensor):
            if y.dtype not in (torch.int64, torch.int32) or y.ndim != 1:
                raise ValueError(f"y must be an integer tensor [B] of class labels, got {y.dtype} {list(y.shape)}")
        elif not isinstance(y, int) or isinstance(y, bool):
            raise ValueError(f"y must be an integer tensor [B] or an int, got {type(y).__name__}")
        self.y = y

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def labels(self, batch: int, device: torch.device) -> Tensor:
        """y as a LongTensor [batch] on ``device``."""
        if isinstance(self.y, int):
            return torch.full((batch,), self.y, dtype=torch.long, device=device)
        if self.y.shape[0] != batch:
            raise ValueError(f"y has {self.y.shape[0]} labels for a batch of {batch} images")
        return self.y.to(device=device, dtype=torch.long)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        y = self.labels(x.shape[0], x.device)
        if self.scale == 0:
            return self.model(x, t, y=y)
        w, B, C = self.scale, x.shape[0], x.shape[1]
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = out[:B], out[B:]
        guided = (1 + w) * cond[:, :C] - w * uncond[:, :C]
        return torch.cat([guided, cond[:, C:]], dim=1) if cond.shape[1] > C else guided


def guided(model, y: Tensor | int | None, scale: float = 0.0, null_label: int | None = None):
    """``model`` itself when ``y`` is None (and ``scale`` is 0), else ``Guided(model, y, scale, null_label)``."""
    if y is None:
        if check_guidance_scale(scale) != 0:
            raise ValueError(f"guidance_scale={scale} needs class labels y (guidance steers towards a class)")
        return model
    return Guided(model, y, scale, null_label)


def resolve_class_labels(class_labels: int | str | Sequence[int] | Tensor, n: int, num_classes: int) -> Tensor:
    """The class of each of ``n`` images as a LongTensor [n]: one int for all, ``"cycle"`` for
    0, 1, …, K−1, 0, 1, … (image i gets i mod K), or a sequence of exactly n labels. Each in 0 … K−1."""
    if isinstance(class_labels, str):
        if class_labels != "cycle":
            raise ValueError(f"class_labels={class_labels!r}: the only name accepted is 'cycle'")
        labels = torch.arange(n) % num_classes
    elif isinstance(class_labels, int) and not isinstance(class_labels, bool):
        labels = torch.full((n,), class_labels, dtype=torch.long)
    else:
        labels = torch.as_tensor(class_labels)
        if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != (n,):
            raise ValueError(f"class_labels must be an int, 'cycle' or {n} integer labels, "
                             f"got {labels.dtype} {list(labels.shape)}")
        labels = labels.to(torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class_labels must lie in 0 … {num_classes - 1}, got values from {int(labels.min())} "
                         f"to {int(labels.max())}")
    return labels
