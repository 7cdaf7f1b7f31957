"""The noise predictor ε_θ(x_t, t): the paper's UNet (App. B; official ``models/unet.py``).

A PixelCNN++-style UNet with group normalization instead of weight normalization, single-head
self-attention at the 16×16 resolution, and the timestep fed to every residual block through a
sinusoidal (Transformer) embedding. For CIFAR10 (32×32): four resolutions 32, 16, 8, 4 with
channel multipliers (1, 2, 2, 2) of ch = 128 and two residual blocks per resolution, which makes
35,746,307 parameters (the paper's "35.7M").

Layout, one row per resolution (↓ stride-2 conv, ↑ nearest ×2 upsampling then a conv)::

    conv_in → [Res (+Attn)] × N ↓ … [Res (+Attn)] × N → Res, Attn, Res → [Res (+Attn)] × (N+1) ↑ … → out
       │            │         │              │                                 ▲
       └────────────┴─────────┴──────────────┴──── skip stack (last in, first out) ┘

Every feature map made on the way down (conv_in, each block, each downsample) is pushed on a stack;
each block on the way up concatenates the top of the stack onto its input along the channels.
That is N·L + L pushes for L levels, hence N+1 blocks per level on the way up.

Beyond the paper, ``num_classes`` makes the network class-conditional for classifier-free guidance
(Ho & Salimans 2022, arXiv:2207.12598): a learned embedding of the label y, with one extra row for the
null label ∅ (index ``num_classes``), is added to the time embedding, so every residual block sees
(t, y). Without it (the default) the network, its parameters and their names are the paper's.

Conventions: ``t`` holds 0-based timestep indices, as in the official code (index i is the paper's
t = i + 1); tensors are [B, C, H, W].
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import Config, ModelConfig, get_config
from .fused_norm import norm_act

GROUP_NORM_EPS = 1e-6  # TF's group_norm default; the released weights were trained with it


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) as used by the paper in place of PixelCNN++'s weight norm (App. B)."""
    return nn.GroupNorm(num_groups, channels, eps=GROUP_NORM_EPS)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timestep indices (App. B, after Vaswani et al. 2017 §3.5).

    Row b is [sin(t_b ω_0), …, sin(t_b ω_{h-1}), cos(t_b ω_0), …, cos(t_b ω_{h-1})] with h = dim / 2
    and ω_i = 10000^(-i / (h - 1)), so ω runs from 1 down to 1/10000. Computed in float32.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"the embedding dimension must be even and at least 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """Residual block with the timestep added between its two 3×3 convolutions (App. B).

    h = conv1(SiLU(GN(x))) + W·SiLU(temb);   out = skip(x) + conv2(dropout(SiLU(GN(h)))),
    where skip is a 1×1 conv when the channel count changes and the identity otherwise.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(norm_act(self.norm1, x))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # one bias per channel, from t
        h = self.conv2(norm_act(self.norm2, h, dropout=self.dropout))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection (App. B).

    out = x + proj_out(softmax(q kᵀ / √C) v), with q, k, v linear maps of GN(x) (C channels each).
    """

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(ch, num_groups)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = norm_act(self.norm, x, act=False).flatten(2).transpose(1, 2)  # [B, H·W, C]: one token per pixel
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [B, 1 head, H·W, C]
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/√C by default
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3×3 conv with TF "SAME" padding (one zero row and column after)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention (or the identity),
    then an optional resampling (``Downsample`` on the way down, ``Upsample`` on the way up).
    ``forward`` of ``UNet`` runs them, since the skip stack is shared across levels."""

    def __init__(
        self, in_chs: list[int], out_ch: int, temb_ch: int, use_attn: bool, dropout: float,
        num_groups: int, resample: nn.Module | None,
    ):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, temb_ch, dropout, num_groups) for c in in_chs)
        self.attn = nn.ModuleList(
            AttnBlock(out_ch, num_groups) if use_attn else nn.Identity() for _ in in_chs
        )
        self.resample = resample


def _check_shape(image_size: int, num_levels: int, num_classes: int | None) -> None:
    if image_size % 2 ** (num_levels - 1):
        raise ValueError(f"image_size={image_size} cannot be halved {num_levels - 1} times")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer, or None (unconditional)")


def _up_levels(c: int, res: int, skip_chs: list[int], ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               attn_resolutions: tuple[int, ...], block: dict) -> tuple[nn.ModuleList, int]:
    """The up path from the bottom level (``c`` channels at resolution ``res``): each block reads the
    running map plus one popped skip. Returns the levels by index (0: full resolution) and the channels out."""
    up = []
    for level in reversed(range(len(ch_mult))):
        out_ch = ch * ch_mult[level]
        in_chs = []
        for _ in range(num_res_blocks + 1):
            in_chs.append(c + skip_chs.pop())
            c = out_ch
        resample = Upsample(out_ch) if level else None
        up.append(Level(in_chs, out_ch, use_attn=res in attn_resolutions, resample=resample, **block))
        res = res * 2 if level else res
    assert not skip_chs, "every skip connection is used exactly once"
    return nn.ModuleList(reversed(up)), c


