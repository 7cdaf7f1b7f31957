"""Counter-based per-image noise (ddpm_lib.rng.ImageNoise, Philox4x32-10): Random123's known answers, normal
statistics, image i's noise a function of (seed, i, draw) alone, and generate(noise="device") keeping
generate's promises."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.generation import generate
from ddpm_lib.rng import ImageNoise, derive_seed, philox4x32, randn
from ddpm_lib.samplers import sample_loop


@pytest.mark.parametrize("counter, key, want", [  # Random123's kat_vectors for philox4x32_10
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_gives_random123_s_known_answers(counter, key, want) -> None:
    assert [int(w) for w in philox4x32(counter, key)] == want


def test_the_noise_is_standard_normal_and_uncorrelated() -> None:
    noise = ImageNoise.for_images(3, range(64))
    z = noise.randn((64, 3, 16, 16))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    z = z.double()
    flat = z.reshape(-1)  # 49,152 values
    assert abs(flat.mean().item()) < 0.02 and abs(flat.var().item() - 1) < 0.02
    assert abs(((flat**4).mean() - 3).item()) < 0.1  # the normal's kurtosis, not a uniform's or a sum's
    probs = torch.distributions.Normal(0.0, 1.0).cdf(torch.sort(flat).values)  # Kolmogorov–Smirnov
    ks = (probs - torch.arange(1, len(flat) + 1, dtype=torch.float64) / len(flat)).abs().max().item()
    assert ks < 1.63 / math.sqrt(len(flat))  # the 1% critical value
    a, b = z[:, 0].reshape(64, -1), z[:, 1].reshape(64, -1)  # neighbouring channels, neighbouring images
    assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(torch.stack([z[0].reshape(-1), z[1].reshape(-1)]))[0, 1].item()) < 0.08
    again = noise.randn((64, 3, 16, 16))  # the next draw is another one
    assert abs(torch.corrcoef(torch.stack([z.reshape(-1).float(), again.reshape(-1)]))[0, 1].item()) < 0.03


def test_an_image_s_noise_depends_on_its_seed_index_and_draw_alone() -> None:
    big = ImageNoise.for_images(7, [0, 1, 2, 3, 4])
    draws = [big.randn((5, 3, 5, 5)) for _ in range(3)]
    small = ImageNoise.for_images(7, [3, 1])  # other batch, other order, same images
    for d in range(3):
        assert torch.equal(small.randn((2, 3, 5, 5)), draws[d][[3, 1]])
    assert int(big.draw) == 3  # one draw per call, kept on the device
    other = ImageNoise.for_images(8, [0, 1, 2, 3, 4]).randn((5, 3, 5, 5))
    assert not torch.isclose(other, draws[0]).any(dim=(1, 2, 3)).all()
    assert len({tuple(img.reshape(-1)[:8].tolist()) for img in draws[0]}) == 5
    assert torch.equal(ImageNoise([derive_seed(7, "image", 2)]).randn((1, 75)), draws[0][2:3].reshape(1, 75))
    # rng.randn takes it wherever a generator goes, and an odd element count is cut from whole blocks
    assert randn((5, 7), ImageNoise.for_images(7, range(5)), "cpu", torch.float64).shape == (5, 7)


def test_bad_keys_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="one non-negative 63-bit key per image"):
        ImageNoise([])
    with pytest.raises(ValueError, match="one non-negative 63-bit key per image"):
        ImageNoise([-1])
    with pytest.raises(ValueError, match="holds 2 images, asked for shape"):
        ImageNoise.for_images(0, [0, 1]).randn((3, 4))


class TinyNet(torch.nn.Module):
    """A fixed ε-predictor with a dependence on x and t, enough to carry the noise to the images."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.01 * t.float()[:, None, None, None] / 30


def test_generate_on_device_noise_keeps_its_promises(tmp_path) -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 30))
    shape, kw = (3, 8, 8), dict(sampler="ddim", steps=4, eta=0.5, image_shape=(3, 8, 8), progress=False)
    a = generate(TinyNet(), d, 5, seed=0, batch_size=2, noise="device", **kw)
    b = generate(TinyNet(), d, 5, seed=0, batch_size=5, noise="device", **kw)
    cpu = generate(TinyNet(), d, 5, seed=0, batch_size=5, **kw)
    assert torch.equal(a, b) and not torch.equal(a, cpu)  # batch-independent; other streams than "cpu"
    x = sample_loop(d, TinyNet(), (1, *shape), sampler="ddim", steps=4, eta=0.5,
                    generator=ImageNoise.for_images(0, [4]))  # image 4 alone, from its own noise
    from ddpm_lib.data import to_uint8
    assert torch.equal(a[4:5], to_uint8(x).permute(0, 2, 3, 1))
    out = tmp_path / "s.npz"
    generate(TinyNet(), d, 3, noise="device", out_path=out, **kw)
    assert json.loads(str(np.load(out)["job"]))["noise"] == "device"  # a resumed job cannot mix the two
    with pytest.raises(ValueError, match="noise must be one of"):
        generate(TinyNet(), d, 3, noise="gpu", **kw)
