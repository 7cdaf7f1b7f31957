"""Train the book's small models and ship their EMA weights: ``python tools/train_book_model.py``.

The chapters that need a trained network (the ELBO decomposition, the first look in the
introduction) load ``ddpm_lib/weights/digits.safetensors`` (``ddpm_lib.pretrained.load_book_model``;
it ships inside the package, so ``pip install`` brings it to Colab too): the ``digits`` config (1.0M parameters, the
paper's T = 1000 linear schedule, ε-prediction, σ² = β_t) trained with Algorithm 1 on the first
1,500 of scikit-learn's bundled 8×8 digits, on a CPU or a GPU. This script is the whole recipe:
it calls ``ddpm_lib.train`` and copies the run's ``ema.safetensors`` and ``metrics.csv`` into
``ddpm_lib/weights/``. An interrupted run continues where it stopped when the script is run again.

``--config digits_cond`` trains the class-conditional twin for classifier-free guidance (Ho & Salimans
2022): the same network plus a label embedding, labels dropped to ∅ with probability 0.1; its weights go
to ``ddpm_lib/weights/digits_cond.safetensors`` (``load_book_model("digits_cond")``).

The shipped weights: ``digits``: ``python tools/train_book_model.py --device cuda`` on one NVIDIA H200
(10,000 steps in 313 s, 2026-11-26). ``digits_cond``: ``python tools/train_book_model.py --config
digits_cond --threads 1`` on this project's 2-core CPU (see ``ddpm_lib/weights/digits_cond.metrics.csv``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ddpm_lib import train
from ddpm_lib.checkpoint import CKPT_NAME

ROOT = Path(__file__).resolve().parents[1]
BOOK_CONFIGS = ("digits", "digits_cond")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=BOOK_CONFIGS, default="digits", help="which book model to train")
    p.add_argument("--run", type=Path, default=None, help="run directory (default runs/book-<config>)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the EMA weights go (default ddpm_lib/weights/<config>.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu (about 30 min on 2 cores) or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    run = args.run or ROOT / "runs" / f"book-{args.config}"
    out = args.out or ROOT / "ddpm_lib" / "weights" / f"{args.config}.safetensors"
    torch.set_num_threads(args.threads)
    resume = (run / CKPT_NAME).is_file()
    summary = train(args.config, run, resume=resume, device=args.device, log_every=100, ckpt_every=1000,
                    sample_every=0, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "ema.safetensors", out)
    shutil.copyfile(run / "metrics.csv", out.with_suffix(".metrics.csv"))
    print(f"step {summary.step}: EMA weights → {out}")


if __name__ == "__main__":
    main()
