"""The UNet of App. B: parameter counts, shapes, input checks, the time embedding, attention."""

import math
from dataclasses import asdict

import pytest
import torch

from ddpm_lib.configs import CONFIGS, get_config
from ddpm_lib.unet import AttnBlock, UNet, timestep_embedding


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_unet(name: str) -> UNet:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return UNet.from_config(name)


def randomized(model: UNet, seed: int = 0) -> UNet:
    """All weights random, so that no zero-initialized layer hides a path through the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def test_cifar10_unet_has_the_papers_35_7m_parameters():
    assert n_params(meta_unet("cifar10")) == 35_746_307


def test_lsun256_unet_has_the_official_114m_parameters():
    assert n_params(meta_unet("lsun256")) == 113_673_219


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_takes_model_config_fields_as_keywords(name):
    cfg = get_config(name).model
    with torch.device("meta"):
        model = UNet(**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()})
    assert model.config == cfg
    assert n_params(model) == n_params(meta_unet(name))


def test_from_config_accepts_name_config_and_model_config():
    cfg = get_config("tiny")
    models = [UNet.from_config(c) for c in ("tiny", cfg, cfg.model)]
    assert all(m.config == cfg.model for m in models)
    with pytest.raises(TypeError):
        UNet.from_config(42)


@pytest.mark.parametrize("name", ["tiny", "cifar10"])
def test_output_has_the_input_shape(name):
    model = UNet.from_config(name).eval()
    c = model.config
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, c.out_channels, c.image_size, c.image_size)


def test_learned_variance_model_outputs_twice_the_channels():
    model = UNet(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                 out_channels=6)
    assert model(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long)).shape == (3, 6, 16, 16)


def test_fresh_model_predicts_zero_like_the_official_init():
    model = UNet.from_config("tiny")
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 50]))
    assert torch.count_nonzero(out) == 0


def test_group_norms_use_the_released_weights_eps():
    norms = [m for m in UNet.from_config("tiny").modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 5 and all(m.eps == 1e-6 for m in norms)


def test_output_depends_on_the_timestep():
    model = randomized(UNet.from_config("tiny"))
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 90]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize(
    ("x_shape", "t_shape", "match"),
    [
        ((2, 1, 16, 16), (2,), r"x must have shape \[B, 3, 16, 16\]"),
        ((2, 3, 32, 32), (2,), r"x must have shape"),
        ((3, 16, 16), (2,), r"x must have shape"),
        ((2, 3, 16, 16), (), r"t must be a tensor of shape \[B\] = \[2\]"),
        ((2, 3, 16, 16), (2, 1), r"t must be a tensor of shape"),
        ((2, 3, 16, 16), (3,), r"t must be a tensor of shape"),
    ],
)
def test_forward_rejects_wrong_shapes(x_shape, t_shape, match):
    model = UNet.from_config("tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(x_shape), torch.zeros(t_shape, dtype=torch.long))


def test_forward_rejects_a_python_int_timestep():
    with pytest.raises(ValueError, match="t must be a tensor"):
        UNet.from_config("tiny")(torch.randn(1, 3, 16, 16), 5)


def test_timestep_embedding_matches_the_formula():
    dim, half = 128, 64
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = timestep_embedding(t, dim)
    for b, tb in enumerate(t.tolist()):
        for i in (0, 1, 10, half - 1):
            w = 10000.0 ** (-i / (half - 1))  # ω from 1 down to 1e-4
            assert emb[b, i].item() == pytest.approx(math.sin(tb * w), abs=2e-4)
            assert emb[b, half + i].item() == pytest.approx(math.cos(tb * w), abs=2e-4)
    assert emb[:, half - 1].abs().max() < 0.1  # the slowest frequency barely moves over T


def test_attention_block_is_softmax_of_scaled_dot_products():
    block = randomized(AttnBlock(16, num_groups=4))
    x = torch.randn(2, 16, 4, 4)
    h = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.q(h), block.k(h), block.v(h)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    want = x + block.proj_out(w @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_summary_rows_add_up_to_the_parameter_count():
    model = UNet.from_config("cifar10")
    rows = model.summary()
    assert sum(n for _, n, _ in rows) == n_params(model) == 35_746_307
    assert rows[0] == ("time_embed", 4 * 128 * 128 + 4 * 128 + 512 * 512 + 512, (512,))
    assert rows[-1][0] == "conv_out" and rows[-1][2] == (3, 32, 32)
    assert min(shape[-1] for _, _, shape in rows[1:]) == 4  # the 4×4 bottom of the CIFAR10 UNet
    assert "35,746,307" in model.summary_table()


def test_channels_last_and_bf16_autocast_agree_with_float32():
    model = randomized(UNet.from_config("tiny"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 60])
    with torch.no_grad():
        ref = model(x, t)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x, t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_forward_compiles_as_one_graph():
    model = randomized(UNet.from_config("tiny"))  # nonzero output, so the comparison means something
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break fails
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 9])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t))


def test_image_size_must_survive_the_downsamplings():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNet(image_size=20, ch_mult=(1, 2, 2, 2))
