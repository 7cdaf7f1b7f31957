"""Table 2 of the paper at small scale: ``python -m ddpm_lib.studies.table2``.

The paper's ablation (Ho et al. 2020, §4.2, Table 2) trains its CIFAR10 model with three choices of
what the network predicts and how it is trained: the posterior mean μ̃ or the noise ε, with the
true bound L (learned diagonal Σ or fixed isotropic Σ) or with an unweighted squared error. In
``ddpm_lib`` terms the six rows are (mean_type, var_type, loss_type) =

    (mu, learned, vlb)   (mu, fixed_large, vlb)   (mu, fixed_large, simple)
    (eps, learned, vlb)  (eps, fixed_large, vlb)  (eps, fixed_large, simple)

This module trains all six on data small enough for a CPU: the 2-D ring of eight Gaussians
(``GaussianMixture2D.ring``, std 0.1) rounded to the 256-level grid of [−1, 1], so that the
discrete decoder of eq. 13 and bits/dim mean what they mean for images. Every configuration gets
the same network (``MLPDenoiser``; 4 outputs instead of 2 when Σ is learned, mean part first), the
paper's T = 1000 linear schedule, and the same steps, batch, learning rate, seeds and batches; each
is trained from several seeds. Each run is measured with metrics that are exact on this data set,
where CIFAR10 needs an Inception network:

* ``nll_bound_bpd``: the bound L (eq. 5) in bits/dim on held-out points (``vlb_bpd``), ± its
  standard error over the points; the data's exact NLL (the entropy of the discretized mixture)
  is the floor no model can go below;
* ``mmd2``: the squared maximum mean discrepancy between Algorithm 2's samples and the true
  mixture, Gaussian kernel of width ``kernel_width``; the mixture's side is a Gaussian integral,
  so the distance needs no reference sample (lower is better; 0 for a perfect sampler, up to the
  samples' own noise);
* ``near_mode``: the share of samples within 3 std of a component's mean (99.5% of the data);
* ``escaped``: samples that are not finite or lie outside [−2, 2]², twice the data's range: the
  sampler diverged for them. They stay in ``mmd2`` and ``near_mode`` (a non-finite one is placed
  far away), so they count as misses.

A non-finite loss or gradient norm stops a run and records it as ``"unstable"``, the paper's "–".
Results go to ``ddpm_lib/studies/table2_small.json`` (shipped with the package, so Colab has it too),
which the chapter ``book/eps.ipynb`` loads with ``studies.load_results("table2")``.
Single-threaded and seeded: a rerun on the same machine and PyTorch gives the same numbers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..diffusion import GaussianDiffusion
from ..rng import global_seed
from ..samplers import sample_loop
from ..schedules import make_beta_schedule
from ..toy import GaussianMixture2D, MLPDenoiser, discretized_gaussian
from ..train import fit
from . import command_line, machine_note, results_path, write_results

DEFAULT_OUT = results_path("table2")

# Table 2's rows: (label, mean_type, var_type, loss_type, the paper's IS, the paper's FID); None is "–".
ROWS: list[tuple[str, str, str, str, float | None, float | None]] = [
    ("μ̃, L, learned diagonal Σ", "mu", "learned", "vlb", 7.28, 23.69),
    ("μ̃, L, fixed isotropic Σ", "mu", "fixed_large", "vlb", 8.06, 13.22),
    ("μ̃, ‖μ̃ − μ̃_θ‖²", "mu", "fixed_large", "simple", None, None),
    ("ε, L, learned diagonal Σ", "eps", "learned", "vlb", None, None),
    ("ε, L, fixed isotropic Σ", "eps", "fixed_large", "vlb", 7.67, 13.51),
    ("ε, ‖ε̃ − ε_θ‖² (L_simple)", "eps", "fixed_large", "simple", 9.46, 3.17),
]
SUMMARY_METRICS = ("nll_bound_bpd", "mmd2", "near_mode", "escaped")


@dataclass
class Table2Settings:
    """Everything a run depends on; the same for all six configurations."""

    T: int = 1000                # the paper's linear schedule, β 1e-4 → 0.02
    steps: int = 4000            # Adam updates per run
    batch_size: int = 512
    lr: float = 2e-3
    warmup: int = 200            # linear warm-up of the learning rate (App. B: 5000 of 800k steps)
    grad_clip: float = 1.0       # App. B
    ema_decay: float = 0.995     # metrics use the EMA weights, as the paper's do
    hidden: int = 128            # MLPDenoiser width and depth
    depth: int = 3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # init, batches, t and ε
    data_seed: int = 0           # the data set and the evaluation draws: one for all runs
    n_train: int = 20_000        # fixed training set
    n_eval: int = 2_000          # held-out points
    n_bound: int = 500           # held-out points for the bound (one x_t draw per t each)
    n_samples: int = 2_000       # Algorithm 2 samples per run
    n_keep: int = 500            # samples of the first seed stored in the JSON (for the chapter's figure)
    kernel_width: float = 0.1    # MMD's Gaussian kernel: the components' std
    ring_k: int = 8
    ring_radius: float = 0.7
    ring_std: float = 0.1
    loss_window: int = 250       # the loss curve is stored as means over windows of this many steps


# --------------------------------------------------------------------------- data and its exact answers


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round points to the nearest of the 256 levels of [−1, 1] (the grid of 8-bit images)."""
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def make_mixture(s: Table2Settings) -> GaussianMixture2D:
    return GaussianMixture2D.ring(k=s.ring_k, radius=s.ring_radius, std=s.ring_std)


