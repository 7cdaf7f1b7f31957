"""Run directories and checkpoints, in safetensors: nothing is ever unpickled.

A run directory (``runs/x/``) holds::

    config.json          the run's Config (``configs.config_to_dict``)
    ckpt.safetensors     the latest training state: model, EMA, Adam state, step
    ckpt-0100000.safetensors   optional copies kept every N steps
    ema.safetensors      the EMA weights alone, for sampling (the paper samples from the EMA, App. B)
    metrics.csv, tb/, samples/   written by ``train.train``

The training checkpoint is one safetensors file. Its tensors are named ``model/<param>``,
``ema/<param>`` and ``optim/<param>/<state>`` (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``),
keyed by parameter *name*, not position. Everything else rides as JSON strings in the safetensors
header's metadata: ``format`` (always ``"ddpm_lib"``), ``kind`` (``"train"`` or ``"ema"``),
``version``, ``step``, ``config`` and ``optimizer`` (param groups: lr, betas, eps, …).
No random-number-generator state is stored: training draws every random number from a
generator seeded by (seed, step, rank) (``rng.derive_seed``), so the step *is* the RNG state.

Files are written atomically: to a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``'d over the old one, so a crash mid-write leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .configs import Config, config_from_dict, config_to_dict

FORMAT = "ddpm_lib"
VERSION = "1"
CKPT_NAME = "ckpt.safetensors"
EMA_NAME = "ema.safetensors"
CONFIG_NAME = "config.json"
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class CheckpointError(Exception):
    """A checkpoint or run directory that cannot be used (missing, corrupt, foreign, mismatched)."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file: tensors by name, the header metadata, step and config."""

    path: Path
    kind: str
    step: int
    config: Config
    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    def group(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under ``prefix/``, with the prefix removed (e.g. ``group("ema")``)."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


# --------------------------------------------------------------------------- atomic files


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        open(tmp, "xb").close()  # a new file with the usual permissions (umask), never an existing one
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) would leave it 0600
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the temporary file of an ``atomic_path`` write (left behind if it was killed)."""
    return bool(_TEMP_NAME.fullmatch(Path(path).name))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: str | os.PathLike) -> Path:
    """Make ``folder`` if needed and write (then remove) a file in it: an OSError now, naming the folder, rather
    than after the work whose result goes there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".write-test") as tmp:
            tmp.write_bytes(b"ok")
        (folder / ".write-test").unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write into {folder}: {e.strerror or e}", str(folder)) from None
    return folder


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor],
                             metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` through ``atomic_path``; tensors are made contiguous CPU copies."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors' own error on a full disk or a vanished folder: name the file
            if type(e).__name__ != "SafetensorError":
                raise
            raise OSError(f"cannot write {path}: {e} (check the free space and permissions)") from None


# --------------------------------------------------------------------------- config


def write_config(run_dir: str | os.PathLike, cfg: Config) -> Path:
    path = Path(run_dir) / CONFIG_NAME
    write_text_atomic(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")
    return path


def read_config(run_dir: str | os.PathLike) -> Config:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {run_dir} is not a ddpm_lib run directory")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid ddpm_lib config: {e}") from e


# --------------------------------------------------------------------------- optimizer state


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer,
                               names: list[str]) -> tuple[dict[str, Tensor], str]:
    """Flatten ``optimizer.state_dict()`` into tensors ``optim/<param name>/<key>`` plus a JSON string.

    ``names[i]`` is the name of the optimizer's i-th parameter. The JSON holds the param groups
    (without their parameter lists) and any non-tensor per-parameter state.
    """
    sd = optimizer.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise ValueError(f"the optimizer has {len(order)} parameters, {len(names)} names were given")
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, name in zip(order, names, strict=True):
        for key, value in sd["state"].get(idx, {}).items():
            if isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])}
              for g in sd["param_groups"]]
    return tensors, json.dumps({"param_groups": groups, "state": scalars})


def optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], names: list[str],
                                 tensors: dict[str, Tensor], meta_json: str) -> None:
    """Inverse of ``optimizer_state_to_tensors`` (``tensors`` without the ``optim/`` prefix): load the
    state into ``optimizer``, whose parameters are ``params`` named ``names``."""
    meta = json.loads(meta_json)
    current = optimizer.state_dict()
    if [len(g["params"]) for g in current["param_groups"]] != [g["num_params"] for g in meta["param_groups"]]:
        raise ValueError("the optimizer's parameter groups differ from the checkpoint's")
    by_param: dict[str, dict] = {}
    for key, value in tensors.items():  # "<param name>/<state key>"
        name, sub = key.rsplit("/", 1)
        by_param.setdefault(name, {})[sub] = value
    unknown = set(by_param) - set(names)
    if unknown:
        raise ValueError(f"optimizer state for unknown parameters {sorted(unknown)[:5]}")
    state: dict[int, dict] = {}
    for i, (p, name) in enumerate(zip(params, names, strict=True)):
        entry = dict(meta["state"].get(name, {}))
        for sub, value in by_param.get(name, {}).items():
            if value.ndim and value.shape != p.shape:
                raise ValueError(f"the optimizer state {name}/{sub} has shape {list(value.shape)}, but the "
                                 f"parameter has {list(p.shape)}")
            if value.shape == p.shape:  # moment buffers keep the parameter's memory format (channels_last)
                value = torch.empty_like(p).copy_(value)
            entry[sub] = value
        if entry:
            state[i] = entry
    groups = []
    start = 0
    for now, saved in zip(current["param_groups"], meta["param_groups"], strict=True):
        n = saved.pop("num_params")
        # hyperparameters come from the checkpoint; how the update runs (fused, foreach, …) from here
        saved = {k: v for k, v in saved.items() if k not in IMPLEMENTATION_KEYS}
        if "betas" in saved:
            saved["betas"] = tuple(saved["betas"])
        groups.append(now | saved | {"params": list(range(start, start + n))})
        start += n
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- save / read


def _metadata(kind: str, step: int, cfg: Config, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "version": VERSION, "kind": kind, "step": str(int(step)),
            "config": json.dumps(config_to_dict(cfg)), "torch_version": torch.__version__, **extra}


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> Path:
    """Write the full training state (after ``step`` optimizer updates) atomically to ``path``."""
    names = [n for n, _ in model.named_parameters()]
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema/{k}": v for k, v in ema.state_dict().items()}
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer, names)
    tensors |= opt_tensors
    write_safetensors_atomic(path, tensors, _metadata("train", step, cfg, optimizer=opt_meta))
    return Path(path)


def save_ema(path: str | os.PathLike, ema: nn.Module, step: int, cfg: Config) -> Path:
    """Write the EMA weights alone (plain UNet state-dict names) atomically to ``path``."""
    write_safetensors_atomic(path, dict(ema.state_dict()), _metadata("ema", step, cfg))
    return Path(path)


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a ddpm_lib safetensors file (training checkpoint or EMA export).

    Raises ``CheckpointError`` naming the file when it is missing, truncated, corrupt, or not one
    of ours (a safetensors file without our header metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a ddpm_lib checkpoint: "
                                      f"its header has no format={FORMAT!r} entry")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path} is not a ddpm_lib checkpoint: {type(e).__name__}: {e}") from e
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')!r}; "
                              f"this ddpm_lib reads version {VERSION}")
    try:
        kind, step = meta["kind"], int(meta["step"])
        cfg = config_from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a ddpm_lib checkpoint: bad header metadata ({e})") from e
    if kind not in ("train", "ema"):
        raise CheckpointError(f"{path} is not a ddpm_lib checkpoint: unknown kind {kind!r}")
    return Checkpoint(path, kind, step, cfg, tensors, meta)


def load_training_state(path: str | os.PathLike, *, model: nn.Module, ema: nn.Module,
                        optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore model, EMA and Adam state in place from a training checkpoint; returns it (``.step``)."""
    ckpt = read_checkpoint(path)
    if ckpt.kind != "train":
        raise CheckpointError(f"{path} holds {ckpt.kind} weights only, not a training state to resume from")
    try:
        model.load_state_dict(ckpt.group("model"))
        ema.load_state_dict(ckpt.group("ema"))
        names = [n for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        optimizer_state_from_tensors(optimizer, params, names, ckpt.group("optim"),
                                     ckpt.metadata["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this model/optimizer: {e}") from e
    return ckpt


def ema_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], Config, int]:
    """(EMA state dict, config, step) from a run directory, an EMA export or a training checkpoint.

    A directory means its ``ema.safetensors`` if present, else its ``ckpt.safetensors``.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / EMA_NAME, path / CKPT_NAME]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise CheckpointError(f"{path} holds no {EMA_NAME} or {CKPT_NAME}")
        path = found[0]
    ckpt = read_checkpoint(path)
    weights = ckpt.tensors if ckpt.kind == "ema" else ckpt.group("ema")
    return weights, ckpt.config, ckpt.step


def keep_copy(path: str | os.PathLike, step: int) -> Path:
    """Keep the checkpoint at ``path`` as ``<stem>-<step>.safetensors`` (a hard link when possible)."""
    path = Path(path)
    dest = path.with_name(f"{path.stem}-{step:07d}{path.suffix}")
    dest.unlink(missing_ok=True)
    try:
        os.link(path, dest)
    except OSError:
        with atomic_path(dest) as tmp:
            shutil.copyfile(path, tmp)
    return dest
