"""ddpm_lib.graphed.GraphedSampler: the step it captures as a CUDA graph gives sample_loop's images.

On the CPU the step runs eagerly over the sampler's fixed buffers (``capture=False``): the tests check that this
loop, with its device tables of τ and of DDIM's coefficients and its on-device step counter, gives exactly
``samplers.sample_loop``'s images from the same ``ImageNoise``. On a CUDA machine the same comparisons run with
the graph captured and replayed (``benchmarks/gpu_fused_check.sh`` runs them there)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddpm_lib import GaussianDiffusion, UNet, get_config, make_beta_schedule
from ddpm_lib.generation import generate
from ddpm_lib.graphed import GraphedSampler
from ddpm_lib.rng import ImageNoise
from ddpm_lib.samplers import sample_loop

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def tiny_unet(num_classes: int | None = None, device: str = "cpu") -> UNet:
    mc = get_config("tiny").model
    torch.manual_seed(0)
    net = UNet.from_config(dataclasses.replace(mc, num_classes=num_classes, image_size=8))
    for p in net.parameters():  # the zero-initialised output layers would make ε̂ = 0
        p.data.normal_(0, 0.05)
    return net.to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 5, 0.0), ("ddim", 5, 0.7)])
def test_the_graphed_loop_gives_sample_loop_s_images(device, sampler, steps, eta) -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    net = tiny_unet(device=device)
    indices = [3, 0, 7]
    g = GraphedSampler(d, net, (3, 3, 8, 8), sampler=sampler, steps=steps, eta=eta, device=device,
                       capture=device == "cuda")
    keys = ImageNoise.for_images(5, indices).keys
    got = g(keys)
    want = sample_loop(d, net, (3, 3, 8, 8), sampler=sampler, steps=steps, eta=eta, device=device,
                       generator=ImageNoise.for_images(5, indices, device))
    assert got.shape == want.shape and torch.isfinite(got).all()
    if device == "cpu":
        assert torch.equal(got, want)
    else:  # the graph's kernels are the eager ones; allow for autotuned convolutions
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(g(keys), got)  # a second call (a replay of the same graph) gives the same images
    other = g(ImageNoise.for_images(5, [1, 2, 4]).keys)
    assert not torch.equal(other, got)  # new keys, new noise, other images


@pytest.mark.parametrize("device", DEVICES)
def test_guided_graphed_sampling_follows_the_labels(device) -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    net = tiny_unet(num_classes=3, device=device)
    g = GraphedSampler(d, net, (2, 3, 8, 8), sampler="ddim", steps=4, conditional=True, guidance_scale=1.5,
                       device=device, capture=device == "cuda")
    keys = ImageNoise.for_images(0, [0, 1]).keys
    for labels in ([0, 2], [1, 1]):
        y = torch.tensor(labels, device=device)
        want = sample_loop(d, net, (2, 3, 8, 8), sampler="ddim", steps=4, y=y, guidance_scale=1.5, device=device,
                           generator=ImageNoise.for_images(0, [0, 1], device))
        torch.testing.assert_close(g(keys, y=y), want, rtol=1e-5, atol=1e-5)


def test_bad_calls_name_the_problem() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    net = tiny_unet()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedSampler(d, net, (2, 3, 8, 8), capture=True)
    with pytest.raises(ValueError, match="shape must be"):
        GraphedSampler(d, net, (3, 8, 8), capture=False)
    with pytest.raises(ValueError, match="steps, timesteps and eta"):
        GraphedSampler(d, net, (2, 3, 8, 8), steps=5, capture=False)
    g = GraphedSampler(d, net, (2, 3, 8, 8), capture=False)
    with pytest.raises(ValueError, match=r"keys must be int64 \[2\]"):
        g(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels y"):
        g(torch.zeros(2, dtype=torch.int64), y=torch.zeros(2, dtype=torch.int64))


def test_generate_refuses_graphs_without_their_conditions() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    kw = dict(sampler="ddim", steps=3, progress=False)
    with pytest.raises(ValueError, match='graph=True needs noise="device"'):
        generate(tiny_unet(), d, 2, graph=True, **kw)
    if not CUDA:
        with pytest.raises(ValueError, match="graph=True needs a CUDA device"):
            generate(tiny_unet(), d, 2, graph=True, noise="device", **kw)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_generate_with_graphs_matches_the_eager_loop() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 40))
    net = tiny_unet(device="cuda")
    kw = dict(sampler="ddpm", seed=3, noise="device", progress=False, batch_size=3)
    a = generate(net, d, 5, graph=True, **kw)  # batches of 3 and 2: two graphs
    b = generate(net, d, 5, **kw)
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 images: at most one level apart where rounding differs
