"""The book's networks as ONNX files, and the constants a sampler outside Python needs, for a page that samples
in the reader's browser (ONNX Runtime Web).

* ``export_onnx(model, path)`` writes ε_θ(x_t, t) (or ε_θ(x_t, t, y) for a class-conditional network) as one
  self-contained ONNX file, batch size free, through ``torch.onnx.export`` (the torch.export-based exporter).
  The graph is ``UNet.forward_checked``: the network after ``forward``'s input checks, which cannot be traced.
  Each ``Upsample`` (nearest ×2, then a 3×3 conv) is exported as the same map computed on the low-resolution
  grid (``SubpixelUpsample``), which needs about half the multiply-adds; the outputs agree to float32 rounding.
* ``sampler_constants(diffusion)`` is every per-timestep number that Algorithm 2 and DDIM use, taken from
  ``GaussianDiffusion.const`` (never retyped), with the conventions the library samples with: 0-based indices
  (index i is the paper's t = i + 1), σ² at index 0 as in ``p_mean_variance_from_output``, x̂_0 clipped.
* ``max_abs_error(path, model, ...)`` runs the file with the Python ``onnxruntime`` and compares it with the
  PyTorch network on random inputs.

``python -m ddpm_lib.onnx_export OUT_DIR`` writes the two book models (``fashion``, ``fashion_cond``) and their
constants there. onnx, onnxscript and onnxruntime are needed only here (the ``export`` extra), and torch 2.5 or
newer.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion import GaussianDiffusion
from .loading import BOOK_MODELS, WEIGHTS_DIR, load_book_model
from .samplers import ddim_timesteps
from .unet import UNet, Upsample

OPSET = 18  # GroupNormalization is an ONNX operator from opset 18; ONNX Runtime Web runs it
DDIM_STEPS = (10, 20, 50, 100)  # the step counts a page offers, with the library's uniform spacing
CONSTANT_NAMES = ("betas", "alpha_bar", "alpha_bar_prev", "sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar",
                  "coef_x0", "coef_xt")


class _Checked(nn.Module):
    """``UNet.forward_checked`` as a module's forward, for the exporter."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net.forward_checked(x, t, y)


