"""The book's models: the fashion configs and their data, and the shipped EMA weights of both."""

import dataclasses

import pytest
import torch

from ddpm_lib import get_config
from ddpm_lib.data import load_digits, make_dataset, to_model_range
from ddpm_lib.loading import BOOK_MODELS, WEIGHTS_DIR, load_book_model
from ddpm_lib.unet import UNet


def test_digits_splits_are_disjoint_and_on_17_levels():
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8
    levels = torch.cat([train.images, test.images]).unique()
    assert levels.tolist() == [round(k * 255 / 16) for k in range(17)]
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


def test_the_fashion_configs_are_the_papers_diffusion_and_differ_only_by_the_labels():
    plain, cond = get_config("fashion"), get_config("fashion_cond")
    d = plain.diffusion
    assert (d.T, d.schedule, d.mean_type, d.var_type, d.loss_type) == (1000, "linear", "eps", "fixed_large", "simple")
    assert dataclasses.replace(cond.model, num_classes=None) == plain.model and cond.model.num_classes == 10
    assert dataclasses.replace(cond.train, label_drop=plain.train.label_drop) == plain.train
    assert cond.diffusion == plain.diffusion and cond.train.label_drop == 0.1
    counts = [sum(p.numel() for p in UNet.from_config(c).parameters()) for c in (plain, cond)]
    assert counts == [1_112_801, 1_112_801 + 11 * 128]  # the label embedding: 10 classes + ∅, temb 128


def test_the_fashion_config_trains_on_the_training_split(fashion_test):
    cfg = get_config("fashion")
    ds = make_dataset(cfg.train.dataset, cfg.model.image_size, cfg.model.in_channels, download=False)
    assert ds.images.shape == (60_000, 1, 28, 28) and ds.labels.bincount().tolist() == [6000] * 10
    assert not torch.equal(ds.images[:100], fashion_test.images[:100])
    with pytest.raises(ValueError, match="grey"):
        make_dataset("fashion", 28, 3)


@pytest.mark.parametrize("name", BOOK_MODELS)
def test_a_shipped_book_model_loads_at_its_last_step_and_denoises_held_out_images(name, fashion_test):
    assert (WEIGHTS_DIR / f"{name}.safetensors").is_file(), f"run tools/train_book_model.py --config {name}"
    book = load_book_model(name=name)
    assert book.config == get_config(name) and book.step == book.config.train.steps
    assert not book.model.training
    # A trained ε-predictor beats predicting zero noise (loss 1) by far on images it never saw.
    x0 = to_model_range(fashion_test.images[:128])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loss = book.diffusion.training_losses(book.model, x0, generator=g).mean().item()
    assert loss < 0.1


def test_the_conditional_book_model_uses_its_labels(fashion_test):
    book = load_book_model(name="fashion_cond")
    x0, labels = to_model_range(fashion_test.images[:256]), fashion_test.labels[:256]
    losses = {}
    for name, y in (("true", labels), ("wrong", (labels + 5) % 10), ("null", None)):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model = book.model if y is None else (lambda x, t, y=y: book.model(x, t, y))
            losses[name] = book.diffusion.training_losses(model, x0, generator=g).mean().item()
    # The right label helps predict the noise; a wrong one hurts; ∅ is in between.
    assert losses["true"] < losses["null"] < losses["wrong"]
    with pytest.raises(ValueError, match="book model"):
        load_book_model(name="cifar10")
