"""The book model's slow figures: ``python -m ddpm_lib.studies.figures``.

The chapters on the ELBO and on the experiments show what the book's Fashion-MNIST model
(``load_book_model()``: 1.1M parameters, T = 1000, the paper's β, ε-prediction, σ² = β_t) does in computations
that take minutes on one CPU thread: the whole bound of eq. 5 over many test images, and the paper's Fig. 7
(samples that share a latent x_t). This module computes them once; its results ship as
``ddpm_lib/studies/figures_small.json`` (``studies.load_results("figures")``), and each chapter recomputes a
piece live that must come out as stored.

Three parts, each a key of the JSON:

* ``"bound"``: eq. 5 in bits/dim on the first ``n_bound`` Fashion-MNIST test images
  (``evaluate.dataset_nll``, ``bound_batch`` images per batch, x_t drawn from one generator seeded with
  ``bound_seed``, x̂_0 clipped as in the official evaluation): each image's total and prior term, and per t
  the mean term and the mean squared error of x̂_0 (the distortion of §4.3's Fig. 5). The first batch alone,
  with the same seed, gives the same numbers for its images.
* ``"shared_latents"`` (Fig. 7): for each of ``sources`` test images (the first of each class), one x_t
  ~ q(x_t | x_0) at each t of ``starts``, and ``chains`` reverse chains (Algorithm 2) from it, each with its
  own generator (``rng.image_generators``: chain k of source j has the same noise in any batch). Stored: every
  sample, and per t the share of samples that the shipped Fashion-MNIST classifier puts in the source's class
  and their RMS pixel distance to the source.
* ``"consistency"`` (the DDIM paper's consistency, shown in the closing chapter): ``n_consistency`` shared
  x_T sampled twice with Algorithm 2 (different step noise) and with DDIM, η = 0, on each S of
  ``ddim_steps``.

Single-threaded and seeded: a rerun on the same machine and PyTorch gives the same numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data import load_split, to_model_range, to_uint8
from ..evaluate import dataset_nll
from ..loading import WEIGHTS_DIR, load_book_model
from ..metrics import FashionFeatures, as_nchw, extract
from ..rng import image_generators
from ..samplers import sample_loop
from . import add_part_arguments, command_line, file_sha256, keep_images, merge_parts, results_path, write_results

DEFAULT_OUT = results_path("figures")
PARTS = ("bound", "shared_latents", "consistency")
MODEL = "fashion"


@dataclass
class FiguresSettings:
    """Everything the three parts depend on."""

    n_bound: int = 50  # the first test images
    bound_batch: int = 2
    bound_seed: int = 0
    sources: int = 10  # the first test image of each of the first `sources` classes
    starts: list[int] = field(default_factory=lambda: [250, 500, 750, 1000])  # the paper's t
    chains: int = 4
    latent_seed: int = 0  # the x_t draws
    chain_seed: int = 1  # the reverse chains' noise
    n_consistency: int = 6
    consistency_seed: int = 7  # x_T
    ddpm_seeds: list[int] = field(default_factory=lambda: [1, 2])  # the two Algorithm 2 runs' step noise
    ddim_steps: list[int] = field(default_factory=lambda: [10, 20, 50, 100])


def source_images(n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first test image of each class 0 … n_classes − 1 (uint8 [n, 1, 28, 28]) and their indices."""
    test = load_split("fashion", "test", download=False)
    idx = torch.tensor([int((test.labels == k).nonzero()[0]) for k in range(n_classes)])
    return test.images[idx], idx


def shared_latent(diffusion, source: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) (eq. 4) of uint8 sources [n, 1, H, W] at the paper's t, from ``seed``."""
    i = torch.full((len(source),), t - 1)
    return diffusion.q_sample(to_model_range(source), i, generator=torch.Generator().manual_seed(seed + t))


def chains_from(diffusion, model, x_t: torch.Tensor, t: int, chains: int, seed: int,
                first_index: int = 0) -> torch.Tensor:
    """``chains`` Algorithm 2 chains from each latent in x_t [n, …], run from index t − 1 to x_0: samples
    [n · chains, …] in [−1, 1], source-major; chain k of latent j uses ``image_generators(seed + t, …)`` at
    index (first_index + j) · chains + k, so any subset of the sources gives the same chains."""
    x = x_t.repeat_interleave(chains, 0)
    gens = image_generators(seed + t, range(first_index * chains, first_index * chains + len(x)))
    return sample_loop(diffusion, model, x.shape, x_T=x, t_start=t - 1, generator=gens)


