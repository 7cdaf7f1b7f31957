"""The paper's released weights (§4, Table 1), through their PyTorch port on the Hugging Face Hub.

The authors released TensorFlow checkpoints; diffusers ported them to its ``UNet2DModel`` and
published them as ``google/ddpm-cifar10-32`` (CIFAR10, the model of Table 1) and ``google/ddpm-*-256``
(LSUN, CelebA-HQ). The two UNets are the same network layer for layer (App. B; 35,746,307
parameters for CIFAR10), only the names differ: ``from_diffusers`` renames a diffusers state dict
to ours and checks that the architecture is the paper's; ``load_pretrained`` downloads and converts.

Downloading needs ``huggingface_hub`` and a network; nothing here touches the network at import.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from .configs import ModelConfig
from .unet import GROUP_NORM_EPS, UNet

# Hub models in the paper's architecture, with the dropout rate the paper trained them with
# (App. B: 0.1 on CIFAR10, 0 elsewhere; diffusers' saved configs do not record it reliably).
# The 256×256 entries are the "ema" uploads: the EMA weights are the ones the paper evaluates.
# "config" names the ddpm_lib config whose diffusion (β, T, ε-prediction, σ² = β_t) they were trained with.
PRETRAINED: dict[str, dict] = {
    "google/ddpm-cifar10-32": {"dropout": 0.1, "config": "cifar10"},
    "google/ddpm-ema-church-256": {"dropout": 0.0, "config": "lsun256"},
    "google/ddpm-ema-bedroom-256": {"dropout": 0.0, "config": "lsun256"},
    "google/ddpm-ema-cat-256": {"dropout": 0.0, "config": "lsun256"},
    "google/ddpm-ema-celebahq-256": {"dropout": 0.0, "config": "lsun256"},
}

# diffusers UNet2DModel settings that must hold for the network to be the paper's. Keys absent
# from a config are not checked.
_REQUIRED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,  # sin first, then cos
    "freq_shift": 1,  # ω_i = 10000^(-i / (h - 1))
    "downsample_padding": 0,  # TF "SAME": pad one row/column after, not one on each side
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",  # temb added, not a scale-and-shift
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# Layer names inside a block: diffusers (current and older releases) → ours.
_LAYER = {
    "norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
    "conv2": "conv2", "conv_shortcut": "skip",
    "group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out",
}
_MID = {"resnets.0": "mid_res1", "attentions.0": "mid_attn", "resnets.1": "mid_res2"}
_BLOCK_KEY = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def _layer(rest: str) -> str:
    """'to_out.0.weight' → 'proj_out.weight'; unknown layer names pass through (and will not match)."""
    module, param = rest.rsplit(".", 1)
    return f"{_LAYER.get(module, module)}.{param}"


def _our_key(key: str, num_levels: int) -> str:
    """Our name for one diffusers parameter, e.g. up_blocks.0.resnets.2.conv1.weight → up.3.res.2.conv1.weight.

    diffusers numbers its up blocks in execution order (bottom first); we number levels by resolution.
    """
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        side, i, kind, j, rest = m.groups()
        level = int(i) if side == "down" else num_levels - 1 - int(i)
        if kind in ("downsamplers", "upsamplers"):
            return f"{side}.{level}.resample.{rest}" if j == "0" else key
        return f"{side}.{level}.{'res' if kind == 'resnets' else 'attn'}.{j}.{_layer(rest)}"
    if key.startswith("mid_block."):
        kind, j, rest = key.removeprefix("mid_block.").split(".", 2)
        return f"{_MID[f'{kind}.{j}']}.{_layer(rest)}" if f"{kind}.{j}" in _MID else key
    module, param = key.rsplit(".", 1)
    return f"{_TOP[module]}.{param}" if module in _TOP else key


def _infer_model_config(state_dict: dict[str, Tensor], config: dict | None, dropout: float) -> ModelConfig:
    """Our ModelConfig from the weights' shapes (channels, levels, blocks, attention) and, for what
    weights do not show (image size, group count), from the diffusers config (default: CIFAR10's)."""
    config = config or {}
    for key in ("conv_in.weight", "conv_out.weight", "down_blocks.0.resnets.0.conv1.weight"):
        if key not in state_dict:
            raise ValueError(f"not a diffusers UNet2DModel state dict: no {key!r}")
    ch, in_channels = state_dict["conv_in.weight"].shape[:2]
    out_channels = state_dict["conv_out.weight"].shape[0]
    levels = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks.")})
    if levels != list(range(len(levels))):
        raise ValueError(f"down_blocks are not numbered 0..L-1: {levels}")
    level_chs = [state_dict[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
    if any(c % ch for c in level_chs):
        raise ValueError(f"block_out_channels {level_chs} are not multiples of the first, {ch}")
    num_res_blocks = len({k.split(".")[3] for k in state_dict if k.startswith("down_blocks.0.resnets.")})
    size = config.get("sample_size", 32)
    image_size = size[0] if isinstance(size, (list, tuple)) else size
    attn_levels = [i for i in levels if any(k.startswith(f"down_blocks.{i}.attentions.") for k in state_dict)]
    return ModelConfig(
        image_size=int(image_size),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        ch=int(ch),
        ch_mult=tuple(c // ch for c in level_chs),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(image_size // 2**i for i in attn_levels),
        dropout=dropout,
        num_groups=int(config.get("norm_num_groups", 32)),
    )


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _architecture(cfg: ModelConfig) -> dict:
    """The diffusers UNet2DModel settings that the weights of ``cfg``'s network determine."""
    chs = [cfg.ch * m for m in cfg.ch_mult]
    attn = [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(len(chs))]
    return {
        "block_out_channels": chs,
        "layers_per_block": cfg.num_res_blocks,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    }


def diffusers_config(cfg: ModelConfig) -> dict:
    """diffusers ``UNet2DModel`` keyword arguments for the network of ``cfg``: the inverse of
    ``from_diffusers``'s reading (the same blocks, group norm ε = 1e-6, sin-then-cos embedding with
    ω_i = 10000^(−i/(h−1)), TF "SAME" downsampling, one attention head). Unconditional networks only."""
    if cfg.num_classes is not None:
        raise ValueError("diffusers_config describes the paper's unconditional network; num_classes is set")
    return {**_REQUIRED, **_architecture(cfg), "sample_size": cfg.image_size, "norm_num_groups": cfg.num_groups,
            "norm_eps": GROUP_NORM_EPS, "attention_head_dim": None, "dropout": cfg.dropout}


def _config_mismatches(config: dict, cfg: ModelConfig) -> list[str]:
    """Where a diffusers UNet2DModel config departs from the paper's network or from the weights."""
    bad = [f"{k}={config[k]!r} (need {v!r})" for k, v in _REQUIRED.items() if k in config and config[k] != v]
    if "norm_eps" in config and not math.isclose(config["norm_eps"], GROUP_NORM_EPS):
        bad.append(f"norm_eps={config['norm_eps']!r} (need 1e-06)")
    bad += [
        f"{k}={config[k]!r} (the weights have {v!r})"
        for k, v in _architecture(cfg).items() if k in config and _as_list(config[k]) != v
    ]
    chs, attn_res = [cfg.ch * m for m in cfg.ch_mult], cfg.attn_resolutions
    if config.get("time_embedding_dim") not in (None, 4 * cfg.ch):
        bad.append(f"time_embedding_dim={config['time_embedding_dim']!r} (need {4 * cfg.ch})")
    if config.get("attn_norm_num_groups") not in (None, cfg.num_groups):
        bad.append(f"attn_norm_num_groups={config['attn_norm_num_groups']!r} (need {cfg.num_groups})")
    head_dim = config.get("attention_head_dim")
    attn_chs = {c for i, c in enumerate(chs) if cfg.image_size // 2**i in attn_res} | {chs[-1]}
    if head_dim is not None and {head_dim} != attn_chs:
        bad.append(f"attention_head_dim={head_dim!r} (the paper uses one head: None or {sorted(attn_chs)})")
    return bad


def from_diffusers(state_dict: dict[str, Tensor], config: dict | None = None, *, dropout: float = 0.1) -> UNet:
    """Our UNet holding the weights of a diffusers ``UNet2DModel`` in the paper's architecture.

    The architecture (channels, levels, blocks per level, attention levels) is read from the weights;
    ``config`` (the model's ``config.json`` as a dict) supplies the image size and group count
    (default 32 and 32, CIFAR10) and is checked against the paper's network: a mismatch, a missing or
    unexpected key, or a wrong shape raises ValueError. Dropout is not in the weights: pass the
    training value (0.1 for CIFAR10) if you fine-tune. Returns the model in eval mode.
    """
    cfg = _infer_model_config(state_dict, config, dropout)
    if config is not None:
        bad = _config_mismatches(config, cfg)
        if bad:
            raise ValueError("the diffusers config is not the paper's UNet: " + "; ".join(bad))
    model = UNet(**asdict(cfg))
    target = model.state_dict()

    ours = {_our_key(k, len(cfg.ch_mult)): v for k, v in state_dict.items()}
    missing, unexpected = sorted(set(target) - set(ours)), sorted(set(ours) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit {cfg}: {len(missing)} missing keys (ours) {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = []
    for k, v in ours.items():
        if v.ndim == 4 and target[k].ndim == 2 and v.shape[2:] == (1, 1):
            v = ours[k] = v[:, :, 0, 0]  # attention projections saved as 1×1 convs
        if v.shape != target[k].shape:
            wrong.append(f"{k}: {list(v.shape)} vs {list(target[k].shape)}")
    if wrong:
        raise ValueError(f"{len(wrong)} weights have the wrong shape, e.g. {wrong[:5]}")
    model.load_state_dict(ours)
    return model.eval()


def _download(name: str, cache_dir: str | Path | None) -> tuple[dict[str, Tensor], dict]:
    """The state dict and config.json of a hub model: safetensors when present, else a .bin read
    with ``torch.load(weights_only=True)`` (never arbitrary pickles); root folder, else ``unet/``."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError  # also raised when offline and not cached
    except ImportError as e:
        raise ImportError("load_pretrained needs huggingface_hub: pip install huggingface_hub") from e

    last_error = None
    for subfolder in (None, "unet"):
        for filename in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            try:
                path = hf_hub_download(name, filename, subfolder=subfolder, cache_dir=cache_dir)
            except EntryNotFoundError as e:
                last_error = e
                continue
            config_path = hf_hub_download(name, "config.json", subfolder=subfolder, cache_dir=cache_dir)
            config = json.loads(Path(config_path).read_text())
            if filename.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path), config
            return torch.load(path, map_location="cpu", weights_only=True), config
    raise FileNotFoundError(
        f"no diffusion_pytorch_model.safetensors or .bin in {name} (root or unet/), or none cached while offline"
    ) from last_error


def load_pretrained(name: str = "google/ddpm-cifar10-32", cache_dir: str | Path | None = None) -> UNet:
    """Download (once; the Hub cache keeps it) and convert released weights, e.g. the CIFAR10 model
    of Table 1. Needs ``huggingface_hub`` and a network on first use. Returns the model in eval mode."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; supported: {sorted(PRETRAINED)}")
    state_dict, config = _download(name, cache_dir)
    return from_diffusers(state_dict, config, dropout=PRETRAINED[name]["dropout"])
