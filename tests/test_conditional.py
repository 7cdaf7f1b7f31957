"""Beyond the paper: the class-conditional UNet and classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from fakes import digits_config

import ddpm_lib.checkpoint as ckpt_io
from ddpm_lib import GaussianDiffusion, UNet, get_config, make_beta_schedule
from ddpm_lib.cli import main as cli_main
from ddpm_lib.data import TensorImages, iterate_batches, load_digits
from ddpm_lib.generation import generate
from ddpm_lib.guidance import Guided, resolve_class_labels
from ddpm_lib.loading import load_for_sampling
from ddpm_lib.runs import resolve_run_config
from ddpm_lib.samplers import sample_loop
from ddpm_lib.train import build_training_state, drop_labels, train, train_step
from ddpm_lib.unet import ResBlock

QUIET = dict(progress=False, tensorboard=False, sample_every=0)


def cond_unet(num_classes: int = 3, seed: int = 0) -> UNet:
    """The ``tiny`` UNet conditioned on ``num_classes`` classes, its zero-initialized layers perturbed
    (at initialization every residual branch is zero, so the embeddings would not reach the output)."""
    torch.manual_seed(seed)
    net = UNet(**{**asdict(get_config("tiny").model), "num_classes": num_classes}).eval()
    with torch.no_grad():
        for block in net.modules():
            if isinstance(block, ResBlock):
                block.conv2.weight.normal_(0, 0.05)
        net.conv_out.weight.normal_(0, 0.05)
    return net


def small_digits_cond(steps: int, **train_overrides):
    return digits_config(conditional=True, steps=steps, **train_overrides)


# ---------------------------------------------------------------- the network


def test_unconditional_unet_is_the_papers_and_the_label_embedding_is_extra():
    plain, cond = UNet.from_config("cifar10"), UNet.from_config("cifar10_cond")
    assert sum(p.numel() for p in plain.parameters()) == 35_746_307
    assert sum(p.numel() for p in cond.parameters()) == 35_746_307 + 11 * 512  # 10 classes + ∅, temb 512
    assert not any("label" in k for k in plain.state_dict())
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_embed.weight"}
    assert plain.config.num_classes is None and cond.null_label == 10


def test_conditional_unet_reads_the_label_and_none_means_the_null_label():
    net = cond_unet()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        out = {y: net(x, t, torch.full((4,), y)) for y in range(4)}
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
        assert torch.equal(net(x, t), out[3])  # y=None: the null label (index num_classes) for every image


def test_bad_labels_are_refused_by_name():
    x, t = torch.zeros(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        UNet.from_config("tiny")(x, t, torch.tensor([0, 1]))
    net = cond_unet()
    with pytest.raises(ValueError, match=r"0 … 2, or 3 for the null label, got values from 0 to 4"):
        net(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \[B\] = \[2\]"):
        net(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes"):
        UNet(**{**asdict(get_config("tiny").model), "num_classes": 0})


# ---------------------------------------------------------------- guidance


def test_guided_output_is_one_plus_w_cond_minus_w_uncond():
    net = cond_unet()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([5, 50, 99]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full((3,), 3))
        guided = Guided(net, y, 2.5)(x, t)
        assert torch.allclose(guided, 3.5 * cond - 2.5 * uncond, atol=1e-5)
        assert torch.equal(Guided(net, y, 0.0)(x, t), cond)  # w = 0: plain conditional, exactly


def test_guidance_keeps_a_learned_variance_from_the_conditional_half():
    def fake(x, t, y):  # 2C channels: mean = label, "variance" = 10 × label
        y = y.float()[:, None, None, None].expand(-1, x.shape[1], *x.shape[2:])
        return torch.cat([y, 10 * y], dim=1)

    out = Guided(fake, torch.tensor([1, 2]), 1.0, null_label=5)(torch.zeros(2, 1, 2, 2), torch.tensor([0, 0]))
    assert out[:, :1].flatten(1)[:, 0].tolist() == [2 * 1 - 5, 2 * 2 - 5]  # (1 + w) y − w ∅
    assert out[:, 1:].flatten(1)[:, 0].tolist() == [10.0, 20.0]


def test_guidance_at_w0_reproduces_conditional_sampling_in_both_samplers():
    net = cond_unet()
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    y = torch.tensor([0, 1, 2, 1])
    shape = (4, 3, 16, 16)

    def plain(x, t):
        return net(x, t, y)

    for how in (dict(sampler="ddpm"), dict(sampler="ddim", steps=8, eta=0.5)):
        def run(model, how=how, **kw):
            return sample_loop(d, model, shape, generator=torch.Generator().manual_seed(3), **how, **kw)

        ref = run(plain)
        assert torch.equal(run(net, y=y, guidance_scale=0.0), ref)
        guided = run(net, y=y, guidance_scale=3.0)
        assert torch.isfinite(guided).all() and not torch.equal(guided, ref)
    x = sample_loop(d, net, shape, generator=torch.Generator().manual_seed(3), y=y)
    assert torch.equal(x, sample_loop(d, plain, shape, generator=torch.Generator().manual_seed(3)))


def test_generate_samples_classes_independently_of_the_batch_size():
    net = cond_unet()
    d = GaussianDiffusion(make_beta_schedule("linear", 60))
    a = generate(net, d, 5, class_labels="cycle", guidance_scale=2.0, seed=4, batch_size=5, progress=False)
    b = generate(net, d, 5, class_labels=[0, 1, 2, 0, 1], guidance_scale=2.0, seed=4, batch_size=2, progress=False)
    assert torch.equal(a, b)
    c = generate(net, d, 5, class_labels=2, guidance_scale=2.0, seed=4, progress=False)
    assert torch.equal(a[2], c[2]) and not torch.equal(a[0], c[0])  # image i depends on its own label only
    with pytest.raises(ValueError, match="needs class_labels"):
        generate(net, d, 2, guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        generate(UNet.from_config("tiny"), d, 2, class_labels=0, progress=False)
    with pytest.raises(ValueError, match=r"0 … 2"):
        generate(net, d, 2, class_labels=3, progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        generate(net, d, 2, class_labels=0, guidance_scale=-1, progress=False)


def test_class_labels_resolve_to_one_per_image():
    assert resolve_class_labels("cycle", 5, 3).tolist() == [0, 1, 2, 0, 1]
    assert resolve_class_labels(1, 3, 3).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="4 integer labels"):
        resolve_class_labels([0, 1], 4, 3)


# ---------------------------------------------------------------- data and training


def test_digits_and_their_labels_stay_aligned():
    from sklearn.datasets import load_digits as sk_load_digits

    target = torch.from_numpy(sk_load_digits().target)
    train_ds, test_ds = load_digits("train"), load_digits("test")
    assert torch.equal(torch.cat([train_ds.labels, test_ds.labels]), target)
    batches = list(iterate_batches(train_ds, 16, seed=0, start_step=0, stop_step=3, random_flip=True,
                                   with_labels=True))
    plain = list(iterate_batches(train_ds, 16, seed=0, start_step=0, stop_step=3, random_flip=True))
    for (s, images, labels), (s2, images2) in zip(batches, plain, strict=True):
        assert s == s2 and torch.equal(images, images2)  # the same images as unconditional training
        for image, label in zip(images, labels, strict=True):  # each label is its own image's
            same, flipped = train_ds.images == image, train_ds.images.flip(-1) == image
            matches = same.flatten(1).all(1) | flipped.flatten(1).all(1)
            assert label in train_ds.labels[matches]
    with pytest.raises(ValueError, match="no class labels"):
        list(iterate_batches(TensorImages(train_ds.images), 16, 0, 0, 1, with_labels=True))


def test_label_drop_is_deterministic_per_step_and_split_over_processes():
    labels = torch.arange(4000) % 10
    a = drop_labels(labels, 10, 0.1, seed=0, step=5, global_batch=4000)
    assert torch.equal(a, drop_labels(labels, 10, 0.1, seed=0, step=5, global_batch=4000))
    assert not torch.equal(a, drop_labels(labels, 10, 0.1, seed=0, step=6, global_batch=4000))
    dropped = a == 10
    assert 0.08 < dropped.float().mean() < 0.12 and torch.equal(a[~dropped], labels[~dropped])
    halves = [drop_labels(labels[r * 2000:(r + 1) * 2000], 10, 0.1, 0, 5, 4000, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)
    assert torch.equal(drop_labels(labels, 10, 0.0, 0, 5, 4000), labels)
    assert (drop_labels(labels, 10, 1.0, 0, 5, 4000) == 10).all()


def test_conditional_train_step_trains_the_label_embedding_and_needs_labels():
    state = build_training_state(small_digits_cond(3), torch.device("cpu"))
    ds = load_digits("train")
    images, labels = ds.images[:16], ds.labels[:16]
    with pytest.raises(ValueError, match="labels must be given"):
        train_step(state, images, 0)
    before = state.model.label_embed.weight.detach().clone()
    for s in range(3):
        loss, _ = train_step(state, images, s, labels)
    assert torch.isfinite(loss)
    assert not torch.equal(state.model.label_embed.weight, before)
    plain = build_training_state(get_config("tiny"), torch.device("cpu"))
    with pytest.raises(ValueError, match="only for one"):
        train_step(plain, torch.zeros(8, 3, 16, 16, dtype=torch.uint8), 0, torch.zeros(8, dtype=torch.long))


def test_conditional_run_resumes_bit_for_bit_and_samples_from_the_cli(tmp_path, capsys):
    train(small_digits_cond(4), tmp_path / "full", **QUIET)
    train(small_digits_cond(2), tmp_path / "split", **QUIET)
    train(resolve_run_config(tmp_path / "split", resume=True, steps=4), tmp_path / "split", resume=True, **QUIET)
    full = ckpt_io.read_checkpoint(tmp_path / "full" / ckpt_io.CKPT_NAME)
    split = ckpt_io.read_checkpoint(tmp_path / "split" / ckpt_io.CKPT_NAME)
    assert full.tensors.keys() == split.tensors.keys()
    assert all(torch.equal(full.tensors[k], split.tensors[k]) for k in full.tensors)
    # the checkpoint carries the options: sample needs no config
    loaded = load_for_sampling(tmp_path / "full")
    assert loaded.config.model.num_classes == 10 and loaded.config.train.label_drop == 0.1
    out = tmp_path / "cfg.npz"
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "full"), "--n", "4", "--sampler", "ddim",
                     "--steps", "5", "--class-label", "all", "--guidance-scale", "2", "--out", str(out),
                     "--no-progress"]) == 0
    images = np.load(out)["images"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert "w 2" in capsys.readouterr().out
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "full"), "--n", "3", "--sampler", "ddim",
                     "--steps", "5", "--class-label", "3,7", "--out", str(tmp_path / "list.png"),
                     "--no-progress"]) == 0
    # and its bound is on −log p(x | y): the held-out digits' labels reach the network
    report = tmp_path / "bound.json"
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "full"), "--metrics", "nll", "--max-images", "2",
                     "--out", str(report)]) == 0
    assert "class labels" in json.loads(report.read_text())["bound"]["conditioning"]


def test_label_drop_reaches_training():
    """label_drop = 1 trains only the null label's embedding row; label_drop = 0 never touches it."""
    ds = load_digits("train")
    images, labels = ds.images[:16], ds.labels[:16]
    for p, changed_rows in ((1.0, {10}), (0.0, set(labels.tolist()))):
        state = build_training_state(small_digits_cond(3, label_drop=p), torch.device("cpu"))
        before = state.model.label_embed.weight.detach().clone()
        for step in range(3):  # the zero-initialized output layers pass no gradient back in the first two
            train_step(state, images, step, labels)
        moved = (state.model.label_embed.weight != before).any(dim=1)
        assert set(torch.nonzero(moved).flatten().tolist()) == changed_rows, p