class SubpixelUpsample(nn.Module):
    """``unet.Upsample`` (nearest-neighbour ×2, then a 3×3 conv with zero padding) computed on the input's grid.

    Output pixel (2i + a, 2j + b), with phases a, b ∈ {0, 1}, reads the upsampled rows 2i + a − 1, 2i + a and
    2i + a + 1, which are the input rows ⌊(2i + a − 1)/2⌋, … : for a = 0 the rows i − 1, i, i, for a = 1 the
    rows i, i, i + 1 (and the same for columns). Rows that repeat take the sum of their taps, so each phase is a
    2×2 conv of the input whose taps are sums of the 3×3 kernel's rows w₀, w₁, w₂:

        a = 0: (w₀, w₁ + w₂) over input rows (i − 1, i);   a = 1: (w₀ + w₁, w₂) over rows (i, i + 1).

    The zero padding of the upsampled map is the zero padding of the input, so one 2×2 conv with the four phases'
    kernels as 4·C_out output channels, on the input padded by one, gives every phase at (h + 1) × (w + 1)
    offsets; phase (a, b) is the window starting at (a, b), and ``pixel_shuffle`` interleaves the four. The
    multiply-adds per input pixel are 4 phases × 4 taps against 4 outputs × 9 taps (16(h+1)(w+1) / 36hw: 0.51
    at 14 × 14). The summed taps are formed in float64, so the result differs from ``Upsample`` by rounding.
    """

    def __init__(self, up: Upsample):
        super().__init__()
        w = up.conv.weight.detach().to(torch.float64)  # [C_out, C_in, 3, 3]

        def phase_taps(k: Tensor, a: int, dim: int) -> Tensor:  # the two taps of phase a along dim
            w0, w1, w2 = k.unbind(dim)
            return torch.stack((w0, w1 + w2) if a == 0 else (w0 + w1, w2), dim)

        kernels = [phase_taps(phase_taps(w, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]
        self.register_buffer("weight", torch.cat(kernels).to(up.conv.weight.dtype))  # [4·C_out, C_in, 2, 2]
        self.register_buffer("bias", up.conv.bias.detach().repeat(4).clone())
        self.out_channels = w.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        B, _, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias).reshape(B, 4, self.out_channels, h + 1, w + 1)
        phases = [y[:, 2 * a + b, :, a:a + h, b:b + w] for a in (0, 1) for b in (0, 1)]  # [B, C_out, h, w] each
        return F.pixel_shuffle(torch.stack(phases, 2).reshape(B, 4 * self.out_channels, h, w), 2)


def with_subpixel_upsampling(model: UNet) -> UNet:
    """A copy of ``model`` whose ``Upsample`` blocks are ``SubpixelUpsample``: the same network (to rounding)."""
    net = copy.deepcopy(model)
    for level in net.up:
        if isinstance(level.resample, Upsample):
            level.resample = SubpixelUpsample(level.resample)
    return net


@contextmanager
def _readable_cudnn_flags() -> Iterator[None]:
    """torch.export reads the legacy ``torch.backends.cudnn.allow_tf32``, whose getter raises in torch 2.9+ once
    the new API has set cuDNN's convolutions to "ieee" (as ``precision.set_fp32_precision(..., "fp32")`` does).
    The export runs on the CPU, where TF32 means nothing, so the flags are put back to torch's default for it
    and restored after."""
    if not hasattr(torch.backends, "fp32_precision"):
        yield
        return
    conv, rnn = torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    saved = conv.fp32_precision, rnn.fp32_precision
    conv.fp32_precision = rnn.fp32_precision = "tf32"
    try:
        yield
    finally:
        conv.fp32_precision, rnn.fp32_precision = saved


def input_names(model: UNet) -> list[str]:
    """The graph's inputs: x [B, C, H, W] float32 and t [B] int64 (0-based), and y [B] int64 when conditional."""
    return ["x", "t"] + (["y"] if model.config.num_classes is not None else [])


def export_onnx(model: UNet, path: str | Path, *, opset: int = OPSET, subpixel: bool = True) -> Path:
    """Write ``model`` (float32, on the CPU, in eval mode) to ``path`` as one ONNX file; returns the path.

    The batch dimension is dynamic. Inputs are named by ``input_names``, the output ``eps``. With ``subpixel``
    (the default) the upsampling blocks are exported as ``SubpixelUpsample``; ``subpixel=False`` exports the
    network as it is written (for comparison).
    """
    if not isinstance(model, UNet):
        raise TypeError(f"export_onnx takes a ddpm_lib UNet, got {type(model).__name__}")
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
        raise RuntimeError(f"the ONNX export needs torch >= 2.5 (torch.onnx.export with dynamo=True), "
                           f"this is torch {torch.__version__}")
    c = model.config
    net = _Checked(with_subpixel_upsampling(model) if subpixel else model).to("cpu", torch.float32).eval()
    x = torch.zeros(2, c.in_channels, c.image_size, c.image_size)
    args: tuple[Tensor, ...] = (x, torch.tensor([c.image_size, 0]))
    if c.num_classes is not None:
        args += (torch.tensor([0, c.num_classes]),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), _readable_cudnn_flags():
        # the exporter notes that the one dynamic axis is named once for all inputs: true, and harmless
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        torch.onnx.export(net, args, str(path), dynamo=True, opset_version=opset, external_data=False,
                          input_names=input_names(model), output_names=["eps"],
                          dynamic_shapes=tuple({0: batch} for _ in args))
    return path


def sampler_constants(diffusion: GaussianDiffusion) -> dict:
    """The per-index numbers of Algorithm 2 and DDIM, as lists of floats (float64 values), for a sampler
    written in another language. Only the library's own settings are exported: ε-prediction with a fixed
    variance, x̂_0 clipped to [−1, 1].

    ``log_variance`` is σ_t² of Algorithm 2 at each index, index 0 included (``fixed_large``: β̃_2 there).
    Algorithm 2's step at index i: x̂_0 = clip(sqrt_recip_alpha_bar·x − sqrt_recipm1_alpha_bar·ε) (eq. 15),
    mean = coef_x0·x̂_0 + coef_xt·x (eq. 7), x ← mean + exp(½ log_variance)·z, with z = 0 at index 0.
    ``ddim_timesteps`` maps a step count S (as a string) to ``samplers.ddim_timesteps(T, S)``, the indices a DDIM
    chain visits, in sampling order; the last step goes to ᾱ = 1 (x_0).
    """
    if diffusion.mean_type != "eps" or diffusion.var_type not in ("fixed_large", "fixed_small"):
        raise ValueError(f"only eps prediction with a fixed variance is exported, got mean_type "
                         f"{diffusion.mean_type!r}, var_type {diffusion.var_type!r}")
    out = {name: diffusion.const(name).tolist() for name in CONSTANT_NAMES}
    out["log_variance"] = diffusion.const(f"log_var_{diffusion.var_type}").tolist()
    T = diffusion.num_timesteps
    out["ddim_timesteps"] = {str(S): ddim_timesteps(T, S) for S in DDIM_STEPS if S <= T}  # in sampling order
    out.update(T=T, mean_type=diffusion.mean_type, var_type=diffusion.var_type, clip_denoised=True)
    return out


def max_abs_error(path: str | Path, model: UNet, *, batch: int = 3, seed: int = 0, num_timesteps: int = 1000) -> float:
    """The largest |ONNX Runtime − PyTorch| over the outputs for a random batch: x ~ N(0, I), t uniform on
    0 … ``num_timesteps`` − 1 and, for a conditional network, y uniform over the classes and the null label."""
    import onnxruntime

    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    feeds = {"x": x, "t": torch.randint(0, num_timesteps, (batch,), generator=g)}
    if c.num_classes is not None:
        feeds["y"] = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["eps"], {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        want = model.to("cpu", torch.float32).eval()(*feeds.values())
    return float((torch.from_numpy(got) - want).abs().max())


def export_book_models(out_dir: str | Path, names: tuple[str, ...] = BOOK_MODELS) -> dict:
    """Each book model as ``<name>.onnx`` and ``<name>.json`` (its ``sampler_constants``, its input names and
    its parameter count) in ``out_dir``; returns {name: {"onnx": path, "json": path, "max_abs_error": float}}."""
    out_dir = Path(out_dir)
    written = {}
    for name in names:
        book = load_book_model(name=name)
        onnx_path = export_onnx(book.model, out_dir / f"{name}.onnx")
        info = sampler_constants(book.diffusion)
        info.update(name=name, inputs=input_names(book.model), num_classes=book.model.config.num_classes,
                    image_shape=[book.model.config.in_channels, book.model.config.image_size,
                                 book.model.config.image_size],
                    parameters=sum(p.numel() for p in book.model.parameters()))
        json_path = out_dir / f"{name}.json"
        json_path.write_text(json.dumps(info), encoding="utf8")
        error = max_abs_error(onnx_path, book.model, num_timesteps=book.diffusion.num_timesteps)
        if not math.isfinite(error) or error > 1e-4:
            raise RuntimeError(f"{onnx_path}: ONNX Runtime differs from PyTorch by {error:.2e} (> 1e-4)")
        written[name] = {"onnx": onnx_path, "json": json_path, "max_abs_error": error}
    return written


ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")  # ONNX Runtime Web


def _stamp(names: tuple[str, ...]) -> str:
    """What the exported files depend on: the weights, this module and the torch release."""
    h = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode())
    for name in names:
        h.update((WEIGHTS_DIR / f"{name}.safetensors").read_bytes())
    return h.hexdigest()


def write_live_assets(dest: str | Path, ort_dist: str | Path,
                      names: tuple[str, ...] = BOOK_MODELS) -> Path:
    """The files the book's live panel loads, under ``dest/live``: each book model's ``.onnx`` and ``.json``
    (``export_book_models``) and ONNX Runtime Web's module and WebAssembly (``ORT_FILES``, copied from
    ``ort_dist``, the ``dist`` folder of the npm package ``onnxruntime-web``) in ``dest/live/ort``.

    The models are exported again only when the weights, this module or torch change (``dest``.stamp, beside
    ``dest``, records them). Returns ``dest/live``.
    """
    ort_dist = Path(ort_dist)
    missing = [f for f in ORT_FILES if not (ort_dist / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{ort_dist} lacks {missing}: install the book's JavaScript dependency with "
                                f"`npm ci` at the repository root (package-lock.json pins onnxruntime-web)")
    live = Path(dest) / "live"
    (live / "ort").mkdir(parents=True, exist_ok=True)
    for f in ORT_FILES:
        shutil.copy2(ort_dist / f, live / "ort" / f)
    stamp, stamp_file = _stamp(names), Path(dest).parent / f"{Path(dest).name}.stamp"  # beside dest, not in it
    complete = all((live / f"{n}.{ext}").is_file() for n in names for ext in ("onnx", "json"))
    if not (complete and stamp_file.is_file() and stamp_file.read_text(encoding="utf8") == stamp):
        export_book_models(live, names)
        stamp_file.write_text(stamp, encoding="utf8")
    return live


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the book's models to ONNX, with their sampler constants.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models", nargs="+", default=list(BOOK_MODELS), choices=BOOK_MODELS)
    args = parser.parse_args(argv)
    for name, w in export_book_models(args.out_dir, tuple(args.models)).items():
        print(f"{name}: {w['onnx']} ({w['onnx'].stat().st_size / 1e6:.1f} MB), {w['json']}; "
              f"ONNX Runtime vs PyTorch: max |diff| {w['max_abs_error']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
