"""Many images as one resumable job: batches, finished chunks kept on disk, and the output file.

``run_batches`` samples a list of image indices a batch at a time. ``run_to_file`` does the same for a
job that writes ``out`` (``.npz`` or ``.png``): chunk c holds images c·K … (c+1)·K − 1 and is written,
atomically, to ``<out>.partial/chunk-<c>.npy`` as soon as its last image is done, beside ``job.json``, the
arguments that determine the images. Rerun with the same job, it skips the chunks already there (whatever
the batch size); a different job raises ValueError naming what differs. The partial folder is removed
once the output is written. Nothing here knows how images are made: ``generation.generate`` hands in a
function from indices to uint8 images.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .checkpoint import atomic_path, is_temp_file, write_text_atomic
from .grids import save_uint8_grid
from .locks import hold

OUTPUT_SUFFIXES = (".npz", ".png")
SampleFn = Callable[[Sequence[int]], np.ndarray]  # image indices → uint8 images [b, H, W, C]


def run_batches(sample: SampleFn, indices: list[int], batch_size: int, progress: bool, done: int, total: int,
                on_batch: Callable[[dict[int, np.ndarray]], None] | None = None) -> np.ndarray | None:
    """Sample ``indices`` in batches. With ``on_batch``, hand it each batch ({index: image}) and keep
    nothing (the caller stores them); without, return all images stacked."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, unit="img", desc="sampling")
    out = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        images = sample(batch)
        if on_batch is not None:
            on_batch(dict(zip(batch, images, strict=True)))
        else:
            out.append(images)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return np.concatenate(out) if out else None


def _open_partial(partial: Path, job: dict) -> None:
    """Create ``partial/job.json``, or check that the unfinished job there is this one."""
    job_file = partial / "job.json"
    if job_file.is_file():
        old = json.loads(job_file.read_text())
        if old != job:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {job.get(k)!r} now"
                             for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k))
            raise ValueError(f"{partial} holds an unfinished job with other arguments ({diff}); rerun it with "
                             f"the same arguments to continue it, or delete {partial} to start afresh")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job_file, json.dumps(job, indent=2) + "\n")


def run_to_file(out: Path, job: dict, sample: SampleFn, batch_size: int, progress: bool) -> np.ndarray:
    """The resumable job: ``job`` holds at least ``n``, ``chunk_size`` and ``image_shape`` (C, H, W)."""
    partial = out.with_name(out.name + ".partial")
    lock = out.with_name(f".{out.name}.lock")  # one job per output at a time; a killed one releases it
    with hold(lock, f"the sampling job of {out}"):
        images = _run_locked(out, partial, job, sample, batch_size, progress)
        lock.unlink(missing_ok=True)
    return images


def _run_locked(out: Path, partial: Path, job: dict, sample: SampleFn, batch_size: int, progress: bool) -> np.ndarray:
    n, K = job["n"], job["chunk_size"]
    for p in partial.glob(".*.tmp"):  # writes that a killed job left half done
        if is_temp_file(p):
            p.unlink()
    _open_partial(partial, job)
    chunks = [range(c * K, min(n, (c + 1) * K)) for c in range((n + K - 1) // K)]

    def chunk_path(c: int) -> Path:
        return partial / f"chunk-{c:06d}.npy"

    todo = [c for c in range(len(chunks)) if not chunk_path(c).is_file()]
    pending: dict[int, dict[int, np.ndarray]] = {c: {} for c in todo}

    def save_finished(images: dict[int, np.ndarray]) -> None:
        for i, image in images.items():
            pending[i // K][i] = image
        for c in [c for c, got in pending.items() if len(got) == len(chunks[c])]:
            got = pending.pop(c)
            _save_chunk(chunk_path(c), np.stack([got[i] for i in chunks[c]]))

    indices = [i for c in todo for i in chunks[c]]
    run_batches(sample, indices, batch_size, progress, n - len(indices), n, save_finished)
    c_, h, w = job["image_shape"]
    images = np.concatenate([_load_chunk(chunk_path(c), (len(chunks[c]), h, w, c_)) for c in range(len(chunks))])
    _write_output(out, images, job)
    shutil.rmtree(partial)
    return images


def _write_output(out: Path, images: np.ndarray, job: dict) -> None:
    """``.npz``: ``images`` and ``job`` (JSON), plus a grid of the first 64 beside it; ``.png``: a grid of all."""
    if out.suffix.lower() == ".npz":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, job=np.array(json.dumps(job, sort_keys=True)))
        save_uint8_grid(images[:64], out.with_suffix(".png"))
    else:
        save_uint8_grid(images, out)


def _save_chunk(path: Path, images: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, images)


def _load_chunk(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a chunk of images ({e}; pickled objects are never loaded): delete it "
                         "to redo it") from None
    if images.dtype != np.uint8 or images.shape != shape:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, expected uint8 {shape}; delete it to redo it")
    return images
