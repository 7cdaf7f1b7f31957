"""Faults and bad input, injected: every case ends in success or in a one-line error that names the problem,
with a non-zero exit, and nothing good is ever replaced by something broken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import digits_config
from PIL import Image

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib import UNet, get_config
from ddpm_lib.cli import main
from ddpm_lib.locks import InUseError, hold

FAST = ["--no-progress", "--sample-every", "0", "--device", "cpu"]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def exit_code(argv: list[str]) -> int:
    """``main``'s exit status, also when argparse refuses an argument (it exits with 2)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def train_tiny(run: Path, *extra: str) -> int:
    return main(["train", "--config", "tiny", "--out", str(run), "--steps", "2", *FAST, *extra])


# ---------------------------------------------------------------- nothing good is replaced


@pytest.mark.parametrize("lr", ["inf", "nan", "1e38"])
def test_an_absurd_learning_rate_is_refused_up_front(tmp_path, cifar_cache, capsys, lr):
    run = tmp_path / "run"
    assert train_tiny(run) == 0
    before = (run / "ckpt.safetensors").read_bytes()
    assert exit_code(["train", "--out", str(run), "--resume", "--steps", "4", "--lr", lr, *FAST]) != 0
    assert (run / "ckpt.safetensors").read_bytes() == before
    capsys.readouterr()
    from ddpm_lib.runs import validate_train_config

    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="train.lr"):
        validate_train_config(type(cfg)(cfg.name, cfg.model, cfg.diffusion,
                                        type(cfg.train)(**{**cfg.train.__dict__, "lr": float(lr)})))


def test_weights_broken_by_the_last_update_never_replace_the_checkpoint(tmp_path, cifar_cache, capsys, monkeypatch):
    """Every loss is finite, but the last update before the checkpoint makes the weights NaN: it is refused."""
    import importlib

    T = importlib.import_module("ddpm_lib.train")  # the module (ddpm_lib.train is also the function)

    run = tmp_path / "run"
    assert train_tiny(run, "--ckpt-every", "2") == 0
    before = (run / "ckpt.safetensors").read_bytes(), (run / "ema.safetensors").read_bytes()
    real_step = T.algorithm1_step

    def breaking_step(diffusion, model, ema, optimizer, x0, **kw):
        out = real_step(diffusion, model, ema, optimizer, x0, **kw)
        if optimizer.state[next(iter(model.parameters()))]["step"] >= 4:  # the last update goes wrong
            with torch.no_grad():
                next(iter(model.parameters())).fill_(float("nan"))
        return out

    monkeypatch.setattr(T, "algorithm1_step", breaking_step)
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--ckpt-every", "2", *FAST]) == 1
    one_line_error(capsys, "weights became non-finite by step 4", "step 2, is intact")
    assert ((run / "ckpt.safetensors").read_bytes(), (run / "ema.safetensors").read_bytes()) == before


def test_sample_and_eval_refuse_a_nan_checkpoint_naming_it(tmp_path, capsys):
    net = UNet.from_config("tiny")
    with torch.no_grad():
        net.conv_out.weight.fill_(float("nan"))
    ema = ckpt_io.save_ema(tmp_path / "ema.safetensors", net, 7, get_config("tiny"))
    assert main(["sample", "--checkpoint", str(ema), "--n", "1", "--out", str(tmp_path / "x.png"), "--device",
                 "cpu", "--no-progress"]) == 1
    one_line_error(capsys, str(ema), "NaN or infinite", "conv_out.weight")
    assert not (tmp_path / "x.png").exists()
    assert main(["eval", "--checkpoint", str(ema), "--data", "digits", "--out", str(tmp_path / "r.json"),
                 "--no-progress"]) == 1
    one_line_error(capsys, str(ema), "NaN or infinite")


# ---------------------------------------------------------------- one process per run directory and job


