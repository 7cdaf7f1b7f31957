"""Training data for Algorithm 1: x_0 ~ q(x_0), scaled to [-1, 1] (§4: "we assume that image data
consists of integers in {0, 1, …, 255} scaled linearly to [−1, 1]"), with random horizontal flips
(App. B).

Three sources:

* ``load_cifar10(root)`` — the CIFAR10 training split (50,000 images, 32×32). The archive is
  downloaded by torchvision into a cache folder on first use, and only when training asks for it;
  the batches are then read by a small reader of the documented ``cifar-10-batches-py`` format
  that refuses any pickled object other than NumPy arrays.
* ``load_digits(split)`` — scikit-learn's bundled 8×8 handwritten digits (1,797 images, 17 grey
  levels), which ship inside the package: the book's small model trains on them offline. The first
  1,500 are the training split, the remaining 297 the test split.
* ``ImageFolder(path, size)`` — any folder of images, searched recursively, each resized (shorter
  side) and center-cropped to ``size`` × ``size`` (for LSUN / CelebA-HQ style data).

The order of the data is a pure function of (seed, step): each epoch is a permutation drawn from
(seed, epoch); the global batch of step s is a fixed slice of it; with W processes, rank r takes the
r-th contiguous shard of that batch; flips are drawn per step from (seed, step). So the data
position of a run *is* its step, and a resumed run sees exactly the batches an uninterrupted run
would have seen (``batch_indices``, ``flip_mask``).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .rng import derive_seed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


def default_cache_dir() -> Path:
    """Where downloads go: ``$DDPM_LIB_CACHE`` or ``~/.cache/ddpm_lib``."""
    return Path(os.environ.get("DDPM_LIB_CACHE", Path.home() / ".cache" / "ddpm_lib"))


def to_model_range(images: Tensor) -> Tensor:
    """uint8 {0, …, 255} → float32 in [-1, 1] (§4)."""
    return images.to(torch.float32) / 127.5 - 1.0  # a new tensor: the caller's images stay as they are


def to_uint8(images: Tensor) -> Tensor:
    """float in [-1, 1] → uint8 {0, …, 255}, rounding to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------- sources


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as one uint8 tensor [N, C, H, W] (CIFAR10 fits: 150 MB), with optional
    class labels, an int64 tensor [N] (for class-conditional training)."""

    def __init__(self, images: Tensor, name: str = "tensor", labels: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], "
                             f"got {images.dtype} {list(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dtype != torch.int64 or tuple(labels.shape) != (images.shape[0],):
                raise ValueError(f"labels must be an int64 tensor [N] = [{images.shape[0]}], "
                                 f"got {labels.dtype} {list(labels.shape)}")
        self.images, self.name, self.labels = images, name, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]

    def batch(self, indices: Tensor) -> Tensor:
        """The uint8 images at ``indices`` [b] as [b, C, H, W] (one gather, no DataLoader needed)."""
        return self.images[indices]

    def batch_labels(self, indices: Tensor) -> Tensor:
        """The class labels at ``indices`` [b]; ValueError when the dataset has none."""
        if self.labels is None:
            raise ValueError(f"dataset {self.name!r} has no class labels (a class-conditional model needs them)")
        return self.labels[indices.to(self.labels.device)]


class ImageFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursively, sorted by path), resized and center-cropped.

    Each image is read with Pillow, converted to RGB (or L for one channel), its shorter side
    resized to ``size`` (bicubic, antialiased when shrinking), then center-cropped to size × size.
    """

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3) -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"data path {str(root)!r} is not a folder of images")
        self.files = sorted(p for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(
                f"data folder {str(root)!r} holds no images "
                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        unreadable = _unreadable(self.files)
        if unreadable:
            shown = "; ".join(f"{p}: {why}" for p, why in unreadable[:3])
            raise ImageReadError(f"{len(unreadable)} of {len(self.files)} files in {root} cannot be read as images "
                                 f"({shown}{' …' if len(unreadable) > 3 else ''}): fix or remove them")
        self.root, self.size, self.channels, self.name = root, size, channels, str(root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        try:
            return load_image(self.files[index], self.size, self.channels)
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's to fix: name it
            raise ImageReadError(f"{self.files[index]} cannot be read as an image ({type(e).__name__}: {e}); "
                                 "fix or remove it") from None


class ImageReadError(ValueError):
    """An image file that Pillow cannot read (the message names it)."""


def _unreadable(files: list[Path]) -> list[tuple[Path, str]]:
    """The files whose header Pillow cannot read (a quick check: truncated pixel data shows only when read)."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - the header is parsed on open
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append((p, str(e).split(" (")[0] or type(e).__name__))
    return bad


def load_image(path: str | os.PathLike, size: int, channels: int = 3) -> Tensor:
    """One image file as uint8 [C, size, size]: shorter side resized to ``size``, then center-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR10 batches (dicts of bytes, lists and NumPy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2 (str → bytes, nothing else)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: "
                                         "the CIFAR10 format holds only arrays")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` file → (uint8 images [N, 3, 32, 32], int64 labels [N]).

    The documented format: a pickled dict with ``b"data"`` (uint8 [N, 3072], each row the red,
    green then blue 32×32 planes in row-major order) and ``b"labels"`` (N ints).
    """
    with open(path, "rb") as f:
        try:
            d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        except Exception as e:  # noqa: BLE001 - any failure means "not a CIFAR10 batch"
            raise ValueError(f"{path} is not a CIFAR10 batch file: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path} is not a CIFAR10 batch file: expected a dict with b'data' and b'labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be [N, 3072] uint8, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], dtype=np.int64)


def load_cifar10(root: str | os.PathLike | None = None, download: bool = True, split: str = "train") -> TensorImages:
    """A CIFAR10 split as uint8 [N, 3, 32, 32]: ``"train"`` (the 5 ``data_batch_*`` files, 50,000
    images) or ``"test"`` (``test_batch``, 10,000).

    ``root`` holds (or will hold) ``cifar-10-batches-py/``; default ``default_cache_dir()``.
    If the files are missing and ``download`` is true, torchvision fetches and checks the archive.
    """
    files = {"train": CIFAR10_TRAIN_FILES, "test": (CIFAR10_TEST_FILE,)}
    if split not in files:
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    root = Path(root) if root is not None else default_cache_dir()
    folder = root / CIFAR10_FOLDER
    missing = [f for f in files[split] if not (folder / f).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(f"CIFAR10 is not in {folder} (missing {', '.join(missing)}) "
                                    "and download=False")
        from torchvision.datasets import CIFAR10

        print(f"downloading CIFAR10 into {root} …")
        try:
            CIFAR10(str(root), train=split == "train", download=True)
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            reason = getattr(e, "reason", None) or e
            raise DataUnavailableError(
                f"CIFAR10 is not in {folder} and could not be downloaded ({reason}). Connect to the internet, "
                "or train offline: --config fashion (Fashion-MNIST: apt-get install dataset-fashion-mnist) "
                "or --data DIR (a folder of images)") from None
    batches = [read_cifar10_batch(folder / f) for f in files[split]]
    images = np.concatenate([b[0] for b in batches])
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return TensorImages(torch.from_numpy(images), name="cifar10" if split == "train" else "cifar10-test",
                        labels=labels)


DIGITS_TRAIN = 1500  # the first 1,500 of scikit-learn's 1,797 digits train; the rest are held out


def load_digits(split: str = "train") -> TensorImages:
    """scikit-learn's 8×8 digits (UCI ML hand-written digits; bundled, no download) as uint8
    [N, 1, 8, 8]: grey levels 0…16 mapped to the nearest of 0…255, with their labels 0…9 (``.labels``).
    ``split`` is "train" (the first 1,500) or "test" (the other 297)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    digits = sk_load_digits()
    levels = torch.from_numpy(digits.images)  # float64 in [0, 16]
    images = (levels * (255 / 16)).round().to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return TensorImages(images[part], name=f"digits-{split}", labels=labels[part])


FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (MIT licence)
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (the MNIST format; ``.gz`` or not) as a uint8 array: a 4-byte magic number (0, 0, type 0x08
    for unsigned bytes, the number of dimensions), the dimensions as big-endian int32, then the data."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} cannot be read as an IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: the header says {dims} ({int(np.prod(dims)):,} bytes), the file holds "
                         f"{data.size:,}: truncated or corrupt")
    return data.reshape(dims)


def _fashion_file(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
                       cache_dir: str | os.PathLike | None = None) -> TensorImages:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017: 60,000 training and 10,000 test 28×28 grey images of 10
    kinds of clothing, ``FASHION_CLASSES``) as uint8 [N, 1, 28, 28] with labels 0…9.

    Read from ``root`` if given, else from Debian's package (``apt-get install dataset-fashion-mnist`` puts the
    original IDX files in ``FASHION_DEBIAN_DIR``), else from torchvision's download folder under
    ``cache_dir`` (default ``default_cache_dir()``). Only with ``download=True`` does torchvision fetch it when
    it is in none of them (a training run or ``eval`` asks for that, through ``load_split``; tests and the
    book never do).
    """
    if split not in FASHION_FILES:
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "FashionMNIST" / "raw"
    folders = [Path(root)] if root is not None else [FASHION_DEBIAN_DIR, cache]
    files = [_fashion_file(name, folders) for name in FASHION_FILES[split]]
    if None in files:
        if not download:
            raise DataUnavailableError(
                f"Fashion-MNIST is not in {' or '.join(str(f) for f in folders)}: on Debian or Ubuntu, "
                f"apt-get install dataset-fashion-mnist; elsewhere load_fashion_mnist(download=True) has "
                f"torchvision fetch it into {cache}")
        from torchvision.datasets import FashionMNIST

        print(f"downloading Fashion-MNIST into {cache.parent.parent} …")
        try:
            FashionMNIST(str(cache.parent.parent), train=split == "train", download=True)
        except (OSError, RuntimeError) as e:
            raise DataUnavailableError(f"Fashion-MNIST could not be downloaded ({getattr(e, 'reason', e)}): on "
                                       "Debian or Ubuntu, apt-get install dataset-fashion-mnist") from None
        files = [_fashion_file(name, [cache]) for name in FASHION_FILES[split]]
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{files[0]} and {files[1]} do not hold images [N, H, W] and one label each")
    return TensorImages(torch.from_numpy(images.copy())[:, None], name=f"fashion-{split}",
                        labels=torch.from_numpy(labels.astype(np.int64)))


def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 [N, C, H, W] → uint8 [N, C, size, size] (antialiased bilinear; used for CIFAR10 at 16×16)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


NAMED_DATASETS = ("cifar10", "digits", "fashion")
MIRRORED_IS_NOT_DATA = ("digits",)  # a mirrored digit is no digit: random flips are off for these


class DataUnavailableError(ValueError):
    """A named data set is missing and cannot be fetched (offline); the message says what to do."""


def mirror_invariant(dataset: str) -> bool:
    """Whether a horizontally flipped image of ``dataset`` is still one of its images (App. B's flips)."""
    return dataset.lower() not in MIRRORED_IS_NOT_DATA


def load_split(dataset: str, split: str = "train", cache_dir: str | os.PathLike | None = None,
               download: bool = True) -> TensorImages:
    """A dataset known by name (``NAMED_DATASETS``), ``train`` or ``test`` split: ``cifar10``
    (downloaded by torchvision when ``download``), ``digits`` (bundled with scikit-learn) or ``fashion``
    (Fashion-MNIST: Debian's package, else torchvision's download when ``download``)."""
    name = dataset.lower()
    if name == "cifar10":
        return load_cifar10(cache_dir, download, split)
    if name == "fashion":
        return load_fashion_mnist(split, download=download, cache_dir=cache_dir)
    if name == "digits":
        return load_digits(split)
    raise ValueError(f"dataset={dataset!r} is not a named dataset; choose one of {NAMED_DATASETS}")


def make_dataset(dataset: str, image_size: int, channels: int = 3,
                 cache_dir: str | os.PathLike | None = None, download: bool = True):
    """The dataset named by ``TrainConfig.dataset``: ``"cifar10"``, ``"digits"``, ``"fashion"`` or a folder.

    CIFAR10 is resized to ``image_size`` when the config asks for another resolution (``tiny``: 16).
    """
    if not dataset:
        raise ValueError("no training data: set TrainConfig.dataset to 'cifar10', 'fashion', 'digits' "
                         "or pass a folder of images (--data DIR)")
    if dataset.lower() not in NAMED_DATASETS:
        return ImageFolder(dataset, image_size, channels)
    if dataset.lower() == "cifar10" and channels != 3:
        raise ValueError(f"CIFAR10 has 3 channels, the model expects {channels}")
    if dataset.lower() == "digits" and (channels != 1 or image_size != 8):
        raise ValueError(f"digits are 1×8×8; the model expects {channels}×{image_size}×{image_size}")
    if dataset.lower() == "fashion" and channels != 1:
        raise ValueError(f"Fashion-MNIST images are grey (1 channel), the model expects {channels}")
    ds = load_split(dataset, "train", cache_dir, download)
    return TensorImages(resize_images(ds.images, image_size), name=ds.name, labels=ds.labels)


# --------------------------------------------------------------------------- order


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    """Whole global batches per epoch (the last partial batch of a permutation is dropped)."""
    if num_images < global_batch:
        raise ValueError(f"the dataset has {num_images} images, fewer than one global batch ({global_batch})")
    return num_images // global_batch


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    """The order of epoch ``epoch``: a permutation of range(num_images) drawn from (seed, epoch).

    Cached, since every step of an epoch slices the same permutation (do not modify the result).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_images, generator=g)


def batch_indices(num_images: int, global_batch: int, step: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> Tensor:
    """Dataset indices of rank ``rank``'s share of the global batch of step ``step``.

    Step s takes slice s mod E of epoch s // E's permutation (E = steps per epoch); rank r of W takes
    the r-th of W contiguous, equal shards of it.
    """
    if global_batch % world_size:
        raise ValueError(f"batch_size={global_batch} does not divide by the world size {world_size}")
    per_epoch = steps_per_epoch(num_images, global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = epoch_permutation(num_images, seed, epoch)
    local = global_batch // world_size
    start = pos * global_batch + rank * local
    return perm[start:start + local]


def flip_mask(global_batch: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Which images of rank ``rank``'s share to flip horizontally at step ``step`` (p = 1/2 each).

    Drawn for the whole global batch from (seed, step), so it does not depend on the world size.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "flip", step))
    mask = torch.rand(global_batch, generator=g) < 0.5
    local = global_batch // world_size
    return mask[rank * local:(rank + 1) * local]


def apply_flips(images: Tensor, flip: Tensor) -> Tensor:
    """Flip horizontally the images [b, C, H, W] where ``flip`` [b] is true (App. B's augmentation)."""
    flip = flip.to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class _StepBatches(torch.utils.data.Sampler):
    """Yields rank ``rank``'s index list for steps start … stop − 1 (for a DataLoader's batch_sampler)."""

    def __init__(self, n: int, global_batch: int, seed: int, start: int, stop: int, rank: int, world: int):
        self.args = (n, global_batch, seed, rank, world)
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        n, b, seed, rank, world = self.args
        for step in range(self.start, self.stop):
            yield batch_indices(n, b, step, seed, rank, world).tolist()


def _one_line_errors(batches: Iterator[Tensor]) -> Iterator[Tensor]:
    """A DataLoader's batches; a worker's ``ImageReadError`` (re-raised with the worker's whole traceback in
    its message) comes out as its own one-line message."""
    while True:
        try:
            images = next(batches)
        except StopIteration:
            return
        except ImageReadError as e:
            raise ImageReadError(str(e).strip().splitlines()[-1].removeprefix("ImageReadError: ")) from None
        yield images


def iterate_batches(dataset, global_batch: int, seed: int, start_step: int, stop_step: int,
                    rank: int = 0, world_size: int = 1, random_flip: bool = True,
                    num_workers: int = 0, with_labels: bool = False) -> Iterator[tuple]:
    """(step, uint8 images [global_batch / world_size, C, H, W]) for step = start_step … stop_step − 1.

    In-memory datasets are gathered directly; folders are read by a DataLoader (``num_workers``
    processes) in the same deterministic order. Flips (App. B) are applied here. With ``with_labels``
    (class-conditional training) it yields (step, images, labels [b]) instead; only in-memory datasets
    with ``labels`` have them (a folder of images raises ValueError).
    """
    steps_per_epoch(len(dataset), global_batch)  # fail early with a clear message
    if with_labels:
        if not isinstance(dataset, TensorImages) or dataset.labels is None:
            raise ValueError(f"dataset {getattr(dataset, 'name', dataset)!r} has no class labels: class-conditional "
                             "training needs a labelled dataset ('cifar10', 'fashion' or 'digits')")
        for step in range(start_step, stop_step):
            idx = batch_indices(len(dataset), global_batch, step, seed, rank, world_size)
            images = dataset.batch(idx)
            if random_flip:
                images = apply_flips(images, flip_mask(global_batch, step, seed, rank, world_size))
            yield step, images, dataset.batch_labels(idx)
        return
    if isinstance(dataset, TensorImages):
        def gather() -> Iterator[Tensor]:
            for step in range(start_step, stop_step):
                yield dataset.batch(batch_indices(len(dataset), global_batch, step, seed, rank, world_size))
        batches = gather()
    else:
        sampler = _StepBatches(len(dataset), global_batch, seed, start_step, stop_step, rank, world_size)
        batches = _one_line_errors(iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False)))
    for step, images in zip(range(start_step, stop_step), batches, strict=True):
        if random_flip:
            images = apply_flips(images, flip_mask(global_batch, step, seed, rank, world_size))
        yield step, images
