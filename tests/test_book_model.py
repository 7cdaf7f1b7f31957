"""The book's shared model and its data: scikit-learn's bundled digits, the digits config, the shipped weights."""

import pytest
import torch

from ddpm_lib import get_config
from ddpm_lib.data import load_digits, make_dataset, to_model_range
from ddpm_lib.loading import WEIGHTS_DIR, load_book_model


def test_digits_splits_are_disjoint_and_on_17_levels():
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8
    levels = torch.cat([train.images, test.images]).unique()
    assert levels.tolist() == [round(k * 255 / 16) for k in range(17)]
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


def test_digits_config_trains_on_the_training_split():
    cfg = get_config("digits")
    ds = make_dataset(cfg.train.dataset, cfg.model.image_size, cfg.model.in_channels)
    assert torch.equal(ds.images, load_digits("train").images)
    assert (cfg.diffusion.T, cfg.diffusion.schedule, cfg.diffusion.mean_type) == (1000, "linear", "eps")
    with pytest.raises(ValueError, match="digits"):
        make_dataset("digits", 32, 3)


def test_shipped_book_model_loads_and_denoises():
    assert (WEIGHTS_DIR / "digits.safetensors").is_file(), "run tools/train_book_model.py"
    book = load_book_model()
    assert book.config.name == "digits" and book.step == book.config.train.steps
    # A trained ε-predictor beats predicting zero noise (loss 1) by far on held-out digits.
    x0 = to_model_range(load_digits("test").images[:64])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loss = book.diffusion.training_losses(book.model, x0, generator=g).mean().item()
    assert loss < 0.2
