"""Beyond the paper at small scale: ``python -m ddpm_lib.studies.beyond``.

The paper's conclusion names what DDPM leaves open: sampling is slow (1000 network calls per image),
the forward process is fixed, the likelihood is weak, and there is no conditioning. This module
measures, on a CPU, how three later ideas answer those limits. Its results ship as
``ddpm_lib/studies/beyond_small.json``, which the chapter ``book/beyond.ipynb`` loads
(``studies.load_results("beyond")``) and partly recomputes.

**The quality measure** (``Yardstick``): the FID of ``eval --metrics fid_fashion``
(``evaluate.fashion_quality``), built from the same pieces of ``metrics``: the Fréchet distance between
the samples' features and those of Fashion-MNIST's 60,000 training images, in the
128 hidden features of the shipped Fashion-MNIST classifier (``metrics.FashionFeatures``; 91.97% test
accuracy). FID is biased upward at small n, so every FID here stands beside its floor: the FID of n
real test images (never trained on) against the training split, over ``n_floor_draws`` random draws
(mean and spread). A perfect sampler scores the floor; lower is better.

Three parts, each a key of the JSON:

* ``"sampling"``: the book's unconditional model (``load_book_model()``, Fashion-MNIST, T = 1000,
  σ² = β_t) sampled with Algorithm 2 (1000 steps) and with DDIM (Song, Meng & Ermon 2021;
  ``samplers.sample_loop``) on S uniformly spaced steps, η = 0 (deterministic) and η = 1 (stochastic,
  σ² = β̃ on the subsequence): the FID and the classifier's mean confidence for each (S, η), from the same
  seeds (image i has the same x_T in every row). Rows with S < T use ``n_samples`` images; a row with
  T steps (Algorithm 2, 1000 network calls per image) uses ``n_long``.
* ``"guidance"``: the book's class-conditional model (``load_book_model(name="fashion_cond")``) sampled
  with classifier-free guidance (Ho & Salimans 2022; ``guidance.Guided``) at several strengths w, classes
  0 … 9 in turn: the classifier's accuracy on the intended class, its mean probability p(y | x) and mean
  −log p(y | x) (fidelity), the mean distance between two samples of one class, in pixels and in the
  classifier's features (diversity), and the FID (both at once). The same numbers for as many real test
  images are the reference.
* ``"likelihood"``: a training study on scikit-learn's 8×8 digits (small enough to train four networks on
  a CPU). Small UNets (the paper's architecture, 16 base channels, one resolution change, about 0.16M
  parameters) are trained for the same steps on the same batches with the linear or the cosine β schedule
  (Nichol & Dhariwal 2021, eq. 17), with fixed variances and L_simple or with learned variances
  (``var_type="learned_range"``, their eq. 15) and L_hybrid (their §3.1). Each is scored by the whole
  bound of eq. 5 (``vlb_bpd``) on the same held-out digits with the same x_t draws, so differences between
  variants are paired. A network trained with L_simple is scored with σ² = β_t and with σ² = β̃_t (the
  same network: L_simple does not involve σ).

Single-threaded and seeded: a rerun on the same machine and PyTorch gives the same numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..data import load_digits, load_split, to_model_range
from ..diffusion import GaussianDiffusion
from ..generation import generate
from ..loading import WEIGHTS_DIR, load_book_model
from ..metrics import FashionFeatures, as_nchw, extract, feature_statistics, frechet_distance, reference_statistics
from ..rng import global_seed
from ..schedules import make_beta_schedule
from ..train import fit
from ..unet import UNet
from . import add_part_arguments, command_line, file_sha256, keep_images, merge_parts, results_path, write_results

DEFAULT_OUT = results_path("beyond")
PARTS = ("sampling", "guidance", "likelihood")
UNCONDITIONAL, CONDITIONAL = "fashion", "fashion_cond"  # the book models the first two parts sample

# The likelihood study's variants: (label, schedule, mean_type, var_type, loss_type).
VARIANTS: list[tuple[str, str, str, str, str]] = [
    ("linear β, fixed Σ, L_simple", "linear", "eps", "fixed_large", "simple"),
    ("linear β, learned Σ, L_hybrid", "linear", "eps", "learned_range", "hybrid"),
    ("cosine β, fixed Σ, L_simple", "cosine", "eps", "fixed_large", "simple"),
    ("cosine β, learned Σ, L_hybrid", "cosine", "eps", "learned_range", "hybrid"),
]


@dataclass
class BeyondSettings:
    """Everything the three parts depend on."""

    # sampling: the unconditional book model, DDIM against Algorithm 2
    n_samples: int = 500  # images per sampler with S < T
    n_long: int = 100  # images for a row with T steps (Algorithm 2, or DDIM with S = T)
    n_floor_draws: int = 10  # draws of real test images for the floor
    sample_seed: int = 0
    ddim_steps: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    ddim_etas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    eta1_steps: list[int] = field(default_factory=lambda: [10, 50])  # the S sampled with η = 1 too
    ddpm: bool = True  # also Algorithm 2 (σ² = β_t), T steps
    n_keep: int = 8  # images of each sampler stored in the JSON (uint8)
    sample_batch: int = 100  # images per network call (larger batches run slower per image on a CPU)
    # guidance: the conditional book model
    guidance_scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    guidance_n: int = 300  # images per scale, classes i mod 10
    guidance_steps: int = 50  # DDIM, η = 0
    guidance_seed: int = 0
    guidance_keep: int = 20  # images per scale stored in the JSON: two of each class
    guidance_batch: int = 50  # images per guided call (two network evaluations each)
    # likelihood: the training study on 8×8 digits
    T: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ch: int = 16
    seed: int = 0
    n_bound: int = 100  # held-out digits for the bound (the first of the test split)
    bound_seed: int = 0  # the x_t draws of the bound: the same for every variant
    loss_window: int = 50


# --------------------------------------------------------------------------- the measures


class Yardstick:
    """``fid_fashion`` for the study: the shipped classifier's features and logits, the training split's
    feature statistics (``metrics.reference_statistics``, cached) and the real test images that give the floor
    and the reference."""

    def __init__(self) -> None:
        self.extractor = FashionFeatures()
        stats = reference_statistics("fashion", "train", self.extractor, download=False)  # cached after once
        self.mu, self.sigma = stats.mu, stats.sigma
        test = load_split("fashion", "test", download=False)
        self.test_images, self.test_labels = test.images, test.labels

    def features(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, Tensor]:
        """Features [N, 128] and the classifier's p(y | x) [N, 10] of uint8 images (either layout)."""
        feats, logits = extract(as_nchw(torch.as_tensor(np.asarray(images))), self.extractor)
        return feats, torch.from_numpy(logits).softmax(-1)

    def fid(self, feats: np.ndarray) -> float:
        """The FID of these features against Fashion-MNIST's training split."""
        return frechet_distance(*feature_statistics(feats), self.mu, self.sigma)

    def test_draw(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """n real test images and their labels, drawn with ``seed``."""
        pick = torch.randperm(len(self.test_images), generator=torch.Generator().manual_seed(seed))[:n]
        return self.test_images[pick], self.test_labels[pick]

    def floor(self, n: int, draws: int) -> dict:
        """The FID of n real test images against the training split, over ``draws`` draws: mean, sd, all."""
        fids = [self.fid(self.features(self.test_draw(n, k)[0])[0]) for k in range(draws)]
        return {"mean": float(np.mean(fids)), "sd": float(np.std(fids, ddof=1)) if draws > 1 else 0.0,
                "draws": fids}


def pixels(images: Tensor | np.ndarray) -> Tensor:
    """uint8 grey images [N, 1, H, W] or [N, H, W, 1] (``generate``'s layout) → float [N, H·W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    return x.reshape(len(x), -1).float() / 255


def within_class_distance(values: Tensor | np.ndarray, labels: Tensor) -> list[float]:
    """Diversity: for each class 0 … 9, the mean distance between two of its items. For uint8 images it is
    the RMS pixel difference on the [0, 1] intensity scale (0: all alike); for float features [N, D], the
    mean Euclidean distance between them. NaN for a class with fewer than 2 items."""
    is_images = torch.as_tensor(np.asarray(values)).dtype == torch.uint8
    x = pixels(values).double() if is_images else torch.as_tensor(np.asarray(values)).double()
    scale = math.sqrt(x.shape[1]) if is_images else 1.0
    out = []
    for k in range(10):
        xk = x[labels == k]
        out.append(float(torch.pdist(xk).mean() / scale) if len(xk) > 1 else float("nan"))
    return out


# --------------------------------------------------------------------------- part 1: DDIM against Algorithm 2


def sampler_runs(s: BeyondSettings, T: int) -> list[tuple[str, int, float]]:
    """(sampler, steps, η) of the sampling part, in the order they run."""
    runs = [("ddim", S, float(eta)) for eta in s.ddim_etas for S in s.ddim_steps
            if S <= T and (eta == 0 or S in s.eta1_steps)]
    return runs + ([("ddpm", T, 0.0)] if s.ddpm else [])


def run_sampling(s: BeyondSettings, yard: Yardstick, log=print) -> dict:
    book = load_book_model(name=UNCONDITIONAL)
    T = book.diffusion.num_timesteps
    floor = {str(n): yard.floor(n, s.n_floor_draws) for n in sorted({s.n_samples, s.n_long})}
    rows = []
    for sampler, steps, eta in sampler_runs(s, T):
        t0 = time.perf_counter()
        n = s.n_long if steps >= T else s.n_samples
        images = generate(book.model, book.diffusion, n, sampler=sampler,
                          steps=steps if sampler == "ddim" else None, eta=eta, seed=s.sample_seed,
                          batch_size=min(n, s.sample_batch), progress=False)  # uint8 [n, 28, 28, 1]
        feats, probs = yard.features(images)
        fid = yard.fid(feats)
        conf = float(probs.max(-1).values.mean())
        seconds = round(time.perf_counter() - t0, 1)
        rows.append({"sampler": sampler, "steps": steps, "eta": eta, "network_calls": steps, "n": n,
                     "fid": fid, "mean_confidence": conf,
                     "predicted_classes": np.bincount(probs.argmax(-1).numpy(), minlength=10).tolist(),
                     "seconds": seconds, "images": keep_images(images, s.n_keep)})
        log(f"{sampler} S={steps:4d} η={eta:g} n={n}: FID {fid:7.2f} (floor {floor[str(n)]['mean']:.2f})  "
            f"confidence {conf:.3f}  ({seconds:.0f} s)")
    weights = WEIGHTS_DIR / f"{UNCONDITIONAL}.safetensors"
    return {"weights": weights.name, "weights_sha256": file_sha256(weights), "step": book.step,
            "T": T, "spacing": "uniform", "floor": floor, "runs": rows}


# --------------------------------------------------------------------------- part 2: classifier-free guidance


def fidelity_and_diversity(yard: Yardstick, images: Tensor | np.ndarray, labels: Tensor) -> dict:
    """What guidance trades, for images meant to be of class ``labels``: the classifier's accuracy, mean
    p(y | x) and mean −log p(y | x); within-class distances in pixels and in features; the FID."""
    feats, p = yard.features(images)
    pred = p.argmax(-1)
    p_y = p[torch.arange(len(p)), labels].double()
    diversity = within_class_distance(images, labels)
    return {"accuracy": float((pred == labels).double().mean()), "confidence": float(p_y.mean()),
            "nll": float(-p_y.clamp_min(1e-300).log().mean()), "diversity": float(np.mean(diversity)),
            "diversity_per_class": diversity,
            "feature_diversity": float(np.mean(within_class_distance(feats, labels))),
            "fid": yard.fid(feats), "predicted": pred.tolist()}


def run_guidance(s: BeyondSettings, yard: Yardstick, log=print) -> dict:
    book = load_book_model(name=CONDITIONAL)
    labels = torch.arange(s.guidance_n) % 10
    rows = []
    for w in s.guidance_scales:
        t0 = time.perf_counter()
        images = generate(book.model, book.diffusion, s.guidance_n, sampler="ddim", steps=s.guidance_steps,
                          eta=0.0, seed=s.guidance_seed, batch_size=min(s.guidance_n, s.guidance_batch), progress=False,
                          class_labels="cycle", guidance_scale=w)
        r = {"w": float(w), **fidelity_and_diversity(yard, images, labels)}
        r["per_class_accuracy"] = [float((torch.tensor(r["predicted"])[labels == k] == k).double().mean())
                                   for k in range(10)]
        r |= {"seconds": round(time.perf_counter() - t0, 1), "images": keep_images(images, s.guidance_keep)}
        rows.append(r)
        log(f"guidance w={w:g}: accuracy {r['accuracy']:.3f}  confidence {r['confidence']:.3f}  "
            f"−log p(y|x) {r['nll']:.4f}  diversity {r['diversity']:.3f} / {r['feature_diversity']:.3f}  "
            f"FID {r['fid']:.2f}  ({r['seconds']:.0f} s)")
    real, real_labels = yard.test_draw(s.guidance_n, s.guidance_seed)
    held_out = fidelity_and_diversity(yard, real, real_labels)
    held_out.pop("predicted")
    weights = WEIGHTS_DIR / f"{CONDITIONAL}.safetensors"
    return {"weights": weights.name, "weights_sha256": file_sha256(weights), "step": book.step,
            "sampler": f"DDIM, {s.guidance_steps} uniform steps, η = 0", "labels": "image i: class i mod 10",
            "held_out": held_out | {"n": s.guidance_n, "about": "real test images, the same n, drawn at random"},
            "floor": yard.floor(s.guidance_n, s.n_floor_draws), "runs": rows}


# --------------------------------------------------------------------------- part 3: schedules and variances


def make_small_unet(var_type: str, s: BeyondSettings) -> UNet:
    """The paper's UNet made small for 8×8 digits: 16 channels, multipliers (1, 2), one residual block per
    resolution, no attention, no dropout; 2 output channels (mean part, then v) when Σ is learned."""
    out = 2 if var_type in ("learned", "learned_range") else 1
    with global_seed(s.seed):
        return UNet(image_size=8, in_channels=1, out_channels=out, ch=s.ch, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(), dropout=0.0, num_groups=8)


def training_data() -> tuple[Tensor, Tensor]:
    """The 1,500 training digits and the held-out ones, in [−1, 1] (float32 [N, 1, 8, 8])."""
    return to_model_range(load_digits("train").images), to_model_range(load_digits("test").images)


def bound(diffusion: GaussianDiffusion, model: nn.Module, x0: Tensor, s: BeyondSettings) -> dict:
    """Eq. 5 in bits/dim on x0, with the study's fixed x_t draws: mean, standard error, its parts, and
    the per-example totals and per-t means (for paired comparisons and the chapter's figure)."""
    b = diffusion.vlb_bpd(model, x0, generator=torch.Generator().manual_seed(s.bound_seed))
    total = b["total"]
    return {"bpd": float(total.mean()), "se": float(total.std() / math.sqrt(len(total))),
            "L0": float(b["terms"][:, 0].mean()), "sum_Lt": float(b["terms"][:, 1:].sum(1).mean()),
            "LT": float(b["prior"].mean()), "per_example": [round(float(v), 6) for v in total],
            "per_t": [float(f"{v:.6g}") for v in b["terms"].mean(0)]}


def run_variant(schedule: str, mean_type: str, var_type: str, loss_type: str, s: BeyondSettings,
                train: Tensor, held_out: Tensor) -> dict:
    """Train one variant (``train.fit``: Adam, warm-up, clipping, EMA) and score its EMA weights."""
    t0 = time.perf_counter()
    betas = make_beta_schedule(schedule, s.T)
    diffusion = GaussianDiffusion(betas, mean_type, var_type, loss_type)
    run = fit(diffusion, make_small_unet(var_type, s), train, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
              warmup=s.warmup, grad_clip=s.grad_clip, ema_decay=s.ema_decay, seed=s.seed, loss_window=s.loss_window)
    result = {"steps_done": run["steps_done"], "failure": run["failure"], "loss_windows": run["loss_windows"],
              "bound": {}}
    if run["failure"] is None:
        scored = [var_type] if var_type == "learned_range" else [var_type, "fixed_small"]
        for v in scored:  # L_simple does not involve σ: the same network under both fixed variances
            d = diffusion if v == var_type else GaussianDiffusion(betas, mean_type, v, "simple")
            result["bound"][v] = bound(d, run["ema"], held_out[: s.n_bound], s)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def run_likelihood(s: BeyondSettings, log=print) -> dict:
    train, held_out = training_data()
    rows = []
    for label, schedule, mean_type, var_type, loss_type in VARIANTS:
        r = run_variant(schedule, mean_type, var_type, loss_type, s, train, held_out)
        rows.append({"label": label, "schedule": schedule, "mean_type": mean_type, "var_type": var_type,
                     "loss_type": loss_type, **r})
        log(f"{label:32s} {r['seconds']:5.0f} s  " + "  ".join(
            f"{v}: {b['bpd']:.3f} ± {b['se']:.3f} bits/dim" for v, b in r["bound"].items()))
    return {"parameters": {v: sum(p.numel() for p in make_small_unet(v, s).parameters())
                           for v in ("fixed_large", "learned_range")},
            "n_train": len(train), "variants": rows}


# --------------------------------------------------------------------------- the whole study


def run_all(s: BeyondSettings, parts: tuple[str, ...] = PARTS, log=print) -> dict:
    """The chosen parts; the dict that ``main`` writes as JSON (with ``seconds`` per part)."""
    out: dict = {}
    yard = None
    if {"sampling", "guidance"} & set(parts):
        t0 = time.perf_counter()
        yard = Yardstick()
        _, probs = yard.features(yard.test_images)
        acc = float((probs.argmax(-1) == yard.test_labels).double().mean())
        out["classifier"] = {"weights": yard.extractor.name, "test_accuracy": acc,
                             "seconds": round(time.perf_counter() - t0, 1)}
        log(f"classifier {yard.extractor.name}: test accuracy {acc:.4f}")
    for part in parts:
        t0 = time.perf_counter()
        if part == "sampling":
            out[part] = run_sampling(s, yard, log)
        elif part == "guidance":
            out[part] = run_guidance(s, yard, log)
        else:
            out[part] = run_likelihood(s, log)
        out[part]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_part_arguments(p, DEFAULT_OUT, PARTS)
    d = BeyondSettings()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per variant (likelihood)")
    p.add_argument("--T", type=int, default=d.T, help="timesteps of the likelihood study (the paper: 1000)")
    p.add_argument("--n-bound", type=int, default=d.n_bound, help="held-out digits for the bound")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples per sampler with S < T (sampling)")
    p.add_argument("--n-long", type=int, default=d.n_long, help="samples for the T-step samplers (sampling)")
    p.add_argument("--ddim-steps", type=int, nargs="+", default=d.ddim_steps, help="DDIM step counts S")
    p.add_argument("--eta1-steps", type=int, nargs="+", default=d.eta1_steps, help="the S also sampled with η = 1")
    p.add_argument("--no-ddpm", action="store_true", help="skip Algorithm 2 (T steps) in the sampling part")
    p.add_argument("--guidance-n", type=int, default=d.guidance_n, help="samples per guidance scale")
    p.add_argument("--guidance-steps", type=int, default=d.guidance_steps, help="DDIM steps when guiding")
    args = p.parse_args(argv)
    s = BeyondSettings(steps=args.steps, T=args.T, n_bound=args.n_bound, n_samples=args.n_samples, n_long=args.n_long,
                       ddim_steps=args.ddim_steps, eta1_steps=args.eta1_steps, ddpm=not args.no_ddpm,
                       guidance_n=args.guidance_n, guidance_steps=args.guidance_steps)
    torch.set_num_threads(1)  # one thread: reductions add up in the same order on every run
    command = command_line("ddpm_lib.studies.beyond", argv)
    new = run_all(s, tuple(args.parts), log=lambda line: print(line, flush=True))
    result = merge_parts("beyond", args.out, new, args.parts, PARTS, settings=asdict(s), command=command,
                         description="Beyond DDPM at small scale, on a CPU: DDIM and classifier-free guidance on "
                                     "the book's Fashion-MNIST models, schedules and learned variances on "
                                     "scikit-learn's 8×8 digits. Written by ddpm_lib/studies/beyond.py; see its "
                                     "docstring.")
    result.pop("machine", None)  # parts rerun alone may run elsewhere: each part records its own machine
    result["total_seconds"] = round(sum(result[k]["seconds"] for k in PARTS if k in result)
                                    + result.get("classifier", {}).get("seconds", 0), 1)
    write_results(args.out, result)
    print(f"wrote {args.out}: parts {', '.join(args.parts)} in {sum(new[k]['seconds'] for k in args.parts):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
