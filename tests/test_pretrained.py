"""Conversion of diffusers' port of the released weights (google/ddpm-cifar10-32) to our UNet, offline."""

import json
from dataclasses import replace

import pytest
import torch

from ddpm_lib.configs import get_config
from ddpm_lib.pretrained import PRETRAINED, from_diffusers, load_pretrained

diffusers = pytest.importorskip("diffusers")

# diffusers' config of google/ddpm-cifar10-32 (the paper's CIFAR10 model, App. B).
CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    act_fn="silu", time_embedding_type="positional", dropout=0.1,
)


@pytest.fixture(scope="module")
def peer():
    """A diffusers UNet2DModel with the CIFAR10 config and every weight random (none zero)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**CIFAR10_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def state_dict(peer):
    return {k: v.clone() for k, v in peer.state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0, 999])


@pytest.fixture(scope="module")
def peer_output(peer, inputs):
    with torch.no_grad():
        return peer(*inputs).sample


@pytest.fixture(scope="module")
def converted(state_dict):
    return from_diffusers(state_dict)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_converted_model_matches_diffusers_outputs(peer, state_dict, inputs, peer_output):
    model = from_diffusers(state_dict, dict(peer.config))
    with torch.no_grad():
        got = model(*inputs)
    assert peer_output.abs().max() > 0.01  # a non-trivial output
    # float32 round-off gives ~2e-6; GroupNorm eps 1e-5 instead of 1e-6 would give ~8e-5
    assert max_rel_error(got, peer_output) < 2e-5


def test_inferred_architecture_is_the_cifar10_config(converted):
    assert converted.config == get_config("cifar10").model


def test_dropout_is_the_callers_choice(state_dict):
    assert from_diffusers(state_dict, dropout=0.0).config.dropout == 0.0


def test_converted_model_is_in_eval_mode(converted):
    assert not converted.training


def test_older_attention_names_and_conv_shaped_projections_are_accepted(state_dict, converted):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in state_dict.items():
        for new, name in old_names.items():
            if f".{new}." in k:
                k, v = k.replace(f".{new}.", f".{name}."), v[..., None, None] if v.ndim == 2 else v
        old[k] = v
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    assert same_weights(from_diffusers(old), converted)


def test_missing_key_raises(state_dict):
    broken = dict(state_dict)
    del broken["mid_block.attentions.0.to_k.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys .*mid_attn\.k\.weight"):
        from_diffusers(broken)


def test_unexpected_key_raises(state_dict):
    broken = dict(state_dict, **{"class_embedding.weight": torch.zeros(10, 512)})
    with pytest.raises(ValueError, match=r"1 unexpected keys \['class_embedding\.weight'\]"):
        from_diffusers(broken)


def test_wrong_shape_raises(state_dict):
    broken = dict(state_dict, **{"up_blocks.3.resnets.0.time_emb_proj.weight": torch.zeros(128, 256)})
    with pytest.raises(ValueError, match=r"wrong shape.*up\.0\.res\.0\.temb_proj\.weight"):
        from_diffusers(broken)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"block_out_channels": (128, 256, 256, 512)}, "block_out_channels"),
        ({"layers_per_block": 3}, "layers_per_block"),
        ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
        ({"freq_shift": 0}, "freq_shift"),
        ({"downsample_padding": 1}, "downsample_padding"),
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"attention_head_dim": 64}, "attention_head_dim"),
        ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D")}, "down_block"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ],
)
def test_a_config_that_is_not_the_papers_raises(state_dict, change, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers(state_dict, dict(CIFAR10_CONFIG, **change))


def test_weights_of_a_different_network_raise():
    """A real diffusers model with other block channels: caught from the weights alone."""
    cfg = dict(CIFAR10_CONFIG, block_out_channels=(32, 48, 64, 64), norm_num_groups=16)
    other = diffusers.UNet2DModel(**cfg).state_dict()
    with pytest.raises(ValueError, match="not multiples"):
        from_diffusers(other)


def test_a_smaller_network_in_the_papers_family_converts(inputs):
    """The converter reads the architecture from the weights, not from a fixed table."""
    cfg = dict(CIFAR10_CONFIG, block_out_channels=(32, 64), norm_num_groups=8,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    peer = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.05)
    model = from_diffusers(peer.state_dict(), dict(peer.config))
    assert model.config == replace(get_config("cifar10").model, ch=32, ch_mult=(1, 2), num_groups=8)
    x, t = inputs
    with torch.no_grad():
        assert max_rel_error(model(x, t), peer(x, t).sample) < 2e-5


# load_pretrained: the real download-and-load code, with the Hub replaced by a local folder.


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, peer):
    """Save ``peer`` as a hub repo would hold it and serve its files through hf_hub_download."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import EntryNotFoundError

    calls = []

    def hf_hub_download(repo_id, filename, *, subfolder=None, cache_dir=None, **kwargs):
        calls.append((repo_id, subfolder, filename))
        path = tmp_path / (subfolder or "") / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def save(safe: bool, subfolder: str = "") -> list:
        peer.save_pretrained(tmp_path / subfolder, safe_serialization=safe)
        return calls

    return save


def test_load_pretrained_reads_safetensors_and_config(fake_hub, converted):
    calls = fake_hub(safe=True)
    model = load_pretrained("google/ddpm-cifar10-32")
    assert ("google/ddpm-cifar10-32", None, "config.json") in calls
    assert all(not f.endswith(".bin") for _, _, f in calls)
    assert model.config == get_config("cifar10").model
    assert same_weights(model, converted)


def test_load_pretrained_falls_back_to_a_bin_in_a_unet_folder(fake_hub, converted):
    calls = fake_hub(safe=False, subfolder="unet")
    model = load_pretrained()
    assert calls[-2:] == [("google/ddpm-cifar10-32", "unet", f) for f in ("diffusion_pytorch_model.bin", "config.json")]
    assert same_weights(model, converted)


def test_load_pretrained_checks_the_downloaded_config(fake_hub, tmp_path):
    fake_hub(safe=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, flip_sin_to_cos=True)))
    with pytest.raises(ValueError, match="flip_sin_to_cos"):
        load_pretrained()


def test_load_pretrained_reports_a_repo_without_weights(fake_hub):
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        load_pretrained()


def test_load_pretrained_rejects_unknown_names():
    with pytest.raises(ValueError, match="supported: .*google/ddpm-cifar10-32"):
        load_pretrained("google/ddpm-cifar100-32")
    assert "google/ddpm-cifar10-32" in PRETRAINED


def test_load_pretrained_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        load_pretrained()
