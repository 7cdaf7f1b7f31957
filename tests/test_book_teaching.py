"""What every chapter of the book holds for its reader, read from the committed notebooks.

* Exercises: at least four per chapter, each with a label and a solution folded until the reader opens it
  (sphinx-exercise's ``{exercise}`` and ``{solution}`` directives, or ``{solution-start}`` …
  ``{solution-end}`` around code cells); at least one is a pen-and-paper derivation (``:class: derivation``);
  a computational solution asserts its answer.
* The algorithms are shown from the library's source (``literalinclude`` with ``:pyobject:``), so the book
  shows the code it runs; the objects named must exist, and their listings are free of combining accents.
* Figures are legible: the chapters use the book's text sizes (``viz.use_book_style``) and set none smaller
  than ``viz.MIN_FONT_PT``.
* Text that a reader sees in a fixed-width output or a figure has no combining accents (x̂ drawn as x
  followed by U+0302 lands on the wrong letter in many fonts): mathtext or plain words instead.
* Plumbing is folded: a code cell longer than 25 lines, or one that only draws a figure (mostly plotting calls,
  no ``assert``), is tagged ``hide-input`` or ``remove-input``; so is the Colab install cell.
* The reader sees no words about how the project is run.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import unicodedata
from pathlib import Path

import nbformat
import pytest

from ddpm_lib import viz

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))
MIN_EXERCISES = 4
MAX_VISIBLE_CODE_LINES = 25
HIDING_TAGS = {"hide-input", "remove-input", "hide-cell", "remove-cell"}
PROCESS_WORDS = re.compile(r"\b(issue|issues|session|sessions|ticket|acceptance|the target|targets of)\b", re.I)

EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n((?::[a-z-]+:[^\n]*\n)*)")
SOLUTION = re.compile(r"```\{solution(?:-start)?\}\s*([\w-]+)[^\n]*\n((?::[a-z-]+:[^\n]*\n)*)")
LITERALINCLUDE = re.compile(r"```\{literalinclude\}\s*(\S+)\s*\n((?::[a-z-]+:[^\n]*\n)*)")


def _options(block: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r":([a-z-]+):([^\n]*)", block)}


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.fixture(params=CHAPTERS, ids=[p.stem for p in CHAPTERS])
def chapter(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_there_are_chapters() -> None:
    assert len(CHAPTERS) >= 7


def test_every_chapter_ends_with_exercises_and_folded_solutions(chapter) -> None:
    path, nb = chapter
    text = _markdown(nb)
    exercises = [_options(m.group(1)) for m in EXERCISE.finditer(text)]
    labels = [e.get("label") for e in exercises]
    assert len(exercises) >= MIN_EXERCISES, f"{path.name}: {len(exercises)} exercises, want {MIN_EXERCISES}"
    assert all(labels) and len(set(labels)) == len(labels), f"{path.name}: exercise labels {labels}"
    assert any("derivation" in e.get("class", "").split() for e in exercises), \
        f"{path.name}: no pen-and-paper exercise (:class: derivation)"
    solutions = {m.group(1): _options(m.group(2)) for m in SOLUTION.finditer(text)}
    assert set(labels) <= set(solutions), f"{path.name}: exercises without a solution: {set(labels) - set(solutions)}"
    for label, options in solutions.items():
        assert "dropdown" in options.get("class", "").split(), f"{path.name}: solution {label} is not folded"


def test_computational_solutions_assert_their_answers(chapter) -> None:
    path, nb = chapter
    inside, code = None, []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            start = re.search(r"```\{solution-start\}\s*([\w-]+)", cell.source)
            if start:
                inside, code = start.group(1), []
            if inside and "{solution-end}" in cell.source:
                assert code, f"{path.name}: solution {inside} has no code cell"
                assert any("assert " in c for c in code), f"{path.name}: solution {inside} asserts nothing"
                inside = None
        elif inside:
            code.append(cell.source)
    assert inside is None, f"{path.name}: solution {inside} is never closed"


def test_included_source_exists() -> None:
    found = 0
    for path in CHAPTERS:
        for m in LITERALINCLUDE.finditer(_markdown(nbformat.read(path, as_version=4))):
            target = (path.parent / m.group(1)).resolve()
            assert target.is_file() and ROOT in target.parents, f"{path.name}: {m.group(1)}"
            options = _options(m.group(2))
            assert "pyobject" in options, f"{path.name}: include {m.group(1)} by :pyobject:, not by lines"
            module = importlib.import_module(".".join(target.relative_to(ROOT).with_suffix("").parts))
            obj = module
            for part in options["pyobject"].split("."):
                obj = getattr(obj, part)  # AttributeError names what is gone
            shown = _combining(inspect.getsource(obj))
            assert not shown, f"{path.name}: the listing of {options['pyobject']} has combining accents {shown}"
            found += 1
    assert found >= 2, "Algorithms 1 and 2 are shown from the library's source"


def _font_sizes(source: str) -> list[float]:
    """Every literal number passed as fontsize=, size= (in text calls) or prop={'size': …} in a code cell."""
    sizes = []
    try:
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    except SyntaxError:
        return sizes
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("fontsize", "labelsize", "titlesize"):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, (int, float)):
                sizes.append(node.value.value)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("set_fontsize", "set_size"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, (int, float)):
                sizes.append(node.args[0].value)
    return sizes


def test_figures_use_the_book_text_sizes(chapter) -> None:
    path, nb = chapter
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    draws = any(re.search(r"plt\.|Figure\(|viz\.(image_row|timestep_scrubber)", c) for c in code)
    if draws:
        assert any("viz.use_book_style()" in c for c in code), f"{path.name}: call viz.use_book_style()"
    small = [s for c in code for s in _font_sizes(c) if s < viz.MIN_FONT_PT]
    assert not small, f"{path.name}: text sizes {small} below {viz.MIN_FONT_PT} pt"


def _combining(text: str) -> list[str]:
    return sorted({text[max(0, k - 1):k + 1] for k, ch in enumerate(text) if unicodedata.combining(ch)})


def test_no_combining_accents_in_code_outputs_or_figure_text(chapter) -> None:
    path, nb = chapter
    found = []
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        found += [(k, "source", s) for s in _combining(cell.source)]
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [v for key, v in out.get("data", {}).items()
                                             if key in ("text/plain", "text/html") and isinstance(v, str)]
            found += [(k, "output", s) for t in texts for s in _combining(t)]
    assert not found, f"{path.name}: combining accents (cell, where, text): {found}"


def test_long_plumbing_cells_are_folded(chapter) -> None:
    path, nb = chapter
    long_open = [k for k, c in enumerate(nb.cells)
                 if c.cell_type == "code" and len(c.source.splitlines()) > MAX_VISIBLE_CODE_LINES
                 and not HIDING_TAGS & set(c.metadata.get("tags", []))]
    assert not long_open, f"{path.name}: cells {long_open} are over {MAX_VISIBLE_CODE_LINES} lines and not folded"


PLOTTING = re.compile(r"\b(ax\d?|ax_\w+|axes|fig|plt)\.|\bFigure\(|\.(imshow|scatter|quiver|plot)\(")


def _only_draws(source: str) -> bool:
    lines = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    drawing = [line for line in lines if PLOTTING.search(line)]
    return "assert" not in source and len(drawing) >= 3 and len(drawing) >= 0.4 * len(lines)


def test_figure_drawing_and_install_cells_are_folded(chapter) -> None:
    path, nb = chapter
    open_cells = [k for k, c in enumerate(nb.cells) if c.cell_type == "code"
                  and (_only_draws(c.source) or "colab-install" in c.metadata.get("tags", []))
                  and not HIDING_TAGS & set(c.metadata.get("tags", []))]
    assert not open_cells, f"{path.name}: cells {open_cells} only draw a figure (or install) and are not folded"


def test_the_reader_sees_no_words_about_the_project_process(chapter) -> None:
    path, nb = chapter
    for cell in nb.cells:
        texts = [cell.source] if cell.cell_type == "markdown" else [
            t for out in cell.get("outputs", []) for t in [out.get("text", "")]
            + [v for v in out.get("data", {}).values() if isinstance(v, str)]]
        for text in texts:
            hit = PROCESS_WORDS.search(re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text))
            assert not hit, f"{path.name}: {hit.group(0)!r} in {text[max(0, hit.start() - 60):hit.end() + 60]!r}"
