// The book's live sampling panel: Algorithm 2 (Ho et al. 2020) and DDIM (Song et al. 2021) run in the reader's
// browser on the book's own networks, exported to ONNX (ddpm_lib/onnx_export.py) and run by ONNX Runtime Web.
//
// An ES module with no build step and no dependency but ONNX Runtime Web, which it loads on the first Run from
// <this folder>/live/ort/ (ort.wasm.min.mjs with ort-wasm-simd-threaded.{mjs,wasm} beside it); each model is
// <this folder>/live/<name>.onnx with its sampler constants in <name>.json. Nothing is fetched from elsewhere.
//
// The arithmetic of one step follows tests/test_onnx_export.py::_JsonSampler line for line, in float64 from the
// exported constants (0-based indices; x̂_0 clipped to [−1, 1]; no noise at index 0; DDIM's last step goes to
// ᾱ = 1). Guidance is ddpm_lib.guidance.Guided: ε̃ = (1 + w) ε(x, y) − w ε(x, ∅), both from one network call
// on the doubled batch (w = 0: one call with y).
//
// Noise: xoshiro128** (Blackman & Vigna) seeded by splitmix32 from the integer seed; uniforms with 53 bits from
// two 32-bit outputs; normals by Box–Muller (both of each pair used, cos then sin). x_T is drawn first, then one z
// per step, drawn at every step (used or not), so a chain's noise depends on the seed and the step alone.
//
// The network runs in Web Workers that load this same module (one a core, at most 4, each with one ONNX Runtime
// thread: a static host is not cross-origin isolated, so ORT's own threads are not available), the batch split
// between them; the page's thread only does the step arithmetic and the drawing, so it stays responsive. Where
// workers cannot start, the network runs on the page's thread, yielding to the event loop between steps.
//
// Exports mountAll() (mounts every div.ddpm-live), sample(options) (the sampler without the UI, which the panel's
// Run uses too), resources() (every URL the page and its workers fetched) and settings ({workers}); all are also
// on window.ddpmLive. A panel's div fires "ddpm-live-result" after each Run, with detail {options (the sample()
// options its controls gave), result (what sample() returned)}.

const CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
  "Ankle boot"];
const HERE = new URL(".", import.meta.url);           // <content_root>/_static/
const LIVE = new URL("live/", HERE);                  // models and constants
const ORT_DIR = new URL("live/ort/", HERE);           // ONNX Runtime Web
const FALLBACK = "The pictures above are precomputed; they are the book's.";

// ------------------------------------------------------------------------------------------- random numbers

function splitmix32(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

/** A seeded N(0, 1) stream: xoshiro128** seeded by splitmix32, Box–Muller on 53-bit uniforms. */
export class Normal {
  constructor(seed) {
    const sm = splitmix32(Number(seed) >>> 0);
    this.s = new Uint32Array([sm(), sm(), sm(), sm()]);
    if (!(this.s[0] | this.s[1] | this.s[2] | this.s[3])) this.s[0] = 1;
    this.spare = null;
  }
  nextU32() {
    const s = this.s;
    const r = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl(s[3], 11);
    return r;
  }
  uniform() { // in [0, 1), 53 bits
    return ((this.nextU32() >>> 5) * 67108864 + (this.nextU32() >>> 6)) / 9007199254740992;
  }
  next() {
    if (this.spare !== null) { const z = this.spare; this.spare = null; return z; }
    const u1 = 1 - this.uniform();                  // in (0, 1]: log is finite
    const u2 = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u1));
    this.spare = r * Math.sin(2 * Math.PI * u2);
    return r * Math.cos(2 * Math.PI * u2);
  }
  fill(n) { const a = new Float64Array(n); for (let i = 0; i < n; i++) a[i] = this.next(); return a; }
}

function rotl(x, k) { return ((x << k) | (x >>> (32 - k))) >>> 0; }

// ------------------------------------------------------------------------------------------- loading

let ortPromise = null;
const models = new Map();
const IN_WORKER = typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope;
/** workers: how many Web Workers run the network (the batch split between them); null: one a core, at most 4;
 *  0: none (the network runs on the page's own thread). Read when a model is first loaded. */
