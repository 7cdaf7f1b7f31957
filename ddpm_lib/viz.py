"""Pictures and widgets for the book: images as PNGs, a sample photograph, and a timestep scrubber.

Everything here serves the notebooks. The notebook-only packages it uses (matplotlib, Pillow,
IPython, ipywidgets) are imported inside the functions that need them, so importing this module
needs nothing beyond the core's own dependencies; and the library core never imports it.

The scrubber shows a picture that depends on the timestep t (x_t of the forward process, a
histogram, …) with a slider to move t:

* in a live kernel with a frontend (Jupyter, Colab) it is an ipywidgets slider over every t that
  recomputes the picture as it moves;
* everywhere else (the rendered HTML book, where there is no kernel) it is a static scrubber:
  the pictures at a few t, precomputed as base64 PNGs, and an ``<input type="range">`` whose small
  inline script shows one of them at a time.

The static form is what the committed notebooks store, because it is deterministic (no widget model
ids) and works without a kernel. The book's test and refresh environments set ``DDPM_BOOK_STATIC=1``
(see ``book/conftest.py``) so that the stored outputs are always the static form.

Time indices are 0-based as everywhere in ddpm_lib: index i is the paper's t = i + 1. Labels
shown to the reader use the paper's t.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .configs import get_config
from .data import to_uint8
from .loading import BOOK_MODELS

STATIC_ENV_VAR = "DDPM_BOOK_STATIC"

# The book's figure text sizes, in points. A figure is shown at its own pixel size on a desktop and shrunk to
# the column on a phone, so its text must be large enough at full size: 11 pt at the notebooks' 80–90 dpi is
# 12–14 px, the size of the page's own small print.
BOOK_STYLE = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 12,
}
MIN_FONT_PT = 9  # no text in a book figure is smaller (tests/test_notebooks_text.py checks the chapters)

#: What a frame-rendering function may return: an image tensor/array (see ``to_uint8_image``)
#: or a matplotlib Figure.
Frame = Any


# ---------------------------------------------------------------------------------- images


def to_uint8_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image in the model's range [-1, 1] as uint8 pixels for display.

    Accepts a tensor or array shaped [C, H, W], [1, C, H, W] (C = 1 or 3) or [H, W], or a uint8
    array [H, W] / [H, W, 3] / [H, W, 4], which is returned as is. Values are mapped by
    round((x + 1) · 127.5) and clipped to 0 … 255, the inverse of the data scaling (§4).
    Returns [H, W, 3] for colour and [H, W] for grey.
    """
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"expected a single image, got a batch of shape {a.shape}")
        a = a[0]
    if a.ndim == 3:
        if a.shape[0] not in (1, 3):
            raise ValueError(f"expected [C, H, W] with C = 1 or 3, got shape {a.shape}")
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    elif a.ndim != 2:
        raise ValueError(f"expected an image of 2, 3 or 4 dimensions, got shape {a.shape}")
    return to_uint8(torch.from_numpy(a)).numpy()  # the same rounding as the samplers' output


