"""Checkpoints: safetensors only, atomic, exact round trips, clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib.checkpoint import CheckpointError
from ddpm_lib.configs import get_config
from ddpm_lib.loading import load_for_sampling
from ddpm_lib.train import build_training_state, train_step

CFG = get_config("tiny")


def _trained_state(steps: int = 2, seed_images: int = 0):
    state = build_training_state(CFG, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed_images)
    for s in range(steps):
        train_step(state, torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8), s)
    return state


def _save(state, path):
    return ckpt_io.save_checkpoint(path, model=state.model, ema=state.ema, optimizer=state.optimizer,
                                   step=state.step, cfg=CFG)


def test_round_trip_restores_model_ema_and_adam_exactly(tmp_path):
    a = _trained_state(3)
    path = _save(a, tmp_path / "ckpt.safetensors")
    b = build_training_state(CFG, torch.device("cpu"))
    loaded = ckpt_io.load_training_state(path, model=b.model, ema=b.ema, optimizer=b.optimizer)
    assert loaded.step == 3 and loaded.config == CFG
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for p, q in zip(a.ema.state_dict().values(), b.ema.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, entry in sa["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)
    # the EMA is a real average, not a copy of the model
    assert not torch.equal(a.ema.conv_in.weight, a.model.conv_in.weight)


def test_checkpoint_is_plain_safetensors_with_our_header(tmp_path):
    path = _save(_trained_state(1), tmp_path / "ckpt.safetensors")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    meta = header["__metadata__"]
    assert meta["format"] == "ddpm_lib" and meta["kind"] == "train" and meta["step"] == "1"
    assert json.loads(meta["config"])["name"] == "tiny"
    names = set(header) - {"__metadata__"}
    assert "model/conv_in.weight" in names and "ema/conv_in.weight" in names
    assert "optim/conv_in.weight/exp_avg" in names and "optim/conv_in.weight/exp_avg_sq" in names


def test_foreign_safetensors_file_is_rejected_by_name(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"foreign.safetensors is not a ddpm_lib checkpoint"):
        ckpt_io.read_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_gives_a_checkpoint_error(tmp_path, damage):
    path = _save(_trained_state(1), tmp_path / "ckpt.safetensors")
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="ckpt.safetensors is not a ddpm_lib checkpoint"):
        ckpt_io.read_checkpoint(path)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.read_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no ema.safetensors or ckpt.safetensors"):
        ckpt_io.ema_state_dict(tmp_path)


def test_crash_while_writing_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    state = _trained_state(1)
    path = _save(state, tmp_path / "ckpt.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(state, path)
    assert path.read_bytes() == before
    assert ckpt_io.read_checkpoint(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no temp file left


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    path = _save(_trained_state(1), tmp_path / "ckpt.safetensors")
    probe = tmp_path / "probe"
    probe.touch()
    assert path.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_resuming_into_another_architecture_is_a_checkpoint_error(tmp_path):
    path = _save(_trained_state(1), tmp_path / "ckpt.safetensors")
    other = build_training_state(get_config("small"), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt_io.load_training_state(path, model=other.model, ema=other.ema, optimizer=other.optimizer)


def test_ema_export_and_training_checkpoint_give_the_same_sampling_model(tmp_path):
    state = _trained_state(2)
    _save(state, tmp_path / ckpt_io.CKPT_NAME)
    ckpt_io.save_ema(tmp_path / ckpt_io.EMA_NAME, state.ema, state.step, CFG)
    from_dir = load_for_sampling(tmp_path, "cpu")
    from_ckpt = load_for_sampling(tmp_path / ckpt_io.CKPT_NAME, "cpu")
    assert from_dir.step == from_ckpt.step == 2 and from_dir.config == CFG
    for p, q, e in zip(from_dir.model.parameters(), from_ckpt.model.parameters(), state.ema.parameters(),
                       strict=True):
        assert torch.equal(p, q) and torch.equal(p, e)
    with pytest.raises(CheckpointError, match="ema weights only"):
        ckpt_io.load_training_state(tmp_path / ckpt_io.EMA_NAME, model=state.model, ema=state.ema,
                                    optimizer=state.optimizer)


def test_keep_copy_survives_the_next_save(tmp_path):
    a = _trained_state(1)
    path = _save(a, tmp_path / "ckpt.safetensors")
    kept = ckpt_io.keep_copy(path, 1)
    assert kept.name == "ckpt-0000001.safetensors"
    b = _trained_state(2)
    _save(b, path)
    assert ckpt_io.read_checkpoint(kept).step == 1 and ckpt_io.read_checkpoint(path).step == 2


def test_config_round_trips_through_the_run_directory(tmp_path):
    ckpt_io.write_config(tmp_path, get_config("cifar10"))
    assert ckpt_io.read_config(tmp_path) == get_config("cifar10")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid ddpm_lib config"):
        ckpt_io.read_config(tmp_path)
