"""Beyond the paper at small scale: ``python -m ddpm_lib.studies.beyond``.

The paper's conclusion names what DDPM leaves open: sampling is slow (1000 network calls per image),
the forward process is fixed, the likelihood is weak, and there is no conditioning. This module
measures, on the book's 8×8 digits and on a CPU, how three later ideas answer those limits. Its
results ship as ``ddpm_lib/studies/beyond_small.json``, which the chapter ``book/beyond.ipynb`` loads
(``studies.load_results("beyond")``) and partly recomputes.

**The quality measure** (``mmd_digits``). FID needs the Inception network and 32×32 colour images, and
with a few hundred samples it is biased by an amount that depends on their number. On 8×8 digits this
module measures the squared maximum mean discrepancy (MMD², unbiased estimator; the idea of the KID)
between samples and the 297 held-out digits, which neither the classifier nor the diffusion models have
seen, in the 32-dimensional last hidden layer of a small MLP classifier (``DigitClassifier``,
64 → 128 → 32 → 10) trained on the 1,500 training digits, with a Gaussian kernel whose width is the
median distance between two held-out digits' features. Being unbiased, it can compare sets of different
sizes. Its floor is not 0: the held-out digits were written by other people than the training digits,
so the study records the MMD² of ``n`` real training digits (mean and spread over 10 draws). Lower is
better.

Three parts, each a key of the JSON:

* ``"sampling"``: the book's unconditional model (``load_book_model()``, T = 1000, σ² = β_t) sampled
  with Algorithm 2 (1000 steps) and with DDIM (Song, Meng & Ermon 2021; ``samplers.sample_loop``) on
  S uniformly spaced steps, η = 0 (deterministic) and η = 1 (stochastic, σ² = β̃ on the subsequence):
  ``mmd_digits`` and the classifier's mean confidence for each (S, η), from the same seeds (image i has
  the same x_T in every row). Rows with S < T use ``n_samples`` images; a row with T steps (Algorithm 2,
  1000 network calls per image) uses ``n_long``.
* ``"guidance"``: the book's class-conditional model (``load_book_model(name="digits_cond")``) sampled
  with classifier-free guidance (Ho & Salimans 2022; ``guidance.Guided``) at several strengths w, classes
  0 … 9 in turn: the classifier's accuracy on the intended class, its mean probability p(y | x) and mean
  −log p(y | x) (fidelity), the mean pairwise distance between samples of one class, in pixels and in the
  classifier's features (diversity), and ``mmd_digits``.
* ``"likelihood"``: a training study. Small UNets (the paper's architecture, 16 base channels, one
  resolution change, about 0.16M parameters) are trained for the same steps on the same batches with
  the linear or the cosine β schedule (Nichol & Dhariwal 2021, eq. 17), with fixed variances and
  L_simple or with learned variances (``var_type="learned_range"``, their eq. 15) and L_hybrid (their
  §3.1). Each is scored by the whole bound of eq. 5 (``vlb_bpd``) on the same held-out digits with the
  same x_t draws, so differences between variants are paired. A network trained with L_simple is scored
  with σ² = β_t and with σ² = β̃_t (the same network: L_simple does not involve σ).

Single-threaded and seeded: a rerun on the same machine and PyTorch gives the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data import load_digits, to_model_range
from ..diffusion import GaussianDiffusion
from ..generation import generate
from ..loading import WEIGHTS_DIR, load_book_model
from ..rng import global_seed
from ..schedules import make_beta_schedule
from ..train import fit
from ..unet import UNet
from . import load_results, machine_note, results_path, write_results

DEFAULT_OUT = results_path("beyond")
PARTS = ("sampling", "guidance", "likelihood")

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

    # the classifier behind mmd_digits, accuracy and confidence
    clf_seed: int = 0
    clf_steps: int = 1500
    clf_batch: int = 100
    clf_lr: float = 2e-3
    # sampling: the book's model, DDIM against Algorithm 2
    n_samples: int = 1000  # images per sampler with S < T
    n_long: int = 200  # images for a row with T steps (Algorithm 2, or DDIM with S = T)
    n_floor_draws: int = 10  # draws of real training digits for the floor
    sample_seed: int = 0
    ddim_steps: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    ddim_etas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    eta1_max_steps: int = 100  # η = 1 only up to this S (at S = T it is Algorithm 2 with σ² = β̃)
    ddpm: bool = True  # also Algorithm 2 (σ² = β_t), T steps
    n_keep: int = 8  # images of each sampler stored in the JSON (uint8)
    # guidance: the conditional book model
    guidance_scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    guidance_n: int = 200  # images per scale, classes i mod 10
    guidance_steps: int = 50  # DDIM, η = 0
    guidance_seed: int = 0
    # likelihood: the training study
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


# --------------------------------------------------------------------------- the classifier and the measures


class DigitClassifier(nn.Module):
    """An MLP on the 64 pixels in [0, 1]: 64 → 128 → 32 → 10 with SiLU. ``features`` is the 32-wide
    last hidden layer, the space in which ``mmd_digits`` is measured."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32), nn.SiLU())
        self.head = nn.Linear(32, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def pixels(images: Tensor | np.ndarray) -> Tensor:
    """uint8 images [N, 1, 8, 8] or [N, 8, 8, 1] (``generate``'s layout) → float [N, 64] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    return x.reshape(len(x), 64).float() / 255


def train_classifier(s: BeyondSettings) -> DigitClassifier:
    """Adam on cross-entropy, minibatches of the 1,500 training digits, seeded; returns it in eval mode."""
    train = load_digits("train")
    x, y = pixels(train.images), train.labels
    with global_seed(s.clf_seed):  # the initial weights (and any dropout) from the seed alone
        clf = DigitClassifier()
        opt = torch.optim.Adam(clf.parameters(), lr=s.clf_lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(s.clf_seed + 1)
        for _ in range(s.clf_steps):
            idx = torch.randint(len(x), (s.clf_batch,), generator=gen)
            loss = nn.functional.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval().requires_grad_(False)


def reference_digits() -> tuple[Tensor, Tensor]:
    """The 297 held-out digits (uint8 [N, 1, 8, 8]) and their labels: the reference of every measure."""
    test = load_digits("test")
    return test.images, test.labels


@torch.no_grad()
def mmd_digits(clf: DigitClassifier, images: Tensor | np.ndarray, reference: Tensor | np.ndarray) -> float:
    """``mmd_digits``: the unbiased MMD² between the classifier features of two sets of uint8 images,

        MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j),

    with k(a, b) = exp(−‖a − b‖² / 2ℓ²) and ℓ the median distance between two features of ``reference``.
    0 in expectation when both sets come from one distribution; it can come out slightly negative."""
    x, y = clf.features(pixels(images)).double(), clf.features(pixels(reference)).double()
    ell = torch.pdist(y).median()

    def mean_k(a: Tensor, b: Tensor, same: bool) -> Tensor:
        k = torch.exp(-torch.cdist(a, b) ** 2 / (2 * ell**2))
        return (k.sum() - len(a)) / (len(a) * (len(a) - 1)) if same else k.mean()

    return float(mean_k(x, x, True) + mean_k(y, y, True) - 2 * mean_k(x, y, False))


@torch.no_grad()
def class_probs(clf: DigitClassifier, images: Tensor | np.ndarray) -> Tensor:
    """The classifier's p(y | x) [N, 10]."""
    return clf(pixels(images)).double().softmax(-1)


