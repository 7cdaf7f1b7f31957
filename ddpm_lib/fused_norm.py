"""GroupNorm, then SiLU, then dropout, as one pass over the activations: Triton kernels for CUDA, with their
backward, in either memory format (channels_last is the training layout, so no layout copy is made).

``norm_act(norm, x, act=True, dropout=None)`` is what the UNet's blocks call. It computes
``dropout(silu(norm(x)))`` (without the SiLU when ``act`` is False, without dropout when ``dropout`` is None or
not training) with the plain PyTorch ops, except where ``enabled(x)``: x on a CUDA device, Triton importable and
``DDPM_LIB_FUSED_NORM=1`` in the environment. The fused path is opt-in until it has been measured against the
plain ops (compiled) on a GPU; ``benchmarks/gpu_fused_check.sh`` runs its checks there. Off CUDA the plain ops are
always used.

The maths (Wu & He 2018, GroupNorm; eps as the layer's): for sample n and group g of C/G channels,
μ = mean, σ² = biased variance over the group's C/G·H·W values, x̂ = (x − μ)/√(σ² + eps), z = γ_c x̂ + β_c,
y = silu(z) = z·sigmoid(z), and with dropout y·m/(1 − p), m ~ Bernoulli(1 − p) drawn in the kernel from a seed
(Philox, ``tl.rand``), drawn again from the same seed by the backward.

Statistics are merged without the cancellation of E[x²] − μ²: each program takes a tile of pixels and writes, per
channel, the tile's mean and sum of squared deviations; the tiles are merged by Chan et al.'s pairwise formula
(M2 = Σ M2_i + Σ n_i (μ_i − μ)²), in float32 whatever the activations' dtype.

Backward, with dz = dy·m/(1 − p)·silu'(z) and M = C/G·H·W:
  dβ_c = Σ dz,   dγ_c = Σ dz·x̂,   dx = rstd·(γ_c dz − (1/M) Σ_g γ dz − x̂ (1/M) Σ_g γ dz x̂),
the sums over the batch for dγ, dβ and over the group for dx; one kernel writes each tile's per-channel Σ dz and
Σ dz·x̂, another forms dx.

The kernels run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported), which is how the tests check them against the plain ops without a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain ops are used
    triton = tl = None

BLOCK_HW = 32  # pixels per program; a program holds a [BLOCK_HW, next_power_of_2(C)] tile


def enabled(x: Tensor) -> bool:
    """Whether ``norm_act`` takes the fused path for ``x``."""
    return (triton is not None and x.is_cuda and os.environ.get("DDPM_LIB_FUSED_NORM") == "1")


def norm_act(norm: nn.GroupNorm, x: Tensor, act: bool = True, dropout: nn.Dropout | None = None) -> Tensor:
    """dropout(silu(norm(x))), or norm(x) with ``act=False``; dropout only in training, as ``nn.Dropout``."""
    if enabled(x):
        p = dropout.p if dropout is not None and dropout.training else 0.0
        return group_norm_act(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act, p)
    y = F.silu(norm(x)) if act else norm(x)
    return dropout(y) if dropout is not None else y  # the modules themselves: the same ops and random draws


if triton is not None:

    @triton.jit
    def _tile(x_ptr, n, hw0, HW, C, s_n, s_hw, s_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets, mask and float32 values of pixels hw0 … hw0 + BLOCK_HW − 1 of sample n, all channels."""
        hw = hw0 + tl.arange(0, BLOCK_HW)
        c = tl.arange(0, BLOCK_C)
        offs = n * s_n + hw[:, None] * s_hw + c[None, :] * s_c
        mask = (hw[:, None] < HW) & (c[None, :] < C)
        return offs, mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, C, s_n, s_hw, s_c,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per tile and channel: the mean and the sum of squared deviations of the tile's pixels."""
        n, tile = tl.program_id(0), tl.program_id(1)
        _, mask, x = _tile(x_ptr, n, tile * BLOCK_HW, HW, C, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C)
        count = tl.sum(mask.to(tl.float32), axis=0)
        mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
        dev = tl.where(mask, x - mean[None, :], 0.0)
        c = tl.arange(0, BLOCK_C)
        out = (n * tl.num_programs(1) + tile) * C + c
        tl.store(mean_ptr + out, mean, mask=c < C)
        tl.store(m2_ptr + out, tl.sum(dev * dev, axis=0), mask=c < C)

    @triton.jit
    def _act(x, a, b, seed, offs, mask, p, ACT: tl.constexpr, DROP: tl.constexpr):
        """With z = a·x + b per channel: the output y (zero outside the tensor) and the factor dy/dz (SiLU's
        slope, the dropout mask)."""
        z = x * a[None, :] + b[None, :]
        if ACT:
            s = tl.sigmoid(z)
            y, slope = z * s, s * (1.0 + z * (1.0 - s))
        else:
            y, slope = z, tl.full(z.shape, 1.0, tl.float32)
        if DROP:
            keep = tl.where(tl.rand(seed, offs) >= p, 1.0 / (1.0 - p), 0.0)
            y, slope = y * keep, slope * keep
        return tl.where(mask, y, 0.0), slope

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, a_ptr, b_ptr, seed_ptr, p, HW, C, s_n, s_hw, s_c,
                        BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr, DROP: tl.constexpr):
        n, tile = tl.program_id(0), tl.program_id(1)
        offs, mask, x = _tile(x_ptr, n, tile * BLOCK_HW, HW, C, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C)
        c = tl.arange(0, BLOCK_C)
        a = tl.load(a_ptr + n * C + c, mask=c < C, other=0.0)
        b = tl.load(b_ptr + n * C + c, mask=c < C, other=0.0)
        y, _ = _act(x, a, b, tl.load(seed_ptr), offs, mask, p, ACT, DROP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_tile(x_ptr, dy_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, seed_ptr, p, n, tile, HW, C, s_n, s_hw, s_c,
                   BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr, DROP: tl.constexpr):
        """A tile's offsets and mask, dz = dy·dy/dz (zero outside the tensor), x̂, and the channel mask."""
        offs, mask, x = _tile(x_ptr, n, tile * BLOCK_HW, HW, C, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        row = n * C + c
        a = tl.load(a_ptr + row, mask=cm, other=0.0)
        b = tl.load(b_ptr + row, mask=cm, other=0.0)
        _, slope = _act(x, a, b, tl.load(seed_ptr), offs, mask, p, ACT, DROP)
        xhat = (x - tl.load(mean_ptr + row, mask=cm, other=0.0)[None, :]) \
            * tl.load(rstd_ptr + row, mask=cm, other=0.0)[None, :]
        return offs, mask, tl.where(mask, dy * slope, 0.0), xhat, cm

    @triton.jit
    def _backward_sums_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, seed_ptr, p, s1_ptr, s2_ptr,
                              HW, C, s_n, s_hw, s_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                              ACT: tl.constexpr, DROP: tl.constexpr):
        """Per tile and channel: Σ dz and Σ dz·x̂."""
        n, tile = tl.program_id(0), tl.program_id(1)
        _, _, dz, xhat, cm = _grad_tile(x_ptr, dy_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, seed_ptr, p, n, tile, HW, C,
                                        s_n, s_hw, s_c, BLOCK_HW, BLOCK_C, ACT, DROP)
        out = (n * tl.num_programs(1) + tile) * C + tl.arange(0, BLOCK_C)
        tl.store(s1_ptr + out, tl.sum(dz, axis=0), mask=cm)
        tl.store(s2_ptr + out, tl.sum(dz * xhat, axis=0), mask=cm)

    @triton.jit
    def _backward_dx_kernel(x_ptr, dy_ptr, dx_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, gamma_ptr, k1_ptr, k2_ptr,
                            seed_ptr, p, HW, C, s_n, s_hw, s_c, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                            ACT: tl.constexpr, DROP: tl.constexpr):
        """dx = rstd·(γ dz − k1 − x̂·k2), with k1, k2 the group means of γ dz and γ dz x̂ (per channel)."""
        n, tile = tl.program_id(0), tl.program_id(1)
        offs, mask, dz, xhat, cm = _grad_tile(x_ptr, dy_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, seed_ptr, p, n, tile,
                                              HW, C, s_n, s_hw, s_c, BLOCK_HW, BLOCK_C, ACT, DROP)
        c = tl.arange(0, BLOCK_C)
        row = n * C + c
        rstd = tl.load(rstd_ptr + row, mask=cm, other=0.0)[None, :]
        gamma = tl.load(gamma_ptr + c, mask=cm, other=0.0)[None, :]
        k1 = tl.load(k1_ptr + row, mask=cm, other=0.0)[None, :]
        k2 = tl.load(k2_ptr + row, mask=cm, other=0.0)[None, :]
        dx = rstd * (gamma * dz - k1 - xhat * k2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """N, C, H·W and the strides of sample, pixel and channel, for x dense in NCHW or channels_last (where H and
    W flatten into one pixel axis)."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    return N, C, H * W, sn, (sw if W > 1 else sh), sc


def _launch_shape(C: int, HW: int) -> tuple[int, int]:
    return triton.next_power_of_2(C), triton.cdiv(HW, BLOCK_HW)


def _group_stats(x: Tensor, G: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per sample and group: mean and 1/√(σ² + eps), float32 [N, G], from the tiles' per-channel statistics."""
    N, C, HW, sn, shw, sc = _layout(x)
    BLOCK_C, tiles = _launch_shape(C, HW)
    mean_t = torch.empty(N, tiles, C, device=x.device, dtype=torch.float32)
    m2_t = torch.empty_like(mean_t)
    _stats_kernel[(N, tiles)](x, mean_t, m2_t, HW, C, sn, shw, sc, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C)
    counts = torch.full((tiles,), float(BLOCK_HW), device=x.device)
    counts[-1] = HW - BLOCK_HW * (tiles - 1)
    w = counts[None, :, None, None]  # pixels per tile, for [N, tiles, G, C/G]
    mean_t, m2_t = mean_t.reshape(N, tiles, G, C // G), m2_t.reshape(N, tiles, G, C // G)
    M = HW * (C // G)
    mean = (mean_t * w).sum(dim=(1, 3)) / M
    m2 = m2_t.sum(dim=(1, 3)) + (w * (mean_t - mean[:, None, :, None]) ** 2).sum(dim=(1, 3))
    return mean, torch.rsqrt(m2 / M + eps)


def _per_channel(v: Tensor, C: int) -> Tensor:
    """[N, G] → [N, C], each group's value repeated over its channels, contiguous float32."""
    return v.repeat_interleave(C // v.shape[1], dim=1).contiguous()


def _affine(mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, C: int):
    """z = a·x + b per (sample, channel): a = γ·rstd, b = β − μ·a; also μ and rstd per channel."""
    mean_c, rstd_c = _per_channel(mean, C), _per_channel(rstd, C)
    gamma = weight.float() if weight is not None else torch.ones(C, device=mean.device)
    beta = bias.float() if bias is not None else torch.zeros(C, device=mean.device)
    a = (gamma[None, :] * rstd_c).contiguous()
    return a, (beta[None, :] - mean_c * a).contiguous(), mean_c, rstd_c, gamma


def _check(x: Tensor, G: int, p: float) -> None:
    if triton is None:
        raise RuntimeError("group_norm_act needs Triton (it ships with PyTorch's CUDA builds)")
    if x.dim() != 4:
        raise ValueError(f"group_norm_act takes [N, C, H, W] activations, got shape {tuple(x.shape)}")
    if x.shape[1] % G:
        raise ValueError(f"{x.shape[1]} channels do not split into {G} groups")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, G, eps, act, p, seed):
        N, C, HW, sn, shw, sc = _layout(x)
        mean, rstd = _group_stats(x, G, eps)
        a, b, mean_c, rstd_c, gamma = _affine(mean, rstd, weight, bias, C)
        y = torch.empty_like(x)  # the input's memory format
        BLOCK_C, tiles = _launch_shape(C, HW)
        _forward_kernel[(N, tiles)](x, y, a, b, seed, p, HW, C, sn, shw, sc, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C,
                                    ACT=act, DROP=p > 0)
        ctx.save_for_backward(x, a, b, mean_c, rstd_c, gamma, seed)
        ctx.config = (G, act, p, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, mean_c, rstd_c, gamma, seed = ctx.saved_tensors
        G, act, p, w_dtype, b_dtype = ctx.config
        dy = dy.contiguous(memory_format=_format(x))
        N, C, HW, sn, shw, sc = _layout(x)
        BLOCK_C, tiles = _launch_shape(C, HW)
        s1 = torch.empty(N, tiles, C, device=x.device, dtype=torch.float32)
        s2 = torch.empty_like(s1)
        flags = dict(BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, ACT=act, DROP=p > 0)
        _backward_sums_kernel[(N, tiles)](x, dy, a, b, mean_c, rstd_c, seed, p, s1, s2, HW, C, sn, shw, sc, **flags)
        sum_dz, sum_dz_xhat = s1.sum(1), s2.sum(1)  # [N, C]
        M = HW * (C // G)
        k1 = _per_channel((gamma * sum_dz).reshape(N, G, -1).sum(2) / M, C)
        k2 = _per_channel((gamma * sum_dz_xhat).reshape(N, G, -1).sum(2) / M, C)
        dx = torch.empty_like(x)
        _backward_dx_kernel[(N, tiles)](x, dy, dx, a, b, mean_c, rstd_c, gamma.contiguous(), k1, k2, seed, p,
                                        HW, C, sn, shw, sc, **flags)
        dw = None if w_dtype is None else sum_dz_xhat.sum(0).to(w_dtype)
        db = None if b_dtype is None else sum_dz.sum(0).to(b_dtype)
        return dx, dw, db, None, None, None, None, None


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def group_norm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float,
                   act: bool = True, p: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """The fused op: silu(group_norm(x)) (or group_norm(x) with ``act=False``), then dropout with probability
    ``p``, as one forward and one backward pass over x. ``seed`` (an int32 tensor of one element on x's device)
    fixes the dropout mask; by default it is drawn from torch's generator for x's device, so that the mask is
    new at every call, CUDA graph replays included."""
    _check(x, num_groups, p)
    x = x.contiguous(memory_format=_format(x))  # dense, so that dy can be laid out with the same strides
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
    return _GroupNormAct.apply(x, weight, bias, num_groups, eps, act, float(p), seed)
