"""Random numbers: seeds derived from names, noise from one generator or one per image, and the
global generator borrowed for a block and given back.

Every random number in ddpm_lib comes from an explicit ``torch.Generator``, so a result depends on
its seeds alone. The one exception is dropout, which PyTorch draws from the global generator:
``global_seed`` seeds it for a block and restores the caller's state afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


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
