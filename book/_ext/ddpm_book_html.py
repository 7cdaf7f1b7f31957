"""A local Sphinx extension for the book's HTML (``sphinx.local_extensions`` in ``_config.yml``).

It adds the book's stylesheet (``book/_static/ddpm.css``) to every page; it writes the files of the live
sampling panel (the book's networks as ONNX, their constants, ONNX Runtime Web from ``node_modules``; see
``ddpm_lib.onnx_export.write_live_assets``) into the build's ``_static/live``; and it removes scripts that a
page would load twice. Sphinx 7.4 registers an inline script added by
an extension during the build once as ``filename=None`` and again, when it prepares writing, as
``filename=""``; the two do not compare equal, so the page gets both. For sphinx-thebe's
``const THEBE_JS_URL = …`` that is a console error ("Identifier has already been declared"), which
the browser test (tests/test_book_html.py) rejects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent.parent / "_static"
ROOT = STATIC.parent.parent
ORT_DIST = ROOT / "node_modules" / "onnxruntime-web" / "dist"


def _script_key(script: Any) -> tuple:
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {})
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def dedupe_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Keep the first of each script (same file or same inline body, same attributes) on a page."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def add_static_path(app: Any, config: Any) -> None:
    """Serve book/_static (the stylesheet) from the built book's _static folder."""
    if str(STATIC) not in [str(Path(app.confdir, p).resolve()) for p in config.html_static_path]:
        config.html_static_path.append(str(STATIC))


def add_live_assets(app: Any, config: Any) -> None:
    """Write the live panel's files beside the output folder and serve them as ``_static/live``."""
    from ddpm_lib.onnx_export import write_live_assets

    dest = Path(app.outdir).parent / "live_static"
    write_live_assets(dest, ORT_DIST)
    config.html_static_path.append(str(dest))


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", add_static_path)
    app.connect("config-inited", add_live_assets)
    app.add_css_file("ddpm.css")
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
