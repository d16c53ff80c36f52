"""The book's notebooks must be committed *executed*.

nbval (``make test``) only compares a cell when the committed cell has an ``execution_count``, and never
compares PNG images: a notebook stripped of its outputs passes strict nbval while testing nothing, and the
book (built with execution off) would show a chapter without results. These checks make that a failure.

How to fix a failure: ``make execute NB=book/<chapter>.ipynb`` and commit the notebook.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
TOC = (BOOK / "_toc.yml").read_text(encoding="utf-8")
TOC_FILES = set(re.findall(r"^\s*-?\s*(?:file|root):\s*([^\s#]+)", TOC, flags=re.MULTILINE))

# Comment markers after which a cell may legitimately end with no stored output.
NO_OUTPUT_MARKERS = ("# NBVAL_SKIP",)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _code_cells(nb: dict) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and _source(c).strip()]


def _python_only(src: str) -> str:
    """Source with IPython magics/shell lines blanked, so that ``ast`` can parse it."""
    if src.lstrip().startswith("%%"):
        return ""
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines())


def _must_show_something(src: str) -> bool:
    """True when the cell's last statement certainly produces an output.

    That is a bare expression other than a call (a name, attribute, subscript, literal, operation: IPython
    displays its value), or a call to print/display. Other calls may legitimately return None, so they are
    not required to show anything; a trailing ``;`` suppresses the display.
    """
    code = _python_only(src)
    if not code.strip() or code.rstrip().endswith(";"):
        return False
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    if not tree.body:
        return False
    last = tree.body[-1]
    if any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "display")
           for node in ast.walk(tree)):
        return True
    if not isinstance(last, ast.Expr):
        return False
    value = last.value
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return False  # a docstring-like string literal; odd but harmless
    return not isinstance(value, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom))


def test_book_has_notebooks():
    assert NOTEBOOKS, f"no notebooks in {BOOK}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_toc(path):
    assert path.stem in TOC_FILES, (f"{path.name} is not listed in book/_toc.yml: it would be neither built "
                                    "into the book nor executed by `make book`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_kernel_is_python3(path):
    ks = _load(path).get("metadata", {}).get("kernelspec", {})
    assert ks.get("name") == "python3", (f"{path.name}: kernelspec name is {ks.get('name')!r}; must be 'python3' "
                                         "(the project's venv kernel that make book/make test run)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed(path):
    nb = _load(path)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code cell: a chapter runs the library"
    problems = []
    for i, cell in cells:
        src = _source(cell)
        first = src.lstrip().splitlines()[0] if src.strip() else ""
        if cell.get("execution_count") is None:
            problems.append(f"cell {i}: never executed (no execution_count): nbval would skip it")
            continue
        if not cell.get("outputs") and _must_show_something(src) and not first.startswith(NO_OUTPUT_MARKERS):
            problems.append(f"cell {i}: ends in an expression but has no stored output (stripped?)")
        tags = cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and "raises-exception" not in tags:
                problems.append(f"cell {i}: committed with an error ({out.get('ename')}: {out.get('evalue')})")
    assert not problems, (f"{path.name} is not committed executed — run `make execute NB=book/{path.name}` "
                          "and commit it:\n  " + "\n  ".join(problems))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executed_in_order_in_one_run(path):
    """Execution counts 1, 2, 3, ... top to bottom: one fresh top-to-bottom run, as `make execute` does."""
    counts = [c.get("execution_count") for _, c in _code_cells(_load(path))]
    counts = [n for n in counts if n is not None]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(counts)} in order — the stored outputs do not "
        f"come from one fresh top-to-bottom run; run `make execute NB=book/{path.name}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shows_results(path):
    outputs = [o for _, c in _code_cells(_load(path)) for o in c.get("outputs", [])]
    assert outputs, f"{path.name}: no code cell has any stored output"