def within_class_distance(images: Tensor | np.ndarray, labels: Tensor, clf: DigitClassifier | None = None
                          ) -> list[float]:
    """Diversity: for each class 0 … 9, the mean distance between two of its images, as the RMS pixel
    difference on the [0, 1] intensity scale (0: all alike); with ``clf``, the mean Euclidean distance
    between their classifier features instead. NaN for a class with fewer than 2 images."""
    x = pixels(images).double()
    if clf is not None:
        with torch.no_grad():
            x = clf.features(x.float()).double() * math.sqrt(64)  # undo the RMS scaling below
    out = []
    for k in range(10):
        xk = x[labels == k]
        out.append(float(torch.pdist(xk).mean() / math.sqrt(64)) if len(xk) > 1 else float("nan"))
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def keep_images(images: Tensor | np.ndarray, n: int) -> list[list[int]]:
    """The first n uint8 images as lists of 64 ints (row-major), for the JSON."""
    return [[int(v) for v in img] for img in pixels(images[:n]).mul(255).round().to(torch.int64).tolist()]


def stored_images(images: list[list[int]]) -> Tensor:
    """The inverse of ``keep_images``: images kept in the JSON as uint8 [n, 1, 8, 8]."""
    return torch.tensor(images, dtype=torch.uint8).reshape(-1, 1, 8, 8)


