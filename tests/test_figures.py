"""ddpm_lib.studies.figures (the book model's slow figures): the pieces the chapters recompute live, a whole run
on a stand-in model, and the shipped results."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from fakes import TinyNet, run_study_twice

from ddpm_lib import GaussianDiffusion, get_config, make_beta_schedule, studies
from ddpm_lib.evaluate import dataset_nll
from ddpm_lib.loading import LoadedModel
from ddpm_lib.studies import figures

T_SMALL = 25


@pytest.fixture
def stand_in(monkeypatch, fashion_test) -> LoadedModel:
    """The study with a tiny ε-network on T = 20 in place of the book model (same image shape)."""
    net = TinyNet(T_SMALL, c_in=1, c_out=1, squash=True).eval()
    book = LoadedModel(net, GaussianDiffusion(make_beta_schedule("linear", T_SMALL)), get_config("fashion"), 7)
    monkeypatch.setattr(figures, "load_book_model", lambda name: book)
    return book


def test_chains_of_one_source_are_those_it_gets_among_all_sources(stand_in) -> None:
    sources, idx = figures.source_images(3)
    assert [int(figures.load_split("fashion", "test", download=False).labels[i]) for i in idx] == [0, 1, 2]
    d, net = stand_in.diffusion, stand_in.model
    x_t = figures.shared_latent(d, sources, 10, seed=0)
    assert torch.equal(figures.shared_latent(d, sources, 10, seed=0), x_t)
    everything = figures.chains_from(d, net, x_t, 10, chains=2, seed=1)
    alone = figures.chains_from(d, net, x_t[2:3], 10, chains=2, seed=1, first_index=2)
    assert everything.shape == (6, 1, 28, 28) and torch.allclose(alone, everything[4:6], atol=1e-5)
    assert not torch.allclose(everything[4], everything[5])  # two chains from one latent differ


def test_the_first_batch_of_the_bound_alone_gives_its_images_totals(stand_in, fashion_test) -> None:
    d, net = stand_in.diffusion, stand_in.model
    whole = dataset_nll(net, d, fashion_test.images[:4], batch_size=2, seed=3)
    first = dataset_nll(net, d, fashion_test.images[:2], batch_size=2, seed=3)
    assert np.allclose(first.total, whole.total[:2])


def test_the_command_writes_every_part_deterministically_and_keeps_other_parts(stand_in, tmp_path) -> None:
    args = ["--n-bound", "2", "--bound-batch", "1", "--sources", "2", "--starts", "5", "25", "--chains", "2",
            "--n-consistency", "2", "--ddim-steps", "2", "5"]
    a, b, paths = run_study_twice(figures.main, args, tmp_path)
    for part in figures.PARTS:
        assert a[part] == b[part]
    bound = a["bound"]
    assert bound["n"] == 2 and len(bound["terms"]) == T_SMALL and len(bound["x0_mse"]) == T_SMALL
    assert bound["nll_bpd"] == pytest.approx(np.mean(bound["total"]), abs=1e-5)
    rows = a["shared_latents"]["rows"]
    assert [r["t"] for r in rows] == [5, 25] and all(0 <= r["class_kept"] <= 1 for r in rows)
    assert studies.stored_images(rows[0]["samples"]).shape == (4, 1, 28, 28)
    kinds = [(r["sampler"], r["steps"]) for r in a["consistency"]["rows"]]
    assert kinds == [("ddpm", T_SMALL), ("ddpm", T_SMALL), ("ddim", 2), ("ddim", 5)]
    assert a["bound"]["step"] == 7 and a["commands"]["bound"].startswith("python -m ddpm_lib.studies.figures")
    # rerunning one part keeps the others
    before = json.loads(paths[0].read_text(encoding="utf8"))
    assert figures.main([*args, "--parts", "consistency", "--out", str(paths[0])]) == 0
    after = json.loads(paths[0].read_text(encoding="utf8"))
    assert after["bound"] == before["bound"] and after["shared_latents"] == before["shared_latents"]


# --------------------------------------------------------------------------- the shipped results


@pytest.fixture(scope="module")
def shipped() -> dict:
    return studies.load_results("figures")


def test_shipped_results_come_from_the_default_settings_and_the_shipped_weights(shipped) -> None:
    assert shipped["settings"] == asdict(figures.FiguresSettings())
    for part in figures.PARTS:
        assert shipped[part]["weights_sha256"] == studies.file_sha256(figures.WEIGHTS_DIR / shipped[part]["weights"])


def test_the_shipped_bound_adds_up(shipped) -> None:
    s, b = figures.FiguresSettings(), shipped["bound"]
    assert b["n"] == len(b["total"]) == len(b["prior"]) == s.n_bound and len(b["terms"]) == 1000
    assert b["nll_bpd"] == pytest.approx(np.mean(b["total"]), abs=1e-5)
    assert b["nll_bpd"] == pytest.approx(np.mean(b["prior"]) + sum(b["terms"]), rel=1e-4)
    assert b["nll_sem"] == pytest.approx(np.std(b["total"], ddof=1) / math.sqrt(b["n"]), rel=1e-3)


def test_the_shipped_shared_latents_are_what_the_classifier_says(shipped) -> None:
    s, part = figures.FiguresSettings(), shipped["shared_latents"]
    labels = np.repeat(np.arange(s.sources), s.chains)
    assert [r["t"] for r in part["rows"]] == s.starts
    for r in part["rows"]:
        assert r["class_kept"] == pytest.approx(float((np.array(r["predicted"]) == labels).mean()))
        assert studies.stored_images(r["samples"]).shape == (s.sources * s.chains, 1, 28, 28)