def test_a_run_directory_is_held_by_one_process(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    with hold(run / ".lock", "test"):
        assert train_tiny(run) == 1
    one_line_error(capsys, f"run directory {run} is in use by another process (pid {os.getpid()})")
    assert train_tiny(run) == 0  # released


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ddpm_lib.locks import hold\n"
                               f"with hold({str(run / '.lock')!r}, 'x'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_tiny(run) == 1
        one_line_error(capsys, "in use by another process", f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train_tiny(run) == 0


def test_two_sample_jobs_on_one_output_do_not_mix(tmp_path, capsys):
    ema = ckpt_io.save_ema(tmp_path / "ema.safetensors", UNet.from_config("tiny"), 7, get_config("tiny"))
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", str(ema), "--n", "2", "--out", str(out), "--sampler", "ddim", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    with hold(tmp_path / ".s.npz.lock", "test"):
        assert main(argv) == 1
    one_line_error(capsys, f"the sampling job of {out} is in use by another process")
    assert main(argv) == 0 and out.is_file()
    with pytest.raises(InUseError):
        with hold(tmp_path / "a.lock", "a"), hold(tmp_path / "a.lock", "a"):
            pass


# ---------------------------------------------------------------- a run that stopped early starts afresh


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "metrics.csv", ".ema.safetensors.123.0123abcd.tmp"):
        (run / name).write_text("left behind")
    (run / "tb").mkdir()
    (run / "tb" / "events").write_text("x")
    assert train_tiny(run) == 0
    assert ckpt_io.read_checkpoint(run / "ckpt.safetensors").step == 2
    assert not (run / "tb" / "events").exists() and not list(run.glob(".*.tmp"))
    # --resume of a directory without a checkpoint starts it from step 0 as well
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text((run / "config.json").read_text())
    assert main(["train", "--out", str(fresh), "--resume", "--steps", "2", *FAST]) == 0
    assert "no checkpoint yet" in capsys.readouterr().out
    a, b = (ckpt_io.read_checkpoint(d / "ckpt.safetensors").tensors for d in (fresh, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, from step 0
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", *FAST]) == 1
    one_line_error(capsys, "config.json")


def test_temp_files_of_killed_writes_are_removed_on_resume(tmp_path, cifar_cache):
    run = tmp_path / "run"
    assert train_tiny(run) == 0
    stale = run / ".ckpt.safetensors.999.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", *FAST]) == 0
    assert not stale.exists()


# ---------------------------------------------------------------- disks and files


def test_unwritable_outputs_are_one_line_errors(tmp_path, cifar_cache, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train_tiny(blocker / "run") == 1
    one_line_error(capsys, str(blocker))
    ema = ckpt_io.save_ema(tmp_path / "ema.safetensors", UNet.from_config("tiny"), 7, get_config("tiny"))
    assert main(["sample", "--checkpoint", str(ema), "--n", "1", "--out", str(blocker / "s.npz"), "--sampler",
                 "ddim", "--steps", "2", "--device", "cpu", "--no-progress"]) == 1
    one_line_error(capsys, str(blocker))
    assert main(["eval", "--checkpoint", str(ema), "--data", "digits", "--max-images", "2", "--out",
                 str(blocker / "r.json"), "--no-progress"]) == 1
    one_line_error(capsys, str(blocker))


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, cifar_cache, capsys, monkeypatch):
    from safetensors import SafetensorError

    run = tmp_path / "run"
    assert train_tiny(run) == 0
    before = (run / "ckpt.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(ckpt_io, "save_file", full)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", *FAST]) == 1
    one_line_error(capsys, "cannot write", "ema.safetensors", "StorageFull")
    assert (run / "ckpt.safetensors").read_bytes() == before and not list(run.glob(".*.tmp"))