export const settings = { workers: null };

/** ONNX Runtime Web, imported once (rejects when there is no WebAssembly or the files cannot be loaded). */
function loadOrt() {
  if (!ortPromise) {
    ortPromise = (async () => {
      if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
      const ort = await import(new URL("ort.wasm.min.mjs", ORT_DIR).href);
      if (!ort || !ort.env || !ort.InferenceSession) throw new Error("ONNX Runtime Web did not load");
      ort.env.wasm.wasmPaths = ORT_DIR.href;
      const isolated = typeof crossOriginIsolated !== "undefined" && crossOriginIsolated;
      ort.env.wasm.numThreads = isolated && !IN_WORKER
        ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
      ort.env.logLevel = "error";
      return ort;
    })();
    ortPromise.catch(() => { ortPromise = null; });  // a later Run may try again
  }
  return ortPromise;
}

async function fetchInfo(name) {
  const response = await fetch(new URL(`${name}.json`, LIVE).href);
  if (!response.ok) throw new Error(`${name}.json: HTTP ${response.status}`);
  return response.json();
}

/** {ort, info, session} in this context (the page or a worker). */
async function openSession(name, info) {
  const ort = await loadOrt();
  const session = await ort.InferenceSession.create(new URL(`${name}.onnx`, LIVE).href,
    { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  return { ort, info, session };
}

/** A worker running this same module: one network, asked for ε by messages. */
class NetWorker {
  constructor() {
    this.pending = new Map();
    this.nextId = 0;
    this.failed = null;
    this.worker = new Worker(import.meta.url, { type: "module", name: "ddpm-live" });
    this.worker.onmessage = (ev) => {
      const p = this.pending.get(ev.data.id);
      if (!p) return;
      this.pending.delete(ev.data.id);
      if (ev.data.ok) p.resolve(ev.data); else p.reject(new Error(ev.data.error));
    };
    const fail = (ev) => {
      if (ev && typeof ev.preventDefault === "function") ev.preventDefault();
      this.failed = new Error((ev && ev.message) || "the sampling worker stopped");
      for (const p of this.pending.values()) p.reject(this.failed);
      this.pending.clear();
    };
    this.worker.onerror = fail;
    this.worker.onmessageerror = fail;
  }
  call(msg, transfer = []) {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...msg, id }, transfer);
    });
  }
  terminate() { this.worker.terminate(); }
}

/** The network of a model, loaded once: {info, eps(x, B, t, label, w) → Float64Array, where}. */
function loadModel(name) {
  if (!/^[A-Za-z0-9_-]+$/.test(String(name))) return Promise.reject(new Error(`bad model name ${name}`));
  if (!models.has(name)) {
    const p = (async () => {
      if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
      const info = await fetchInfo(name);
      const cores = (typeof navigator !== "undefined" && navigator.hardwareConcurrency) || 1;
      const k = settings.workers == null ? Math.max(1, Math.min(4, cores)) : Math.max(0, settings.workers | 0);
      if (k > 0 && typeof Worker === "function") {
        const pool = [];
        try {
          for (let i = 0; i < k; i++) pool.push(new NetWorker());
          await Promise.all(pool.map((wk) => wk.call({ type: "load", model: name, info })));
          return { info, workers: pool, where: `${k} worker${k > 1 ? "s" : ""}`,
            eps: (x, B, t, label, w) => poolEps(pool, info, x, B, t, label, w) };
        } catch (err) {
          pool.forEach((wk) => wk.terminate());  // and try on the page's thread
        }
      }
      const m = await openSession(name, info);
      return { info, workers: [], where: "page", eps: (x, B, t, label, w) => predictEps(m, x, B, t, label, w) };
    })();
    p.catch(() => models.delete(name));
    models.set(name, p);
  }
  return models.get(name);
}

