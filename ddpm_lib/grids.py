"""Many images as one picture: a mosaic tensor, and the PNG grids that training and sampling write.

``mosaic`` lays images [n, C, H, W] out on a canvas with gaps between them; ``save_grid`` writes such a
canvas as a PNG (RGB, as torchvision's ``save_image`` would), ``save_uint8_grid`` the same from uint8
images [n, H, W, C] as the samplers return them. The book's figures use ``mosaic`` too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import to_model_range, to_uint8


def mosaic(images: Tensor | np.ndarray, ncol: int | None = None, gap: int = 1, background: float = -1.0) -> Tensor:
    """Images [n, C, H, W] (floats in [−1, 1], or uint8) → one float canvas [C, H', W'] in [−1, 1]:
    ``ncol`` per row (default ⌈√n⌉), ``gap`` pixels of ``background`` around and between them."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    x = to_model_range(x) if x.dtype == torch.uint8 else x.detach().float().cpu().clamp(-1, 1)
    if x.ndim != 4:
        raise ValueError(f"expected images [n, C, H, W], got shape {list(x.shape)}")
    n, C, H, W = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    rows = (n + ncol - 1) // ncol
    canvas = torch.full((C, rows * (H + gap) + gap, ncol * (W + gap) + gap), float(background))
    for k, img in enumerate(x):
        r, c = divmod(k, ncol)
        top, left = gap + r * (H + gap), gap + c * (W + gap)
        canvas[:, top:top + H, left:left + W] = img
    return canvas


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Images in [-1, 1] [n, C, H, W] → one RGB grid [3, H', W'] in [0, 1], ``nrow`` per row (default ⌈√n⌉),
    2 black pixels between them (for TensorBoard)."""
    n = images.shape[0]
    grid = mosaic(images, min(nrow or math.ceil(math.sqrt(n)), n), gap=2 if n > 1 else 0)
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    return (grid + 1) / 2


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] [n, C, H, W] as one PNG grid (see ``image_grid``)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(image_grid(images, nrow) * 2 - 1).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


def save_uint8_grid(images: np.ndarray | Tensor, path: str | os.PathLike) -> Path:
    """uint8 images [n, H, W, C] as one PNG grid."""
    images = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return save_grid(images, path)
