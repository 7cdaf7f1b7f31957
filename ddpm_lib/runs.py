"""A training run's configuration: a named config with overrides, or the one stored in a run directory.

``resolve_run_config`` gives the config a run will use; ``check_same_model`` refuses to resume a run
with another network or diffusion; ``validate_train_config`` names a bad training setting.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from . import checkpoint as ckpt_io
from .configs import Config, get_config

MAX_LR = 1.0  # above it Adam's steps (about lr per weight) throw any network far off: refused up front

MODEL_SECTIONS = ("model", "diffusion")


def resolve_run_config(out_dir: str | os.PathLike, cfg: Config | str | None = None, resume: bool = False,
                       **train_overrides) -> Config:
    """The config a run will use: ``cfg`` (or a name) with ``TrainConfig`` fields overridden.

    With ``resume`` the run directory's stored config is the base; a ``cfg`` given as well must
    agree with it on the model and diffusion (a checkpoint cannot change architecture). A directory with no
    stored config has no run to resume: ``cfg`` then starts one.
    """
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    if resume and not (Path(out_dir) / ckpt_io.CONFIG_NAME).is_file():
        if cfg is None:
            raise ckpt_io.CheckpointError(f"{out_dir} has no run to resume (no {ckpt_io.CONFIG_NAME}): start one "
                                          "with --config NAME (config=...)")
        resume = False
    if resume:
        stored = ckpt_io.read_config(out_dir)
        if cfg is not None:
            check_same_model(stored, cfg, f"{out_dir}/{ckpt_io.CONFIG_NAME}")
        cfg = stored
    if cfg is None:
        raise ValueError("config is required for a new run (e.g. config='cifar10')")
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg.train)}
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))


def check_same_model(stored: Config, cfg: Config, where: str) -> None:
    """ValueError when ``cfg`` would change the model or diffusion recorded in ``where``."""
    for section in MODEL_SECTIONS:
        a, b = getattr(stored, section), getattr(cfg, section)
        if a != b:
            diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                    if getattr(a, f.name) != getattr(b, f.name)}
            raise ValueError(f"cannot resume: the {section} config differs from {where} "
                             f"(stored vs requested: {diff}); start a new run directory instead")


def validate_train_config(cfg: Config, world_size: int = 1) -> None:
    """ValueError naming the first ``TrainConfig`` field out of range (the batch must split over the processes)."""
    tc = cfg.train
    finite = {name: math.isfinite(getattr(tc, name)) for name in ("lr", "grad_clip", "ema_decay", "label_drop")}
    checks = [
        ("steps", tc.steps >= 0, "must be >= 0"),
        ("batch_size", tc.batch_size >= 1, "must be >= 1"),
        ("lr", finite["lr"] and 0 < tc.lr <= MAX_LR,
         f"must be a number in (0, {MAX_LR:g}]: Adam moves each weight by about lr a step (the paper: 2e-4)"),
        ("warmup", tc.warmup >= 0, "must be >= 0"),
        ("grad_clip", finite["grad_clip"] and tc.grad_clip > 0, "must be a finite number > 0 (the paper: 1)"),
        ("ema_decay", finite["ema_decay"] and 0 <= tc.ema_decay < 1, "must be in [0, 1)"),
        ("seed", tc.seed >= 0, "must be >= 0"),
        ("label_drop", finite["label_drop"] and 0 <= tc.label_drop <= 1, "must be in [0, 1]"),
    ]
    for name, ok, msg in checks:
        if not ok:
            raise ValueError(f"train.{name}={getattr(tc, name)!r} {msg}")
    if tc.batch_size % world_size:
        raise ValueError(f"batch_size={tc.batch_size} (the global batch) does not divide by the "
                         f"number of processes ({world_size})")