class UNet(nn.Module):
    """ε_θ(x_t, t) of App. B. Keyword arguments are the fields of ``configs.ModelConfig``.

    ``forward(x, t)`` takes images x [B, in_channels, image_size, image_size] and 0-based timestep
    indices t [B] and returns [B, out_channels, image_size, image_size].
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        num_classes: int | None = None,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        num_levels = len(ch_mult)
        _check_shape(image_size, num_levels, num_classes)
        self.config = ModelConfig(
            image_size, in_channels, out_channels, ch, ch_mult, num_res_blocks, attn_resolutions,
            dropout, num_groups, num_classes,
        )
        temb_ch = 4 * ch
        block = dict(temb_ch=temb_ch, dropout=dropout, num_groups=num_groups)

        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        if num_classes is not None:  # rows 0 … K−1 the classes, row K the null label ∅
            self.label_embed = nn.Embedding(num_classes + 1, temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down: remember the channel count of every feature map pushed on the skip stack.
        skip_chs, c, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            out_ch, last = ch * mult, level == num_levels - 1
            in_chs = [c] + [out_ch] * (num_res_blocks - 1)
            resample = None if last else Downsample(out_ch)
            self.down.append(Level(in_chs, out_ch, use_attn=res in attn_resolutions, resample=resample, **block))
            skip_chs += [out_ch] * (num_res_blocks + (not last))
            c, res = out_ch, res if last else res // 2

        self.mid_res1 = ResBlock(c, c, **block)
        self.mid_attn = AttnBlock(c, num_groups)
        self.mid_res2 = ResBlock(c, c, **block)

        # Up: built and run from the bottom level; each block's input is the running map plus one
        # popped skip. Stored by level index like ``down``: up[0] is the full resolution.
        self.up, c = _up_levels(c, res, skip_chs, ch, ch_mult, num_res_blocks, attn_resolutions, block)

        self.norm_out = group_norm(c, num_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: str | Config | ModelConfig) -> UNet:
        """Build from a config name (``configs.get_config``), a ``Config`` or a ``ModelConfig``."""
        if isinstance(cfg, str):
            cfg = get_config(cfg)
        if isinstance(cfg, Config):
            cfg = cfg.model
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"expected a config name, Config or ModelConfig, got {type(cfg).__name__}")
        return cls(**asdict(cfg))

    def reset_parameters(self) -> None:
        """The official initialization: Xavier-uniform weights (TF's variance_scaling, fan_avg) and
        zero biases, with the last layer of every residual branch and of the network set to zero,
        so each block starts as the identity and a fresh model predicts ε = 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for layer in [*zero, self.conv_out]:
            nn.init.zeros_(layer.weight)

    @property
    def null_label(self) -> int | None:
        """The index of the null label ∅ (``num_classes``), or None for an unconditional network."""
        return self.config.num_classes

    def _labels(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """The label indices the embedding reads: ``y`` checked, or ∅ for every image when y is None."""
        K = self.config.num_classes
        if K is None:
            if y is not None:
                raise ValueError("y (class labels) was given to an unconditional UNet (num_classes=None)")
            return None
        if y is None:
            return torch.full((batch,), K, dtype=torch.long, device=device)
        if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (batch,):
            what = f"{y.dtype} {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape [B] = [{batch}], got {what}")
        msg = f"y must hold class labels in 0 … {K - 1}, or {K} for the null label"
        if y.device.type == "cpu":
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > K):
                raise ValueError(f"{msg}, got values from {int(y.min())} to {int(y.max())}")
        else:  # no host sync on an accelerator
            torch._assert_async(((y >= 0) & (y <= K)).all(), msg)
        return y.to(device)

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, want))}], got {list(x.shape)}")
        if not isinstance(t, Tensor) or tuple(t.shape) != (x.shape[0],):
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape [B] = [{x.shape[0]}] (one index per image), got {shape}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """ε_θ(x_t, t), or ε_θ(x_t, t, y) for a class-conditional network: the noise predicted in x_t at
        timestep indices t. ``y`` [B] holds class labels (``num_classes`` is the null label ∅); None means
        ∅ for every image. An unconditional network refuses ``y``."""
        self._check_inputs(x, t)
        return self.forward_checked(x, t, self._labels(y, x.shape[0], x.device))

    def forward_checked(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """``forward`` after its checks: x, t and the label indices (None for an unconditional network) as
        ``forward`` has validated them. The ONNX export (``ddpm_lib.onnx_export``) traces this, since the
        value checks on the labels cannot be traced; everything else should call ``forward``."""
        temb = self.time_embed(timestep_embedding(t, self.config.ch))
        if labels is not None:
            temb = temb + self.label_embed(labels)

        hs = [self.conv_in(x)]
        for level in self.down:
            for res, attn in zip(level.res, level.attn, strict=True):
                hs.append(attn(res(hs[-1], temb)))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], temb)), temb)

        for level in reversed(self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(norm_act(self.norm_out, h))

    def summary(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(name, parameter count, output shape for a batch of one) per block, in execution order.

        The rows' parameter counts add up to the model's. Shapes come from a forward pass of a twin
        on the ``meta`` device, which computes shapes only and costs nothing.
        """
        with torch.device("meta"):
            twin = UNet(**asdict(self.config))
        rows: list[tuple[str, int, tuple[int, ...]]] = []

        def record(name: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                rows.append((name, sum(p.numel() for p in module.parameters()), tuple(out.shape[1:])))
            return hook

        top = ("time_embed", "conv_in", "norm_out", "conv_out")
        for name, m in twin.named_modules():
            if name in top or isinstance(m, (ResBlock, AttnBlock, Downsample, Upsample)):
                m.register_forward_hook(record(name))
        c = self.config
        twin(torch.zeros(1, c.in_channels, c.image_size, c.image_size, device="meta"),
             torch.zeros(1, dtype=torch.long, device="meta"))
        return rows

    def summary_table(self) -> str:
        """``summary()`` as a printable table, with the total parameter count."""
        rows = self.summary()
        lines = [f"{'block':<22}{'params':>12}  output [C, H, W]"]
        lines += [f"{name:<22}{n:>12,}  {list(shape)}" for name, n, shape in rows]
        lines.append(f"{'total':<22}{sum(n for _, n, _ in rows):>12,}")
        return "\n".join(lines)