/** ε for the batch split in contiguous parts between the workers (the network treats images independently). */
async function poolEps(pool, info, x, B, t, label, w) {
  const D = info.image_shape.reduce((a, b) => a * b, 1);
  const parts = [];
  const k = Math.min(pool.length, B);
  let start = 0;
  for (let i = 0; i < k; i++) {
    const first = start, n = Math.floor(B / k) + (i < B % k ? 1 : 0);
    const xs = Float32Array.from(x.subarray(first * D, (first + n) * D));
    parts.push(pool[i].call({ type: "eps", x: xs, n, t, label, w }, [xs.buffer]).then((r) => [first, r.eps]));
    start += n;
  }
  const eps = new Float64Array(B * D);
  for (const [start, e] of await Promise.all(parts)) eps.set(e, start * D);
  return eps;
}

if (IN_WORKER) {  // this module as a worker: load one network, answer ε requests
  let net = null;
  self.onmessage = async (ev) => {
    const msg = ev.data;
    try {
      if (msg.type === "load") {
        net = await openSession(msg.model, msg.info);
        self.postMessage({ id: msg.id, ok: true });
      } else if (msg.type === "eps") {
        const eps = await predictEps(net, msg.x, msg.n, msg.t, msg.label, msg.w);
        self.postMessage({ id: msg.id, ok: true, eps }, [eps.buffer]);
      } else if (msg.type === "resources") {
        self.postMessage({ id: msg.id, ok: true, urls: performance.getEntriesByType("resource").map((e) => e.name) });
      }
    } catch (err) {
      self.postMessage({ id: msg.id, ok: false, error: String((err && err.message) || err) });
    }
  };
}

/** Every URL this page and its sampling workers have requested (for tests: nothing leaves the site). */
export async function resources() {
  const urls = performance.getEntriesByType("resource").map((e) => e.name);
  for (const p of models.values()) {
    let m = null;
    try { m = await p; } catch (err) { continue; }
    for (const wk of m.workers) urls.push(...(await wk.call({ type: "resources" })).urls);
  }
  return urls;
}

// ------------------------------------------------------------------------------------------- sampling

/** Yield to the event loop (a macrotask, not clamped like a nested setTimeout): the page stays usable. */
function yieldToPage() {
  return new Promise((resolve) => {
    if (typeof MessageChannel === "function") {
      const ch = new MessageChannel();
      ch.port1.onmessage = () => { ch.port1.close(); resolve(); };
      ch.port2.postMessage(0);
    } else {
      setTimeout(resolve, 0);
    }
  });
}

function chainOf(info, sampler, steps, timesteps) {
  const T = info.T;
  let tau;
  if (timesteps != null) {
    tau = Array.from(timesteps, Number);
    if (!tau.length || tau.some((i) => !Number.isInteger(i) || i < 0 || i >= T)
        || tau.some((i, k) => k > 0 && tau[k - 1] <= i)) {
      throw new Error(`timesteps must be strictly decreasing indices in 0 … ${T - 1}`);
    }
  } else if (sampler === "ddpm") {
    tau = Array.from({ length: T }, (_, k) => T - 1 - k);
  } else if (sampler === "ddim") {
    tau = info.ddim_timesteps[String(steps)];
    if (!tau) throw new Error(`DDIM with ${steps} steps is not offered (${Object.keys(info.ddim_timesteps)})`);
  } else {
    throw new Error(`unknown sampler ${sampler}`);
  }
  return tau;
}

/** ε (guided for a conditional model) at x [B·D] for index t, as a Float64Array. */
async function predictEps(m, x, B, t, label, w) {
  const { ort, info, session } = m;
  const [C, H, W] = info.image_shape;
  const D = C * H * W;
  const conditional = info.inputs.includes("y");
  const guided = conditional && w > 0;
  const n = guided ? 2 * B : B;
  const xs = new Float32Array(n * D);
  xs.set(x);
  if (guided) xs.set(x, B * D);
  const feeds = {
    x: new ort.Tensor("float32", xs, [n, C, H, W]),
    t: new ort.Tensor("int64", new BigInt64Array(n).fill(BigInt(t)), [n]),
  };
  if (conditional) {
    const y = new BigInt64Array(n).fill(BigInt(label));
    if (guided) y.fill(BigInt(info.num_classes), B);
    feeds.y = new ort.Tensor("int64", y, [n]);
  }
  // one run at a time on a session (two panels of one model may both be running): queue behind the last
  const run = (m.last || Promise.resolve()).then(() => session.run(feeds));
  m.last = run.catch(() => {});
  const out = await run;
  const e = out.eps.data;
  const eps = new Float64Array(B * D);
  if (guided) {
    for (let i = 0; i < B * D; i++) eps[i] = (1 + w) * e[i] - w * e[i + B * D];
  } else {
    for (let i = 0; i < B * D; i++) eps[i] = e[i];
  }
  for (const v of Object.values(out)) if (v && typeof v.dispose === "function") v.dispose();
  return eps;
}

