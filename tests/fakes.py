"""What several test files share: data the tests write themselves (no downloads), the paper's
diffusion, and a tiny stand-in network."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.configs import Config, ModelConfig, TrainConfig
from ddpm_lib.rng import global_seed


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



def paper_diffusion(**kw) -> GaussianDiffusion:
    """The paper's schedule (linear β, T = 1000) with the given mean, variance and loss types."""
    return GaussianDiffusion(make_beta_schedule("linear", 1000), **kw)


class TinyNet(nn.Module):
    """A stand-in for ε_θ with few parameters: a conv over x (through tanh when ``squash``, which keeps a
    sampler's x_t bounded) plus a learned per-timestep bias; initialized from ``seed``."""

    def __init__(self, T: int, c_in: int = 3, c_out: int = 3, seed: int = 0, squash: bool = False) -> None:
        super().__init__()
        with global_seed(seed):
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            self.emb = nn.Embedding(T, c_out)
        self.squash = squash

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return (torch.tanh(h) if self.squash else h) + self.emb(t)[:, :, None, None]


def digits_config(conditional: bool = False, steps: int = 4, batch_size: int = 16, **train: object) -> Config:
    """A 1.0M-parameter UNet for scikit-learn's bundled 8×8 digits (T = 1000, the paper's β, ε-prediction):
    real labelled data that trains in seconds without any package beyond scikit-learn, for the tests of the
    training path. ``conditional`` adds the 10 classes (label dropout 0.1)."""
    model = ModelConfig(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2,
                        attn_resolutions=(4,), dropout=0.1, num_groups=8, num_classes=10 if conditional else None)
    return Config("digits_cond" if conditional else "digits", model=model,
                  train=TrainConfig(**{"dataset": "digits", "batch_size": batch_size, "lr": 1e-3, "warmup": 200,
                                       "ema_decay": 0.999, "steps": steps, "random_flip": False, **train}))


def without_timings(obj):
    """A study's results with every ``"seconds"`` (wall time, the one thing a rerun changes) left out."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def run_study_twice(main, args: list[str], tmp_path: Path) -> tuple[dict, dict, list[Path]]:
    """A study's command (``main``) run twice with ``args``, into two files: both results without their
    timings, and the two paths."""
    import json

    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        assert main([*args, "--out", str(path)]) == 0
    a, b = (without_timings(json.loads(path.read_text(encoding="utf8"))) for path in paths)
    return a, b, paths
