"""Small studies that the book's chapters load: each trains and measures on a CPU, and ships its results
as JSON beside its module.

* ``table2`` — Table 2 of the paper at small scale (``python -m ddpm_lib.studies.table2``), results
  ``table2_small.json``, loaded by the ε chapter and the experiments chapter.
* ``beyond`` — DDIM steps, classifier-free guidance, schedules and learned variances on 8×8 digits
  (``python -m ddpm_lib.studies.beyond``), results ``beyond_small.json``, loaded by the closing chapter.

``load_results(name)`` reads a study's shipped results; ``write_results``, ``to_json`` and ``machine_note``
are how the studies write them.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent
RESULTS = {"table2": "table2_small.json", "beyond": "beyond_small.json"}


def results_path(name: str) -> Path:
    """The shipped results file of study ``name`` (``RESULTS``)."""
    if name not in RESULTS:
        raise ValueError(f"study={name!r} is unknown; choose one of {sorted(RESULTS)}")
    return RESULTS_DIR / RESULTS[name]


def load_results(name: str, path: str | Path | None = None) -> dict:
    """Study ``name``'s results: its shipped JSON, or the file at ``path``."""
    return json.loads(Path(path if path is not None else results_path(name)).read_text(encoding="utf8"))


def to_json(obj) -> str:
    """JSON with one key per line, but every list of numbers (and list of such lists) on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    flat = re.compile(r"\[\s*([^\[\]{}]*?)\s*\]")  # a list holding no list or object
    text = flat.sub(lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    nested = re.compile(r"\[\s*((?:\[[^\[\]{}]*\],?\s*)+)\]")  # a list of such lists
    return nested.sub(lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def write_results(path: str | Path, result: dict) -> Path:
    """Write a study's results as ``to_json`` text (the folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(result), encoding="utf8")
    return path


def machine_note() -> str:
    """The CPU, thread count, Python and PyTorch a study ran on (recorded in its results)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu} ({torch.get_num_threads()} thread), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()}")
