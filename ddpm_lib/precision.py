"""Numeric precision on the GPU: fp32, TF32 and bf16 autocast, in one place.

``"fp32"`` is true IEEE fp32 (PyTorch lets cuDNN use TF32 for convolutions by default; here it
does not), ``"tf32"`` lets fp32 matmuls and convolutions use TF32 tensor cores, and ``"bf16"``
runs the network's forward under bf16 autocast while weights, loss and optimizer stay fp32.
On the CPU only bf16 autocast changes anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "tf32", "bf16")
_NEW_API = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9; the two APIs must not be mixed


def _get() -> tuple:
    if _NEW_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set(state: tuple) -> None:
    if _NEW_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def _state_for(precision: str) -> tuple:
    tf32 = precision != "fp32"
    if _NEW_API:
        mode = "tf32" if tf32 else "ieee"
        return mode, mode
    return tf32, tf32


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")


def set_fp32_precision(device: torch.device, precision: str) -> None:
    """On CUDA, allow TF32 tensor cores for fp32 matmuls/convs only when ``precision`` is not "fp32"."""
    check_precision(precision)
    if device.type == "cuda":
        _set(_state_for(precision))


@contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """``set_fp32_precision`` for a block, restoring the previous setting afterwards."""
    check_precision(precision)
    saved = _get()
    _set(_state_for(precision))
    try:
        yield
    finally:
        _set(saved)


class Autocast(nn.Module):
    """Runs ``net`` under autocast (bf16) and returns float32, so the loss is computed in fp32."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    @property
    def config(self):
        """The wrapped network's config (None for a network without one)."""
        return getattr(self.net, "config", None)

    def forward(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        if self.dtype is None:
            return self.net(x, t, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.net(x, t, *args, **kwargs)
        return out.float()


@contextmanager
def training_backends(device: torch.device, precision: str) -> Iterator[None]:
    """For a training run on ``device``: the TF32 setting of ``precision`` (``fp32_precision``) and, on CUDA,
    cuDNN's autotuner (``cudnn.benchmark``: pick the fastest convolution algorithms once, for the run's
    fixed shapes); both restored afterwards."""
    check_precision(precision)
    saved_benchmark = torch.backends.cudnn.benchmark
    with fp32_precision(precision if device.type == "cuda" else "fp32"):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved_benchmark
