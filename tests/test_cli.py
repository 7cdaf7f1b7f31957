"""The command line: train, resume, sample, and errors that name the offending argument."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib import get_config
from ddpm_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--sample-every", "0", "--device", "cpu"]


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
    assert "has no run to resume (no config.json): start one with --config" in capsys.readouterr().err
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["sample", "--checkpoint", str(bogus), "--out", str(tmp_path / "g.png")]) == 1
    assert "bogus.safetensors is not a ddpm_lib checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "ddpm_lib", "train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--resume" in res.stdout and "total training steps" in res.stdout


# ---------------------------------------------------------------- sample: .npz, resume, DDIM, released weights


def tiny_weights(seed: int = 0):
    """The ``tiny`` UNet with random weights; its zero-initialized output layer is perturbed."""
    import torch

    from ddpm_lib import UNet

    torch.manual_seed(seed)
    net = UNet.from_config("tiny").eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


@pytest.fixture
def tiny_ema(tmp_path):
    return ckpt_io.save_ema(tmp_path / "ema.safetensors", tiny_weights(), step=7, cfg=get_config("tiny"))


DDIM = ["--sampler", "ddim", "--steps", "3", "--eta", "0.5", "--device", "cpu", "--no-progress"]


def sample_argv(ckpt, out, *extra):
    return ["sample", "--checkpoint", str(ckpt), "--n", "5", "--out", str(out), "--chunk-size", "2", *DDIM, *extra]


def test_sample_npz_holds_uint8_images_and_a_grid_beside_it(tmp_path, tiny_ema, capsys):
    out = tmp_path / "s" / "samples.npz"
    assert main(sample_argv(tiny_ema, out, "--batch-size", "3")) == 0
    with np.load(out) as f:
        images, job = f["images"], json.loads(str(f["job"]))
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 10
    assert job["sampler"] == "ddim" and job["steps"] == 3 and job["eta"] == 0.5 and job["seed"] == 0
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size == (3 * 18 + 2, 2 * 18 + 2)  # 5 images, 3 per row, 2-pixel padding
    assert not (tmp_path / "s" / "samples.npz.partial").exists()
    assert "ddim, 3 steps, eta 0.5; EMA, step 7" in capsys.readouterr().out


def test_interrupted_sampling_resumes_to_the_same_npz(tmp_path, tiny_ema, monkeypatch, capsys):
    import ddpm_lib.generation as generation
    import ddpm_lib.jobs as jobs

    whole = tmp_path / "whole.npz"
    assert main(sample_argv(tiny_ema, whole, "--batch-size", "5")) == 0

    # Kill the job once its first chunk (images 0, 1) is on disk.
    out = tmp_path / "resumed.npz"
    save_chunk = jobs._save_chunk

    def save_then_die(path, images):
        save_chunk(path, images)
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "_save_chunk", save_then_die)
    assert main(sample_argv(tiny_ema, out, "--batch-size", "2")) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    partial = tmp_path / "resumed.npz.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-000000.npy", "job.json"]
    assert not out.exists()

    # Other arguments than the unfinished job's are refused, naming what differs.
    monkeypatch.setattr(jobs, "_save_chunk", save_chunk)
    other = ckpt_io.save_ema(tmp_path / "other.safetensors", tiny_weights(seed=1), 7, get_config("tiny"))
    for ckpt, extra, what in [(tiny_ema, ["--seed", "1"], "seed"), (tiny_ema, ["--eta", "0.2"], "eta"),
                              (tiny_ema, ["--steps", "4"], "steps"), (tiny_ema, ["--noise", "device"], "noise"),
                              (other, [], "weights")]:
        assert main(sample_argv(ckpt, out, *extra)) == 1  # a repeated option: argparse keeps the last
        err = capsys.readouterr().err
        assert "unfinished job with other arguments" in err and what in err and str(partial) in err

    # The rerun (any batch size) samples only images 2, 3, 4 and gives the uninterrupted result.
    sampled = []
    image_generators = generation.image_generators
    monkeypatch.setattr(generation, "image_generators",
                        lambda seed, idx: sampled.extend(idx) or image_generators(seed, idx))
    assert main(sample_argv(tiny_ema, out, "--batch-size", "3")) == 0
    assert sampled == [2, 3, 4] and not partial.exists()
    with np.load(whole) as a, np.load(out) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_sample_with_a_bad_suffix_is_refused(tmp_path, tiny_ema, capsys):
    assert main(sample_argv(tiny_ema, tmp_path / "x.jpg")) == 1
    assert "--out" in capsys.readouterr().err and not (tmp_path / "x.jpg.partial").exists()


@pytest.mark.parametrize("extra, arg", [
    (["--eta", "1.5"], "--eta"),
    (["--sampler", "plms"], "--sampler"),
    (["--steps", "0"], "--steps"),
    (["--spacing", "cubic"], "--spacing"),
])
def test_bad_sample_arguments_exit_naming_them(extra, arg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", "x", *extra])
    assert e.value.code == 2 and arg in capsys.readouterr().err.split("error:", 1)[1]


def test_ddpm_sampler_with_ddim_steps_is_a_clear_error(tmp_path, tiny_ema, capsys):
    argv = ["sample", "--checkpoint", str(tiny_ema), "--out", str(tmp_path / "g.png"), "--steps", "10"]
    assert main(argv) == 1
    assert "sampler='ddpm' runs all T=100 steps" in capsys.readouterr().err


def test_released_weights_by_name_use_the_cifar10_diffusion(tmp_path, monkeypatch, capsys):
    import ddpm_lib.pretrained as pretrained
    from ddpm_lib.loading import load_for_sampling

    asked = []
    monkeypatch.setattr(pretrained, "load_pretrained", lambda name: asked.append(name) or tiny_weights())
    loaded = load_for_sampling("google/ddpm-cifar10-32", "cpu")
    d = loaded.diffusion
    assert asked == ["google/ddpm-cifar10-32"] and loaded.step == -1
    assert (d.num_timesteps, d.mean_type, d.var_type) == (1000, "eps", "fixed_large")
    assert float(d.betas[0]) == pytest.approx(1e-4) and float(d.betas[-1]) == pytest.approx(0.02)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", "google/ddpm-cifar10-32", "--n", "2", "--out", str(grid),
                 "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    assert grid.is_file() and "released weights" in capsys.readouterr().out


def test_eval_reports_the_bound_and_rate_distortion_of_a_checkpoint(tmp_path, tiny_ema, capsys):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images)
    out = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(tiny_ema), "--metrics", "nll", "rd", "--data", str(tmp_path / "data.npz"),
                 "--batch-size", "2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    bound, rd = report["bound"], report["rate_distortion"]
    assert bound["n"] == 4 and len(bound["terms_bpd"]) == get_config("tiny").diffusion.T
    # the bound is L_T + Σ terms, and it splits into the rate and the distortion of §4.3
    assert bound["nll_bpd"] == pytest.approx(bound["prior_bpd"] + sum(bound["terms_bpd"]), rel=1e-6)
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(bound["nll_bpd"], rel=1e-6)
    assert "report written" in capsys.readouterr().out


def test_eval_needs_samples_or_a_checkpoint(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path / "r.json")]) == 1
    assert "--samples and/or --checkpoint" in capsys.readouterr().err


def test_sample_with_graphs_names_what_they_need(tmp_path, tiny_ema, capsys):
    assert main(sample_argv(tiny_ema, tmp_path / "g.npz", "--graph")) == 1
    assert 'needs noise="device"' in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(sample_argv(tiny_ema, tmp_path / "g.npz", "--graph", "--noise", "device")) == 1
        assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g.npz.partial").exists()