def figure_to_uint8(fig: Any) -> np.ndarray:
    """Render a matplotlib Figure to RGB pixels [H, W, 3] (Agg) and close it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)  # harmless for a figure that pyplot does not manage
    return rgb


def frame_to_uint8(frame: Frame) -> np.ndarray:
    """A frame (image tensor/array or matplotlib Figure) as uint8 pixels."""
    if hasattr(frame, "savefig"):
        return figure_to_uint8(frame)
    return to_uint8_image(frame)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode uint8 pixels [H, W] or [H, W, 3] as PNG (Pillow; no timestamps, so deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def use_book_style() -> None:
    """Set matplotlib's text sizes to the book's (``BOOK_STYLE``); each chapter calls it once, after
    ``%matplotlib inline``."""
    import matplotlib as mpl

    mpl.rcParams.update(BOOK_STYLE)


def load_sample_photo(size: int = 64, name: str = "grace_hopper.jpg") -> torch.Tensor:
    """A photograph that ships with matplotlib, as x_0 in [-1, 1]: a float64 tensor [1, 3, size, size].

    The picture is cropped to its top square (for grace_hopper.jpg, the portrait's head and
    shoulders) and resized with Pillow's Lanczos filter, so it needs no download.
    """
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left = (im.size[0] - side) // 2
        im = im.crop((left, 0, left + side, side)).resize((size, size), Image.Resampling.LANCZOS)
        pixels = np.asarray(im, dtype=np.float64)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_row(images: Sequence[torch.Tensor | np.ndarray], titles: Sequence[str], *,
              height_in: float = 1.6, dpi: int = 80) -> Any:
    """A matplotlib Figure with the images side by side, each titled; returns the Figure.

    The Figure is made with ``matplotlib.pyplot`` so that a notebook shows it inline.
    """
    import matplotlib.pyplot as plt

    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    fig, axes = plt.subplots(1, len(images), figsize=(height_in * len(images), height_in + 0.3), dpi=dpi,
                             squeeze=False)
    for ax, img, title in zip(axes[0], images, titles, strict=True):
        pixels = to_uint8_image(img)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left_columns: int = 1,
               caption: str | None = None, group_row: str = "") -> str:
    """An HTML table of strings (escaped): the first ``left_columns`` columns are labels, left-aligned and
    free to wrap; the others are numbers, right-aligned on one line. ``group_row`` is raw HTML for a row
    of column groups above the header. The table scrolls sideways inside its own box when it is wider than
    the page (a phone), instead of widening the page."""
    def row(values: Sequence[str], tag: str) -> str:
        cells = []
        for k, v in enumerate(values):
            style = "padding:2px 5px; text-align:" + ("left" if k < left_columns else "right")
            if tag == "td" and k >= left_columns:
                style += "; white-space:nowrap"
            cells.append(f'<{tag} style="{style}">{html.escape(v)}</{tag}>')
        return "<tr>" + "".join(cells) + "</tr>"

    head = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return ('<div style="overflow-x:auto; max-width:100%"><table style="font-size:0.85em">' + head + group_row
            + row(header, "th") + "".join(row(r, "td") for r in rows) + "</table></div>")


# ---------------------------------------------------------------------------------- the scrubber

# One handler, inline on the range input, so the scrubber needs no page-level script and no ids:
# show frame k of the enclosing scrubber and put its label in the <output>.
_ONINPUT = (
    "var box=this.closest('.ddpm-scrubber'),k=parseInt(this.value,10),"
    "frames=box.querySelectorAll('img.ddpm-scrubber-frame');"
    "for(var j=0;j<frames.length;j++){frames[j].style.display=(j===k)?'block':'none';}"
    "box.querySelector('output.ddpm-scrubber-label').textContent=frames[k].getAttribute('data-label');"
)


def scrubber_html(frames: Sequence[np.ndarray], labels: Sequence[str], *, width_px: int | None = None,
                  title: str = "") -> str:
    """The static scrubber: uint8 frames as base64 PNGs and an ``<input type="range">`` to choose one.

    Works in any browser without a kernel: a small inline ``oninput`` script shows frame k and
    its label when the slider is at k. The HTML is a pure function of the frames and labels
    (no random ids), so a notebook that stores it has deterministic outputs. ``width_px`` is the
    displayed width (default: the frames' own width; small frames are enlarged with crisp pixels).
    """
    if not frames or len(frames) != len(labels):
        raise ValueError(f"need one label per frame and at least one frame; got {len(frames)} and {len(labels)}")
    parts = ['<div class="ddpm-scrubber" style="display:inline-block;font-family:sans-serif;font-size:0.9em">']
    if title:
        parts.append(f'<div class="ddpm-scrubber-title" style="font-weight:bold">{html.escape(title)}</div>')
    width_px = width_px or frames[0].shape[1]
    for k, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        h, w = frame.shape[:2]
        height_px = round(width_px * h / w)
        data = base64.b64encode(png_bytes(frame)).decode("ascii")
        display = "block" if k == 0 else "none"
        parts.append(
            f'<img class="ddpm-scrubber-frame" data-label="{html.escape(label)}" alt="{html.escape(label)}" '
            f'width="{width_px}" height="{height_px}" '
            f'style="display:{display};image-rendering:pixelated;max-width:100%;height:auto" '
            f'src="data:image/png;base64,{data}">'
        )
    parts.append(
        f'<div><input class="ddpm-scrubber-range" type="range" min="0" max="{len(frames) - 1}" step="1" '
        f'value="0" aria-label="{html.escape(title or "timestep")}" style="width:{width_px}px;max-width:100%" '
        f'oninput="{html.escape(_ONINPUT)}"> '
        f'<output class="ddpm-scrubber-label">{html.escape(labels[0])}</output></div>'
    )
    parts.append("</div>")
    return "\n".join(parts)


def live_frontend() -> bool:
    """Whether ``timestep_scrubber`` should show the live ipywidgets slider.

    True in an IPython kernel (Jupyter, Colab) with ipywidgets installed, unless the environment
    variable ``DDPM_BOOK_STATIC`` is set to a non-empty value other than ``0`` (the tests and the
    refresh tool set it: they run notebooks in a kernel that has no frontend to show widgets).
    """
    if os.environ.get(STATIC_ENV_VAR, "") not in ("", "0"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def default_caption(i: int) -> str:
    """The label of index i: the paper's t = i + 1."""
    return f"t = {i + 1}"


def timestep_scrubber(
    render: Callable[[int], Frame],
    indices: Sequence[int],
    *,
    num_timesteps: int,
    caption: Callable[[int], str] = default_caption,
    title: str = "",
    width_px: int | None = None,
    live: bool | None = None,
) -> None:
    """Display a picture that depends on the timestep, with a slider over t.

    Args:
        render: index i (0-based; the paper's t = i + 1) → the picture at that step: an image in
            [-1, 1] ([C, H, W] or [1, C, H, W]), uint8 pixels, or a matplotlib Figure (closed
            after rendering; build it with ``matplotlib.figure.Figure`` so it is not also shown).
        indices: the steps precomputed for the static scrubber, in slider order.
        num_timesteps: T; the live slider runs over every t = 1 … T.
        caption: index i → the label shown under the picture (default ``"t = i + 1"``).
        title: a heading shown above the picture.
        width_px: the displayed width (default: the frames' own width); small frames are
            enlarged with crisp pixels.
        live: force the live slider (True) or the static scrubber (False); by default the live
            slider in a kernel with a frontend, the static scrubber elsewhere (``live_frontend``).
    """
    from IPython.display import HTML, display

    indices = [int(i) for i in indices]
    if any(not 0 <= i < num_timesteps for i in indices):
        raise ValueError(f"indices must lie in 0 … {num_timesteps - 1}, got {indices}")
    if live is None:
        live = live_frontend()
    if not live:
        frames = [frame_to_uint8(render(i)) for i in indices]
        display(HTML(scrubber_html(frames, [caption(i) for i in indices], width_px=width_px, title=title)))
        return

    import ipywidgets as widgets

    first = indices[0] if indices else 0
    pixels = frame_to_uint8(render(first))
    width_px = width_px or pixels.shape[1]
    height_px = round(width_px * pixels.shape[0] / pixels.shape[1])
    image = widgets.Image(value=png_bytes(pixels), format="png", width=width_px, height=height_px)
    image.layout.object_fit = "contain"
    label = widgets.HTML(html.escape(caption(first)))
    slider = widgets.IntSlider(value=first + 1, min=1, max=num_timesteps, step=1, description="t",
                               continuous_update=True, layout=widgets.Layout(width=f"{max(width_px, 200)}px"))

    def on_change(change: dict) -> None:
        i = int(change["new"]) - 1
        image.value = png_bytes(frame_to_uint8(render(i)))
        label.value = html.escape(caption(i))

    slider.observe(on_change, names="value")
    children = ([widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []) + [image, slider, label]
    display(widgets.VBox(children))


# ---------------------------------------------------------------------------------- the live panel

# The models a page can sample live (the book's, exported by ``onnx_export.export_book_models``): name → number of
# classes (None: unconditional). The label ``None`` of a conditional model is the null label ∅ (index num_classes).
_LIVE_MODELS: dict[str, int | None] = {name: get_config(name).model.num_classes for name in BOOK_MODELS}
_LIVE_SAMPLERS = ("ddpm", "ddim")
_LIVE_MAX_GUIDANCE = 4.0  # the panel's guidance slider runs over 0 … 4

# Imports the panel's module from the site root (a Sphinx page's <html data-content_root="../">) and mounts every
# div.ddpm-live on the page; mountAll mounts each panel once, so a page with several panels may run it several times.
_LIVE_SCRIPT = (
    '<script type="module">'
    "const root=document.documentElement.dataset.content_root||'./';"
    "import(new URL(root+'_static/ddpm_live.js',document.baseURI).href)"
    ".then(function(m){m.mountAll();})"
    ".catch(function(){document.querySelectorAll('div.ddpm-live .ddpm-live-fallback').forEach(function(e){"
    "e.textContent='Live sampling could not be loaded here. '+"
    "'The pictures above are precomputed; they are the book\\'s.';"
    "});});"
    "</script>"
)


def _live_number(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float in [low, high]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a number in [{low:g}, {high:g}]")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number in [{low:g}, {high:g}]") from None
    if not (low <= v <= high):
        raise ValueError(f"{name}={value!r} must lie in [{low:g}, {high:g}]")
    return v


def _live_arguments(model: str, sampler: str, steps: int, eta: float, seed: int, label: int | None,
                    guidance: float, n_images: int, title: str) -> tuple[float, float, int | None]:
    """``live_panel``'s arguments checked; returns η, w and the model's number of classes (None: unconditional)."""
    from .onnx_export import DDIM_STEPS

    if model not in _LIVE_MODELS:
        raise ValueError(f"model={model!r}: the live panel offers {', '.join(map(repr, _LIVE_MODELS))}")
    if sampler not in _LIVE_SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {', '.join(map(repr, _LIVE_SAMPLERS))}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or int(steps) not in DDIM_STEPS:
        raise ValueError(f"steps={steps!r}: DDIM is offered with S in {', '.join(map(str, DDIM_STEPS))}")
    eta = _live_number("eta", eta, 0.0, 1.0)
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} is DDIM's; sampler='ddpm' (Algorithm 2) takes none")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in 0 … 2**32 − 1")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or not 1 <= int(n_images) <= 64:
        raise ValueError(f"n_images={n_images!r} must be an integer in 1 … 64")
    num_classes = _LIVE_MODELS[model]
    guidance = _live_number("guidance", guidance, 0.0, _LIVE_MAX_GUIDANCE)
    if num_classes is None:
        if label is not None:
            raise ValueError(f"label={label!r}: model {model!r} is unconditional (use 'fashion_cond' for classes)")
        if guidance != 0:
            raise ValueError(f"guidance={guidance:g}: model {model!r} is unconditional (use 'fashion_cond')")
    elif label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))
                                or not 0 <= int(label) < num_classes):
        raise ValueError(f"label={label!r} must be a class 0 … {num_classes - 1} or None (the null label)")
    if not isinstance(title, str):
        raise ValueError(f"title must be a string, got {type(title).__name__}")
    return eta, guidance, num_classes


