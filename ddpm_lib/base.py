"""What every layer of ddpm_lib shares: the model type, where a model lives, argument checks, the version.

A *model* is any callable ``model(x_t, t)`` mapping a batch x_t [B, C, H, W] and 0-based timestep
indices t (LongTensor [B]) to a prediction of the same batch shape: an ``nn.Module`` such as
``unet.UNet``, or a plain function (the closed-form predictors of ``toy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__version__ = "0.1.0"  # the package's version, as pyproject.toml gives it

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_choice(arg: str, value: str, valid: Sequence[str]) -> None:
    """ValueError naming ``arg`` and the valid values when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"{arg}={value!r} is not valid; choose one of {tuple(valid)}")


def model_device(model: Model) -> torch.device:
    """The device of a model's parameters; CPU for a parameterless callable."""
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or "auto": CUDA if available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
