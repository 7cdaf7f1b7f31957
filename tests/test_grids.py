"""Many images as one picture: the mosaic, and the PNG grids that training and sampling write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lib.data import to_model_range
from ddpm_lib.grids import image_grid, mosaic, save_grid, save_uint8_grid


def test_mosaic_places_each_image_between_gaps_of_background():
    images = torch.linspace(-0.9, 0.9, 16).reshape(16, 1, 1, 1).expand(16, 1, 8, 8)
    canvas = mosaic(images, 4)
    assert canvas.shape == (1, 4 * 9 + 1, 4 * 9 + 1)
    for k in range(16):
        r, c = divmod(k, 4)
        assert torch.equal(canvas[:, 1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c], images[k])
    assert (canvas[:, 0] == -1).all() and (canvas[:, :, 9] == -1).all()  # the gaps
    assert mosaic(images, 5).shape == (1, 4 * 9 + 1, 5 * 9 + 1)  # 16 images, 5 a row: 4 rows, the last short


def test_mosaic_takes_uint8_and_clamps_floats():
    u8 = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mosaic(u8, 3), mosaic(to_model_range(u8), 3))
    assert mosaic(torch.full((1, 1, 2, 2), 5.0)).max() == 1
    with pytest.raises(ValueError, match="images"):
        mosaic(torch.zeros(4, 4))


def test_grids_are_rgb_with_two_pixel_gaps_like_torchvision(tmp_path):
    from torchvision.utils import make_grid

    g = torch.Generator().manual_seed(1)
    x = to_model_range(torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8, generator=g))
    assert torch.allclose(image_grid(x, 3), make_grid((x + 1) / 2, nrow=3, padding=2), atol=1e-6)
    path = save_grid(x, tmp_path / "g" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (3 * 8 + 2, 2 * 8 + 2)
    nhwc = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with Image.open(save_uint8_grid(nhwc, tmp_path / "u.png")) as a, Image.open(path) as b:  # ⌈√5⌉ = 3 a row
        assert np.array_equal(np.asarray(a), np.asarray(b))
