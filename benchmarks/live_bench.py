"""The live panel's sampler in headless Chromium against PyTorch on one CPU thread, on this machine, in one run.

The work: DDIM with S = 50 steps (η = 0) for 16 images of the book's Fashion-MNIST network (``fashion``).

* **chromium**: ``window.ddpmLive.sample`` (book/_static/ddpm_live.js) on ONNX Runtime Web (WebAssembly, SIMD, one
  ORT thread a session: a static host is not cross-origin isolated), timed in the page with ``performance.now``
  (the model is loaded before the clock starts), on a site built and served from 127.0.0.1 as
  tests/test_live_panel.py builds it; twice: with the network in the panel's Web Workers (its default: one a core,
  at most 4, the batch split between them) and on the page's own thread (its fallback).
  The same in workers with the network exported as written (``export_onnx(..., subpixel=False)``: nearest
  upsampling, then a 3×3 conv at the doubled size), to measure what ``SubpixelUpsample`` saves.
* **ceiling**: the rate of ONNX Runtime Web's convolution in this browser, measured on the network's largest conv
  (64 → 64 channels, 3×3, 28 × 28, batch 8: one worker's half of the batch), alone in one worker and in two
  workers at once. The network's conv multiply-adds (``torch.utils.flop_counter``) over the two-worker rate are
  the least time the work can take in this browser if every conv ran at that rate and nothing else cost
  anything.
* **torch (peer)**: ``samplers.sample_loop`` on the same network in PyTorch, ``torch.set_num_threads(1)``.
* **onnxruntime (python)**: the same ONNX file in Python's onnxruntime on one thread, the network calls only
  (50 calls at batch 16), to separate the runtime from the page's own arithmetic.

Each is run once to warm up, then timed five times. Prints a table and writes
``benchmarks/results/live_<date>.json`` (or ``--out``) with the machine's description.

Usage::

    python benchmarks/live_bench.py                 # exports the models (~20 s), then ~1 min
    python benchmarks/live_bench.py --assets DIR    # keep the exported model in DIR and reuse it next time
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_lib import viz  # noqa: E402
from ddpm_lib.loading import load_book_model  # noqa: E402
from ddpm_lib.onnx_export import export_onnx, with_subpixel_upsampling  # noqa: E402
from ddpm_lib.samplers import sample_loop  # noqa: E402

ORT_DIST = ROOT / "node_modules" / "onnxruntime-web" / "dist"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODEL, STEPS, N_IMAGES, REPEATS = "fashion", 50, 16, 5
PLAIN = "fashion_as_written"  # the same network exported without SubpixelUpsample
PROBE_SHAPE, PROBE_RUNS = (8, 64, 28, 28), 40  # the network's largest conv, at one worker's half of the batch
PROBE_WORKER = """
self.onmessage = async (e) => {
  if (e.data.go) {
    const t0 = performance.now();
    for (let i = 0; i < e.data.runs; i++) await self.session.run({x: self.x});
    self.postMessage({seconds: (performance.now() - t0) / 1000});
    return;
  }
  const ort = await import(e.data.ort);
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL("./", e.data.ort).href;
  self.session = await ort.InferenceSession.create(e.data.model);
  const n = e.data.shape.reduce((a, b) => a * b, 1);
  self.x = new ort.Tensor("float32", new Float32Array(n).map((_, i) => Math.sin(i)), e.data.shape);
  for (let i = 0; i < 10; i++) await self.session.run({x: self.x});  // the wasm code tiers up
  self.postMessage({ready: true});
};
"""
PROBE_SCRIPT = """
const done = arguments[arguments.length - 1], [k, shape, runs] = arguments;
const base = new URL("../", location.href);
const workers = Array.from({length: k}, () => new Worker(new URL("probe_worker.mjs", base), {type: "module"}));
const next = (w) => new Promise((ok, bad) => { w.onmessage = (e) => ok(e.data); w.onerror = (e) => bad(e.message); });
(async () => {
  const ready = workers.map(next);
  workers.forEach((w) => w.postMessage({ort: new URL("_static/live/ort/ort.wasm.min.mjs", base).href,
                                        model: new URL("probe_conv.onnx", base).href, shape}));
  await Promise.all(ready);
  const timed = workers.map(next);
  workers.forEach((w) => w.postMessage({go: true, runs}));
  const seconds = (await Promise.all(timed)).map((r) => r.seconds);
  workers.forEach((w) => w.terminate());
  return seconds;
})().then(done, (e) => done({error: String(e)}));
"""


def build_site(root: Path, assets: Path) -> Path:
    """The site the benchmark loads: the live files as the book's build writes them (``write_live_assets``; the
    model is exported into ``assets`` once and reused while the weights are unchanged) and ddpm_live.js."""
    from ddpm_lib.onnx_export import write_live_assets

    live = write_live_assets(assets, ORT_DIST, (MODEL,))
    shutil.copytree(live, root / "_static" / "live")
    export_onnx(load_book_model(name=MODEL).model, root / "_static" / "live" / f"{PLAIN}.onnx", subpixel=False)
    shutil.copy(live / f"{MODEL}.json", root / "_static" / "live" / f"{PLAIN}.json")
    shutil.copy(ROOT / "book" / "_static" / "ddpm_live.js", root / "_static" / "ddpm_live.js")
    (root / "probe_worker.mjs").write_text(PROBE_WORKER, encoding="utf8")
    conv = torch.nn.Conv2d(PROBE_SHAPE[1], PROBE_SHAPE[1], 3, padding=1).eval()
    with torch.no_grad():
        torch.onnx.export(conv, (torch.zeros(PROBE_SHAPE),), str(root / "probe_conv.onnx"), dynamo=True,
                          opset_version=18, external_data=False, input_names=["x"])
    (root / "chapter").mkdir()
    (root / "chapter" / "bench.html").write_text(
        '<!DOCTYPE html>\n<html data-content_root="../"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>live bench</title></head><body>\n{viz.live_panel(MODEL, steps=STEPS)}\n</body></html>\n",
        encoding="utf8")
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm"}

    def log_message(self, *args):
        pass


def chromium_times(site: Path) -> tuple[dict[str, list[float]], dict]:
    """Seconds of each repeat in Chromium, by where the network runs: Web Workers (the panel's default, one a
    core up to 4), alternating with the network as written (``PLAIN``, in workers of its own), and the page's
    own thread (``settings.workers = 0``, the fallback); the conv probe's seconds (one worker, then two at once);
    and the browser's details."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
              "--disable-dev-shm-usage"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    times, info = {}, {"browser_version": driver.capabilities.get("browserVersion")}
    try:
        driver.set_script_timeout(600)
        page = f"http://127.0.0.1:{httpd.server_address[1]}/chapter/bench.html"
        for k in (1, 2):
            driver.get(page)
            out = driver.execute_async_script(PROBE_SCRIPT, k, list(PROBE_SHAPE), PROBE_RUNS)
            if isinstance(out, dict):
                raise RuntimeError(out["error"])
            info[f"conv_probe_s ({k} worker{'s' if k > 1 else ''} at once)"] = out
        for workers, models in ((None, (MODEL, PLAIN)), (0, (MODEL,))):
            driver.get(page)  # a fresh module
            for _ in range(600):
                if driver.execute_script("return !!window.ddpmLive"):
                    break
                time.sleep(0.05)
            out = driver.execute_async_script(
                "const done = arguments[arguments.length - 1], [models, steps, n, repeats, workers] = arguments;"
                "window.ddpmLive.settings.workers = workers;"
                "(async () => { const times = {}, where = {};"
                "  for (let r = 0; r <= repeats; r++) for (const model of models) {"  # paired: the graphs alternate
                "    const t0 = performance.now();"
                "    const res = await window.ddpmLive.sample({model, sampler: 'ddim', steps, eta: 0, n, seed: r});"
                "    (times[model] = times[model] || []).push({inside: res.seconds,"
                "                                              outside: (performance.now() - t0) / 1000});"
                "    where[model] = res.where;"
                "  }"
                "  return {times, where, isolated: !!self.crossOriginIsolated, threads: navigator.hardwareConcurrency,"
                "          ua: navigator.userAgent};"
                "})().then(done, e => done({error: String(e)}));", list(models), STEPS, N_IMAGES, REPEATS, workers)
            if "error" in out:
                raise RuntimeError(out["error"])
            for model in models:
                where = out["where"][model] + (", network as written" if model == PLAIN else "")
                times[where] = [t["inside"] for t in out["times"][model][1:]]
                info[f"warmup_s_including_model_load ({where})"] = out["times"][model][0]["outside"]
            info |= {"user_agent": out["ua"], "cross_origin_isolated": out["isolated"],
                     "hardware_concurrency": out["threads"], "ort_wasm_threads_per_session": 1}
        return times, info
    finally:
        driver.quit()
        httpd.shutdown()
        httpd.server_close()