/**
 * Run a chain. options: model ("fashion"), sampler ("ddpm" | "ddim"), steps (DDIM's S), eta (DDIM's η),
 * timesteps (optional: the indices to visit, strictly decreasing, overriding sampler/steps' chain; Algorithm 2's
 * step when sampler is "ddpm", DDIM's otherwise), x (x_T, or the x_t at timesteps[0]: B·784 numbers; default
 * drawn from seed), n (B when x is not given; 16), seed (0), noise (optional: one array of B·784 per step,
 * replacing the PRNG's z), y (class 0 … 9, or 10 = null label; conditional model only), w (guidance scale),
 * onStep({k, n, t, x_t, x, pred_x0}) (after step k of n, at index t: its input x_t, its output x and x̂_0; may be
 * async), shouldStop() (checked before each step: true stops the chain there).
 * Resolves to {x0, pred_x0 (of the last step), seconds (of the chain, the model already loaded), steps (taken),
 * stopped, timesteps (the chain's indices), where (the network ran in "page" or "<k> workers")}.
 */
export async function sample(options = {}) {
  const o = { model: "fashion", sampler: "ddim", steps: 50, eta: 0, seed: 0, n: 16, w: 0, ...options };
  const m = await loadModel(o.model);
  const { info } = m;
  const D = info.image_shape.reduce((a, b) => a * b, 1);
  const c = info;
  const eta = Number(o.eta), w = Number(o.w);
  if (!(eta >= 0 && eta <= 1)) throw new Error(`eta=${o.eta} must lie in [0, 1]`);
  if (!(w >= 0 && Number.isFinite(w))) throw new Error(`w=${o.w} must be a finite number >= 0`);
  const conditional = info.inputs.includes("y");
  let label = o.y == null ? info.num_classes : Number(o.y);
  if (conditional && !(Number.isInteger(label) && label >= 0 && label <= info.num_classes)) {
    throw new Error(`y=${o.y} must be a class 0 … ${info.num_classes - 1} or ${info.num_classes} (none)`);
  }
  if (!conditional && (o.y != null || w !== 0)) throw new Error(`${o.model} is unconditional: no y, no w`);
  const tau = chainOf(info, o.sampler, o.steps, o.timesteps);
  const ddpm = o.sampler === "ddpm";
  const rng = new Normal(o.seed);
  let x;
  if (o.x != null) {
    x = Float64Array.from(o.x, Number);
    if (!x.length || x.length % D) throw new Error(`x has ${x.length} numbers, not a multiple of ${D}`);
  } else {
    x = rng.fill(Number(o.n) * D);
  }
  const B = x.length / D;
  const t0 = performance.now();
  let x0 = null, k = 0, stopped = false;
  for (; k < tau.length; k++) {
    if (o.shouldStop && o.shouldStop()) { stopped = true; break; }
    const i = tau[k];
    const eps = await m.eps(x, B, i, label, w);
    const z = o.noise ? o.noise[k] : rng.fill(B * D);  // one z per step
    if (z && z.length !== B * D) throw new Error(`noise[${k}] has ${z.length} numbers, not ${B * D}`);
    // x̂_0 = clip(√(1/ᾱ_t) x − √(1/ᾱ_t − 1) ε) (eq. 15)
    const a = c.sqrt_recip_alpha_bar[i], b = c.sqrt_recipm1_alpha_bar[i];
    x0 = new Float64Array(B * D);
    for (let j = 0; j < B * D; j++) x0[j] = Math.min(1, Math.max(-1, a * x[j] - b * eps[j]));
    const next = new Float64Array(B * D);
    if (ddpm) { // Algorithm 2, line 4: x_{t−1} = μ̃(x_t, x̂_0) + σ_t z, z = 0 at index 0
      const cx0 = c.coef_x0[i], cxt = c.coef_xt[i];
      const sigma = i === 0 ? 0 : Math.exp(0.5 * c.log_variance[i]);
      if (sigma > 0 && !z) throw new Error(`noise[${k}] is missing`);
      for (let j = 0; j < B * D; j++) next[j] = cx0 * x0[j] + cxt * x[j] + (sigma > 0 ? sigma * z[j] : 0);
    } else { // DDIM eq. 12 to the next index (ᾱ = 1 after the last), σ² of eq. 16
      const s = k + 1 < tau.length ? tau[k + 1] : -1;
      const aT = c.alpha_bar[i], aS = s >= 0 ? c.alpha_bar[s] : 1.0;
      const v = eta ** 2 * (1 - aS) / (1 - aT) * (1 - aT / aS);
      const sqT = Math.sqrt(aT), sq1T = Math.sqrt(1 - aT), sqS = Math.sqrt(aS);
      const dir = Math.sqrt(Math.max(1 - aS - v, 0)), sd = Math.sqrt(v);
      if (sd > 0 && !z) throw new Error(`noise[${k}] is missing`);
      for (let j = 0; j < B * D; j++) {
        const epsHat = (x[j] - sqT * x0[j]) / sq1T;
        next[j] = sqS * x0[j] + dir * epsHat + (sd > 0 ? sd * z[j] : 0);
      }
    }
    const xIn = x;
    x = next;
    if (o.onStep) await o.onStep({ k, n: tau.length, t: i, x_t: xIn, x, pred_x0: x0 });
    await yieldToPage();
  }
  return { x0: Array.from(x), pred_x0: x0 ? Array.from(x0) : null, seconds: (performance.now() - t0) / 1000,
    steps: k, stopped, timesteps: tau.slice(), where: m.where };
}

