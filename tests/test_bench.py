"""benchmarks/bench.py: the peer is the same network, and the smoke mode runs end to end.

Speed is never asserted (benchmarks are scripts, compared within one run); these tests check that
the script works and that what it compares is comparable.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lib.configs import get_config
from ddpm_lib.pretrained import from_diffusers
from ddpm_lib.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cifar10", "tiny", "fashion"])
def test_the_peer_is_the_same_network(bench, name):
    """diffusers' UNet2DModel built from ``pretrained.diffusers_config`` has our parameter count, and with its
    weights converted to our UNet gives the same output: the comparison is like for like."""
    mc = get_config(name).model
    ours_params = sum(p.numel() for p in UNet.from_config(mc).parameters())
    if name == "cifar10":  # too big to run twice here; the count pins the architecture
        with torch.device("meta"):
            peer = bench.build_peer(mc)
        assert sum(p.numel() for p in peer.parameters()) == ours_params == 35_746_307
        return
    torch.manual_seed(0)
    peer = bench.randomize_(bench.build_peer(mc)).eval()
    assert sum(p.numel() for p in peer.parameters()) == ours_params
    ours = from_diffusers(peer.state_dict(), dict(peer.config), dropout=mc.dropout).eval()
    assert ours.config == mc
    x = torch.randn(2, mc.in_channels, mc.image_size, mc.image_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, get_config(name).diffusion.T - 1])
    with torch.no_grad():
        a, b = ours(x, t), bench.PeerDenoiser(peer)(x, t)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_peer_scheduler_uses_our_betas(bench):
    from ddpm_lib.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion.from_config(get_config("tiny").diffusion)
    for kind in ("ddpm", "ddim"):
        sched = bench.peer_scheduler(kind, diffusion)
        assert torch.allclose(sched.betas.double(), diffusion.betas, atol=1e-7)
        assert torch.allclose(sched.alphas_cumprod.double(), diffusion.const("alpha_bar"), atol=1e-6)


def test_modes_parse_and_reject_nonsense(bench):
    assert bench.parse_mode("bf16+compile+cudagraphs") == bench.Mode("bf16", True, True, False)
    assert bench.parse_mode("fp32") == bench.Mode("fp32")
    for bad in ("fp16", "bf16+cudagraphs", "bf16+compile+compile", "bf16+fast"):
        with pytest.raises(ValueError):
            bench.parse_mode(bad)


def test_kernel_kinds(bench):
    assert bench.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert bench.kernel_kind("void at::native::RowwiseMomentsCUDAKernel<float>") == "normalization"
    assert bench.kernel_kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert bench.kernel_kind("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert bench.kernel_kind("triton_poi_fused_add_silu_3") == "fused triton"
    assert bench.kernel_kind("void at::native::elementwise_kernel<128, 4>") == "other"


def test_smoke_mode_runs_end_to_end(tmp_path):
    """What CI runs: both implementations trained and sampled (DDPM and DDIM) on the tiny config."""
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"] == "tiny" and report["device"] == "cpu" and report["diffusers"]
    assert report["flops"]["ours"] == report["flops"]["peer"]  # the same network, counted twice
    assert report["flops"]["ours"]["train_gflop_per_image"] > 2.9 * report["flops"]["ours"]["forward_gflop_per_image"]
    rows = {(r["part"], r["who"], r.get("sampler")): r for r in report["results"]}
    parts = (("activations", None), ("train", None), ("sample", "ddpm"), ("sample", "ddim"))
    assert set(rows) == {(part, who, s) for who in ("ours", "peer") for part, s in parts}
    for (part, who, _), r in rows.items():
        assert r["finite"]
        if part == "activations":  # the same network keeps about the same tensors for its backward
            assert r["saved_gib"] > 0 and not r["fused_norm"] and r["batch_size"] == 4
            assert {"Convolution", "NativeGroupNorm", "Silu"} <= set(r["by_op_mib"])
            if who == "ours":
                assert 0.9 < r["activations_vs_peer"] < 1.1
            continue
        speed = r["steps_per_s"] if part == "train" else r["seconds"]
        assert math.isfinite(speed) and speed > 0
        if who == "ours":
            assert r["speedup_vs_peer"] > 0
        if part == "sample":
            assert r["projected"] and r["timed_steps"] == 3 and r["images"] == 2
    assert rows[("train", "ours", None)]["profile"]["steps"] == 2
    assert "ours/peer" in res.stdout  # the printed table


def test_saved_by_op_counts_each_storage_once_and_skips_weights(bench):
    """silu(x) keeps x; h·w keeps h and w (w a weight, not counted); x·x keeps x again, which adds nothing."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(16, 4))
    h = torch.nn.functional.silu(x)  # keeps x
    y = (h @ w).sum() + (x * x).sum()  # mm keeps h (and w, skipped); x * x keeps x, already counted
    by_op = bench.saved_by_op(y, {w.untyped_storage().data_ptr()})
    assert by_op == {"Silu": x.nbytes, "Mm": h.nbytes}
    assert bench.saved_by_op(y, set())["Mm"] == h.nbytes + w.nbytes


def test_the_graphed_loop_of_the_benchmark_is_the_loop(bench):
    """DDIM with η = 0 draws nothing after x_T, so the graphed loop (run eagerly here) equals the plain one."""
    from ddpm_lib import GaussianDiffusion

    cfg = get_config("tiny")
    torch.manual_seed(0)
    net = bench.randomize_(UNet.from_config(cfg.model)).eval()
    d = GaussianDiffusion.from_config(cfg.diffusion)
    x_T = torch.randn(2, 3, 16, 16)
    plain, total = bench.ours_sampler(net, d, "ddim", 5)
    graphed, total_g = bench.ours_graphed_sampler(net, d, "ddim", 5)
    gen = torch.Generator().manual_seed(0)
    assert total == total_g == 5
    assert torch.equal(graphed(x_T, gen, 5), plain(x_T, gen, 5))
    assert graphed(x_T, gen, 3).shape == x_T.shape  # a timed part of the chain
