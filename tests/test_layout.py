"""The library's layout: no import cycle, every module above what it imports, short functions, and a book
that calls the library for its helpers instead of copying them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "ddpm_lib"

# From the ground up. A module may import modules of its own layer or of the layers below, never above.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"base", "rng", "locks", "schedules", "losses", "precision", "distributed", "fused_norm"}),
    ("math", {"diffusion", "guidance", "samplers", "langevin"}),
    ("network", {"configs", "unet", "toy"}),
    ("data and files", {"data", "checkpoint", "grids", "jobs", "runs", "runlog", "pretrained", "metrics"}),
    ("loading and generation", {"loading", "graphed", "generation", "onnx_export"}),
    ("training", {"train"}),
    ("evaluation", {"evaluate"}),
    ("the book and its studies", {"viz", "studies", "studies.table2", "studies.beyond", "studies.figures"}),
    ("entry points", {"cli", "__main__", "__init__"}),
]
MATH = {"schedules", "losses", "diffusion", "guidance", "samplers", "langevin"}
NEVER = {  # what a module must not import, directly or through others
    **{m: {"configs", "train", "loading", "checkpoint"} for m in MATH},
    "samplers": {"train", "loading", "configs", "checkpoint"},
    "generation": {"train"},
    "evaluate": {"train"},
    "loading": {"train", "generation"},
}
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    rel = path.relative_to(LIB).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The ddpm_lib modules that ``path`` imports, at the top or inside a function."""
    me = module_name(path)
    package = me.split(".")[:-1] if path.name != "__init__.py" else me.split(".") if me != "__init__" else []
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("ddpm_lib"):
                target = node.module.removeprefix("ddpm_lib").lstrip(".")
            else:
                continue
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            found = [n for n in names if n in known]  # ``from . import checkpoint``: the names are modules
            if found:
                out |= set(found)
            elif target in known or not target:  # a name from a module, or from the package's face
                out.add(target or "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ddpm_lib."):
                    out.add(a.name.removeprefix("ddpm_lib."))
    out.discard(me)
    return {m for m in out if m}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    placed = set().union(*(names for _, names in LAYERS))
    assert set(graph) == placed, f"unplaced: {sorted(set(graph) - placed)}, gone: {sorted(placed - set(graph))}"


def test_there_is_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_one_above_it(graph):
    layer = {m: k for k, (_, names) in enumerate(LAYERS) for m in names}
    upward = [f"{m} ({LAYERS[layer[m]][0]}) imports {d} ({LAYERS[layer[d]][0]})"
              for m, deps in graph.items() for d in deps if layer[d] > layer[m]]
    assert not upward, upward


def test_the_math_sampling_and_evaluation_stay_below_training_and_loading(graph):
    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    bad = {m: sorted(reach(m) & banned) for m, banned in NEVER.items() if reach(m) & banned}
    assert not bad, bad


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


# Helpers the library provides; a chapter that defines its own copy drifts from it.
LIBRARY_HELPERS = {"mosaic": "grids.mosaic", "grid4": "grids.mosaic", "html_row": "viz.html_table",
                   "html_table": "viz.html_table", "to_uint8": "data.to_uint8", "to_model_range": "data.to_model_range",
                   "image_grid": "grids.image_grid", "save_grid": "grids.save_grid", "train_run": "train.fit"}


@pytest.mark.parametrize("notebook", sorted((ROOT / "book").glob("*.ipynb")), ids=lambda p: p.name)
def test_the_book_calls_the_library_for_its_helpers(notebook):
    cells = json.loads(notebook.read_text(encoding="utf8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    defined = {n.name for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    copies = {name: LIBRARY_HELPERS[name] for name in defined & set(LIBRARY_HELPERS)}
    assert not copies, f"{notebook.name} defines its own {copies}: call ddpm_lib instead"
    assert "127.5" not in code, f"{notebook.name} scales pixels by hand: use data.to_model_range / data.to_uint8"
    assert "p_sample_loop" not in code and ".backward()" not in code, (
        f"{notebook.name} writes a sampling or training loop by hand: use samplers.sample_loop / train.fit")


def test_the_version_is_the_one_pyproject_gives():
    from ddpm_lib import __version__

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
