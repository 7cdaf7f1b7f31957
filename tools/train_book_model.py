"""Train the book's small model and ship its EMA weights: ``python tools/train_book_model.py``.

The chapters that need a trained network (the ELBO decomposition, the first look in the
introduction) load ``ddpm_lib/weights/digits.safetensors`` (``ddpm_lib.pretrained.load_book_model``;
it ships inside the package, so ``pip install`` brings it to Colab too): the ``digits`` config (1.0M parameters, the
paper's T = 1000 linear schedule, ε-prediction, σ² = β_t) trained with Algorithm 1 on the first
1,500 of scikit-learn's bundled 8×8 digits, on a CPU or a GPU. This script is the whole recipe:
it calls ``ddpm_lib.train`` and copies the run's ``ema.safetensors`` and ``metrics.csv`` into
``ddpm_lib/weights/``. An interrupted run continues where it stopped when the script is run again.

The shipped weights: ``python tools/train_book_model.py --device cuda`` on one NVIDIA H200
(10,000 steps in 313 s, 2026-11-26).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ddpm_lib import train
from ddpm_lib.checkpoint import CKPT_NAME

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "book-digits", help="run directory")
    p.add_argument("--out", type=Path, default=ROOT / "ddpm_lib" / "weights" / "digits.safetensors")
    p.add_argument("--device", default="cpu", help="cpu (about 30 min on 2 cores) or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    resume = (args.run / CKPT_NAME).is_file()
    summary = train("digits", args.run, resume=resume, device=args.device, log_every=100, ckpt_every=1000,
                    sample_every=0, progress=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.run / "ema.safetensors", args.out)
    shutil.copyfile(args.run / "metrics.csv", args.out.with_suffix(".metrics.csv"))
    print(f"step {summary.step}: EMA weights → {args.out}")


if __name__ == "__main__":
    main()