# --------------------------------------------------------------------------- part 1: DDIM against Algorithm 2


def sampler_runs(s: BeyondSettings, T: int) -> list[tuple[str, int, float]]:
    """(sampler, steps, η) of the sampling part, in the order they run."""
    runs = [("ddim", S, float(eta)) for eta in s.ddim_etas for S in s.ddim_steps
            if S <= T and (eta == 0 or S <= s.eta1_max_steps)]
    return runs + ([("ddpm", T, 0.0)] if s.ddpm else [])


def run_sampling(s: BeyondSettings, clf: DigitClassifier, log=print) -> dict:
    book = load_book_model()
    reference, _ = reference_digits()
    T = book.diffusion.num_timesteps
    train = load_digits("train").images
    floor = {}
    for n in sorted({s.n_samples, s.n_long}):
        draws = [mmd_digits(clf, train[torch.randperm(len(train), generator=torch.Generator().manual_seed(k))[:n]],
                            reference) for k in range(s.n_floor_draws)]
        floor[str(n)] = {"mean": float(np.mean(draws)), "sd": float(np.std(draws, ddof=1)), "draws": draws}
    rows = []
    for sampler, steps, eta in sampler_runs(s, T):
        t0 = time.perf_counter()
        n = s.n_long if steps >= T else s.n_samples
        images = generate(book.model, book.diffusion, n, sampler=sampler,
                          steps=steps if sampler == "ddim" else None, eta=eta, seed=s.sample_seed,
                          batch_size=n, progress=False)  # uint8 [n, 8, 8, 1]
        mmd = mmd_digits(clf, images, reference)
        conf = float(class_probs(clf, images).max(-1).values.mean())
        seconds = round(time.perf_counter() - t0, 1)
        rows.append({"sampler": sampler, "steps": steps, "eta": eta, "network_calls": steps, "n": n,
                     "mmd_digits": mmd, "mean_confidence": conf, "seconds": seconds,
                     "images": keep_images(images, s.n_keep)})
        log(f"{sampler} S={steps:4d} η={eta:g} n={n}: MMD² ×10³ {1e3 * mmd:6.2f}  confidence {conf:.3f}  "
            f"({seconds:.0f} s)")
    return {
        "weights": "digits.safetensors", "weights_sha256": file_sha256(WEIGHTS_DIR / "digits.safetensors"),
        "T": T, "spacing": "uniform", "floor": floor, "runs": rows,
    }


# --------------------------------------------------------------------------- part 2: classifier-free guidance


