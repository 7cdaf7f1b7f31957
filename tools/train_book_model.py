"""Train the book's models and ship their EMA weights: ``python tools/train_book_model.py --config fashion``.

The chapters that show what a trained network does load ``ddpm_lib/weights/fashion.safetensors`` and its
class-conditional twin ``fashion_cond.safetensors`` (``ddpm_lib.loading.load_book_model``; they ship inside
the package, so ``pip install`` brings them to Colab too):

* ``fashion``: the paper's UNet (App. B) scaled down to 1.1M parameters for 28×28 grey images, the paper's
  T = 1000 and linear β, ε-prediction, σ² = β_t, trained with Algorithm 1 on Fashion-MNIST's 60,000
  training images (6,000 steps at batch 64);
* ``fashion_cond``: the same network plus a label embedding for the 10 classes and the null label ∅,
  labels dropped to ∅ with probability 0.1 (classifier-free guidance, Ho & Salimans 2022).

This script is the whole recipe: it calls ``ddpm_lib.train`` and copies the run's ``ema.safetensors`` and
``metrics.csv`` into ``ddpm_lib/weights/``. An interrupted run continues where it stopped when the script is
run again (a checkpoint every 500 steps). What the models' samples are worth is measured by
``python -m ddpm_lib.studies.beyond`` (FID in the features of the shipped Fashion-MNIST classifier beside
its real-data floor, and the classifier's accuracy on conditional samples per guidance scale).

The shipped weights: both trained on this project's 2-core CPU (AMD EPYC), one thread each, side by side,
``--threads 1`` (2026-12-01): 74 min each (each ``<config>.metrics.csv`` has the loss and images/s every
100 steps). ``--device cuda`` trains on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ddpm_lib import train
from ddpm_lib.checkpoint import CKPT_NAME

ROOT = Path(__file__).resolve().parents[1]
BOOK_CONFIGS = ("fashion", "fashion_cond")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=BOOK_CONFIGS, default="fashion", help="which book model to train")
    p.add_argument("--run", type=Path, default=None, help="run directory (default runs/book-<config>)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the EMA weights go (default ddpm_lib/weights/<config>.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu (74 min on one core of this project's CPU) or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    run = args.run or ROOT / "runs" / f"book-{args.config}"
    out = args.out or ROOT / "ddpm_lib" / "weights" / f"{args.config}.safetensors"
    torch.set_num_threads(args.threads)
    resume = (run / CKPT_NAME).is_file()
    summary = train(args.config, run, resume=resume, device=args.device, log_every=100, ckpt_every=500,
                    sample_every=0, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "ema.safetensors", out)
    shutil.copyfile(run / "metrics.csv", out.with_suffix(".metrics.csv"))
    print(f"step {summary.step}: EMA weights → {out}")


if __name__ == "__main__":
    main()