// ------------------------------------------------------------------------------------------- drawing

const CELL = 28, GAP = 2;

function gridSize(n) { const cols = Math.ceil(Math.sqrt(n)); return [cols, Math.ceil(n / cols)]; }

/** Draw B grey images (values in [−1, 1], round((x + 1)·127.5)) as a grid on a canvas. */
function drawGrid(canvas, x, B, side = CELL) {
  const [cols, rows] = gridSize(B);
  const Wd = cols * side + (cols - 1) * GAP, Ht = rows * side + (rows - 1) * GAP;
  if (canvas.width !== Wd || canvas.height !== Ht) { canvas.width = Wd; canvas.height = Ht; }
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(Wd, Ht);
  const px = img.data;
  for (let q = 0; q < px.length; q += 4) { px[q] = px[q + 1] = px[q + 2] = 255; px[q + 3] = 255; }
  const D = side * side;
  for (let b = 0; b < B; b++) {
    const ox = (b % cols) * (side + GAP), oy = Math.floor(b / cols) * (side + GAP);
    for (let r = 0; r < side; r++) {
      for (let cc = 0; cc < side; cc++) {
        const v = Math.round((x[b * D + r * side + cc] + 1) * 127.5);
        const g = v < 0 ? 0 : v > 255 ? 255 : v;
        const q = ((oy + r) * Wd + ox + cc) * 4;
        px[q] = px[q + 1] = px[q + 2] = g;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
}

function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const ch of children) e.append(ch);
  return e;
}

function labelled(text, control) {
  return el("label", { style: "margin-right:0.8em;white-space:nowrap" }, [text + " ", control]);
}

// ------------------------------------------------------------------------------------------- the panel

function mount(root) {
  if (root.dataset.ddpmMounted) return;
  root.dataset.ddpmMounted = "1";
  const fallback = root.querySelector(".ddpm-live-fallback");
  const d = root.dataset;
  const conditional = d.conditional === "1";
  const nImages = Math.max(1, parseInt(d.nImages || "16", 10));
  if (typeof WebAssembly !== "object") {
    if (fallback) fallback.textContent = `Live sampling needs WebAssembly, which this browser lacks. ${FALLBACK}`;
    return;
  }
  const offered = (d.stepsOffered || "10,20,50,100").split(",").map(Number);
  const sampler = el("select", { class: "ddpm-live-sampler" }, [
    el("option", { value: "ddim", text: "DDIM" }), el("option", { value: "ddpm", text: "Algorithm 2 (1000 steps)" })]);
  sampler.value = d.sampler === "ddpm" ? "ddpm" : "ddim";
  const steps = el("select", { class: "ddpm-live-steps" }, offered.map((s) => el("option", { value: s, text: s })));
  steps.value = String(d.steps || 50);
  const eta = el("input", { class: "ddpm-live-eta", type: "range", min: "0", max: "1", step: "0.05",
    value: d.eta || "0" });
  const etaOut = el("output", { text: Number(eta.value).toFixed(2) });
  const seed = el("input", { class: "ddpm-live-seed", type: "number", min: "0", step: "1", value: d.seed || "0",
    style: "width:6em" });
  const controls = [labelled("sampler", sampler), labelled("steps S", steps),
    labelled("η", el("span", {}, [eta, " ", etaOut])), labelled("seed", seed)];
  let klass = null, guidance = null, guidanceOut = null;
  if (conditional) {
    klass = el("select", { class: "ddpm-live-class" }, [
      ...CLASS_NAMES.map((name, i) => el("option", { value: i, text: name })),
      el("option", { value: String(CLASS_NAMES.length), text: "none" })]);
    klass.value = d.label === "" || d.label == null ? String(CLASS_NAMES.length) : d.label;
    guidance = el("input", { class: "ddpm-live-guidance", type: "range", min: "0", max: "4", step: "0.1",
      value: d.guidance || "0" });
    guidanceOut = el("output", { text: Number(guidance.value).toFixed(1) });
    controls.push(labelled("class", klass), labelled("guidance w", el("span", {}, [guidance, " ", guidanceOut])));
  }
  const run = el("button", { type: "button", class: "ddpm-live-run", text: "Run" });
  const stop = el("button", { type: "button", class: "ddpm-live-stop", text: "Stop" });
  stop.disabled = true;
  const progress = el("span", { class: "ddpm-live-progress", role: "status", "aria-live": "polite",
    style: "margin-left:0.8em", text: "" });
  const xt = el("canvas", { class: "ddpm-live-xt", width: "118", height: "118",
    style: "width:236px;max-width:100%;image-rendering:pixelated;image-rendering:crisp-edges;background:#eee" });
  const x0c = el("canvas", { class: "ddpm-live-x0", width: "118", height: "118",
    style: "width:236px;max-width:100%;image-rendering:pixelated;image-rendering:crisp-edges;background:#eee" });
  const xtCaption = el("div", { class: "ddpm-live-xt-caption", text: "x_t" });
  const x0Caption = el("div", { class: "ddpm-live-x0-caption", text: "x̂_0, predicted from x_t" });
  const scrub = el("input", { class: "ddpm-live-scrub", type: "range", min: "0", max: "0", step: "1", value: "0",
    "aria-label": "step of the chain", style: "width:300px;max-width:100%" });
  scrub.disabled = true;
  const scrubOut = el("output", { class: "ddpm-live-scrub-label", text: "" });
  const message = el("div", { class: "ddpm-live-message", style: "color:#a33" });

  const fig = (canvas, caption) => el("figure", { style: "display:inline-block;margin:0 1em 0.5em 0" },
    [canvas, el("figcaption", { style: "font-size:0.9em" }, [caption])]);
  const panel = el("div", { class: "ddpm-live-panel" }, [
    el("div", { style: "margin-bottom:0.4em" }, controls),
    el("div", { style: "margin-bottom:0.4em" }, [run, " ", stop, progress]),
    el("div", {}, [fig(xt, xtCaption), fig(x0c, x0Caption)]),
    el("div", {}, [labelled("scrub t", scrub), scrubOut]),
    message,
  ]);
  if (fallback) fallback.style.display = "none";
  root.append(panel);

  const syncControls = () => {
    const isDdim = sampler.value === "ddim";
    steps.disabled = !isDdim; eta.disabled = !isDdim;
    etaOut.textContent = Number(eta.value).toFixed(2);
    if (guidance) guidanceOut.textContent = Number(guidance.value).toFixed(1);
  };
  sampler.addEventListener("change", syncControls);
  eta.addEventListener("input", syncControls);
  if (guidance) guidance.addEventListener("input", syncControls);
  syncControls();

  let frames = [];  // recorded steps: {t, x, pred_x0}
  let stopRequested = false, running = false;
  const show = (f) => {  // f.t: the step's index, or −1 for the chain's result x_0
    drawGrid(xt, f.x, nImages);
    drawGrid(x0c, f.pred_x0, nImages);
    const label = f.t < 0 ? "x_0 (the result)" : `t = ${f.t + 1}`;
    xtCaption.textContent = f.t < 0 ? "x_0" : `x_t at t = ${f.t + 1}`;
    x0Caption.textContent = f.t < 0 ? "x_0" : `x̂_0, predicted from x_t at t = ${f.t + 1}`;
    scrubOut.textContent = label;
  };
  scrub.addEventListener("input", () => {
    const f = frames[parseInt(scrub.value, 10)];
    if (f) show(f);
  });
  stop.addEventListener("click", () => { stopRequested = true; });
  run.addEventListener("click", async () => {
    if (running) return;
    running = true; stopRequested = false; frames = [];
    run.disabled = true; stop.disabled = false; scrub.disabled = true; message.textContent = "";
    progress.textContent = "loading the model …";
    const isDdim = sampler.value === "ddim";
    let lastDraw = 0;
    try {
      const opts = {
        model: d.model, sampler: sampler.value, steps: Number(steps.value), eta: isDdim ? Number(eta.value) : 0,
        n: nImages, seed: parseInt(seed.value, 10) || 0, shouldStop: () => stopRequested,
        onStep: ({ k, n, t, x_t, x, pred_x0 }) => {
          // record each step's input x_t and its x̂_0: every DDIM step; Algorithm 2's every 10th and last 20
          if (isDdim || k % 10 === 0 || k >= n - 20) frames.push({ t, x: x_t, pred_x0 });
          progress.textContent = `step ${k + 1} of ${n}`;
          const now = performance.now();
          if (now - lastDraw > 40 || k === n - 1) {  // draw at most ~25 times a second
            lastDraw = now;
            show({ t, x: x_t, pred_x0 });
          }
        },
      };
      if (conditional) { opts.y = Number(klass.value); opts.w = Number(guidance.value); }
      const result = await sample(opts);
      const { shouldStop, onStep, ...settings } = opts;  // what the controls asked for, for listeners
      root.dispatchEvent(new CustomEvent("ddpm-live-result", { detail: { options: settings, result } }));
      progress.textContent = `step ${result.steps} of ${result.timesteps.length}` + (result.stopped
        ? " (stopped)" : ` (${result.seconds.toFixed(1)} s)`);
      if (!result.stopped) {
        const x0 = Float64Array.from(result.x0);
        frames.push({ t: -1, x: x0, pred_x0: x0 });
      }
      if (frames.length) {
        scrub.max = String(frames.length - 1); scrub.value = String(frames.length - 1); scrub.disabled = false;
        show(frames[frames.length - 1]);
      }
    } catch (err) {
      progress.textContent = "";
      message.textContent = `Live sampling is not available here (${err && err.message ? err.message : err}). `
        + FALLBACK;
    } finally {
      running = false; run.disabled = false; stop.disabled = true;
    }
  });
}

/** Mount a panel in every div.ddpm-live of the page (once each). */
export function mountAll() {
  if (typeof document === "undefined") return;
  for (const root of document.querySelectorAll("div.ddpm-live")) {
    try { mount(root); } catch (err) {
      const fb = root.querySelector(".ddpm-live-fallback");
      if (fb) { fb.style.display = ""; fb.textContent = `Live sampling could not start. ${FALLBACK}`; }
    }
  }
}

if (typeof window !== "undefined") window.ddpmLive = { mountAll, sample, resources, settings, Normal, CLASS_NAMES };
