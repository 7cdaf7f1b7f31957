"""The training loop (Algorithm 1, App. B): schedule, EMA, exact resume, DDP equality, NaN stop."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib.configs import get_config
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.runlog import NonFiniteLossError
from ddpm_lib.runs import resolve_run_config, validate_train_config
from ddpm_lib.train import (
    build_training_state,
    ema_update_,
    learning_rate,
    train,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, tensorboard=False, sample_every=0)


def tiny(steps: int, **train_overrides):
    cfg = get_config("tiny")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, **train_overrides))


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.read_checkpoint(run_dir / ckpt_io.CKPT_NAME).tensors


def test_learning_rate_warms_up_linearly_then_stays():
    assert learning_rate(0, 2e-4, 5000) == pytest.approx(2e-4 / 5000)
    assert learning_rate(2499, 2e-4, 5000) == pytest.approx(1e-4)
    assert learning_rate(4999, 2e-4, 5000) == learning_rate(700_000, 2e-4, 5000) == 2e-4
    assert learning_rate(0, 2e-4, 0) == 2e-4


def test_ema_update_is_decay_times_ema_plus_rest_times_param():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.detach().clone() for p in a.parameters()]
    ema_update_(a, b, 0.9)
    for new, o, p in zip(a.parameters(), old, b.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * o + 0.1 * p)


def test_paper_recipe_is_the_cifar10_default():
    tc = get_config("cifar10").train
    assert (tc.lr, tc.warmup, tc.grad_clip, tc.ema_decay, tc.batch_size, tc.steps, tc.random_flip) == (
        2e-4, 5000, 1.0, 0.9999, 128, 800_000, True)


def test_train_step_clips_gradients_and_keeps_fp32_master_weights():
    state = build_training_state(tiny(1, grad_clip=1e-3), torch.device("cpu"), precision="bf16")
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    loss, grad_norm = train_step(state, images, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grad_norm > 1e-3  # the norm before clipping is reported
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in state.model.parameters()]))
    assert clipped == pytest.approx(1e-3, rel=1e-3)
    assert all(p.dtype == torch.float32 for p in [*state.model.parameters(), *state.ema.parameters()])
    assert state.step == 1


def test_tiny_training_lowers_the_loss_and_writes_its_run_directory(tmp_path, cifar_cache):
    out = tmp_path / "run"
    summary = train(tiny(30), out, data_cache=cifar_cache, log_every=10, ckpt_every=15, keep_every=15,
                    sample_every=30, num_samples=4, progress=False)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) < 1.2
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "images_per_s"}
    assert summary.step == 30 and summary.images_per_s > 0
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 30
    assert ckpt_io.read_checkpoint(out / "ckpt.safetensors").step == 30
    assert ckpt_io.read_checkpoint(out / "ckpt-0000015.safetensors").step == 15
    assert ckpt_io.read_checkpoint(out / "ema.safetensors").kind == "ema"
    from PIL import Image
    with Image.open(out / "samples" / "step_0000030.png") as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2×2 grid with 2-pixel padding
    assert any((out / "tb").iterdir())


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path, cifar_cache):
    # 8 steps cross an epoch boundary (40 images / batch 8 = 5 steps per epoch)
    train(tiny(8), tmp_path / "straight", data_cache=cifar_cache, **QUIET)
    train(tiny(4), tmp_path / "split", data_cache=cifar_cache, **QUIET)
    cfg = resolve_run_config(tmp_path / "split", resume=True, steps=8)
    train(cfg, tmp_path / "split", resume=True, data_cache=cifar_cache, **QUIET)
    a, b = _tensors(tmp_path / "straight"), _tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with open(tmp_path / "split" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, cifar_cache):
    out = tmp_path / "run"
    train(tiny(4), out, data_cache=cifar_cache, log_every=1, ckpt_every=2, **QUIET)
    # pretend a crash after step 4's metrics but before its checkpoint: roll the checkpoint back
    train(tiny(2), tmp_path / "two", data_cache=cifar_cache, **QUIET)
    os.replace(tmp_path / "two" / "ckpt.safetensors", out / "ckpt.safetensors")
    train(resolve_run_config(out, resume=True, steps=3), out, resume=True, data_cache=cifar_cache, log_every=1, **QUIET)
    with open(out / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, cifar_cache, monkeypatch):
    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        losses = real(self, *args, **kwargs)
        return losses * float("nan") if calls["n"] == 5 else losses

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 5 .*step 4, is intact"):
        train(tiny(10), out, data_cache=cifar_cache, log_every=100, ckpt_every=2, **QUIET)
    ckpt = ckpt_io.read_checkpoint(out / "ckpt.safetensors")
    assert ckpt.step == 4 and ckpt_io.read_checkpoint(out / "ema.safetensors").step == 4
    assert all(torch.isfinite(t).all() for t in ckpt.tensors.values())


def test_new_run_refuses_a_non_empty_directory(tmp_path, cifar_cache):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"is not empty \(keep.txt\): choose another output directory"):
        train(tiny(1), tmp_path, data_cache=cifar_cache, **QUIET)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # not even a lock file was left in it
    train(tiny(1), tmp_path / "run", data_cache=cifar_cache, **QUIET)
    with pytest.raises(FileExistsError, match="holds a run .*pass --resume"):  # a run with a checkpoint
        train(tiny(1), tmp_path / "run", data_cache=cifar_cache, **QUIET)


def test_resume_refuses_a_different_model(tmp_path, cifar_cache):
    out = tmp_path / "run"
    train(tiny(1), out, data_cache=cifar_cache, **QUIET)
    with pytest.raises(ValueError, match="the model config differs"):
        resolve_run_config(out, "small", resume=True)
    wider = dataclasses.replace(tiny(2), model=dataclasses.replace(tiny(2).model, ch=64))
    with pytest.raises(ValueError, match=r"the model config differs.*'ch': \(32, 64\)"):
        train(wider, out, resume=True, data_cache=cifar_cache, **QUIET)


def test_resume_past_the_last_step_does_nothing(tmp_path, cifar_cache, capsys):
    out = tmp_path / "run"
    train(tiny(2), out, data_cache=cifar_cache, **QUIET)
    before = (out / "ckpt.safetensors").read_bytes()
    summary = train(resolve_run_config(out, resume=True), out, resume=True, data_cache=cifar_cache, **QUIET)
    assert summary.step == 2 and "nothing to do" in capsys.readouterr().out
    assert (out / "ckpt.safetensors").read_bytes() == before


def test_bad_training_values_are_named():
    with pytest.raises(ValueError, match="does not divide by the number of processes"):
        validate_train_config(tiny(1), world_size=3)
    with pytest.raises(ValueError, match="train.steps=-1"):
        validate_train_config(tiny(-1))
    with pytest.raises(ValueError, match="precision='fp16'"):
        build_training_state(tiny(1), torch.device("cpu"), precision="fp16")


@pytest.mark.slow
def test_two_processes_with_half_batches_match_one_process(tmp_path, cifar_cache):
    """DDP (gloo, 2 processes under torchrun) equals one process with the same global batch."""
    steps = 4
    train(tiny(steps), tmp_path / "single", data_cache=cifar_cache, **QUIET)
    env = {**os.environ, "DDPM_LIB_CACHE": str(cifar_cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddpm_lib", "train", "--config", "tiny", "--out", str(tmp_path / "ddp"), "--steps", str(steps),
           "--device", "cpu", "--sample-every", "0", "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 8 over 2 process(es)" in res.stdout + res.stderr  # really two processes
    a, b = _tensors(tmp_path / "single"), _tensors(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the run really took the gradient of both halves: the weights moved
    assert not torch.equal(a["model/conv_in.weight"], build_training_state(tiny(1), torch.device("cpu"))
                           .model.conv_in.weight)


def test_missing_tensorboard_only_warns(tmp_path, monkeypatch):
    from ddpm_lib.runlog import MetricsLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        log = MetricsLog(tmp_path, 0)
    log.log({"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0, "images_per_s": 10.0})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,0.5,")


def test_keep_every_must_be_a_multiple_of_ckpt_every(tmp_path):
    with pytest.raises(ValueError, match="keep_every=7 must be a multiple of ckpt_every=5"):
        train(get_config("tiny"), tmp_path / "run", ckpt_every=5, keep_every=7, device="cpu")


def test_compile_modes():
    """compile=False/True/mode name; CUDA-graph modes refuse DDP; the CLI takes an optional mode."""
    from ddpm_lib.cli import build_parser
    from ddpm_lib.distributed import DistInfo
    from ddpm_lib.train import COMPILE_MODES, compile_mode

    assert compile_mode(False) is None and compile_mode(True) == "default"
    assert compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile='fast' is not valid"):
        compile_mode("fast")
    with pytest.raises(ValueError, match="not supported with several processes"):
        build_training_state(tiny(2), torch.device("cpu"), compile="reduce-overhead",
                             dist_info=DistInfo(rank=0, world_size=2, local_rank=0))
    state = build_training_state(tiny(1), torch.device("cpu"), compile="reduce-overhead")
    assert not state.cudagraphs  # CUDA graphs only on CUDA; on the CPU it is a plain compile
    parse = build_parser().parse_args
    assert parse(["train", "--config", "tiny", "--out", "x"]).compile is None
    assert parse(["train", "--config", "tiny", "--out", "x", "--compile"]).compile == "default"
    for mode in COMPILE_MODES:
        assert parse(["train", "--config", "tiny", "--out", "x", "--compile", mode]).compile == mode
    with pytest.raises(SystemExit):
        parse(["train", "--config", "tiny", "--out", "x", "--compile", "fast"])


def test_cuda_graph_training_marks_each_step(monkeypatch):
    """With CUDA graphs, every step starts a new graph generation (else the previous step's outputs
    could be overwritten while in use); without them nothing is marked."""
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    state = build_training_state(tiny(2), torch.device("cpu"))
    images = torch.randint(0, 256, (state.cfg.train.batch_size, 3, 16, 16), dtype=torch.uint8)
    train_step(state, images, 0)
    assert calls == []
    state.cudagraphs = True  # as build_training_state sets it for compile="reduce-overhead" on CUDA
    train_step(state, images, 1)
    train_step(state, images, 2)
    assert calls == [1, 1]


def test_training_leaves_the_callers_random_stream_and_backends_as_they_were(tmp_path, cifar_cache):
    """The run seeds dropout and the initial weights from its own seed, and sets TF32 / cuDNN for itself:
    the caller's global generator and settings are the same afterwards."""
    from ddpm_lib import precision

    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    before, backends = torch.get_rng_state(), (torch.backends.cudnn.benchmark, precision._get())
    state = build_training_state(tiny(2), torch.device("cpu"))
    train_step(state, images, 0)
    train(tiny(2), tmp_path / "run", device="cpu", data_cache=cifar_cache, **QUIET)
    assert torch.equal(torch.get_rng_state(), before)
    assert (torch.backends.cudnn.benchmark, precision._get()) == backends


def test_training_backends_hold_for_the_run_only():
    from ddpm_lib import precision

    saved = (torch.backends.cudnn.benchmark, precision._get())
    with precision.training_backends(torch.device("cuda"), "tf32"):  # flags only: no GPU is touched
        assert torch.backends.cudnn.benchmark and precision._get() == precision._state_for("tf32")
    assert (torch.backends.cudnn.benchmark, precision._get()) == saved
    with precision.training_backends(torch.device("cpu"), "tf32"):  # the CPU has no TF32 and no cuDNN
        assert torch.backends.cudnn.benchmark == saved[0]
