"""ddpm_lib.studies.table2 (Table 2 at small scale): its exact metrics, and a whole run at toy settings."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def tool():
    from ddpm_lib.studies import table2

    return table2


def test_exact_nll_matches_the_continuous_entropy_minus_log_bin_width(tool) -> None:
    # Components 5.4 std apart barely overlap: entropy ≈ log2(8) + a 2-D Gaussian's entropy, bins of width
    # 2/255. The small overlap and the open edge bins can only lower it.
    mix = tool.make_mixture(tool.Table2Settings())
    gaussian = math.log2(2 * math.pi * math.e * mix.std**2)  # 2-D, bits
    approx = (math.log2(8) + gaussian) / 2 - math.log2(2 / 255)
    assert approx - 0.03 < tool.exact_nll_bits(mix) < approx


def test_mmd_is_near_zero_for_the_mixture_and_large_for_a_shifted_copy(tool) -> None:
    s = tool.Table2Settings()
    mix = tool.make_mixture(s)
    x = mix.sample(3000, torch.Generator().manual_seed(0))
    same, shifted = tool.mmd2_to_mixture(mix, x, s.kernel_width), tool.mmd2_to_mixture(mix, x + 0.2, s.kernel_width)
    assert abs(same) < 1e-3 and shifted > 0.02


def test_escaped_and_non_finite_samples_count_as_misses(tool) -> None:
    s = tool.Table2Settings()
    mix = tool.make_mixture(s)
    x = mix.means.repeat(10, 1)  # 80 points, each at a component's mean
    x[0] = torch.tensor([5.0, 0.0])
    x[1] = torch.tensor([float("nan"), 0.0])
    m = tool.sample_metrics(mix, x, s)
    assert (m["escaped"], m["non_finite"]) == (2, 1)
    assert m["near_mode"] == pytest.approx(78 / 80)
    assert sum(m["points_per_mode"]) == 78


def test_a_non_finite_loss_is_recorded_as_unstable(tool, monkeypatch) -> None:
    s = tool.Table2Settings(steps=5, T=100, n_train=64, n_eval=32, n_bound=8, n_samples=16)
    make_mlp = tool.make_mlp

    def broken(var_type, settings, seed):
        model = make_mlp(var_type, settings, seed)
        with torch.no_grad():
            model.net[-1].bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(tool, "make_mlp", broken)
    mix = tool.make_mixture(s)
    train, held_out = tool.make_data(mix, s)
    result, samples = tool.run_row("eps", "fixed_large", "simple", mix, train, held_out, s, seed=0)
    assert result["status"] == "unstable" and "non-finite loss at step 0" in result["failure"]
    assert samples is None and "metrics" not in result
    summary = tool.summarize([result])
    assert summary["stable_runs"] == 0 and summary["mmd2"]["mean"] is None


def test_the_command_writes_every_configuration_and_is_deterministic(tool, tmp_path) -> None:
    args = ["--steps", "6", "--seeds", "0", "1", "--T", "100", "--n-bound", "8", "--n-samples", "16"]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        assert tool.main([*args, "--out", str(path)]) == 0
    a, b = (json.loads(p.read_text(encoding="utf8")) for p in paths)
    assert [(c["mean_type"], c["var_type"], c["loss_type"]) for c in a["configs"]] == [
        ("mu", "learned", "vlb"), ("mu", "fixed_large", "vlb"), ("mu", "fixed_large", "simple"),
        ("eps", "learned", "vlb"), ("eps", "fixed_large", "vlb"), ("eps", "fixed_large", "simple")]
    for ca, cb in zip(a["configs"], b["configs"], strict=True):
        assert len(ca["runs"]) == 2 and ca["summary"]["runs"] == 2
        for ra, rb in zip(ca["runs"], cb["runs"], strict=True):
            assert ra["status"] == "stable" and ra["steps_done"] == 6
            assert ra["loss_windows"] == rb["loss_windows"] and ra["metrics"] == rb["metrics"]
        assert len(ca["samples"]) == 16 and ca["samples"] == cb["samples"]
    assert a["settings"]["T"] == 100 and a["command"].startswith("python -m ddpm_lib.studies.table2 --steps 6")
