"""Command line: ``python -m ddpm_lib train …`` and ``python -m ddpm_lib sample …`` (or ``ddpm-lib …``).

A thin layer over ``ddpm_lib.train``: ``train`` calls ``train.run_config`` and ``train.train``;
``sample`` calls ``train.load_for_sampling``, ``train.sample_images`` and ``train.save_grid``.
Examples::

    python -m ddpm_lib train --config cifar10 --out runs/cifar10            # the paper's recipe, 800k steps
    python -m ddpm_lib train --out runs/cifar10 --resume --steps 900000     # continue the same run further
    torchrun --nproc_per_node 8 -m ddpm_lib train --config cifar10 --out runs/c10 --precision bf16
    python -m ddpm_lib sample --checkpoint runs/cifar10 --n 64 --out grid.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .configs import CONFIGS


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .train import PRECISIONS

    parser = argparse.ArgumentParser(prog="ddpm-lib", description="DDPM (Ho et al. 2020): train and sample.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (Algorithm 1)",
                       description="Train with Algorithm 1. --steps is the run's total number of steps.")
    t.add_argument("--config", choices=sorted(CONFIGS), help="named config (required unless --resume)")
    t.add_argument("--out", required=True, type=Path, help="run directory (config, checkpoints, logs)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--steps", type=_int_at_least(0), help="total training steps of the run")
    t.add_argument("--batch-size", type=_int_at_least(1), help="global batch size (split over processes)")
    t.add_argument("--lr", type=_positive_float, help="learning rate after warm-up")
    t.add_argument("--seed", type=_int_at_least(0), help="seed of the initialization, data order and noise")
    t.add_argument("--data", type=Path, help="folder of images to train on instead of the config's dataset")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, tf32 (fp32 with TF32 matmuls on CUDA) or bf16 autocast")
    t.add_argument("--compile", action="store_true", help="torch.compile the network")
    t.add_argument("--device", default=None, help="cuda, cuda:1, cpu … (default: cuda if available)")
    t.add_argument("--log-every", type=_int_at_least(1), default=100, help="steps between metric rows")
    t.add_argument("--ckpt-every", type=_int_at_least(1), default=5000, help="steps between checkpoints")
    t.add_argument("--keep-every", type=_int_at_least(0), default=0,
                   help="also keep a copy of the checkpoint every N steps (0: only the latest)")
    t.add_argument("--sample-every", type=_int_at_least(0), default=20_000,
                   help="steps between EMA sample grids (0: never)")
    t.add_argument("--num-samples", type=_int_at_least(1), default=64, help="images per sample grid")
    t.add_argument("--num-workers", type=_int_at_least(0), default=None,
                   help="data loader processes for image folders")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a grid from the EMA weights (Algorithm 2)")
    s.add_argument("--checkpoint", required=True, type=Path,
                   help="run directory, ema.safetensors or ckpt.safetensors")
    s.add_argument("--n", type=_int_at_least(1), default=64, help="number of images")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="images per batch (default: all at once)")
    s.add_argument("--device", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sample)
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from .train import run_config, train

    if args.config is None and not args.resume:
        raise ValueError("--config is required for a new run (or pass --resume to continue one)")
    data = None
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data {args.data}: no such folder")
        data = str(args.data.resolve())
    cfg = run_config(args.out, args.config, resume=args.resume, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, dataset=data)
    summary = train(cfg, args.out, resume=args.resume, device=args.device, precision=args.precision,
                    compile=args.compile, log_every=args.log_every, ckpt_every=args.ckpt_every,
                    keep_every=args.keep_every, sample_every=args.sample_every, num_samples=args.num_samples,
                    num_workers=args.num_workers, progress=not args.no_progress)
    if summary.loss is not None:
        print(f"{args.out}: step {summary.step}, loss {summary.loss:.4f}")


def cmd_sample(args: argparse.Namespace) -> None:
    from .train import load_for_sampling, sample_images, save_grid

    loaded = load_for_sampling(args.checkpoint, args.device)
    images = sample_images(loaded.model, loaded.diffusion, args.n, batch_size=args.batch_size, seed=args.seed,
                           progress=not args.no_progress)
    path = save_grid(images, args.out)
    print(f"{path}: {args.n} samples of {loaded.config.name!r} (EMA, step {loaded.step}, seed {args.seed})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ddpm-lib`` / ``python -m ddpm_lib``; returns the exit status."""
    from .checkpoint import CheckpointError
    from .train import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, CheckpointError,
            NonFiniteLossError) as e:
        print(f"ddpm-lib {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddpm-lib {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0
