"""The book as a reader gets it: built with Jupyter Book, opened in headless Chromium.

The build runs here, into a temporary folder, exactly as the README builds it (``jupyter-book
build . -W``, warnings are errors). Then every page of ``_toc.yml`` is opened in headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, driven by selenium), served from 127.0.0.1, and
checked: no console errors, no request leaves the local server (MathJax ships with the book), the
math is typeset with the paper's equation numbers, every internal link resolves, the static
timestep scrubber changes its picture when the slider moves, and at a phone's, a tablet's and two
desktops' widths (360, 768, 1280, 1920 px) nothing on a page is cut off or widens it.

The browser tests skip, with the reason, when chromium, chromedriver or selenium is missing, unless
``DDPM_REQUIRE_BROWSER=1`` (CI sets it), in which case they fail. The checks that need no browser
(the notebooks' Colab cells, their size, the launch links, ``ddpm_lib.viz``) always run.
"""

from __future__ import annotations

import functools
import html.parser
import importlib.util
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRE_BROWSER = os.environ.get("DDPM_REQUIRE_BROWSER", "") == "1"
MAX_NOTEBOOK_BYTES = 1_500_000


def _load_tool():
    spec = importlib.util.spec_from_file_location("refresh_notebooks", ROOT / "tools" / "refresh_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refresh_tool = _load_tool()


def toc_files() -> list[str]:
    """Every document of ``_toc.yml`` (root first), as paths without extension relative to the root."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf8"))
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("sections", "chapters"):
                walk(entry.get(key, []))
            for part in entry.get("parts", []):
                walk(part.get("chapters", []))

    walk(toc.get("chapters", []))
    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    return files


def chapter_notebooks() -> list[Path]:
    return sorted(BOOK.glob("*.ipynb"))


# ------------------------------------------------------------------------------ without a browser


def test_viz_import_needs_no_notebook_packages() -> None:
    code = ("import sys, ddpm_lib, ddpm_lib.viz; "
            "print([m for m in ('matplotlib', 'ipywidgets', 'IPython', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_static_scrubber_html_is_a_pure_function_of_its_frames() -> None:
    from ddpm_lib import viz

    frames = [np.full((4, 6, 3), v, dtype=np.uint8) for v in (0, 128, 255)]
    labels = ["t = 1", "t = 500", "t = 1000"]
    page = viz.scrubber_html(frames, labels, width_px=60, title="x_t")
    assert page == viz.scrubber_html(frames, labels, width_px=60, title="x_t")
    assert page.count('<img class="ddpm-scrubber-frame"') == 3 and page.count("display:block") == 1
    assert 'type="range" min="0" max="2"' in page and 'height="40"' in page
    with pytest.raises(ValueError):
        viz.scrubber_html(frames, labels[:2])


def test_html_table_escapes_aligns_and_scrolls_inside_its_box() -> None:
    from ddpm_lib import viz

    page = viz.html_table(("objective", "FID"), [("ε, ‖ε − ε_θ‖² <simple>", "3.17")], caption="a & b")
    assert page.startswith('<div style="overflow-x:auto') and page.endswith("</table></div>")
    assert "&lt;simple&gt;" in page and "<caption>a &amp; b</caption>" in page
    assert '<td style="padding:2px 5px; text-align:left">ε' in page  # a label: left, free to wrap
    assert '<td style="padding:2px 5px; text-align:right; white-space:nowrap">3.17</td>' in page
    two = viz.html_table(("a", "b", "c"), [("x", "y", "1")], left_columns=2)
    assert '<td style="padding:2px 5px; text-align:left">y</td>' in two


def test_scrubber_is_static_when_the_book_environment_asks(monkeypatch) -> None:
    from ddpm_lib import viz

    monkeypatch.setenv(viz.STATIC_ENV_VAR, "1")
    assert not viz.live_frontend()
    monkeypatch.delenv(viz.STATIC_ENV_VAR)
    assert not viz.live_frontend()  # plain Python, no kernel


def test_live_scrubber_recomputes_the_picture_when_the_slider_moves(monkeypatch) -> None:
    import IPython.display
    import ipywidgets

    from ddpm_lib import viz

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))

    def render(i: int) -> np.ndarray:  # a grey picture whose brightness is the index
        return np.full((8, 8), 10 * i, dtype=np.uint8)

    viz.timestep_scrubber(render, [0, 4], num_timesteps=20, live=True)
    (box,) = shown
    assert isinstance(box, ipywidgets.VBox)
    image, slider, label = box.children
    assert (slider.min, slider.max, slider.value) == (1, 20, 1)  # the paper's t = index + 1
    assert image.value == viz.png_bytes(render(0))
    slider.value = 15
    assert image.value == viz.png_bytes(render(14)) and label.value == "t = 15"


@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda p: p.name)
def test_notebook_installs_from_the_configured_repository_only_in_colab(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    url = refresh_tool.repository_url()
    assert first_code.source == refresh_tool.colab_install_source(url), (
        f"{path.name}: run `python tools/refresh_notebooks.py` to write its Colab cell from _config.yml")
    assert f"git+{url}" in first_code.source and '"google.colab" in sys.modules' in first_code.source
    assert first_code.outputs == []  # silent outside Colab


@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda p: p.name)
def test_notebook_is_committed_executed_small_and_without_widget_state(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run tools/refresh_notebooks.py"
    assert "widgets" not in nb.metadata  # widget state would pull the widget manager from a CDN
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    for cell in code:
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}: a cell stored an error"
            assert out.get("name") != "stderr", f"{path.name}: a cell wrote to stderr: {out.get('text', '')[:200]}"


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    """The book built as the README builds it, into a temporary folder; returns its HTML folder."""
    out = tmp_path_factory.mktemp("book")
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(ROOT), "-W", "--path-output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, f"jupyter-book build failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return out / "_build" / "html"


def test_math_renderer_ships_with_the_book(built_book: Path) -> None:
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (built_book / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    chapters = [doc for doc in toc_files() if (ROOT / f"{doc}.ipynb").exists()]
    assert chapters
    for doc in chapters:  # pages with math load the bundled MathJax, not a CDN's
        page = (built_book / f"{doc}.html").read_text(encoding="utf8")
        assert 'src="../_static/mathjax/tex-chtml.js"' in page, doc


def test_the_live_panel_files_ship_and_nothing_more(built_book: Path) -> None:
    """The book's networks (ONNX and their constants) and ONNX Runtime Web's module and WebAssembly, copied from
    node_modules by the build: exactly these files, so that the book grows by what the panels need."""
    from ddpm_lib.onnx_export import ORT_FILES

    live = built_book / "_static" / "live"
    want = {f"{n}.{ext}" for n in ("fashion", "fashion_cond") for ext in ("onnx", "json")}
    want |= {f"ort/{f}" for f in ORT_FILES}
    have = {str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()}
    assert have == want, f"unexpected {have - want}, missing {want - have}"
    size = sum((live / f).stat().st_size for f in have)
    assert size < 26e6, f"the live panel's files take {size / 1e6:.1f} MB"
    assert (built_book / "_static" / "ddpm_live.js").is_file()


def test_colab_buttons_open_each_chapter_notebook(built_book: Path) -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf8"))
    repo = config["repository"]
    org_repo = urllib.parse.urlparse(repo["url"]).path.strip("/")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    book_path = repo.get("path_to_book", "").strip("/")
    for path in chapter_notebooks():
        doc = path.relative_to(ROOT).with_suffix("").as_posix()
        if doc not in toc_files():
            continue
        rel = f"{book_path}/{doc}" if book_path else doc
        want = f"{colab}/github/{org_repo}/blob/{repo['branch']}/{rel}.ipynb"
        page = (built_book / f"{doc}.html").read_text(encoding="utf8")
        assert f'href="{want}"' in page, f"{doc}: no Colab link to {want}"


# ------------------------------------------------------------------------------ in the browser


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install -y chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(built_book: Path):
    """The built book served over HTTP on 127.0.0.1; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(built_book)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        if REQUIRE_BROWSER:
            pytest.fail(f"DDPM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(f"browser test skipped: {reason}")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


# Wait for MathJax to finish typesetting, then report what the page holds.
_PAGE_REPORT_JS = """
const done = arguments[arguments.length - 1];
const report = () => done({
  mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
  mathSources: document.querySelectorAll('div.math, span.math').length,
  typeset: document.querySelectorAll('mjx-container').length,
  mathErrors: Array.from(document.querySelectorAll('mjx-merror')).map(e => e.getAttribute('data-mjx-error')),
  eqnIds: Array.from(document.querySelectorAll('[id^="mjx-eqn"]')).map(e => e.id),
  resources: performance.getEntriesByType('resource').map(r => r.name),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
});
const deadline = Date.now() + 10000;  // MathJax that never loads is reported, not waited for
const wait = () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(report, e => done({error: String(e)}));
  } else if (document.readyState === 'complete'
             && (!document.querySelector('div.math, span.math') || Date.now() > deadline)) {
    report();
  } else {
    setTimeout(wait, 50);
  }
};
wait();
"""


@pytest.fixture(scope="module")
def pages(browser, site: str) -> dict[str, dict]:
    """Every page of the table of contents, loaded once: its MathJax state, requests, links and console log."""
    reports = {}
    for doc in toc_files():
        browser.get(urllib.parse.urljoin(site, f"{doc}.html"))
        report = browser.execute_async_script(_PAGE_REPORT_JS)
        report["log"] = browser.get_log("browser")
        reports[doc] = report
    return reports


def test_every_page_loads_without_console_errors(pages: dict[str, dict]) -> None:
    for doc, report in pages.items():
        severe = [entry["message"] for entry in report["log"] if entry["level"] == "SEVERE"]
        assert not severe, f"{doc}: console errors {severe}"
        assert "error" not in report, f"{doc}: {report.get('error')}"


def test_no_page_requests_anything_from_the_network(pages: dict[str, dict], site: str) -> None:
    for doc, report in pages.items():
        remote = [r for r in report["resources"] if not (r.startswith(site) or r.startswith("data:"))]
        assert not remote, f"{doc}: requests outside the book: {remote}"


def test_math_is_typeset_with_the_papers_equation_numbers(pages: dict[str, dict]) -> None:
    chapters = [doc for doc in pages if (ROOT / f"{doc}.ipynb").exists()]
    assert chapters
    for doc in chapters:
        report = pages[doc]
        assert report["mathjax"] and report["mathjax"].startswith("3."), f"{doc}: MathJax did not load"
        assert report["mathSources"] > 0, f"{doc}: a chapter without math?"
        assert report["typeset"] >= report["mathSources"], f"{doc}: {report['typeset']} of {report['mathSources']}"
        assert not report["mathErrors"], f"{doc}: TeX errors {report['mathErrors']}"
        # every equation tagged with the paper's number, \tag{n}, is shown as (n)
        nb = nbformat.read(ROOT / f"{doc}.ipynb", as_version=4)
        tags = {m for c in nb.cells if c.cell_type == "markdown" for m in re.findall(r"\\tag\{([^}]+)\}", c.source)}
        assert {f"mjx-eqn:{tag}" for tag in tags} <= set(report["eqnIds"]), (doc, tags, report["eqnIds"])
    forward = pages.get("book/forward")
    if forward is not None:  # the chapter's own equations: the paper's eqs. 2 and 4
        assert {"mjx-eqn:2", "mjx-eqn:4"} <= set(forward["eqnIds"]), forward["eqnIds"]


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf8"))
    return frozenset(parser.ids)


def test_every_internal_link_resolves(pages: dict[str, dict], site: str, built_book: Path) -> None:
    broken = []
    checked = 0
    for doc, report in pages.items():
        for href in report["links"]:
            if not href.startswith(site):
                continue  # external (repository, Colab, arXiv): not followed offline
            url = urllib.parse.urlparse(href)
            target = built_book / urllib.parse.unquote(url.path).lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_file():
                broken.append(f"{doc}: {href} (no such file)")
            elif url.fragment and target.suffix == ".html":
                if urllib.parse.unquote(url.fragment) not in _anchors(target):
                    broken.append(f"{doc}: {href} (no such anchor)")
    assert checked > 0
    assert not broken, "\n".join(broken)


def test_static_scrubber_changes_the_picture(browser, site: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(urllib.parse.urljoin(site, "book/forward.html"))
    scrubbers = browser.find_elements(By.CSS_SELECTOR, ".ddpm-scrubber")
    assert scrubbers, "no static scrubber on the forward-noising page"
    shown = ("return Array.from(arguments[0].querySelectorAll('img.ddpm-scrubber-frame'))"
             ".filter(img => getComputedStyle(img).display !== 'none').map(img => img.src);")
    for scrubber in scrubbers:
        slider = scrubber.find_element(By.CSS_SELECTOR, "input[type=range]")
        label = scrubber.find_element(By.CSS_SELECTOR, "output")
        before = browser.execute_script(shown, scrubber)
        label_before = label.text
        assert len(before) == 1 and before[0].startswith("data:image/png;base64,")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
        slider.send_keys(Keys.END)  # keyboard input on the range, as a reader would
        after = browser.execute_script(shown, scrubber)
        assert slider.get_attribute("value") == slider.get_attribute("max")
        assert len(after) == 1 and after[0] != before[0], "moving the slider did not change the picture"
        assert label.text != label_before
        slider.send_keys(Keys.HOME)
        assert browser.execute_script(shown, scrubber) == before
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe



# A page at one window width: what is cut off. A display equation is cut when a glyph lies left of its box
# (no scrolling reaches it) or right of it in a box that does not scroll; a table, image, code block or
# slider is cut when it sticks out of the nearest box that clips it and that box does not scroll.
_CUT_OFF_JS = """
const done = arguments[arguments.length - 1];
const scrolls = el => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
const name = el => el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
  ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : '');
const what = el => (el.textContent || el.getAttribute('alt') || el.getAttribute('src') || '').trim().slice(0, 50);
const report = () => {
  const cut = [];
  const vw = document.documentElement.clientWidth;
  document.querySelectorAll('div.math > mjx-container').forEach(box => {
    // what the reader can see of the equation: its own box, inside div.math (which clips), inside the window
    const b = box.getBoundingClientRect(), c = box.parentElement.getBoundingClientRect();
    const seenLeft = Math.max(b.left, c.left, 0), seenRight = Math.min(b.right, c.right, vw);
    const glyphs = Array.from(box.querySelectorAll('mjx-math mjx-c')).map(g => g.getBoundingClientRect())
      .filter(r => r.width > 0);
    if (!glyphs.length) return;
    const left = Math.min(...glyphs.map(r => r.left)), right = Math.max(...glyphs.map(r => r.right));
    const scrollable = scrolls(box) && b.left >= seenLeft - 1 && b.right <= seenRight + 1;
    if (left < seenLeft - 1) cut.push(`equation "${what(box)}": ${Math.round(seenLeft - left)} px lost on the left`);
    if (right > seenRight + 1 && !scrollable) cut.push(`equation "${what(box)}": cut on the right`);
  });
  document.querySelectorAll('article table, article img, article pre, article input, article svg').forEach(el => {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || el.closest('mjx-container')) return;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX === 'visible') continue;
      const b = a.getBoundingClientRect();
      if (r.left < b.left - 1 || (r.right > b.right + 1 && !scrolls(a)))
        cut.push(`${name(el)} "${what(el)}" cut by ${name(a)}`);
      break;
    }
  });
  const page = document.documentElement;
  if (page.scrollWidth > page.clientWidth + 1) {
    const wide = Array.from(document.querySelectorAll('body *')).filter(el => {
      const r = el.getBoundingClientRect(), p = el.parentElement.getBoundingClientRect();
      return r.width > 0 && r.right > vw + 1 && p.right <= vw + 1;
    }).map(el => `${name(el)} "${what(el)}"`);
    cut.push(`the page is ${page.scrollWidth} px wide in a ${page.clientWidth} px window: ${wide.slice(0, 5)}`);
  }
  done(cut);
};
(window.MathJax && MathJax.startup && MathJax.startup.promise ? MathJax.startup.promise : Promise.resolve())
  .then(() => setTimeout(report, 100), e => done(['MathJax failed: ' + e]));
"""


@pytest.mark.parametrize("width", [360, 768, 1280, 1920])
def test_nothing_is_cut_off_at_phone_tablet_and_desktop_widths(browser, site: str, width: int) -> None:
    browser.set_window_size(width, 900)
    try:
        problems = []
        for doc in toc_files():
            browser.get(urllib.parse.urljoin(site, f"{doc}.html"))
            problems += [f"{doc} at {width} px: {p}" for p in browser.execute_async_script(_CUT_OFF_JS)]
    finally:
        browser.set_window_size(1280, 1000)
    assert not problems, "\n".join(problems)
