"""The live sampling panel (book/_static/ddpm_live.js) in headless Chromium: the page's sampler gives ddpm_lib's
samples from the same x_T and noise (DDIM η = 0 and 1, Algorithm 2, guidance), and the panel runs, draws, scrubs,
stops and falls back, with no console error and no request beyond the local server.

The test builds its own small site (the book's two networks exported to ONNX, ONNX Runtime Web from node_modules,
one page with two ``viz.live_panel`` outputs), serves it from 127.0.0.1 and drives Chromium offline. It is skipped
when Chromium, chromedriver, selenium or node_modules is missing, unless DDPM_REQUIRE_BROWSER=1 (then it fails).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ORT_DIST = ROOT / "node_modules" / "onnxruntime-web" / "dist"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHAPE = (4, 1, 28, 28)  # the precision checks sample 4 images
TOL = 1e-3

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for p in (CHROMIUM, CHROMEDRIVER):
        if not p.exists():
            return f"{p} is missing"
    from ddpm_lib.onnx_export import ORT_FILES

    for f in ORT_FILES:
        if not (ORT_DIST / f).is_file():
            return f"{ORT_DIST / f} is missing (npm ci)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _need_browser():
    why = _missing()
    if why:
        if os.environ.get("DDPM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DDPM_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)


# --------------------------------------------------------------------------------------------- the site


def page_html(body: str, content_root: str = "../") -> str:
    return (f'<!DOCTYPE html>\n<html data-content_root="{content_root}"><head><meta charset="utf-8">'
            '<link rel="icon" href="data:,"><title>live panel test</title></head>\n<body>\n'
            f'<button id="other" type="button" onclick="this.dataset.clicks=(+this.dataset.clicks||0)+1">other</button>'
            f"\n{body}\n</body></html>\n")


def build_site(root: Path) -> Path:
    """A site laid out like the built book (the build's own ``write_live_assets``): _static/ddpm_live.js,
    _static/live/{models, JSON}, _static/live/ort/."""
    from ddpm_lib import viz
    from ddpm_lib.onnx_export import write_live_assets

    write_live_assets(root / "_static", ORT_DIST)
    shutil.copy(ROOT / "book" / "_static" / "ddpm_live.js", root / "_static" / "ddpm_live.js")
    body = (viz.live_panel("fashion", sampler="ddim", steps=10, title="unconditional")
            + "\n" + viz.live_panel("fashion_cond", sampler="ddim", steps=10, label=7, guidance=2.0,
                                    title="conditional"))
    (root / "chapter").mkdir(exist_ok=True)
    (root / "chapter" / "live.html").write_text(page_html(body), encoding="utf8")
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                      ".json": "application/json"}

    def log_message(self, *args):
        pass


class Server:
    """http.server on 127.0.0.1 (a free port) in a thread, serving ``root``."""

    def __init__(self, root: Path):
        handler = functools.partial(_Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium(wasm: bool = True):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
              "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_script_timeout(600)
    if not wasm:  # a browser without WebAssembly, before any script of the page runs
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.WebAssembly;"})
    return driver


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("live_site"))


@pytest.fixture(scope="module")
def server(site):
    s = Server(site)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(server):
    driver = chromium()
    driver.get(server.url + "chapter/live.html")
    wait_for(driver, "return !!(window.ddpmLive && document.querySelectorAll('.ddpm-live-panel').length === 2)")
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 120.0, poll: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for: {script}")


def run_sample(driver, options: dict) -> dict:
    """window.ddpmLive.sample(options) in the page; returns its result (or raises with the page's error)."""
    out = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.ddpmLive.sample(arguments[0]).then(r => done({ok: r}), e => done({error: String(e && e.stack || e)}));",
        options)
    if "error" in out:
        raise AssertionError(f"the page's sample() failed: {out['error']}")
    return out["ok"]


def severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def flat(x: torch.Tensor) -> list[float]:
    return x.double().reshape(-1).tolist()


@functools.cache
def book(name: str):
    from ddpm_lib.loading import load_book_model

    return load_book_model(name=name)


def max_diff(got: list[float], want: torch.Tensor) -> float:
    return float((torch.tensor(got, dtype=torch.float64) - want.double().reshape(-1)).abs().max())


# --------------------------------------------------------------------------------------------- the sampler


def reference(name: str, seed: int, *, sampler: str, eta: float = 0.0, steps: int | None = None,
              t_start: int | None = None, x_T: torch.Tensor | None = None, y: int | None = None, w: float = 0.0):
    """ddpm_lib's sample_loop from a seeded generator: x_0 and the last step's x̂_0; and the same draws (x_T when
    not given, then one z per step that draws one) as the page's x and noise."""
    from ddpm_lib.samplers import sample_loop, sampling_timesteps

    b = book(name)
    kw = dict(sampler=sampler, eta=eta, steps=steps, t_start=t_start, x_T=x_T)
    if y is not None:
        kw |= dict(y=y, guidance_scale=w)
    tau = sampling_timesteps(b.diffusion.num_timesteps, sampler, steps, None, "uniform", eta, t_start)
    x0, traj = sample_loop(b.diffusion, b.model, SHAPE, keep_steps=[tau[-1]],
                           generator=torch.Generator().manual_seed(seed), **kw)
    g = torch.Generator().manual_seed(seed)  # the same stream, drawn as the library draws it
    xs = x_T if x_T is not None else torch.randn(SHAPE, generator=g)
    draws = len(tau) if sampler == "ddpm" else (0 if eta == 0 else len(tau) - 1)  # DDIM: none on the step to x_0
    noise = [flat(torch.randn(SHAPE, generator=g)) for _ in range(draws)]
    return tau, flat(xs), noise, x0, traj["pred_x0"][-1]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_ddpm_lib(browser, eta) -> None:
    tau, x, noise, want_x0, want_pred = reference("fashion", 11, sampler="ddim", steps=10, eta=eta)
    got = run_sample(browser, {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": eta, "x": x,
                               "noise": noise or None})
    assert got["timesteps"] == tau and got["steps"] == 10 and not got["stopped"]
    assert got["where"].endswith(("worker", "workers"))  # the network runs off the page's thread
    assert max_diff(got["x0"], want_x0) < TOL
    assert max_diff(got["pred_x0"], want_pred) < TOL
    assert severe_logs(browser) == []


def test_algorithm2_short_chain_matches_ddpm_lib(browser) -> None:
    b = book("fashion")
    g = torch.Generator().manual_seed(5)
    x_start = b.diffusion.q_sample(torch.rand(SHAPE, generator=g) * 2 - 1, torch.full((SHAPE[0],), 30),
                                   noise=torch.randn(SHAPE, generator=g))  # an x_t at index 30
    tau, x, noise, want_x0, want_pred = reference("fashion", 12, sampler="ddpm", t_start=30, x_T=x_start)
    assert tau == list(range(30, -1, -1)) and len(noise) == 31
    got = run_sample(browser, {"model": "fashion", "sampler": "ddpm", "timesteps": tau, "x": x, "noise": noise})
    assert got["steps"] == 31
    assert max_diff(got["x0"], want_x0) < TOL
    assert max_diff(got["pred_x0"], want_pred) < TOL


def test_guided_conditional_matches_ddpm_lib(browser) -> None:
    tau, x, noise, want_x0, want_pred = reference("fashion_cond", 13, sampler="ddim", steps=10, eta=0.0, y=3,
                                                  w=2.0)
    got = run_sample(browser, {"model": "fashion_cond", "sampler": "ddim", "steps": 10, "eta": 0, "x": x,
                               "y": 3, "w": 2.0})
    assert max_diff(got["x0"], want_x0) < TOL
    assert max_diff(got["pred_x0"], want_pred) < TOL
    # and guidance matters: w = 0 gives another picture
    plain = run_sample(browser, {"model": "fashion_cond", "sampler": "ddim", "steps": 10, "x": x, "y": 3, "w": 0})
    assert max_diff(plain["x0"], want_x0) > 0.05


def test_two_chains_at_once_on_one_model(browser) -> None:
    """Two chains of one model running together (two panels) share its workers and both stay exact."""
    tau, x, noise, want_x0, _ = reference("fashion", 15, sampler="ddim", steps=10, eta=1.0)
    out = browser.execute_async_script(
        "const done = arguments[arguments.length - 1], o = arguments[0];"
        "Promise.all([window.ddpmLive.sample(o), window.ddpmLive.sample(o)]).then(done, e => done(String(e)));",
        {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": 1, "x": x, "noise": noise})
    assert isinstance(out, list), out
    for got in out:
        assert max_diff(got["x0"], want_x0) < TOL


def test_seeded_prng_is_deterministic(browser) -> None:
    a = run_sample(browser, {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": 1, "seed": 3, "n": 2})
    b = run_sample(browser, {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": 1, "seed": 3, "n": 2})
    c = run_sample(browser, {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": 1, "seed": 4, "n": 2})
    assert a["x0"] == b["x0"] and a["x0"] != c["x0"] and len(a["x0"]) == 2 * 784
    stats = browser.execute_script(
        "const z = new window.ddpmLive.Normal(1).fill(200000); let m = 0, v = 0;"
        "for (const u of z) { m += u; v += u * u; } m /= z.length; return [m, v / z.length - m * m];")
    assert abs(stats[0]) < 0.01 and abs(stats[1] - 1) < 0.01


def test_bad_options_reject(browser) -> None:
    for opts, words in (({"model": "fashion", "sampler": "ddim", "steps": 7}, "not offered"),
                        ({"model": "fashion", "eta": 2}, "eta"),
                        ({"model": "fashion", "y": 1}, "unconditional"),
                        ({"model": "fashion_cond", "y": 11}, "y=11")):
        with pytest.raises(AssertionError, match=words):
            run_sample(browser, opts)


# --------------------------------------------------------------------------------------------- the panel


PANEL = "document.querySelectorAll('div.ddpm-live')[{i}]"


def panel_js(i: int, expr: str) -> str:
    return f"const p = {PANEL.format(i=i)}; return {expr};"


def set_control(driver, i: int, cls: str, value, event: str = "change") -> None:
    driver.execute_script(
        f"const p = {PANEL.format(i=i)}; const c = p.querySelector('.{cls}'); c.value = arguments[0];"
        f"c.dispatchEvent(new Event('{event}', {{bubbles: true}}));", str(value))


def test_panel_runs_draws_and_scrubs(browser) -> None:
    assert browser.execute_script(panel_js(0, "getComputedStyle(p.querySelector('.ddpm-live-fallback')).display"))\
        == "none"
    blank = browser.execute_script(panel_js(0, "p.querySelector('canvas.ddpm-live-x0').toDataURL()"))
    set_control(browser, 0, "ddpm-live-sampler", "ddim")
    set_control(browser, 0, "ddpm-live-steps", 10)
    set_control(browser, 0, "ddpm-live-eta", 0.5, "input")
    browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-run').click()"))
    # the page stays usable while the chain runs: another button answers
    browser.execute_script("document.getElementById('other').click()")
    wait_for(browser, panel_js(0, "!p.querySelector('.ddpm-live-run').disabled && "
                                  "/step 10 of 10/.test(p.querySelector('.ddpm-live-progress').textContent)"))
    assert browser.execute_script("return document.getElementById('other').dataset.clicks") == "1"
    assert browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-message').textContent")) == ""
    end_xt, end_x0 = browser.execute_script(panel_js(
        0, "[p.querySelector('canvas.ddpm-live-xt').toDataURL(), p.querySelector('canvas.ddpm-live-x0').toDataURL()]"))
    assert end_x0 != blank and end_xt != blank
    scrub_max = browser.execute_script(panel_js(0, "+p.querySelector('.ddpm-live-scrub').max"))
    assert scrub_max == 10  # every DDIM step's x_t, and x_0
    set_control(browser, 0, "ddpm-live-scrub", 0, "input")
    first_xt = browser.execute_script(panel_js(0, "p.querySelector('canvas.ddpm-live-xt').toDataURL()"))
    assert first_xt != end_xt  # x_T is noise, x_0 is not
    assert browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-scrub-label').textContent")) == "t = 901"
    set_control(browser, 0, "ddpm-live-scrub", 5, "input")
    assert browser.execute_script(panel_js(0, "p.querySelector('canvas.ddpm-live-xt').toDataURL()")) != first_xt
    assert severe_logs(browser) == []


def test_conditional_panel_runs(browser) -> None:
    assert browser.execute_script(panel_js(1, "p.querySelector('.ddpm-live-class').value")) == "7"
    assert browser.execute_script(panel_js(1, "p.querySelector('.ddpm-live-guidance').value")) == "2"
    names = browser.execute_script(panel_js(1, "[...p.querySelectorAll('.ddpm-live-class option')]"
                                               ".map(o => o.textContent)"))
    assert names[0] == "T-shirt/top" and names[-2:] == ["Ankle boot", "none"] and len(names) == 11
    browser.execute_script(panel_js(1, "p.querySelector('.ddpm-live-run').click()"))
    wait_for(browser, panel_js(1, "!p.querySelector('.ddpm-live-run').disabled && "
                                  "/step 10 of 10/.test(p.querySelector('.ddpm-live-progress').textContent)"))
    assert browser.execute_script(panel_js(1, "p.querySelector('.ddpm-live-message').textContent")) == ""


def run_panel(driver, i: int) -> dict:
    """Click panel i's Run and return the detail of its "ddpm-live-result" event: the options its controls gave
    sample(), and the result."""
    out = driver.execute_async_script(
        "const done = arguments[arguments.length - 1], p = document.querySelectorAll('div.ddpm-live')[arguments[0]];"
        "p.addEventListener('ddpm-live-result', e => done(e.detail), {once: true});"
        "p.querySelector('.ddpm-live-run').click();", i)
    assert driver.execute_script(panel_js(i, "p.querySelector('.ddpm-live-message').textContent")) == ""
    return out


def test_panel_controls_reach_the_sampler(browser) -> None:
    """Class, guidance scale, η, S and seed as set in the conditional panel are what it samples with; its picture is
    what sample() gives for those options; another w gives another picture; Algorithm 2 greys out S and η."""
    set_control(browser, 1, "ddpm-live-sampler", "ddim")
    set_control(browser, 1, "ddpm-live-steps", 10)
    set_control(browser, 1, "ddpm-live-eta", 0.3, "input")
    set_control(browser, 1, "ddpm-live-seed", 4)
    set_control(browser, 1, "ddpm-live-class", 3)
    set_control(browser, 1, "ddpm-live-guidance", 1.5, "input")
    assert browser.execute_script(panel_js(1, "[...p.querySelectorAll('output')].map(o => o.textContent)"))[:2] \
        == ["0.30", "1.5"]
    got = run_panel(browser, 1)
    n = got["options"]["n"]
    assert got["options"] == {"model": "fashion_cond", "sampler": "ddim", "steps": 10, "eta": 0.3, "n": n,
                              "seed": 4, "y": 3, "w": 1.5}
    assert got["result"]["steps"] == 10 and not got["result"]["stopped"]
    again = run_sample(browser, got["options"])  # the same seed draws the same noise: the same images
    assert max_diff(got["result"]["x0"], torch.tensor(again["x0"], dtype=torch.float64)) == 0
    set_control(browser, 1, "ddpm-live-guidance", 0, "input")
    assert max_diff(run_panel(browser, 1)["result"]["x0"], torch.tensor(again["x0"], dtype=torch.float64)) > 0.05
    set_control(browser, 1, "ddpm-live-class", 7)
    set_control(browser, 1, "ddpm-live-sampler", "ddpm")
    assert browser.execute_script(panel_js(1, "[p.querySelector('.ddpm-live-steps').disabled,"
                                              " p.querySelector('.ddpm-live-eta').disabled]")) == [True, True]
    set_control(browser, 1, "ddpm-live-sampler", "ddim")
    assert severe_logs(browser) == []


def test_stop_halts_algorithm2(browser) -> None:
    set_control(browser, 0, "ddpm-live-sampler", "ddpm")
    browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-run').click()"))
    wait_for(browser, panel_js(0, "/step ([3-9]|\\d\\d+) of 1000/.test("
                                  "p.querySelector('.ddpm-live-progress').textContent)"))
    browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-stop').click()"))
    wait_for(browser, panel_js(0, "!p.querySelector('.ddpm-live-run').disabled"), timeout=30)
    text = browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-progress').textContent"))
    k = int(text.split()[1])
    assert "stopped" in text and 3 <= k < 1000, text
    assert browser.execute_script(panel_js(0, "+p.querySelector('.ddpm-live-scrub').max")) >= 0
    assert browser.execute_script(panel_js(0, "p.querySelector('.ddpm-live-scrub').disabled")) is False
    assert severe_logs(browser) == []


def test_no_request_left_the_local_server(browser, server) -> None:
    urls = browser.execute_async_script(  # the page's resource entries and its sampling workers'
        "const done = arguments[arguments.length - 1]; window.ddpmLive.resources().then(u => done(u.concat("
        "performance.getEntriesByType('navigation').map(e => e.name))), e => done(['error: ' + e]));")
    assert urls and all(u.startswith(server.url) for u in urls), [u for u in urls if not u.startswith(server.url)]
    assert any(u.endswith("/_static/live/fashion.onnx") for u in urls)
    assert any(u.endswith("/_static/live/ort/ort-wasm-simd-threaded.wasm") for u in urls)
    assert severe_logs(browser) == []


# --------------------------------------------------------------------------------------------- fallbacks


def test_without_webassembly_the_panel_says_the_pictures_are_precomputed(server) -> None:
    driver = chromium(wasm=False)
    try:
        driver.get(server.url + "chapter/live.html")
        texts = wait_for(driver, "const f = [...document.querySelectorAll('.ddpm-live-fallback')];"
                                 "return f.every(e => /WebAssembly, which this browser lacks/.test(e.textContent))"
                                 " && f.map(e => e.textContent);")
        assert all("precomputed" in t for t in texts)
        assert driver.execute_script("return document.querySelectorAll('.ddpm-live-panel').length") == 0
        assert severe_logs(driver) == []
    finally:
        driver.quit()


def test_when_ort_cannot_load_run_says_so(tmp_path, site) -> None:
    root = tmp_path / "site"
    shutil.copytree(site, root)  # the same site, with ONNX Runtime's module broken
    shutil.rmtree(root / "_static" / "live" / "ort")
    (root / "_static" / "live" / "ort").mkdir()
    (root / "_static" / "live" / "ort" / "ort.wasm.min.mjs").write_text("export const broken = 1;\n")
    s = Server(root)
    driver = chromium()
    try:
        driver.get(s.url + "chapter/live.html")
        wait_for(driver, "return document.querySelectorAll('.ddpm-live-panel').length === 2")
        driver.execute_script(panel_js(0, "p.querySelector('.ddpm-live-run').click()"))
        msg = wait_for(driver, panel_js(0, "p.querySelector('.ddpm-live-message').textContent"), timeout=30)
        assert "precomputed" in msg
        assert driver.execute_script(panel_js(0, "p.querySelector('.ddpm-live-run').disabled")) is False
        assert severe_logs(driver) == []
    finally:
        driver.quit()
        s.close()


def test_network_on_the_page_thread_matches_too(server) -> None:
    """With settings.workers = 0 (as where Web Workers cannot start) the network runs on the page's thread."""
    tau, x, noise, want_x0, want_pred = reference("fashion", 14, sampler="ddim", steps=10, eta=1.0)
    driver = chromium()
    try:
        driver.get(server.url + "chapter/live.html")
        wait_for(driver, "return !!window.ddpmLive")
        driver.execute_script("window.ddpmLive.settings.workers = 0")
        got = run_sample(driver, {"model": "fashion", "sampler": "ddim", "steps": 10, "eta": 1, "x": x,
                                  "noise": noise})
        assert got["where"] == "page"
        assert max_diff(got["x0"], want_x0) < TOL and max_diff(got["pred_x0"], want_pred) < TOL
        assert severe_logs(driver) == []
    finally:
        driver.quit()


def test_constants_served_are_the_exported_ones(site) -> None:
    info = json.loads((site / "_static" / "live" / "fashion_cond.json").read_text(encoding="utf8"))
    assert info["inputs"] == ["x", "t", "y"] and info["num_classes"] == 10
    assert sorted(info["ddim_timesteps"], key=int) == ["10", "20", "50", "100"]
