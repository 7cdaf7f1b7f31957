"""Re-execute the book's notebooks and store their outputs: ``python tools/refresh_notebooks.py``.

The book is built with execution off: it shows the outputs stored in each notebook, and
``pytest --nbval tests book`` checks that running the code still gives them. After changing a
chapter or the library, run this script from anywhere to refresh the stored outputs.

For every notebook (all ``book/*.ipynb``, or those named on the command line) it

1. writes the first code cell, the Colab install cell, from the repository URL in ``_config.yml``
   (the one place that URL lives); a notebook without one gets it before its first code cell;
2. runs the notebook top to bottom with nbclient, in ``book/``, in the environment nbval uses
   (``NOTEBOOK_ENV`` of ``book/conftest.py``: inline figures, static scrubbers, one thread);
3. stores it without run-dependent metadata (no timings, no widget state), so that refreshing
   twice on one machine gives the same file.

``--check`` runs nothing: it only verifies that every install cell matches ``_config.yml``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
COLAB_TAG = "colab-install"
MAX_NOTEBOOK_BYTES = 1_500_000


def repository_url(config_path: Path = ROOT / "_config.yml") -> str:
    """The repository URL of ``_config.yml`` (``repository.url``), without a trailing slash."""
    config = yaml.safe_load(config_path.read_text(encoding="utf8"))
    return str(config["repository"]["url"]).rstrip("/")


def colab_install_source(url: str) -> str:
    """The first code cell of every chapter: in Colab, pip-install ddpm_lib from ``url``; elsewhere nothing."""
    return (
        "# In Colab: install ddpm_lib from the book's repository.\n"
        "# Anywhere else this cell does nothing.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import subprocess\n"
        "\n"
        f'    package = "git+{url}"\n'
        '    pip = [sys.executable, "-m", "pip", "install", "-q"]\n'
        "    subprocess.run(pip + [package], check=True)"
    )


def notebook_env() -> dict[str, str]:
    """``NOTEBOOK_ENV`` from ``book/conftest.py``: the kernel environment shared with nbval."""
    spec = importlib.util.spec_from_file_location("_book_conftest", BOOK / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.NOTEBOOK_ENV)


def colab_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The notebook's Colab install cell (the code cell tagged ``colab-install``), if any."""
    for cell in nb.cells:
        if cell.cell_type == "code" and COLAB_TAG in cell.get("metadata", {}).get("tags", []):
            return cell
    return None


def set_colab_cell(nb: nbformat.NotebookNode, url: str) -> None:
    """Write the install cell's source from ``url``, inserting the cell before the first code cell if missing."""
    cell = colab_cell(nb)
    if cell is None:
        cell = nbformat.v4.new_code_cell(id=COLAB_TAG, metadata={"tags": [COLAB_TAG]})
        first_code = next((k for k, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
        nb.cells.insert(first_code, cell)
    cell.source = colab_install_source(url)


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop what changes from run to run: timings, widget state, and how a printed stream was chunked."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of the same name (stdout, stderr) into one."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.output_type == "stream" and prev is not None and prev.output_type == "stream"
                and prev.name == out.name):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def refresh(path: Path, url: str, env: dict[str, str]) -> float:
    """Re-execute one notebook in place; returns the execution time in seconds."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    set_colab_cell(nb, url)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ.update(env)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to refresh (default: book/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="only check the Colab install cells; run nothing")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted(BOOK.glob("*.ipynb"))
    url = repository_url()
    if args.check:
        bad = [p for p in paths if (c := colab_cell(nbformat.read(p, as_version=4))) is None
               or c.source != colab_install_source(url)]
        for p in bad:
            print(f"{p.relative_to(ROOT)}: Colab install cell missing or not from _config.yml's repository.url")
        return 1 if bad else 0
    env = notebook_env()
    status = 0
    for path in paths:
        seconds = refresh(path, url, env)
        size = path.stat().st_size
        print(f"{path.relative_to(ROOT)}: executed in {seconds:.1f} s, {size / 1e6:.2f} MB")
        if size > MAX_NOTEBOOK_BYTES:
            print(f"  larger than {MAX_NOTEBOOK_BYTES / 1e6:.1f} MB: use smaller figures or fewer frames")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
