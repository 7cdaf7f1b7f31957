"""Data for Algorithm 1: the CIFAR10 reader, image folders, and the deterministic order (offline)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from fakes import write_fake_cifar10
from PIL import Image

from ddpm_lib import data
from ddpm_lib.rng import derive_seed


def test_cifar10_reader_reads_the_documented_layout(tmp_path):
    want, _ = write_fake_cifar10(tmp_path, per_batch=4)
    ds = data.load_cifar10(tmp_path, download=False)
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(want))
    # row = red plane, then green, then blue, each 32×32 row-major
    assert ds.images[3, 1, 2, 5] == want.reshape(20, 3072)[3, 1024 + 2 * 32 + 5]


def test_cifar10_reader_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="not a CIFAR10 batch file.*refusing to load"):
        data.read_cifar10_batch(path)


def test_missing_cifar10_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR10 is not in .*data_batch_1"):
        data.load_cifar10(tmp_path, download=False)


def test_make_dataset_resizes_cifar10_to_the_config_resolution(tmp_path):
    write_fake_cifar10(tmp_path, per_batch=4)
    ds = data.make_dataset("cifar10", 16, cache_dir=tmp_path, download=False)
    assert ds.images.shape == (20, 3, 16, 16) and ds.images.dtype == torch.uint8


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_finds_images_recursively_and_center_crops(tmp_path):
    # a 16×48 (h×w) image: left third red, middle green, right third blue → the crop is green
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, :16, 0] = 255
    wide[:, 16:32, 1] = 255
    wide[:, 32:, 2] = 255
    _png(tmp_path / "a" / "wide.png", wide)
    _png(tmp_path / "b" / "c" / "gray.png", np.full((64, 64), 100, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, size=8)
    assert len(ds) == 2
    crop = ds[0]
    assert crop.shape == (3, 8, 8) and crop.dtype == torch.uint8
    assert (crop[1] > 200).all() and (crop[0] < 60).all() and (crop[2] < 60).all()
    assert torch.equal(ds[1], torch.full((3, 8, 8), 100, dtype=torch.uint8))  # gray → RGB, downscaled


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        data.ImageFolder(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope", 8)
    with pytest.raises(ValueError, match="no training data"):
        data.make_dataset("", 8)


def test_pixels_map_to_minus_one_and_one():
    x = data.to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]
    assert torch.equal(data.to_uint8(data.to_model_range(torch.arange(256, dtype=torch.uint8))),
                       torch.arange(256, dtype=torch.uint8))


def test_each_epoch_visits_every_image_at_most_once():
    n, b = 50, 8
    per_epoch = data.steps_per_epoch(n, b)
    seen = torch.cat([data.batch_indices(n, b, s, seed=3) for s in range(per_epoch)])
    assert len(seen) == per_epoch * b and len(set(seen.tolist())) == len(seen)
    nxt = torch.cat([data.batch_indices(n, b, s, seed=3) for s in range(per_epoch, 2 * per_epoch)])
    assert not torch.equal(seen, nxt)  # a new permutation each epoch


def test_rank_shards_concatenate_to_the_global_batch():
    for step in (0, 7, 13):
        whole = data.batch_indices(40, 8, step, seed=1)
        shards = [data.batch_indices(40, 8, step, seed=1, rank=r, world_size=4) for r in range(4)]
        assert torch.equal(torch.cat(shards), whole)
        flips = [data.flip_mask(8, step, 1, rank=r, world_size=4) for r in range(4)]
        assert torch.equal(torch.cat(flips), data.flip_mask(8, step, 1))


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(ValueError, match="does not divide by the world size 3"):
        data.batch_indices(40, 8, 0, seed=0, rank=0, world_size=3)


def test_dataset_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.steps_per_epoch(5, 8)


def test_iterating_from_step_k_repeats_the_tail_of_a_full_pass():
    ds = data.TensorImages(torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8))
    full = list(data.iterate_batches(ds, 4, seed=0, start_step=0, stop_step=12))
    tail = list(data.iterate_batches(ds, 4, seed=0, start_step=7, stop_step=12))
    assert [s for s, _ in tail] == list(range(7, 12))
    for (s1, x1), (s2, x2) in zip(full[7:], tail, strict=True):
        assert s1 == s2 and torch.equal(x1, x2)


def test_flips_mirror_about_half_the_images():
    ds = data.TensorImages(torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8))
    (_, plain), = data.iterate_batches(ds, 64, 0, 0, 1, random_flip=False)
    (_, flipped), = data.iterate_batches(ds, 64, 0, 0, 1, random_flip=True)
    mask = data.flip_mask(64, 0, 0)
    assert torch.equal(flipped[mask], plain[mask].flip(-1))
    assert torch.equal(flipped[~mask], plain[~mask])
    assert 16 < int(mask.sum()) < 48


def test_folder_batches_come_through_the_loader_in_the_same_order(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        _png(tmp_path / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    ds = data.ImageFolder(tmp_path, 8)
    mem = data.TensorImages(torch.stack([ds[i] for i in range(len(ds))]))
    a = list(data.iterate_batches(ds, 2, seed=5, start_step=0, stop_step=5))
    b = list(data.iterate_batches(mem, 2, seed=5, start_step=0, stop_step=5))
    for (s1, x1), (s2, x2) in zip(a, b, strict=True):
        assert s1 == s2 and torch.equal(x1, x2)


def test_derived_seeds_differ_across_streams_and_steps():
    seeds = {derive_seed(0, tag, s) for tag in ("noise", "flip") for s in range(100)}
    assert len(seeds) == 200
    assert derive_seed(0, "noise", 5) == derive_seed(0, "noise", 5)


def test_to_model_range_leaves_its_input_alone():
    from ddpm_lib.data import to_model_range

    images = torch.tensor([[0.0, 255.0]])
    out = to_model_range(images)
    assert torch.equal(out, torch.tensor([[-1.0, 1.0]])) and torch.equal(images, torch.tensor([[0.0, 255.0]]))


def test_named_datasets_load_by_name_and_refuse_others(tmp_path):
    """One place maps a dataset name to its loader (training, FID references and the bound use it)."""
    from ddpm_lib.data import NAMED_DATASETS, load_split

    assert NAMED_DATASETS == ("cifar10", "digits", "fashion")
    test = load_split("Digits", "test")  # case-insensitive, like --config's dataset field
    assert test.name == "digits-test" and test.images.shape[1:] == (1, 8, 8) and len(test.labels) == len(test)
    with pytest.raises(ValueError, match="not a named dataset; choose one of \\('cifar10', 'digits', 'fashion'\\)"):
        load_split("mnist", "train")
    with pytest.raises(FileNotFoundError):  # CIFAR10 is looked for, not downloaded, when download=False
        load_split("cifar10", "train", cache_dir=tmp_path, download=False)


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """The IDX format (MNIST's): magic 0 0 8 ndim, big-endian int32 dimensions, then the bytes."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([9, 0, 3, 3, 1], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=False)
    ds = data.load_fashion_mnist("train", root=tmp_path)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images[:, 0].numpy(), images) and ds.labels.tolist() == [9, 0, 3, 3, 1]
    assert ds.labels.dtype == torch.int64 and ds.name == "fashion-train"