def run_bound(s: FiguresSettings, book, log=print) -> dict:
    test = load_split("fashion", "test", download=False)
    b = dataset_nll(book.model, book.diffusion, test.images[: s.n_bound], batch_size=s.bound_batch,
                    seed=s.bound_seed)
    log(f"bound on {b.n} test images: {b.nll_bpd:.3f} ± {b.nll_sem:.3f} bits/dim (L_0 {b.terms[0]:.3f})")
    return {"n": b.n, "nll_bpd": b.nll_bpd, "nll_sem": b.nll_sem,
            "total": [round(float(v), 6) for v in b.total], "prior": [float(f"{v:.6g}") for v in b.prior],
            "terms": [float(f"{v:.6g}") for v in b.terms], "x0_mse": [float(f"{v:.6g}") for v in b.x0_mse]}


def run_shared_latents(s: FiguresSettings, book, log=print) -> dict:
    sources, idx = source_images(s.sources)
    labels = torch.arange(s.sources).repeat_interleave(s.chains)
    extractor = FashionFeatures()
    rows = []
    for t in s.starts:
        t0 = time.perf_counter()
        x_t = shared_latent(book.diffusion, sources, t, s.latent_seed)
        out = chains_from(book.diffusion, book.model, x_t, t, s.chains, s.chain_seed)
        samples = to_uint8(out)
        _, logits = extract(as_nchw(samples), extractor)
        kept = float((torch.from_numpy(logits.argmax(1)) == labels).double().mean())
        rms = (samples.float() - sources.repeat_interleave(s.chains, 0).float()).div(255).pow(2).mean((1, 2, 3))
        rows.append({"t": t, "class_kept": kept, "rms_to_source": float(rms.sqrt().mean()),
                     "predicted": logits.argmax(1).tolist(), "latents": keep_images(to_uint8(x_t), s.sources),
                     "samples": keep_images(samples, len(samples)), "seconds": round(time.perf_counter() - t0, 1)})
        log(f"shared latents from t = {t}: class kept {kept:.2f}, RMS to the source {rows[-1]['rms_to_source']:.3f} "
            f"({rows[-1]['seconds']:.0f} s)")
    return {"source_indices": idx.tolist(), "rows": rows}


def run_consistency(s: FiguresSettings, book, log=print) -> dict:
    shape = (s.n_consistency, 1, 28, 28)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(s.consistency_seed))
    rows = []
    for seed in s.ddpm_seeds:
        x = sample_loop(book.diffusion, book.model, shape, x_T=x_T, generator=torch.Generator().manual_seed(seed))
        rows.append({"sampler": "ddpm", "steps": book.diffusion.num_timesteps, "seed": seed,
                     "images": keep_images(to_uint8(x), len(x))})
    for S in s.ddim_steps:
        x = sample_loop(book.diffusion, book.model, shape, sampler="ddim", steps=S, eta=0.0, x_T=x_T)
        rows.append({"sampler": "ddim", "steps": S, "images": keep_images(to_uint8(x), len(x))})
    log(f"consistency: {len(rows)} rows of {s.n_consistency}")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_part_arguments(p, DEFAULT_OUT, PARTS)
    d = FiguresSettings()
    p.add_argument("--n-bound", type=int, default=d.n_bound, help="test images in the bound")
    p.add_argument("--bound-batch", type=int, default=d.bound_batch, help="images per batch of the bound")
    p.add_argument("--sources", type=int, default=d.sources, help="source images of the shared latents (≤ 10)")
    p.add_argument("--starts", type=int, nargs="+", default=d.starts, help="t of the shared latents")
    p.add_argument("--chains", type=int, default=d.chains, help="reverse chains per shared latent")
    p.add_argument("--n-consistency", type=int, default=d.n_consistency, help="x_T of the consistency rows")
    p.add_argument("--ddim-steps", type=int, nargs="+", default=d.ddim_steps, help="DDIM S of the consistency rows")
    args = p.parse_args(argv)
    s = FiguresSettings(n_bound=args.n_bound, bound_batch=args.bound_batch, sources=args.sources, starts=args.starts,
                        chains=args.chains, n_consistency=args.n_consistency, ddim_steps=args.ddim_steps)
    torch.set_num_threads(1)  # one thread: reductions add up in the same order on every run
    command = command_line("ddpm_lib.studies.figures", argv)
    book = load_book_model(name=MODEL)
    weights = WEIGHTS_DIR / f"{MODEL}.safetensors"
    runners = {"bound": run_bound, "shared_latents": run_shared_latents, "consistency": run_consistency}
    new = {}
    for part in args.parts:
        t0 = time.perf_counter()
        new[part] = runners[part](s, book, log=lambda line: print(line, flush=True))
        new[part] |= {"weights": weights.name, "weights_sha256": file_sha256(weights), "step": book.step,
                      "seconds": round(time.perf_counter() - t0, 1)}
    result = merge_parts("figures", args.out, new, args.parts, PARTS, settings=asdict(s), command=command,
                         description="The book model's slow figures (the bound of eq. 5, Fig. 7's shared latents, "
                                     "DDIM's consistency) on Fashion-MNIST, CPU. Written by "
                                     "ddpm_lib/studies/figures.py; see its docstring.")
    write_results(args.out, result)
    print(f"wrote {args.out}: parts {', '.join(args.parts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

