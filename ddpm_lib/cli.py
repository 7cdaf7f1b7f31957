"""Command line: ``python -m ddpm_lib train | sample | eval …`` (or ``ddpm-lib …``).

A thin layer over the library: ``train`` calls ``runs.resolve_run_config`` and ``train.train``;
``sample`` calls ``loading.load_for_sampling`` and ``generation.generate``; ``eval`` calls
``evaluate.run_eval``. Arguments are parsed here; whether they make sense together is checked by the
library, whose ValueError the CLI prints as one line.
Examples::

    python -m ddpm_lib train --config cifar10 --out runs/cifar10            # the paper's recipe, 800k steps
    python -m ddpm_lib train --out runs/cifar10 --resume --steps 900000     # continue the same run further
    torchrun --nproc_per_node 8 -m ddpm_lib train --config cifar10 --out runs/c10 --precision bf16
    python -m ddpm_lib sample --checkpoint runs/cifar10 --n 64 --out grid.png
    python -m ddpm_lib sample --checkpoint runs/cifar10 --n 50000 --batch-size 1000 --out samples.npz
    python -m ddpm_lib sample --checkpoint google/ddpm-cifar10-32 --sampler ddim --steps 50 --out ddim50.npz
    python -m ddpm_lib sample --checkpoint runs/cifar10_cond --class-label all --guidance-scale 1 --out cfg.png
    python -m ddpm_lib eval --samples samples.npz --out report.json             # FID (train, test), IS
    python -m ddpm_lib eval --checkpoint runs/cifar10 --metrics nll rd --out bound.json   # Table 1 NLL, §4.3
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .configs import CONFIGS
from .data import NAMED_DATASETS
from .evaluate import METRICS, run_eval
from .generation import generate
from .jobs import OUTPUT_SUFFIXES
from .loading import load_for_sampling
from .locks import InUseError
from .precision import PRECISIONS
from .runlog import NonFiniteLossError
from .runs import resolve_run_config
from .samplers import SAMPLERS, SPACINGS
from .train import COMPILE_MODES, train


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


def _float_in(low: float, high: float = float("inf"), low_open: bool = False):
    """An argparse type: a number in [low, high] (or (low, high] when ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not ((value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(
                f"{value} must be > {low:g}" if high == float("inf") else f"{value} must lie in [{low:g}, {high:g}]")
        return value
    parse.__name__ = "number"
    return parse


_positive_float = _float_in(0.0, low_open=True)
_unit_float = _float_in(0.0, 1.0)
_nonnegative_float = _float_in(0.0)


def _class_labels(text: str) -> int | str | list[int]:
    """--class-label: ``all`` (classes 0, 1, … in turn), one int, or a comma list cycled over the images."""
    if text.strip().lower() in ("all", "cycle"):
        return "cycle"
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all', an integer or a comma list of integers") from None
    if any(label < 0 for label in labels):
        raise argparse.ArgumentTypeError(f"{text!r}: class labels must be >= 0")
    return labels[0] if len(labels) == 1 else labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-lib", description="DDPM (Ho et al. 2020): train and sample.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    return parser


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model (Algorithm 1)",
                       description="Train with Algorithm 1. --steps is the run's total number of steps.")
    t.add_argument("--config", choices=sorted(CONFIGS), help="named config (required unless --resume)")
    t.add_argument("--out", required=True, type=Path, help="run directory (config, checkpoints, logs)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--steps", type=_int_at_least(0), help="total training steps of the run")
    t.add_argument("--batch-size", type=_int_at_least(1), help="global batch size (split over processes)")
    t.add_argument("--lr", type=_positive_float, help="learning rate after warm-up")
    t.add_argument("--seed", type=_int_at_least(0), help="seed of the initialization, data order and noise")
    t.add_argument("--label-drop", type=_unit_float,
                   help="class-conditional configs: probability of training on the null label (default 0.1)")
    t.add_argument("--data", help="data to train on instead of the config's: a data set (cifar10, fashion, digits) "
                                  "or a folder of images")
    t.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, tf32 (fp32 with TF32 matmuls on CUDA) or bf16 autocast")
    t.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the network; optionally a mode: reduce-overhead adds CUDA graphs "
                        "(fastest on one GPU)")
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


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample images from the EMA weights (Algorithm 2 or DDIM)",
                       description="Sample with Algorithm 2 (ddpm) or DDIM into a .npz (uint8 images [N, H, W, C] "
                                   "under 'images', and a grid of the first 64 beside it) or a .png grid. Image i "
                                   "depends only on --seed and i, not on --batch-size. An interrupted job keeps "
                                   "its finished chunks in OUT.partial/; rerun the same command to continue it.")
    s.add_argument("--checkpoint", required=True,
                   help="run directory, ema.safetensors, ckpt.safetensors, or google/ddpm-cifar10-32 (online)")
    s.add_argument("--n", type=_int_at_least(1), default=64, help="number of images")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="output: .npz or .png")
    s.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: Algorithm 2, all T steps; ddim: Song et al. 2021, eq. 12")
    s.add_argument("--steps", type=_int_at_least(1), default=None, help="DDIM steps (default: all T)")
    s.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="DDIM timesteps: uniform, or quadratic (what the DDIM paper uses for CIFAR10)")
    s.add_argument("--eta", type=_unit_float, default=0.0,
                   help="DDIM eta in [0, 1]: 0 deterministic, 1 the DDPM posterior variance")
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--class-label", type=_class_labels, default=None,
                   help="class-conditional checkpoints: 'all' (classes 0, 1, … in turn), one class, or a comma "
                        "list cycled over the images (default: the null label, i.e. unconditional)")
    s.add_argument("--guidance-scale", type=_nonnegative_float, default=0.0,
                   help="classifier-free guidance strength w >= 0 (Ho & Salimans 2022): "
                        "eps = (1 + w) eps(x, y) - w eps(x, null); 0: plain conditional sampling")
    s.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="images per batch (default: min(n, chunk size)); does not change the images")
    s.add_argument("--chunk-size", type=_int_at_least(1), default=1000,
                   help="images per file of an unfinished job (what a rerun keeps)")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, tf32 (fp32 with TF32 matmuls on CUDA) or bf16 autocast")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the network (3x faster in benchmarks/bench.py's sampling loop on an "
                        "H200; rounds differently from eager)")
    s.add_argument("--noise", default="cpu", choices=["cpu", "device"],
                   help="where each image's noise is made from its seed: one CPU generator per image (default), "
                        "or Philox on the sampling device (no host work per step; other images for a seed)")
    s.add_argument("--graph", action="store_true",
                   help="replay each sampling step from a CUDA graph (CUDA, with --noise device): one launch a step")
    s.add_argument("--device", default=None, help="cuda, cuda:1, cpu … (default: cuda if available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample, interrupted="finished chunks are kept; rerun the same command to continue")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="FID / IS of samples; NLL (bits/dim) and rate-distortion of a checkpoint",
                       description="Evaluate as the paper did (§4): FID against CIFAR10's training set (and its "
                                   "test set) and IS, through torch-fidelity's TF-Inception replica (weights "
                                   "downloaded on first use), and the test-set NLL from the full bound (eq. 5) "
                                   "with its per-t terms and the rate-distortion curve (§4.3). Writes a JSON report.")
    e.add_argument("--samples", type=Path, default=None, help=".npz with uint8 'images' [N, H, W, C] (or .npy)")
    e.add_argument("--checkpoint", default=None, help="run directory, ema/ckpt .safetensors, or google/ddpm-cifar10-32")
    e.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="default: fid and is for --samples; nll and rd added for --checkpoint; fid_fashion: FID "
                        "in a Fashion-MNIST classifier's features (offline), with its floor")
    e.add_argument("--data", default=None,
                   help="images for the bound: a dataset name (cifar10, fashion, digits), .npz/.npy or a folder "
                        "(default: the checkpoint's training dataset)")
    e.add_argument("--split", choices=("train", "test"), default="test", help="split of --data for the bound")
    e.add_argument("--max-images", type=_int_at_least(1), default=None, help="cap the images in the bound")
    e.add_argument("--batch-size", type=_int_at_least(1), default=100)
    e.add_argument("--seed", type=_int_at_least(0), default=0)
    e.add_argument("--splits", type=_int_at_least(1), default=10, help="IS splits")
    e.add_argument("--device", default=None)
    e.add_argument("--no-download", action="store_true", help="fail instead of downloading weights or data")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--out", type=Path, required=True, help="JSON report to write")
    e.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> None:
    if args.config is None and not args.resume:
        raise ValueError("--config is required for a new run (or pass --resume to continue one)")
    data = None
    if args.data is not None:  # a named data set, as for eval, or a folder of images
        if args.data.lower() in NAMED_DATASETS:
            data = args.data.lower()
        elif Path(args.data).is_dir():
            data = str(Path(args.data).resolve())
        else:
            raise FileNotFoundError(f"--data {args.data}: neither a data set ({', '.join(NAMED_DATASETS)}) "
                                    "nor a folder of images")
    cfg = resolve_run_config(args.out, args.config, resume=args.resume, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, dataset=data, label_drop=args.label_drop)
    if args.label_drop is not None and cfg.model.num_classes is None:
        raise ValueError(f"--label-drop is for class-conditional configs (e.g. cifar10_cond); {cfg.name!r} "
                         "is unconditional")
    summary = train(cfg, args.out, resume=args.resume, device=args.device, precision=args.precision,
                    compile=args.compile or False, log_every=args.log_every, ckpt_every=args.ckpt_every,
                    keep_every=args.keep_every, sample_every=args.sample_every, num_samples=args.num_samples,
                    num_workers=args.num_workers, progress=not args.no_progress)
    if summary.loss is not None:
        print(f"{args.out}: step {summary.step}, loss {summary.loss:.4f}")