def test_corrupt_idx_files_are_named(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03rest")  # type 0x0d (float), not unsigned bytes
    with pytest.raises(ValueError, match=f"{bad}.*not an IDX file of unsigned bytes"):
        data.read_idx(bad)
    write_idx(tmp_path / "t.gz", np.zeros((4, 2, 2)))
    (tmp_path / "short.gz").write_bytes((tmp_path / "t.gz").read_bytes()[:-8])  # a cut-off gzip stream
    with pytest.raises(ValueError, match="short.gz"):
        data.read_idx(tmp_path / "short.gz")
    raw = bytes([0, 0, 8, 3]) + np.asarray([4, 2, 2], dtype=">i4").tobytes() + bytes(10)  # 16 bytes promised
    (tmp_path / "trunc").write_bytes(raw)
    with pytest.raises(ValueError, match="trunc.*truncated or corrupt"):
        data.read_idx(tmp_path / "trunc")


def test_missing_fashion_mnist_says_how_to_get_it_and_downloads_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "not-installed")
    asked = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda *a, **kw: asked.append(kw) or None)
    with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("test", cache_dir=tmp_path / "cache")
    assert asked == []  # nothing was fetched without download=True


def test_the_debian_fashion_mnist_package_loads_as_published():
    """The real data, where Debian's dataset-fashion-mnist is installed (CI installs it and requires it)."""
    if not (data.FASHION_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("DDPM_REQUIRE_FASHION"):
            pytest.fail("DDPM_REQUIRE_FASHION is set but dataset-fashion-mnist is not installed")
        pytest.skip("apt-get install dataset-fashion-mnist")
    train, test = (data.load_split("fashion", split, download=False) for split in ("train", "test"))
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:3].tolist() == [9, 0, 0]  # the first training image is an ankle boot
