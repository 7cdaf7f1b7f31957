"""Small studies that the book's chapters load: each trains and measures on a CPU, and ships its results
as JSON beside its module.

* ``table2`` — Table 2 of the paper at small scale (``python -m ddpm_lib.studies.table2``), results
  ``table2_small.json``, loaded by the ε chapter and the experiments chapter.
* ``beyond`` — DDIM steps and classifier-free guidance on the book's Fashion-MNIST models, schedules and
  learned variances on 8×8 digits (``python -m ddpm_lib.studies.beyond``), results ``beyond_small.json``,
  loaded by the closing chapter.
* ``figures`` — the book model's slow figures: the bound of eq. 5 on test images, Fig. 7's shared latents,
  DDIM's consistency (``python -m ddpm_lib.studies.figures``), results ``figures_small.json``, loaded by the
  ELBO, experiments and closing chapters.

``load_results(name)`` reads a study's shipped results; ``write_results``, ``to_json``, ``machine_note``,
``command_line``, ``keep_images`` (uint8 images as base64 in the JSON; ``stored_images`` reads them back) and
``file_sha256`` are how the studies write them. A study made of parts (``beyond``, ``figures``) takes
``--out`` and ``--parts`` from ``add_part_arguments`` and combines a run's parts with the file's others by
``merge_parts``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

RESULTS_DIR = Path(__file__).resolve().parent
RESULTS = {"table2": "table2_small.json", "beyond": "beyond_small.json", "figures": "figures_small.json"}


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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def keep_images(images: Tensor | np.ndarray, n: int) -> dict:
    """The first n uint8 grey images for the JSON: their shape and their bytes, base64."""
    x = torch.as_tensor(np.asarray(images[:n])) if isinstance(images, np.ndarray) else images[:n]
    if x.shape[1] != 1:  # generate's [n, H, W, 1]
        x = x.permute(0, 3, 1, 2)
    x = x.contiguous()
    return {"shape": list(x.shape), "uint8_base64": base64.b64encode(x.numpy().tobytes()).decode("ascii")}


def stored_images(kept: dict) -> Tensor:
    """The inverse of ``keep_images``: uint8 [n, 1, H, W]."""
    data = np.frombuffer(base64.b64decode(kept["uint8_base64"]), dtype=np.uint8)
    return torch.from_numpy(data.copy()).reshape(kept["shape"])


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran a study: ``python -m <module>`` and its arguments (``sys.argv`` when ``argv`` is
    None), recorded in its results."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def add_part_arguments(p: argparse.ArgumentParser, default_out: Path, parts: Sequence[str]) -> None:
    """``--out`` (the JSON to write) and ``--parts`` (which parts to run) of a study made of parts."""
    p.add_argument("--out", type=Path, default=default_out, help="JSON file to write")
    p.add_argument("--parts", nargs="+", choices=parts, default=list(parts),
                   help="parts to (re)run; the others are kept from --out when it exists")


def merge_parts(name: str, out: Path, new: dict, parts: Sequence[str], all_parts: Sequence[str], *,
                settings: dict, command: str, description: str) -> dict:
    """Study ``name``'s results after a run of ``parts``: the ``new`` parts over the other parts of ``out``
    (when the run did not cover them all; their settings must not have changed), with the description, the
    settings, and each new part's command and machine. ``out`` is read here, just before the caller writes
    it, so parts run side by side in separate processes keep each other's results."""
    result: dict = load_results(name, out) if Path(out).is_file() and set(parts) != set(all_parts) else {}
    result.update(new)
    result["description"] = description
    result["settings"] = settings
    result.setdefault("commands", {}).update({part: command for part in parts})
    result.setdefault("machines", {}).update({part: machine_note() for part in parts})
    return result