def test_bound_with_labels_differs_from_the_null_label():
    from ddpm_lib.evaluate import dataset_nll

    net, d = cond_unet(), GaussianDiffusion(make_beta_schedule("linear", 50))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="one per image"):
        dataset_nll(net, d, images, labels=labels[:1])
    with torch.no_grad():
        given = dataset_nll(net, d, images, labels=labels).total
        null = dataset_nll(net, d, images).total
    assert np.isfinite(given).all() and not np.allclose(given, null)


def test_sample_cli_refuses_labels_for_an_unconditional_checkpoint(tmp_path, capsys):
    cfg = get_config("tiny")
    ckpt_io.save_ema(tmp_path / "ema.safetensors", UNet.from_config(cfg), 0, cfg)
    for extra in (["--class-label", "1"], ["--guidance-scale", "1"]):
        assert cli_main(["sample", "--checkpoint", str(tmp_path / "ema.safetensors"), "--n", "1",
                         "--out", str(tmp_path / "x.png"), *extra]) == 1
        assert "need a class-conditional checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["sample", "--checkpoint", "x", "--class-label", "seven"])
    assert "comma list" in capsys.readouterr().err
    assert cli_main(["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--label-drop", "0.2"]) == 1
    assert "--label-drop is for class-conditional configs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