def run_guidance(s: BeyondSettings, clf: DigitClassifier, log=print) -> dict:
    book = load_book_model(name="digits_cond")
    reference, ref_labels = reference_digits()
    labels = torch.arange(s.guidance_n) % 10
    rows = []
    for w in s.guidance_scales:
        t0 = time.perf_counter()
        images = generate(book.model, book.diffusion, s.guidance_n, sampler="ddim", steps=s.guidance_steps,
                          eta=0.0, seed=s.guidance_seed, batch_size=s.guidance_n, progress=False,
                          class_labels="cycle", guidance_scale=w)
        p = class_probs(clf, images)
        pred = p.argmax(-1)
        diversity = within_class_distance(images, labels)
        p_y = p[torch.arange(len(p)), labels]
        rows.append({"w": float(w), "accuracy": float((pred == labels).double().mean()),
                     "confidence": float(p_y.mean()), "nll": float(-p_y.clamp_min(1e-300).log().mean()),
                     "diversity": float(np.mean(diversity)), "diversity_per_class": diversity,
                     "feature_diversity": float(np.mean(within_class_distance(images, labels, clf))),
                     "mmd_digits": mmd_digits(clf, images, reference), "predicted": pred.tolist(),
                     "seconds": round(time.perf_counter() - t0, 1), "images": keep_images(images, 20)})
        r = rows[-1]
        log(f"guidance w={w:g}: accuracy {r['accuracy']:.3f}  confidence {r['confidence']:.3f}  "
            f"−log p(y|x) {r['nll']:.4f}  diversity {r['diversity']:.3f} / {r['feature_diversity']:.3f}  "
            f"MMD² ×10³ {1e3 * r['mmd_digits']:.2f}  ({r['seconds']:.0f} s)")
    p_ref = class_probs(clf, reference)
    p_ref_y = p_ref[torch.arange(len(p_ref)), ref_labels]
    return {
        "weights": "digits_cond.safetensors",
        "weights_sha256": file_sha256(WEIGHTS_DIR / "digits_cond.safetensors"), "step": book.step,
        "sampler": f"DDIM, {s.guidance_steps} uniform steps, η = 0", "labels": "image i: class i mod 10",
        "held_out": {"accuracy": float((p_ref.argmax(-1) == ref_labels).double().mean()),
                     "confidence": float(p_ref_y.mean()), "nll": float(-p_ref_y.clamp_min(1e-300).log().mean()),
                     "diversity": float(np.mean(within_class_distance(reference, ref_labels))),
                     "feature_diversity": float(np.mean(within_class_distance(reference, ref_labels, clf)))},
        "runs": rows,
    }


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
    clf = None
    if {"sampling", "guidance"} & set(parts):
        t0 = time.perf_counter()
        clf = train_classifier(s)
        ref, ref_labels = reference_digits()
        acc = float((class_probs(clf, ref).argmax(-1) == ref_labels).double().mean())
        out["classifier"] = {"held_out_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)}
        log(f"classifier: held-out accuracy {acc:.3f}")
    for part in parts:
        t0 = time.perf_counter()
        if part == "sampling":
            out[part] = run_sampling(s, clf, log)
        elif part == "guidance":
            out[part] = run_guidance(s, clf, log)
        else:
            out[part] = run_likelihood(s, log)
        out[part]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="parts to (re)run; the others are kept from --out when it exists")
    d = BeyondSettings()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per variant (likelihood)")
    p.add_argument("--T", type=int, default=d.T, help="timesteps of the likelihood study (the paper: 1000)")
    p.add_argument("--n-bound", type=int, default=d.n_bound, help="held-out digits for the bound")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples per sampler with S < T (sampling)")
    p.add_argument("--n-long", type=int, default=d.n_long, help="samples for the T-step samplers (sampling)")
    p.add_argument("--ddim-steps", type=int, nargs="+", default=d.ddim_steps, help="DDIM step counts S")
    p.add_argument("--no-ddpm", action="store_true", help="skip Algorithm 2 (T steps) in the sampling part")
    p.add_argument("--guidance-n", type=int, default=d.guidance_n, help="samples per guidance scale")
    p.add_argument("--guidance-steps", type=int, default=d.guidance_steps, help="DDIM steps when guiding")
    p.add_argument("--clf-steps", type=int, default=d.clf_steps, help="classifier training steps")
    args = p.parse_args(argv)
    s = BeyondSettings(steps=args.steps, T=args.T, n_bound=args.n_bound, n_samples=args.n_samples, n_long=args.n_long,
                 ddim_steps=args.ddim_steps, ddpm=not args.no_ddpm, guidance_n=args.guidance_n,
                 guidance_steps=args.guidance_steps, clf_steps=args.clf_steps)
    torch.set_num_threads(1)  # one thread: reductions add up in the same order on every run
    command = " ".join(["python -m ddpm_lib.studies.beyond", *(sys.argv[1:] if argv is None else argv)])
    # rerunning some parts keeps the others of --out (their settings must not have changed)
    result: dict = load_results("beyond", args.out) if args.out.is_file() and set(args.parts) != set(PARTS) else {}
    new = run_all(s, tuple(args.parts), log=lambda line: print(line, flush=True))
    result.update(new)
    result["description"] = ("Beyond DDPM at small scale: DDIM, classifier-free guidance, schedules and learned "
                             "variances on scikit-learn's 8×8 digits, CPU. Written by ddpm_lib/studies/beyond.py; "
                             "see its docstring.")
    result["settings"] = asdict(s)
    result.setdefault("commands", {}).update({part: command for part in args.parts})
    result.pop("machine", None)  # parts rerun alone may run elsewhere: each part records its own machine
    result.setdefault("machines", {}).update({part: machine_note() for part in args.parts})
    result["total_seconds"] = round(sum(result[k]["seconds"] for k in PARTS if k in result)
                                    + result.get("classifier", {}).get("seconds", 0), 1)
    write_results(args.out, result)
    print(f"wrote {args.out}: parts {', '.join(args.parts)} in {sum(new[k]['seconds'] for k in args.parts):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
