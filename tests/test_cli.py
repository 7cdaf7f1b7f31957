"""The command line: train, resume, sample, and errors that name the offending argument."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture
def cifar_cache(tmp_path_factory, monkeypatch):
    """A fake CIFAR10 in the cifar-10-batches-py format, found through $DDPM_LIB_CACHE."""
    root = tmp_path_factory.mktemp("cache")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        rows = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0] * 8}, f, protocol=2)
    monkeypatch.setenv("DDPM_LIB_CACHE", str(root))
    return root


def test_train_resume_further_then_sample(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--steps", "2", *FAST]) == 0
    assert ckpt_io.read_checkpoint(run / "ckpt.safetensors").step == 2
    # --steps is the run's total: resuming with a larger N continues from 2 to 3
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", *FAST]) == 0
    assert ckpt_io.read_checkpoint(run / "ckpt.safetensors").step == 3
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--n", "4", "--batch-size", "2", "--out", str(grid),
                 "--device", "cpu", "--no-progress"]) == 0
    with Image.open(grid) as im:
        assert im.size == (38, 38)  # 2×2 tiny 16×16 images with 2-pixel padding
    assert "EMA, step 3" in capsys.readouterr().out


def test_train_on_a_folder_of_images(tmp_path):
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--steps", "1", "--batch-size", "4",
                 "--data", str(tmp_path / "images"), "--num-workers", "0", *FAST]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["dataset"] == str((tmp_path / "images").resolve()) and cfg["train"]["batch_size"] == 4


@pytest.mark.parametrize("argv, arg", [
    (["train", "--config", "nope", "--out", "x"], "--config"),
    (["train", "--config", "tiny", "--out", "x", "--steps", "-5"], "--steps"),
    (["train", "--config", "tiny", "--out", "x", "--precision", "fp8"], "--precision"),
    (["train", "--config", "tiny", "--out", "x", "--lr", "0"], "--lr"),
    (["train", "--config", "tiny", "--out", "x", "--batch-size", "many"], "--batch-size"),
    (["train", "--config", "tiny"], "--out"),
    (["sample", "--checkpoint", "x", "--n", "0"], "--n"),
])
def test_bad_arguments_exit_with_a_message_naming_them(argv, arg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and arg in err.split("error:", 1)[1]


def test_new_run_in_a_non_empty_directory_is_refused(tmp_path, cifar_cache, capsys):
    (tmp_path / "old.txt").write_text("x")
    assert main(["train", "--config", "tiny", "--out", str(tmp_path), "--steps", "1", *FAST]) == 1
    assert "is not empty" in capsys.readouterr().err


def test_resume_that_would_change_the_model_is_refused(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--steps", "1", *FAST]) == 0
    assert main(["train", "--config", "small", "--out", str(run), "--resume", "--steps", "2", *FAST]) == 1
    assert "cannot resume: the model config differs" in capsys.readouterr().err


def test_missing_config_or_checkpoint_are_clear_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), *FAST]) == 1
    assert "--config is required" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", *FAST]) == 1
    assert "not a ddpm_lib run directory" in capsys.readouterr().err
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["sample", "--checkpoint", str(bogus), "--out", str(tmp_path / "g.png")]) == 1
    assert "bogus.safetensors is not a ddpm_lib checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "ddpm_lib", "train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--resume" in res.stdout and "total training steps" in res.stdout