def cmd_sample(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {args.out}: the suffix must be .npz (images) or .png (a grid)")
    loaded = load_for_sampling(args.checkpoint, args.device)
    labels = args.class_label  # generate() checks them, and the guidance scale, against the model
    if isinstance(labels, list):
        labels = [labels[i % len(labels)] for i in range(args.n)]
    device = next(loaded.model.parameters()).device
    generate(loaded.model, loaded.diffusion, args.n, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
             eta=args.eta, seed=args.seed, batch_size=args.batch_size, device=device, precision=args.precision,
             out_path=args.out, chunk_size=args.chunk_size, progress=not args.no_progress,
             class_labels=labels, guidance_scale=args.guidance_scale, compile=args.compile,
             noise=args.noise, graph=args.graph)
    steps = args.steps or loaded.diffusion.num_timesteps
    how = "ddpm" if args.sampler == "ddpm" else f"ddim, {steps} steps, eta {args.eta:g}"
    if labels is not None:
        how += f"; classes {args.class_label if not isinstance(labels, list) else 'cycled'}, w {args.guidance_scale:g}"
    weights = "released weights" if loaded.step < 0 else f"EMA, step {loaded.step}"
    print(f"{args.out}: {args.n} samples of {loaded.config.name!r} ({how}; {weights}; seed {args.seed})")


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    if args.samples is None and args.checkpoint is None:
        raise ValueError("give --samples and/or --checkpoint")
    report = run_eval(args.out, samples=args.samples, checkpoint=args.checkpoint, metrics=args.metrics,
                      data=args.data, split=args.split, max_images=args.max_images, batch_size=args.batch_size,
                      seed=args.seed, splits=args.splits, device=args.device, download=not args.no_download,
                      progress=not args.no_progress)
    # the headline numbers; the arrays stay in the file
    for section in ("sample_quality", "sample_quality_fashion", "bound", "rate_distortion"):
        if report.get(section):
            scalars = {k: v for k, v in report[section].items()
                       if isinstance(v, (int, float, str, dict)) and k != "about"}
            print(f"{section}: {json.dumps(scalars, default=str)}")
    print(f"{args.out}: report written")


def _one_line(e: BaseException) -> str:
    """An error as one line: an OSError names its file and the system's reason (read-only, disk full, …)."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, (FileNotFoundError, FileExistsError,
                                                                   NotADirectoryError)):
        where = f"{e.filename}: " if e.filename else ""
        return f"cannot write or read {where}{e.strerror} (check the path's permissions and free space)"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ddpm-lib`` / ``python -m ddpm_lib``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, CheckpointError, NonFiniteLossError, InUseError, OSError) as e:
        if args.debug:
            raise
        print(f"ddpm-lib {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", "the last checkpoint is intact")
        print(f"ddpm-lib {args.command}: interrupted; {note}", file=sys.stderr)
        return 130
    return 0
