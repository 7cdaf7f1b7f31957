"""Train the book's small models and ship their EMA weights: ``python tools/train_book_model.py``.

The chapters that need a trained network (the ELBO decomposition, the first look in the
introduction) load ``ddpm_lib/weights/digits.safetensors`` (``ddpm_lib.loading.load_book_model``;
it ships inside the package, so ``pip install`` brings it to Colab too): the ``digits`` config (1.0M parameters, the
paper's T = 1000 linear schedule, ε-prediction, σ² = β_t) trained with Algorithm 1 on the first
1,500 of scikit-learn's bundled 8×8 digits, on a CPU or a GPU. This script is the whole recipe:
it calls ``ddpm_lib.train`` and copies the run's ``ema.safetensors`` and ``metrics.csv`` into
``ddpm_lib/weights/``. An interrupted run continues where it stopped when the script is run again.

``--config digits_cond`` trains the class-conditional twin for classifier-free guidance (Ho & Salimans
2022): the same network plus a label embedding, labels dropped to ∅ with probability 0.1; its weights go
to ``ddpm_lib/weights/digits_cond.safetensors`` (``load_book_model("digits_cond")``).

For ``digits_cond`` the script then checks the model (``--check-only`` runs just this on the shipped
weights): a logistic-regression classifier fitted to scikit-learn's digits (the 1,500 training images)
labels ``--check-n`` samples per guidance scale w (Algorithm 2, or DDIM with ``--check-ddim-steps``;
classes 0 … 9 in turn), and the bound (eq. 5) on 100 held-out digits is computed with their true labels
and with the null label. The numbers go to ``ddpm_lib/weights/digits_cond.check.json``; the shipped ones
come from ``--config digits_cond --check-only --threads 1 --check-ddim-steps 100``.

The shipped weights: ``digits``: ``python tools/train_book_model.py --device cuda`` on one NVIDIA H200
(10,000 steps in 313 s, 2026-11-26). ``digits_cond``: ``python tools/train_book_model.py --config
digits_cond --threads 1`` on this project's 2-core CPU, shared with other jobs (6,000 steps in 27 min,
2026-11-26; see ``ddpm_lib/weights/digits_cond.metrics.csv``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ddpm_lib import train
from ddpm_lib.checkpoint import CKPT_NAME, write_text_atomic
from ddpm_lib.data import load_digits, to_model_range
from ddpm_lib.generation import generate
from ddpm_lib.loading import load_for_sampling

ROOT = Path(__file__).resolve().parents[1]
BOOK_CONFIGS = ("digits", "digits_cond")


def digits_classifier():
    """Logistic regression on the 1,500 training digits (pixels scaled to [0, 1]) and its test accuracy."""
    from sklearn.linear_model import LogisticRegression

    train_ds, test_ds = load_digits("train"), load_digits("test")

    def features(images: torch.Tensor):
        return images.reshape(len(images), -1).numpy() / 255.0

    clf = LogisticRegression(max_iter=2000).fit(features(train_ds.images), train_ds.labels.numpy())
    test_acc = float((clf.predict(features(test_ds.images)) == test_ds.labels.numpy()).mean())
    return clf, features, test_acc


def check_conditional(weights: Path, n: int, scales: list[float], seed: int = 0, ddim_steps: int | None = None,
                      bound_n: int = 100) -> dict:
    """Classifier accuracy of class-conditional samples per guidance scale (Algorithm 2, or DDIM with η = 0
    on ``ddim_steps`` steps), and the bound in bits/dim on ``bound_n`` held-out digits."""
    book = load_for_sampling(weights, "cpu")
    clf, features, test_acc = digits_classifier()
    report = {"weights": weights.name, "step": book.step, "classifier_test_accuracy": test_acc, "n": n,
              "sampler": f"ddim, {ddim_steps} steps, eta 0" if ddim_steps else "ddpm (Algorithm 2, all steps)",
              "labels": "i mod 10", "seed": seed, "guidance": {}}
    labels = torch.arange(n) % 10
    for w in scales:
        t0 = time.perf_counter()
        images = generate(book.model, book.diffusion, n, sampler="ddim" if ddim_steps else "ddpm", steps=ddim_steps,
                          class_labels="cycle", guidance_scale=w, seed=seed, batch_size=n,
                          progress=False)  # uint8 [n, 8, 8, 1]
        pred = torch.from_numpy(clf.predict(features(images.permute(0, 3, 1, 2))))
        per_class = [float((pred[labels == k] == k).float().mean()) for k in range(10)]
        report["guidance"][str(w)] = {"accuracy": float((pred == labels).float().mean()), "per_class": per_class,
                                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"w = {w:g}: accuracy {report['guidance'][str(w)]['accuracy']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    test = load_digits("test")
    x0, y = to_model_range(test.images[:bound_n]), test.labels[:bound_n]
    bound = {}
    for name, labels_or_none in (("true_label", y), ("null_label", None)):
        def model(x, t, y=labels_or_none):
            return book.model(x, t, y)
        total = book.diffusion.vlb_bpd(model, x0, generator=torch.Generator().manual_seed(seed))["total"]
        se = float(total.std() / bound_n**0.5)
        bound[name] = {"bits_per_dim": float(total.mean()), "standard_error": se}
        print(f"bound with the {name.replace('_', ' ')}: {total.mean():.3f} ± {se:.3f} bits/dim", flush=True)
    report[f"bound_{bound_n}_test_digits"] = bound
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=BOOK_CONFIGS, default="digits", help="which book model to train")
    p.add_argument("--run", type=Path, default=None, help="run directory (default runs/book-<config>)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the EMA weights go (default ddpm_lib/weights/<config>.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu (about 30 min on 2 cores) or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--check-only", action="store_true", help="digits_cond: only check the weights at --out")
    p.add_argument("--check-n", type=int, default=200, help="digits_cond: samples per guidance scale")
    p.add_argument("--check-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance scales w")
    p.add_argument("--check-ddim-steps", type=int, default=None,
                   help="digits_cond: sample with DDIM (eta 0) on this many steps instead of Algorithm 2")
    p.add_argument("--check-bound-n", type=int, default=100, help="digits_cond: held-out digits in the bound")
    args = p.parse_args()
    run = args.run or ROOT / "runs" / f"book-{args.config}"
    out = args.out or ROOT / "ddpm_lib" / "weights" / f"{args.config}.safetensors"
    torch.set_num_threads(args.threads)
    if args.check_only:
        check(args, out)
        return
    resume = (run / CKPT_NAME).is_file()
    summary = train(args.config, run, resume=resume, device=args.device, log_every=100, ckpt_every=1000,
                    sample_every=0, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "ema.safetensors", out)
    shutil.copyfile(run / "metrics.csv", out.with_suffix(".metrics.csv"))
    print(f"step {summary.step}: EMA weights → {out}")
    if args.config == "digits_cond":
        check(args, out)


def check(args: argparse.Namespace, out: Path) -> None:
    if args.config != "digits_cond":
        raise SystemExit("--check-only is for --config digits_cond")
    report = check_conditional(out, args.check_n, args.check_scales, ddim_steps=args.check_ddim_steps,
                               bound_n=args.check_bound_n)
    path = out.with_suffix(".check.json")
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    print(f"check → {path}")


if __name__ == "__main__":
    main()
