"""Random numbers: seeds derived from names, noise from one generator or one per image, and the
global generator borrowed for a block and given back.

``ImageNoise`` is the per-image noise computed on the device instead: a counter-based generator
(Philox4x32-10, Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") keyed by each image's
seed, so that image i's noise is still a function of (seed, i, draw) alone, whatever the batch, but is made
by tensor arithmetic on the images' device: no per-image loop on the host, no host-to-device copy, and a step
that can be captured in a CUDA graph (the draw counter is a device tensor that the step advances).

Every random number in ddpm_lib comes from an explicit ``torch.Generator``, so a result depends on
its seeds alone. The one exception is dropout, which PyTorch draws from the global generator:
``global_seed`` seeds it for a block and restores the caller's state afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

Generators = "torch.Generator | Sequence[torch.Generator] | ImageNoise | None"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", step, rank).

    NumPy's ``SeedSequence`` hashes the entropy, so neighbouring steps get unrelated streams.
    """
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) noise of ``shape`` on ``device``: drawn from one generator (on its own device), or from a
    list with one generator per batch row (image i's noise then depends on its generator alone)."""
    shape = tuple(shape)
    if isinstance(generator, ImageNoise):
        return generator.randn(shape).to(device=device, dtype=dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        z = torch.empty(shape, device=generator[0].device)
        for z_i, g in zip(z, generator, strict=True):
            torch.randn(shape[1:], generator=g, out=z_i)
    else:
        gdev = generator.device if generator is not None else device
        z = torch.randn(shape, generator=generator, device=gdev)
    return z.to(device=device, dtype=dtype, non_blocking=True)


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index): image i's noise stream."""
    return [torch.Generator().manual_seed(derive_seed(seed, "image", int(i))) for i in indices]


@contextmanager
def global_seed(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed PyTorch's global generators (CPU, and ``device``'s when it is a GPU) for the block, then put
    the caller's states back: what the block draws (dropout, ``nn.Module`` initialization) depends on
    ``seed`` alone, and the caller's random stream is as it was."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- counter-based noise

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key increments (golden ratio, √3 − 1)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high 32-bit words of a·m, for int64 tensors a of 32-bit values and a 32-bit constant m,
    in 16-bit limbs so that no intermediate leaves int64's range."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    m_lo, m_hi = m & 0xFFFF, m >> 16
    lo_lo = a_lo * m_lo
    mid = a_hi * m_lo + a_lo * m_hi  # < 2^33
    lo = (lo_lo + ((mid & 0xFFFF) << 16)) & _MASK32
    carry = (lo_lo + ((mid & 0xFFFF) << 16)) >> 32
    hi = (a_hi * m_hi + (mid >> 16) + carry) & _MASK32
    return lo, hi


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 with ``rounds`` rounds: four 32-bit words (int64 tensors, broadcast together) of the
    counter and two of the key in, four 32-bit words out (Random123's ``philox4x32_10`` for 10 rounds)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        lo0, hi0 = _mulhilo(c0, _PHILOX_M[0])
        lo1, hi1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


class ImageNoise:
    """N(0, I) noise for a batch of images, image i's from its key alone: draw d of image i, element j, is a
    function of (key_i, d, j). Keys are the 63-bit ``derive_seed(seed, "image", i)``, as ``image_generators``
    uses; the streams differ from those generators' (another algorithm), not their properties.

    Each ``randn`` call is one draw: counter (j // 4, d, 0, 0) with key (low, high word of key_i) gives four
    words, which make four uniforms on (0, 1) (24 bits each, offset by half a step) and, by Box–Muller, four
    normals (cos and sin of two pairs). ``draw`` is a device tensor, advanced in place by each call, so a
    CUDA graph that contains the call draws afresh at every replay.
    """

    def __init__(self, keys: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"):
        keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
        if keys.numel() == 0 or bool((keys < 0).any()):
            raise ValueError("ImageNoise needs one non-negative 63-bit key per image")
        self.device = torch.device(device)
        self.keys = keys.to(self.device)
        self.draw = torch.zeros((), dtype=torch.int64, device=self.device)

    @classmethod
    def for_images(cls, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> ImageNoise:
        """The noise of images ``indices`` of a job seeded by ``seed`` (the keys of ``image_generators``)."""
        return cls([derive_seed(seed, "image", int(i)) for i in indices], device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """The next draw: float32 noise of ``shape`` [B, …] on the keys' device, B the number of keys."""
        shape = tuple(shape)
        if not shape or shape[0] != self.keys.numel():
            raise ValueError(f"ImageNoise holds {self.keys.numel()} images, asked for shape {shape}")
        per_image = math.prod(shape[1:])
        blocks = torch.arange((per_image + 3) // 4, device=self.device, dtype=torch.int64)
        k0 = (self.keys & _MASK32)[:, None]
        k1 = (self.keys >> 32)[:, None]
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        words = philox4x32((blocks[None, :], self.draw.expand(1, 1), zero, zero), (k0, k1))
        u = [((w >> 8).to(torch.float32) + 0.5) * 2.0**-24 for w in words]  # in (0, 1)
        radius = [torch.sqrt(-2.0 * torch.log(u[0])), torch.sqrt(-2.0 * torch.log(u[2]))]
        angle = [2.0 * math.pi * u[1], 2.0 * math.pi * u[3]]
        z = torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                         radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])], dim=-1)
        self.draw.add_(1)
        return z.reshape(len(self.keys), -1)[:, :per_image].reshape(shape)
