"""ddpm_lib.studies.beyond (the "Beyond DDPM" chapter's study): its measures, a whole run on a tiny budget, and the
shipped results."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from fakes import run_study_twice

from ddpm_lib import studies
from ddpm_lib.studies import beyond, load_results


@pytest.fixture(scope="module")
def yard(request) -> beyond.Yardstick:
    request.getfixturevalue("fashion_test")  # skipped (or failed, in CI) without Debian's Fashion-MNIST
    return beyond.Yardstick()


def test_the_yardstick_puts_real_images_at_the_floor_and_noise_far_above(yard) -> None:
    floor = yard.floor(200, 3)
    assert len(floor["draws"]) == 3 and floor["sd"] > 0
    other, _ = yard.test_draw(200, seed=99)  # a fourth draw of real images scores like the floor's
    assert abs(yard.fid(yard.features(other)[0]) - floor["mean"]) < 5 * floor["sd"] + 1e-9
    noise = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert yard.fid(yard.features(noise)[0]) > 10 * floor["mean"]
    _, probs = yard.features(other)
    assert probs.shape == (200, 10) and torch.allclose(probs.sum(-1), torch.ones(200, dtype=probs.dtype))


def test_fidelity_and_diversity_of_real_images_with_their_labels(yard) -> None:
    real, labels = yard.test_draw(300, seed=1)
    r = beyond.fidelity_and_diversity(yard, real, labels)
    assert r["accuracy"] > 0.85 and 0 < r["confidence"] <= 1 and r["nll"] > 0  # the classifier: 91.97%
    shuffled = beyond.fidelity_and_diversity(yard, real, labels[torch.randperm(300)])
    assert shuffled["accuracy"] < 0.3 and shuffled["feature_diversity"] > r["feature_diversity"]


def test_stored_images_are_the_kept_ones_in_either_layout() -> None:
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kept = studies.keep_images(images, 2)
    assert kept["shape"] == [2, 1, 28, 28] and torch.equal(studies.stored_images(kept), images[:2])
    assert torch.equal(studies.stored_images(studies.keep_images(images.permute(0, 2, 3, 1), 3)), images)
    assert torch.equal(studies.stored_images(json.loads(json.dumps(kept))), images[:2])


def test_within_class_distance_is_zero_for_copies_and_the_rms_pixel_difference_otherwise() -> None:
    images = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(20) % 10
    images[10:] = 255  # class k: one black and one white image, RMS difference 1 on the [0, 1] scale
    assert beyond.within_class_distance(images, labels) == pytest.approx([1.0] * 10)
    assert beyond.within_class_distance(torch.zeros_like(images), labels) == [0.0] * 10
    assert math.isnan(beyond.within_class_distance(images[:5], labels[:5])[0])
    features = np.zeros((20, 4))
    features[10:, 0] = 3.0  # float features: the plain Euclidean distance
    assert beyond.within_class_distance(features, labels) == pytest.approx([3.0] * 10)


def test_pixels_accepts_both_layouts_and_refuses_floats() -> None:
    nchw = torch.arange(784, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(1, 1, 28, 28)
    assert torch.equal(beyond.pixels(nchw), beyond.pixels(nchw.permute(0, 2, 3, 1)))
    with pytest.raises(ValueError, match="uint8"):
        beyond.pixels(nchw.float())


def test_learned_variance_models_have_two_output_channels() -> None:
    s = beyond.BeyondSettings()
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    assert beyond.make_small_unet("fixed_large", s)(x, t).shape == (2, 1, 8, 8)
    assert beyond.make_small_unet("learned_range", s)(x, t).shape == (2, 2, 8, 8)


def test_the_command_writes_every_part_and_is_deterministic(tmp_path, yard) -> None:
    args = ["--steps", "3", "--T", "25", "--n-bound", "4", "--n-samples", "6", "--n-long", "4",
            "--ddim-steps", "2", "--eta1-steps", "2", "--no-ddpm", "--guidance-n", "20", "--guidance-steps", "2"]
    a, b, _ = run_study_twice(beyond.main, args, tmp_path)
    assert a["sampling"] == b["sampling"] and a["guidance"] == b["guidance"] and a["likelihood"] == b["likelihood"]
    assert [(r["sampler"], r["steps"], r["eta"]) for r in a["sampling"]["runs"]] == [("ddim", 2, 0.0), ("ddim", 2, 1.0)]
    assert set(a["sampling"]["floor"]) == {"4", "6"} and all(math.isfinite(r["fid"]) for r in a["sampling"]["runs"])
    assert [r["w"] for r in a["guidance"]["runs"]] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert all(len(r["predicted"]) == 20 and len(r["per_class_accuracy"]) == 10 for r in a["guidance"]["runs"])
    assert a["guidance"]["held_out"]["n"] == 20 and a["classifier"]["test_accuracy"] > 0.9
    fixed, learned = a["likelihood"]["variants"][:2]
    assert set(fixed["bound"]) == {"fixed_large", "fixed_small"} and set(learned["bound"]) == {"learned_range"}
    assert all(len(bd["per_t"]) == 25 and len(bd["per_example"]) == 4 for bd in fixed["bound"].values())
    assert a["commands"]["likelihood"].startswith("python -m ddpm_lib.studies.beyond --steps 3")


def test_rerunning_one_part_keeps_the_others(tmp_path, yard) -> None:
    path = tmp_path / "r.json"
    common = ["--steps", "2", "--T", "25", "--n-bound", "2", "--n-samples", "4", "--n-long", "4",
              "--ddim-steps", "2", "--no-ddpm", "--guidance-n", "10", "--guidance-steps", "1", "--out", str(path)]
    beyond.main([*common, "--parts", "likelihood"])
    beyond.main([*common, "--parts", "sampling"])
    result = json.loads(path.read_text(encoding="utf8"))
    assert "likelihood" in result and "sampling" in result and "guidance" not in result


# --------------------------------------------------------------------------- the shipped results


@pytest.fixture(scope="module")
def shipped() -> dict:
    return load_results("beyond")


def test_shipped_results_come_from_the_default_settings_and_the_shipped_weights(shipped) -> None:
    # (a part rerun alone keeps the others: the settings must still be the defaults the whole file was made with)
    assert shipped["settings"] == asdict(beyond.BeyondSettings())
    for part in ("sampling", "guidance"):
        assert shipped[part]["weights_sha256"] == studies.file_sha256(beyond.WEIGHTS_DIR / shipped[part]["weights"])
    assert set(beyond.PARTS) <= set(shipped)


def test_shipped_sampling_rows_are_the_configured_samplers(shipped) -> None:
    s = beyond.BeyondSettings()
    runs = shipped["sampling"]["runs"]
    assert [(r["sampler"], r["steps"], r["eta"]) for r in runs] == beyond.sampler_runs(s, shipped["sampling"]["T"])
    for r in runs:
        assert math.isfinite(r["fid"]) and 0 < r["mean_confidence"] <= 1 and sum(r["predicted_classes"]) == r["n"]
        assert r["n"] == (s.n_long if r["steps"] >= shipped["sampling"]["T"] else s.n_samples)
        floor = shipped["sampling"]["floor"][str(r["n"])]
        assert r["fid"] > floor["mean"] - 3 * floor["sd"]  # no sampler is far better than real images
        assert studies.stored_images(r["images"]).shape == (s.n_keep, 1, 28, 28)


def test_shipped_guidance_metrics_agree_with_the_stored_predictions(shipped) -> None:
    s = beyond.BeyondSettings()
    labels = np.arange(s.guidance_n) % 10
    for r in shipped["guidance"]["runs"]:
        assert len(r["predicted"]) == s.guidance_n
        assert r["accuracy"] == pytest.approx(float((np.array(r["predicted"]) == labels).mean()))
        assert r["diversity"] == pytest.approx(float(np.mean(r["diversity_per_class"])))
        per_class = [float((np.array(r["predicted"])[labels == k] == k).mean()) for k in range(10)]
        assert r["per_class_accuracy"] == pytest.approx(per_class)
        assert studies.stored_images(r["images"]).shape == (s.guidance_keep, 1, 28, 28)


def test_shipped_bounds_add_up(shipped) -> None:
    s = beyond.BeyondSettings()
    variants = shipped["likelihood"]["variants"]
    assert [(v["schedule"], v["var_type"], v["loss_type"]) for v in variants] == [
        (sched, var, loss) for _, sched, _, var, loss in beyond.VARIANTS]
    for v in variants:
        assert v["steps_done"] == s.steps and v["failure"] is None
        for b in v["bound"].values():
            assert len(b["per_example"]) == s.n_bound and len(b["per_t"]) == s.T
            assert b["bpd"] == pytest.approx(float(np.mean(b["per_example"])), abs=1e-5)
            assert b["bpd"] == pytest.approx(sum(b["per_t"]) + b["LT"], rel=1e-4)
            assert b["L0"] + b["sum_Lt"] + b["LT"] == pytest.approx(b["bpd"], rel=1e-9)