def make_data(mix: GaussianMixture2D, s: Table2Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out points [N, 2], float32 on the 256-level grid, from separate seeds."""
    train = quantize(mix.sample(s.n_train, torch.Generator().manual_seed(s.data_seed + 100))).float()
    held_out = quantize(mix.sample(s.n_eval, torch.Generator().manual_seed(s.data_seed + 200))).float()
    return train, held_out


def exact_nll_bits(mix: GaussianMixture2D) -> float:
    """The data's exact NLL in bits/dim: the entropy of the mixture rounded to the 256×256 grid.

    Each component is isotropic, so its bin probabilities are products of 1-D ones
    (``toy.discretized_gaussian``, edge bins open-ended like the decoder's).
    """
    p = torch.zeros(256, 256, dtype=torch.float64)
    for w, (m0, m1) in zip(mix.weights, mix.means, strict=True):
        _, p0 = discretized_gaussian(float(m0), mix.std)
        _, p1 = discretized_gaussian(float(m1), mix.std)
        p += w * p0[:, None] * p1[None, :]
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) / 2


def mmd2_to_mixture(mix: GaussianMixture2D, x: torch.Tensor, width: float) -> float:
    """Squared MMD between points x [N, 2] and the mixture, kernel k(a, b) = exp(−‖a − b‖² / 2ℓ²).

    MMD² = E k(x, x') − 2 E k(x, y) + E k(y, y'), x from the points, y from the mixture. Both
    mixture expectations are Gaussian integrals: in 2-D, with component variance s²,
    E_y k(x, y) = Σ_k w_k ℓ²/(ℓ² + s²) exp(−‖x − μ_k‖² / 2(ℓ² + s²)), and E k(y, y') is the same
    with 2s² between two components' means. The points' term is the unbiased mean over pairs i ≠ j.
    """
    x = x.double()
    n, l2, v = len(x), width**2, mix.std**2
    w, mu = mix.weights, mix.means
    xx = (torch.exp(-torch.cdist(x, x) ** 2 / (2 * l2)).sum() - n) / (n * (n - 1))
    xy = (w * l2 / (l2 + v) * torch.exp(-torch.cdist(x, mu) ** 2 / (2 * (l2 + v)))).sum(1).mean()
    yy = (w[:, None] * w[None] * l2 / (l2 + 2 * v) * torch.exp(-torch.cdist(mu, mu) ** 2 / (2 * (l2 + 2 * v)))).sum()
    return float(xx - 2 * xy + yy)


def sample_metrics(mix: GaussianMixture2D, x: torch.Tensor, s: Table2Settings) -> dict[str, float]:
    """Sample quality of points x [N, 2] against the true mixture (see the module docstring)."""
    x = x.double()
    finite = torch.isfinite(x).all(1)
    escaped = ~finite | (x.abs() > 2).any(1)
    x = torch.where(finite[:, None], x, torch.full_like(x, 100.0))  # a non-finite sample is a miss
    dist = torch.cdist(x, mix.means)
    near = (dist.min(1).values < 3 * mix.std).double()
    per_mode = dist.argmin(1)[~escaped].bincount(minlength=len(mix.means))
    return {
        "mmd2": mmd2_to_mixture(mix, x, s.kernel_width),
        "near_mode": float(near.mean()),
        "near_mode_se": float(near.std() / math.sqrt(len(x))),
        "escaped": int(escaped.sum()),
        "non_finite": int((~finite).sum()),
        "points_per_mode": per_mode.tolist(),
    }


# --------------------------------------------------------------------------- the model and one run


def make_mlp(var_type: str, s: Table2Settings, seed: int) -> nn.Module:
    """``MLPDenoiser`` for 2-D data; with a learned Σ its last layer outputs 4 numbers (2C channels,
    the mean part first, as ``GaussianDiffusion`` expects): the predicted mean and a log-variance."""
    with global_seed(seed):
        model = MLPDenoiser(dim=2, hidden=s.hidden, depth=s.depth)
        if var_type == "learned":
            model.net[-1] = nn.Linear(s.hidden, 4)
    return model


@torch.no_grad()
def score_run(diffusion: GaussianDiffusion, model: nn.Module, mix: GaussianMixture2D, held_out: torch.Tensor,
             s: Table2Settings) -> tuple[dict, torch.Tensor]:
    """The bound on held-out points and the quality of Algorithm 2's samples → (metrics, samples)."""
    bound = diffusion.vlb_bpd(model, held_out[: s.n_bound],
                              generator=torch.Generator().manual_seed(s.data_seed + 300))
    total = bound["total"]
    samples = sample_loop(diffusion, model, (s.n_samples, 2),
                          generator=torch.Generator().manual_seed(s.data_seed + 400))
    metrics = {
        "nll_bound_bpd": float(total.mean()),
        "nll_bound_se": float(total.std() / math.sqrt(len(total))),
        "L0_bpd": float(bound["terms"][:, 0].mean()),
        "sum_Lt_bpd": float(bound["terms"][:, 1:].sum(1).mean()),
        "LT_bpd": float(bound["prior"].mean()),
        **sample_metrics(mix, samples, s),
    }
    return metrics, samples


def run_row(mean_type: str, var_type: str, loss_type: str, mix: GaussianMixture2D, train: torch.Tensor,
               held_out: torch.Tensor, s: Table2Settings, seed: int) -> tuple[dict, torch.Tensor | None]:
    """Train and measure one row of Table 2 from one seed → (result, samples or None)."""
    start = time.perf_counter()
    diffusion = GaussianDiffusion(make_beta_schedule("linear", s.T), mean_type, var_type, loss_type)
    run = fit(diffusion, make_mlp(var_type, s, seed), train, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
              warmup=s.warmup, grad_clip=s.grad_clip, ema_decay=s.ema_decay, seed=seed, loss_window=s.loss_window)
    result = {"seed": seed, "status": "stable" if run["failure"] is None else "unstable",
              "failure": run["failure"], "steps_done": run["steps_done"], "loss_windows": run["loss_windows"]}
    samples = None
    if run["failure"] is None:
        result["metrics"], samples = score_run(diffusion, run["ema"], mix, held_out, s)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result, samples


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over the stable runs of each metric in ``SUMMARY_METRICS``."""
    stable = [r["metrics"] for r in runs if r["status"] == "stable"]
    out: dict = {"stable_runs": len(stable), "runs": len(runs)}
    for name in SUMMARY_METRICS:
        values = [m[name] for m in stable]
        out[name] = {"mean": statistics.fmean(values) if values else None,
                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "min": min(values, default=None), "max": max(values, default=None)}
    return out


def run_all(s: Table2Settings, rows: list[tuple] = ROWS, log=print) -> dict:
    """Every configuration from every seed; the result that ``main`` writes as JSON."""
    start = time.perf_counter()
    mix = make_mixture(s)
    train, held_out = make_data(mix, s)
    out = []
    for label, mean_type, var_type, loss_type, paper_is, paper_fid in rows:
        runs, kept = [], None
        for seed in s.seeds:
            result, samples = run_row(mean_type, var_type, loss_type, mix, train, held_out, s, seed)
            runs.append(result)
            if kept is None and samples is not None:
                kept = [[round(v, 3) if math.isfinite(v) else None for v in p] for p in samples[: s.n_keep].tolist()]
            m = result.get("metrics", {})
            log(f"{label:28s} seed {seed}: {result['status']:8s} {result['seconds']:5.1f} s"
                + (f"  bound {m['nll_bound_bpd']:.3f}  MMD² {m['mmd2']:.4f}  near {m['near_mode']:.3f}"
                   f"  escaped {m['escaped']}" if m else f"  ({result['failure']})"))
        out.append({"label": label, "mean_type": mean_type, "var_type": var_type, "loss_type": loss_type,
                     "paper": {"IS": paper_is, "FID": paper_fid}, "summary": summarize(runs), "runs": runs,
                     "samples": kept})
    return {
        "description": "Table 2 of Ho et al. (2020) at small scale: the 2-D ring of 8 Gaussians on the 256-level "
                       "grid, MLPDenoiser, CPU. Written by ddpm_lib/studies/table2.py; see its docstring.",
        "settings": asdict(s),
        "reference": {
            "exact_nll_bpd": exact_nll_bits(mix),
            "held_out": sample_metrics(mix, held_out, s),
            "parameters": {v: sum(p.numel() for p in make_mlp(v, s, 0).parameters())
                           for v in ("fixed_large", "learned")},
        },
        "configs": out,
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": machine_note(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    d = Table2Settings()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="training seeds")
    p.add_argument("--T", type=int, default=d.T, help="number of timesteps (the paper: 1000)")
    p.add_argument("--n-bound", type=int, default=d.n_bound, help="held-out points for the bound")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples per run")
    args = p.parse_args(argv)
    s = Table2Settings(steps=args.steps, seeds=args.seeds, T=args.T, n_bound=args.n_bound, n_samples=args.n_samples)
    torch.set_num_threads(1)  # one thread: reductions add up in the same order on every run
    result = run_all(s, log=lambda line: print(line, flush=True))
    result["command"] = command_line("ddpm_lib.studies.table2", argv)
    write_results(args.out, result)
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