def test_an_optimizer_state_of_the_wrong_shape_is_found_before_training(tmp_path, cifar_cache, capsys):
    run = tmp_path / "run"
    assert train_tiny(run) == 0
    ckpt = ckpt_io.read_checkpoint(run / "ckpt.safetensors")
    tensors = dict(ckpt.tensors)
    key = next(k for k in tensors if k.startswith("optim/") and k.endswith("/exp_avg"))
    tensors[key] = torch.zeros(3)
    ckpt_io.write_safetensors_atomic(run / "ckpt.safetensors", tensors, ckpt.metadata)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", *FAST]) == 1
    captured = capsys.readouterr()
    assert "steps 2 → 3" not in captured.out and key.removeprefix("optim/") in captured.err
    assert "has shape [3]" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_pickled_chunks_and_samples_are_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    import ddpm_lib.jobs as jobs

    ema = ckpt_io.save_ema(tmp_path / "ema.safetensors", UNet.from_config("tiny"), 7, get_config("tiny"))
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", str(ema), "--n", "2", "--chunk-size", "1", "--out", str(out), "--sampler",
            "ddim", "--steps", "2", "--device", "cpu", "--no-progress"]
    real = jobs._save_chunk

    def save_then_stop(path, images):
        real(path, images)
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "_save_chunk", save_then_stop)
    assert main(argv) == 130  # interrupted after its first chunk
    monkeypatch.setattr(jobs, "_save_chunk", real)
    chunk = tmp_path / "s.npz.partial" / "chunk-000000.npy"
    assert chunk.is_file()
    np.save(chunk, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    capsys.readouterr()
    assert main(argv) == 1
    one_line_error(capsys, str(chunk), "pickled objects are never loaded")
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert main(["eval", "--samples", str(pickled), "--out", str(tmp_path / "r.json"), "--no-download"]) == 1
    one_line_error(capsys, str(pickled), "pickled objects are never loaded")


def test_an_unreadable_image_is_named_before_training_and_during_it(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    argv = ["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
            "--data", str(folder), *FAST]
    assert main(argv) == 1
    one_line_error(capsys, "1 of 9 files", str(folder / "bad.png"), "fix or remove")
    (folder / "bad.png").unlink()
    good = (folder / "0.png").read_bytes()
    (folder / "0.png").write_bytes(good[: len(good) // 2])  # a valid header, truncated pixels: seen on reading
    assert main([*argv, "--num-workers", "1"]) == 1
    one_line_error(capsys, str(folder / "0.png"), "cannot be read as an image")


# ---------------------------------------------------------------- the newcomer's first hour


def test_offline_cifar10_is_a_one_line_error_that_says_what_to_do(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets

    monkeypatch.setenv("DDPM_LIB_CACHE", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    run = tmp_path / "run"
    assert train_tiny(run) == 1
    one_line_error(capsys, "CIFAR10 is not in", "Temporary failure in name resolution", "--config fashion")
    assert main(["train", "--config", "tiny", "--out", str(run), "--steps", "1", "--batch-size", "4",
                 "--data", str(tmp_path / "nowhere"), *FAST]) == 1
    one_line_error(capsys, "neither a data set (cifar10, digits, fashion) nor a folder")


def test_train_takes_a_named_data_set_and_prints_lines_without_a_bar(tmp_path, capsys, fashion_test):
    run = tmp_path / "run"
    argv = ["train", "--config", "fashion", "--data", "fashion", "--out", str(run), "--steps", "4", "--batch-size",
            "8", "--log-every", "2", "--sample-every", "1000", "--num-samples", "4", "--no-progress",
            "--device", "cpu"]
    t0 = time.perf_counter()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fashion step 2/4: loss" in out and "fashion step 4/4: loss" in out
    assert (run / "samples" / "step_0000004.png").is_file()  # a grid at the end, though sample_every > steps
    assert time.perf_counter() - t0 < 600


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        main(["--debug", "sample", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out",
              str(tmp_path / "x.png")])


def test_digits_are_never_mirrored(tmp_path, monkeypatch, capsys):
    """App. B's random flips suit photographs, not digits: a config asking for them on digits trains without."""
    import importlib

    from ddpm_lib.data import mirror_invariant

    T = importlib.import_module("ddpm_lib.train")
    assert mirror_invariant("cifar10") and mirror_invariant("/some/folder") and not mirror_invariant("digits")
    seen = []
    real = T.iterate_batches
    monkeypatch.setattr(T, "iterate_batches", lambda *a, **kw: seen.append(a[7]) or real(*a, **kw))
    cfg = digits_config(steps=1, batch_size=4, random_flip=True)
    T.train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False, sample_every=0)
    assert seen == [False] and "digits: no random flips" in capsys.readouterr().out