def torch_times() -> list[float]:
    torch.set_num_threads(1)
    book = load_book_model(name=MODEL)
    times = []
    for r in range(REPEATS + 1):
        g = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        sample_loop(book.diffusion, book.model, (N_IMAGES, 1, 28, 28), sampler="ddim", steps=STEPS, eta=0.0,
                    generator=g)
        times.append(time.perf_counter() - t0)
    return times[1:]


def onnxruntime_times(onnx_path: Path) -> list[float] | None:
    try:
        import numpy as np
        import onnxruntime
    except ImportError:
        return None
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((N_IMAGES, 1, 28, 28)).astype(np.float32)
    times = []
    for _ in range(REPEATS + 1):
        t0 = time.perf_counter()
        for i in range(STEPS):
            sess.run(["eps"], {"x": x, "t": np.full((N_IMAGES,), 999 - 20 * i, dtype=np.int64)})
        times.append(time.perf_counter() - t0)
    return times[1:]


def conv_flops_per_image() -> float:
    """The exported network's convolution FLOPs (2 × multiply-adds) for one image, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    net = with_subpixel_upsampling(load_book_model(name=MODEL).model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))
    return float(counter.get_flop_counts()["Global"][torch.ops.aten.convolution])


def ceiling(info: dict) -> dict:
    """The conv rate in the browser (GFLOP/s, one worker alone and two at once, summed) and the least seconds the
    work's convolutions take at the two-worker rate."""
    probe = 2 * PROBE_SHAPE[0] * PROBE_SHAPE[2] * PROBE_SHAPE[3] * PROBE_SHAPE[1] * PROBE_SHAPE[1] * 9 * PROBE_RUNS
    one = probe / info["conv_probe_s (1 worker at once)"][0] / 1e9
    two = sum(probe / s for s in info["conv_probe_s (2 workers at once)"]) / 1e9
    work = conv_flops_per_image() * N_IMAGES * STEPS
    return {"conv_gflops_1_worker": one, "conv_gflops_2_workers_summed": two, "work_conv_gflop": work / 1e9,
            "least_s_at_2_worker_rate": work / 1e9 / two}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, help="where to keep the exported model between runs (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="the JSON report (default benchmarks/results/live_<date>.json)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = build_site(Path(tmp) / "site", args.assets or Path(tmp) / "assets")
        chrome, browser_info = chromium_times(site)
        ort_py = onnxruntime_times(site / "_static" / "live" / f"{MODEL}.onnx")
    peer = torch_times()
    rows = [(f"chromium: ddpmLive.sample, network in {where}", t) for where, t in chrome.items()]
    rows.append(("torch (peer): sample_loop, 1 thread", peer))
    if ort_py is not None:
        rows.append(("onnxruntime (python), 1 thread: network calls only", ort_py))
    print(f"DDIM, S = {STEPS}, η = 0, {N_IMAGES} images of {MODEL!r}: seconds, {REPEATS} repeats after a warm-up")
    print(f"{'':56s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name, t in rows:
        print(f"{name:56s} {statistics.median(t):8.2f} {min(t):8.2f} {max(t):8.2f}")
    best = statistics.median(rows[0][1])  # the panel's default
    bound = ceiling(browser_info)
    print(f"chromium (default) / torch: {best / statistics.median(peer):.2f}×; "
          f"goal < 5 s in Chromium: {'met' if best < 5 else 'NOT met'} ({best:.2f} s)")
    print(f"conv rate in Chromium: {bound['conv_gflops_1_worker']:.1f} GFLOP/s in one worker, "
          f"{bound['conv_gflops_2_workers_summed']:.1f} in two at once; the work's convolutions "
          f"({bound['work_conv_gflop']:.0f} GFLOP) take ≥ {bound['least_s_at_2_worker_rate']:.2f} s at that rate")
    date = datetime.date.today().isoformat()
    report = {
        "date": date, "work": {"model": MODEL, "sampler": "ddim", "steps": STEPS, "eta": 0.0, "images": N_IMAGES,
                               "repeats": REPEATS, "warmup": 1},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime_web": json.loads((ORT_DIST.parent / "package.json").read_text())["version"],
                    **browser_info},
        "seconds": {**{f"chromium_{w}": t for w, t in chrome.items()}, "torch_1_thread": peer,
                    "onnxruntime_python_1_thread_network_only": ort_py},
        "median_s": {name: statistics.median(t) for name, t in rows},
        "ceiling": bound,
        "goal_s": 5.0,
    }
    try:
        import onnxruntime
        report["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out = args.out or ROOT / "benchmarks" / "results" / f"live_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