def live_panel(model: str = "fashion", *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
               label: int | None = None, guidance: float = 0.0, n_images: int = 16, title: str = "") -> str:
    """The HTML of a live sampling panel: the reader runs Algorithm 2 or DDIM on ``model`` in the browser.

    A ``div.ddpm-live`` whose data attributes hold the panel's defaults (model, sampler, DDIM's ``steps`` S and
    ``eta`` η, ``seed``, the class ``label`` and guidance scale w for the conditional model, the number of images),
    a visible fallback text (what a reader without JavaScript or WebAssembly sees), and a small inline module
    script that imports ``<content_root>/_static/ddpm_live.js`` (the root read at run time from the page's
    ``data-content_root``) and mounts the panel. The HTML is a pure function of the arguments (no random ids),
    so a notebook that stores it has deterministic outputs.

    ``label``: a class 0 … 9 of ``fashion_cond`` (``data.FASHION_CLASSES``), or None for the null label ∅.
    ``steps`` must be one the exported constants offer (``onnx_export.DDIM_STEPS``); it is the DDIM default and
    is ignored by Algorithm 2, which runs all T steps.
    """
    from .onnx_export import DDIM_STEPS

    eta, guidance, num_classes = _live_arguments(model, sampler, steps, eta, seed, label, guidance, n_images, title)
    attrs = {
        "data-model": model, "data-sampler": sampler, "data-steps": str(int(steps)), "data-eta": f"{eta:g}",
        "data-seed": str(int(seed)), "data-n-images": str(int(n_images)),
        "data-steps-offered": ",".join(str(s) for s in DDIM_STEPS),
        "data-conditional": "0" if num_classes is None else "1",
    }
    if num_classes is not None:
        attrs |= {"data-label": "" if label is None else str(int(label)), "data-guidance": f"{guidance:g}"}
    attr_html = " ".join(f'{k}="{html.escape(v)}"' for k, v in attrs.items())
    parts = [f'<div class="ddpm-live" {attr_html} style="font-family:sans-serif;font-size:0.9em;margin:0.5em 0">']
    if title:
        parts.append(f'<div class="ddpm-live-title" style="font-weight:bold">{html.escape(title)}</div>')
    parts.append('<p class="ddpm-live-fallback" style="font-style:italic">Live sampling runs in the browser with '
                 'JavaScript and WebAssembly, which are not available here. The pictures above are precomputed; '
                 "they are the book's.</p>")
    parts.append("</div>")
    parts.append(_LIVE_SCRIPT)
    return "\n".join(parts)
