"""Test data that the tests write themselves (no downloads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_fake_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR10's documented ``cifar-10-batches-py`` layout under ``root``: 5 training batches and the
    test batch of ``per_batch`` random images each. Returns (train, test) as uint8 [N, 3, 32, 32]."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {name: rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, r in rows.items():
        batch = {b"batch_label": b"fake", b"data": r, b"labels": [0] * per_batch,
                 b"filenames": [b"x.png"] * per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    train = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    return train, rows["test_batch"].reshape(-1, 3, 32, 32)
