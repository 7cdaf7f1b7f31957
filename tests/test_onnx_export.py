"""The networks as ONNX for a sampler in the browser: the exported graph computes what PyTorch computes (Python
onnxruntime, to 1e-4), and the exported constants are enough to rebuild Algorithm 2's and DDIM's steps exactly
as the library takes them (checked here by a NumPy sampler that reads nothing but the exported JSON)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib.onnx_export import (
    SubpixelUpsample,
    export_book_models,
    export_onnx,
    input_names,
    max_abs_error,
    sampler_constants,
    with_subpixel_upsampling,
    write_live_assets,
)
from ddpm_lib.samplers import ddim_step, ddim_timesteps
from ddpm_lib.unet import UNet, Upsample


def small_unet(num_classes: int | None) -> UNet:
    torch.manual_seed(0)
    return UNet(image_size=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, num_groups=4, num_classes=num_classes).eval()


@pytest.mark.parametrize("num_classes", [None, 3])
def test_exported_network_matches_pytorch(tmp_path, num_classes) -> None:
    net = small_unet(num_classes)
    path = export_onnx(net, tmp_path / "net.onnx")
    assert path.stat().st_size > 10_000
    assert input_names(net) == (["x", "t"] if num_classes is None else ["x", "t", "y"])
    for batch in (1, 5):  # the batch dimension is free
        assert max_abs_error(path, net, batch=batch, seed=batch) < 1e-4


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (4, 9)])
def test_subpixel_upsampling_is_the_upsampling_block(size) -> None:
    """Nearest ×2 then a 3×3 conv equals the four 2×2 phase convs on the input grid, in float64 to rounding,
    at odd and non-square sizes and at the border (zero padding)."""
    torch.manual_seed(1)
    up = Upsample(5).double()
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    sub = SubpixelUpsample(up)
    assert sub.weight.shape == (4 * 5, 5, 2, 2)  # 16 taps per input pixel for 4 outputs, not 36
    torch.testing.assert_close(sub(x), up(x), rtol=0, atol=1e-12)


def test_the_exported_graph_upsamples_on_the_input_grid(tmp_path) -> None:
    """The default export carries no Resize (the upsampled map is never formed) and computes the network as
    written, as does the export of the network as written."""
    import onnx

    net = small_unet(None)
    twin = with_subpixel_upsampling(net)
    assert sum(isinstance(level.resample, SubpixelUpsample) for level in twin.up) == 1
    assert sum(isinstance(level.resample, Upsample) for level in net.up) == 1  # the original is untouched
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t), net(x, t), rtol=0, atol=1e-5)
    ops = {}
    for subpixel in (True, False):
        path = export_onnx(net, tmp_path / f"{subpixel}.onnx", subpixel=subpixel)
        ops[subpixel] = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert max_abs_error(path, net, batch=3) < 1e-4
    assert "Resize" in ops[False] and "Resize" not in ops[True] and "DepthToSpace" in ops[True]


def test_export_works_after_the_library_set_true_fp32(tmp_path) -> None:
    """set_fp32_precision(cuda, "fp32") leaves cuDNN's flags at "ieee", where torch.export's read of the legacy
    flag fails; the export puts them back for its own duration only."""
    from ddpm_lib.precision import _get, _set, set_fp32_precision

    before = _get()
    try:
        set_fp32_precision(torch.device("cuda"), "fp32")  # flags only: no GPU is touched
        state = _get()
        assert max_abs_error(export_onnx(small_unet(None), tmp_path / "net.onnx"), small_unet(None)) < 1e-4
        assert _get() == state  # and the caller's setting is back
    finally:
        _set(before)


def test_export_refuses_what_it_cannot_export(tmp_path) -> None:
    with pytest.raises(TypeError, match="UNet"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    learned = GaussianDiffusion(make_beta_schedule("linear", 100), var_type="learned_range", loss_type="hybrid")
    with pytest.raises(ValueError, match="fixed variance"):
        sampler_constants(learned)


class _JsonSampler:
    """Algorithm 2 and DDIM from the exported constants alone, in float64 NumPy: what a page's script does."""

    def __init__(self, info: dict):
        self.c = {k: np.asarray(v, dtype=np.float64) for k, v in info.items() if isinstance(v, list)}

    def x0_hat(self, x, eps, i):
        c = self.c
        return np.clip(c["sqrt_recip_alpha_bar"][i] * x - c["sqrt_recipm1_alpha_bar"][i] * eps, -1, 1)

    def ddpm_step(self, x, eps, i, z):
        c = self.c
        mean = c["coef_x0"][i] * self.x0_hat(x, eps, i) + c["coef_xt"][i] * x
        return mean + (0.0 if i == 0 else math.exp(0.5 * c["log_variance"][i])) * z

    def ddim_step(self, x, eps, i, s, eta, z):
        a_t = self.c["alpha_bar"][i]
        a_s = self.c["alpha_bar"][s] if s >= 0 else 1.0
        x0 = self.x0_hat(x, eps, i)
        eps_hat = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        return math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - var, 0.0)) * eps_hat + math.sqrt(var) * z


class _FixedEps(torch.nn.Module):
    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_constants_rebuild_the_library_steps(var_type) -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), var_type=var_type)
    info = json.loads(json.dumps(sampler_constants(d)))  # through JSON, as a page reads it
    assert info["T"] == 1000 and info["clip_denoised"] is True
    assert np.array_equal(info["betas"], d.betas.numpy())
    assert info["ddim_timesteps"]["50"] == ddim_timesteps(1000, 50) and info["ddim_timesteps"]["10"][0] == 900
    js = _JsonSampler(info)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64) * 1.5
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for i in (999, 500, 10, 1, 0):  # index 0: no noise; large x: the clip acts
        want = d.p_sample(_FixedEps(eps), x, torch.full((4,), i), noise=z)["sample"]
        np.testing.assert_allclose(js.ddpm_step(x.numpy(), eps.numpy(), i, z.numpy()), want.numpy(), atol=1e-12)
    for i, s, eta in ((999, 949, 0.0), (500, 480, 1.0), (20, -1, 0.5)):
        gen = torch.Generator().manual_seed(7)
        want = ddim_step(d, _FixedEps(eps), x, i, s, eta=eta, generator=gen)
        zz = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()  # as rng.randn draws
        got = js.ddim_step(x.numpy(), eps.numpy(), i, s, eta, zz.numpy() if want["variance"] > 0 else 0.0)
        np.testing.assert_allclose(got, want["sample"].numpy(), atol=1e-12)


def test_book_models_export_with_their_constants(tmp_path) -> None:
    written = export_book_models(tmp_path, ("fashion",))
    w = written["fashion"]
    assert w["max_abs_error"] < 1e-4
    info = json.loads(w["json"].read_text(encoding="utf8"))
    assert info["inputs"] == ["x", "t"] and info["image_shape"] == [1, 28, 28] and info["num_classes"] is None
    assert info["parameters"] == 1_112_801 and len(info["log_variance"]) == info["T"] == 1000


def test_live_assets_name_the_missing_javascript_dependency(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="npm ci"):
        write_live_assets(tmp_path / "static", tmp_path / "node_modules" / "onnxruntime-web" / "dist")
