"""viz.live_panel: the live sampling panel's HTML is a pure function of its arguments, carries its defaults as data
attributes and a visible fallback, imports the panel's module from the page's content root, and refuses what the
panel cannot run. (The panel itself runs in a browser: tests/test_live_panel.py.)"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ddpm_lib import viz
from ddpm_lib.data import FASHION_CLASSES
from ddpm_lib.onnx_export import DDIM_STEPS

ROOT = Path(__file__).resolve().parents[1]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(s: str) -> _Tags:
    p = _Tags()
    p.feed(s)
    p.close()
    assert p.open == [], f"unclosed tags {p.open}"
    return p


def panel_attrs(s: str) -> dict:
    (attrs,) = [a for t, a in parse(s).tags if t == "div" and a.get("class") == "ddpm-live"]
    return attrs


def test_defaults_are_data_attributes() -> None:
    a = panel_attrs(viz.live_panel())
    assert a["data-model"] == "fashion" and a["data-sampler"] == "ddim" and a["data-steps"] == "50"
    assert a["data-eta"] == "0" and a["data-seed"] == "0" and a["data-n-images"] == "16"
    assert a["data-conditional"] == "0" and "data-label" not in a and "data-guidance" not in a
    assert a["data-steps-offered"] == ",".join(map(str, DDIM_STEPS))
    c = panel_attrs(viz.live_panel("fashion_cond", sampler="ddpm", seed=7, label=9, guidance=2.5, n_images=4))
    assert c["data-model"] == "fashion_cond" and c["data-sampler"] == "ddpm" and c["data-seed"] == "7"
    assert c["data-conditional"] == "1" and c["data-label"] == "9" and c["data-guidance"] == "2.5"
    assert c["data-n-images"] == "4"
    assert panel_attrs(viz.live_panel("fashion_cond"))["data-label"] == ""  # None: the null label
    assert panel_attrs(viz.live_panel(eta=0.25, steps=10))["data-eta"] == "0.25"


def test_html_is_deterministic_and_well_formed() -> None:
    kw = dict(sampler="ddim", steps=20, eta=0.5, seed=3, label=2, guidance=1.0, title="Sample <now> & see")
    a, b = viz.live_panel("fashion_cond", **kw), viz.live_panel("fashion_cond", **kw)
    assert a == b
    assert viz.live_panel("fashion_cond", **(kw | {"seed": 4})) != a
    p = parse(a)
    assert "Sample <now> & see" in "".join(p.text) and "<now>" not in a  # the title is escaped
    assert not re.search(r'\bid="', a)  # no ids: several panels on a page, stable outputs


def test_fallback_text_is_visible_and_says_pictures_are_precomputed() -> None:
    s = viz.live_panel()
    (fallback,) = [a for t, a in parse(s).tags if a.get("class") == "ddpm-live-fallback"]
    assert "display:none" not in fallback.get("style", "").replace(" ", "")
    text = re.search(r'class="ddpm-live-fallback"[^>]*>(.*?)</p>', s, re.S).group(1)
    assert "precomputed" in text and "JavaScript" in text and "WebAssembly" in text


def test_module_script_imports_from_the_content_root() -> None:
    s = viz.live_panel()
    scripts = [a for t, a in parse(s).tags if t == "script"]
    assert scripts == [{"type": "module"}]
    body = re.search(r'<script type="module">(.*)</script>', s, re.S).group(1)
    assert "document.documentElement.dataset.content_root" in body
    assert "'_static/ddpm_live.js'" in body and "mountAll()" in body
    assert "http" not in body.replace("href", "")  # nothing from off the site
    assert (ROOT / "book" / "_static" / "ddpm_live.js").is_file()


def test_the_module_knows_the_class_names() -> None:
    js = (ROOT / "book" / "_static" / "ddpm_live.js").read_text(encoding="utf8")
    names = re.search(r"const CLASS_NAMES = \[(.*?)\];", js, re.S).group(1)
    assert re.findall(r'"([^"]+)"', names) == list(FASHION_CLASSES)
    assert "export function mountAll" in js and "export async function sample" in js
    assert not re.search(r"https?://", js)  # fetches nothing from off the site


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="cifar10"), "model='cifar10'"),
    (dict(sampler="pndm"), "sampler='pndm'"),
    (dict(steps=7), "steps=7"),
    (dict(steps=50.0), "steps=50.0"),
    (dict(steps=True), "steps=True"),
    (dict(eta=1.5), r"eta=1.5 must lie in \[0, 1\]"),
    (dict(eta=-0.1), "eta"),
    (dict(eta="x"), "eta"),
    (dict(eta=float("nan")), "eta"),
    (dict(sampler="ddpm", eta=0.5), "DDIM's"),
    (dict(label=3), "unconditional"),
    (dict(guidance=1.0), "unconditional"),
    (dict(model="fashion_cond", label=10), "label=10"),
    (dict(model="fashion_cond", label=True), "label=True"),
    (dict(model="fashion_cond", label="Bag"), "label='Bag'"),
    (dict(model="fashion_cond", guidance=4.5), "guidance"),
    (dict(model="fashion_cond", guidance=-1), "guidance"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(n_images=0), "n_images"),
    (dict(n_images=65), "n_images"),
    (dict(title=3), "title"),
])
def test_refuses_what_the_panel_cannot_run(kwargs, words) -> None:
    with pytest.raises(ValueError, match=words):
        viz.live_panel(**kwargs)


def test_edges_are_accepted() -> None:
    for s in DDIM_STEPS:
        viz.live_panel(steps=s)
    viz.live_panel(eta=1.0)
    viz.live_panel("fashion_cond", label=0, guidance=4.0)
    viz.live_panel("fashion_cond", label=None, guidance=0.0)
    assert html.unescape(panel_attrs(viz.live_panel("fashion_cond", guidance=4))["data-guidance"]) == "4"
