"""The fused GroupNorm + SiLU + dropout kernels (ddpm_lib.fused_norm) against the plain PyTorch ops, forward and
gradients, float32 and bfloat16, NCHW and channels_last, run on the CPU by Triton's interpreter; and the UNet
with the fused path equals the UNet without it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton ships with PyTorch's CUDA builds")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton when it is imported, so set beforehand
DEVICE = "cpu" if INTERPRETED else "cuda"

if not INTERPRETED and not torch.cuda.is_available():
    # Triton's own library functions (tl.sigmoid, tl.rand, …) are built when triton is first imported, so the
    # interpreter must be on before that: the cases run again in a fresh process that sets it.
    def test_the_kernels_under_triton_s_interpreter() -> None:
        import subprocess
        import sys

        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                             timeout=1200)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]

    collect_ignore_cases = True
else:
    collect_ignore_cases = False


@pytest.fixture(scope="module")
def fused():
    import ddpm_lib.fused_norm as module

    if INTERPRETED:
        assert type(module._forward_kernel).__name__ == "InterpretedFunction"
    return module


def plain(x, weight, bias, G, eps, act):
    y = F.group_norm(x.float(), G, weight.float(), bias.float(), eps)
    return (F.silu(y) if act else y).to(x.dtype)


def inputs(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(DEVICE, dtype)  # an offset mean: the statistics must not cancel
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    weight = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE, dtype)
    bias = (0.2 * torch.randn(C, generator=g)).to(DEVICE, dtype)
    return x, weight, bias


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
CASES = [((2, 12, 5, 6), 4), ((3, 32, 7, 7), 8), ((1, 64, 8, 8), 32), ((2, 8, 1, 33), 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("shape,G", CASES)
@pytest.mark.parametrize("act", [True, False], ids=["silu", "norm_only"])
def test_forward_and_gradients_match_the_plain_ops(fused, shape, G, dtype, channels_last, act) -> None:
    x, weight, bias = inputs(shape, dtype, channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = fused.group_norm_act(*leaves, G, 1e-6, act=act)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    want_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = plain(*want_leaves, G, 1e-6, act)
    torch.testing.assert_close(y, want, **TOL[dtype])
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(want, want_leaves, dy)
    scale = {torch.float32: 1.0, torch.bfloat16: 4.0}[dtype]  # bf16 gradients sum many rounded terms
    for g_, r_, name in zip(got, ref, ("x", "weight", "bias"), strict=True):
        tol = {k: v * scale for k, v in TOL[dtype].items()}
        torch.testing.assert_close(g_, r_, **tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_dropout_masks_from_the_seed_and_back_propagates_through_the_same_mask(fused) -> None:
    x, weight, bias = inputs((4, 16, 9, 9), torch.float32, True)
    seed = torch.tensor([1234], dtype=torch.int32, device=DEVICE)
    xr = x.clone().requires_grad_()
    y = fused.group_norm_act(xr, weight, bias, 4, 1e-6, p=0.25, seed=seed)
    keep = y != 0
    assert abs(1 - keep.float().mean().item() - 0.25) < 0.03  # 5184 draws: the rate is p
    base = plain(x, weight, bias, 4, 1e-6, True)
    torch.testing.assert_close(y, base * keep / 0.75, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused.group_norm_act(x, weight, bias, 4, 1e-6, p=0.25, seed=seed), y, atol=0, rtol=0)
    other = fused.group_norm_act(x, weight, bias, 4, 1e-6, p=0.25, seed=seed + 1) != 0
    assert (other != keep).any()  # another seed, another mask
    dy = torch.randn_like(x)
    got = torch.autograd.grad(y, xr, dy)[0]
    xe = x.clone().requires_grad_()
    want = torch.autograd.grad(plain(xe, weight, bias, 4, 1e-6, True) * keep / 0.75, xe, dy)[0]
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_a_strided_view_is_normalized_as_its_values(fused, channels_last) -> None:
    """A channel slice (as of a concatenation) and a batch slice with a step are not dense in memory; the
    output and the gradient are those of the plain ops on the same values."""
    x, weight, bias = inputs((4, 12, 6, 5), torch.float32, channels_last)
    for take in (lambda t: t[:, :8], lambda t: t[::2]):
        got_base, want_base = x.clone().requires_grad_(), x.clone().requires_grad_()
        view = take(got_base)
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        C = view.shape[1]
        got = fused.group_norm_act(view, weight[:C], bias[:C], 4, 1e-6)
        want = plain(take(want_base), weight[:C], bias[:C], 4, 1e-6, True)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        dy = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, got_base, dy)[0],
                                   torch.autograd.grad(want, want_base, dy)[0], **TOL[torch.float32])


def test_bad_input_is_named(fused) -> None:
    x, weight, bias = inputs((2, 12, 4, 4), torch.float32, False)
    with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
        fused.group_norm_act(x, weight, bias, 5, 1e-6)
    with pytest.raises(ValueError, match="dropout probability"):
        fused.group_norm_act(x, weight, bias, 4, 1e-6, p=1.0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fused.group_norm_act(x[0], weight, bias, 4, 1e-6)


def test_the_unet_with_the_fused_path_is_the_unet(fused, monkeypatch) -> None:
    """Every norm of the network through the kernels (enabled() forced on the CPU) gives the plain network's
    output and parameter gradients, in eval mode and, with dropout 0, in training mode."""
    from ddpm_lib.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0, num_groups=4).to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 700], device=DEVICE)

    def run(on: bool):
        monkeypatch.setattr(fused, "enabled", lambda x: on)
        net.zero_grad()
        out = net(x, t)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    calls = []
    real = fused.group_norm_act
    monkeypatch.setattr(fused, "group_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    out_f, grads_f = run(True)
    assert len(calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())  # every norm
    out_p, grads_p = run(False)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    for gf, gp in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(gf, gp, atol=1e-5, rtol=1e-4)


def test_off_cuda_the_plain_ops_are_used(fused, monkeypatch) -> None:
    monkeypatch.setenv("DDPM_LIB_FUSED_NORM", "1")
    x, *_ = inputs((2, 8, 4, 4), torch.float32, True)
    x = x.cpu()
    assert not fused.enabled(x)  # a CPU tensor, whatever the variable says
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.testing.assert_close(fused.norm_act(norm, x), F.silu(norm(x)), atol=0, rtol=0)


if collect_ignore_cases:  # in this process only the launcher above runs; the cases run in its subprocess
    for _name in [n for n in globals() if n.startswith("test_") and n != "test_the_kernels_under_triton_s_interpreter"]:
        del globals()[_name]
