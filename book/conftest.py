"""Settings for running the book's notebooks under nbval (``pytest --nbval tests book``).

The same settings are used by ``tools/refresh_notebooks.py`` when it re-executes the notebooks, so
the stored outputs and the outputs nbval computes come from one environment:

* ``NOTEBOOK_ENV``: environment variables for the notebook kernel. nbval starts a notebook's kernel
  when its first cell is set up, and the kernel inherits pytest's environment; the hook below sets
  these variables just for that moment, so the rest of the test session keeps its own. They pin
  the inline matplotlib backend (CI exports ``MPLBACKEND=Agg``, which would stop figures from being
  shown), ask ``ddpm_lib.viz`` for the static scrubber (no widget model ids in the outputs), and
  use one thread so floating-point reductions add up in the same order, and put this checkout first
  on the kernel's import path, so the notebooks test the library next to them.
* ``SANITIZE_FILE``: regular expressions applied to outputs before nbval compares them, for what
  cannot be the same on every machine: base64 image bytes (nbval already skips ``image/png``
  outputs; this extends that to the PNG frames inside the static scrubbers' HTML) and object
  addresses. It is used unless ``--nbval-sanitize-with`` names another file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

NOTEBOOK_ENV: dict[str, str] = {
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "DDPM_BOOK_STATIC": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "HF_HUB_OFFLINE": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    # The notebooks import ddpm_lib from this checkout, whichever copy pip has installed.
    "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")) if p),
}

SANITIZE_FILE = Path(__file__).with_name("nbval_sanitize.cfg")


def pytest_configure(config) -> None:
    """Use the book's sanitize file when nbval runs and no other file was given."""
    option = config.option
    if hasattr(option, "nbval_sanitize_with") and option.nbval_sanitize_with is None:
        option.nbval_sanitize_with = str(SANITIZE_FILE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Start a notebook's kernel (nbval does it in the setup of its first cell) with ``NOTEBOOK_ENV``."""
    if item.path.suffix != ".ipynb":
        yield
        return
    saved = {name: os.environ.get(name) for name in NOTEBOOK_ENV}
    os.environ.update(NOTEBOOK_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
