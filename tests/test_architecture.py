"""The shape of the house: which package may import which, what runs without torch, what a chapter may contain,
that every reference points to something that exists, and that no block of code stands twice in ``src/``."""
from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmcomm"

# package → (llmcomm subpackages it must not import, third-party modules it must not import)
RULES = {
    "derive": ({"predict", "measure", "compare", "report", "cli"}, {"torch", "deepspeed", "transformers", "pandas"}),
    "predict": ({"measure", "compare", "report", "cli"}, {"torch", "deepspeed", "transformers"}),
    "measure": ({"predict", "compare", "report", "cli"}, set()),
    "report": ({"measure", "compare", "cli"}, {"torch", "deepspeed", "transformers"}),
}
# modules at the top of the package that everyone may import: they import no subpackage themselves
BASE = ("spec.py", "notation.py", "record.py")


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            else:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_direction(package):
    banned_sub, banned_ext = RULES[package]
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "llmcomm" and len(parts) > 1 and parts[1] in banned_sub:
                bad.append(f"{path.relative_to(SRC)} imports {name}")
            if parts[0] in banned_ext:
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


def test_base_modules_import_no_subpackage():
    for base in BASE:
        for name in _imports(SRC / base):
            parts = name.split(".")
            assert not (parts[0] == "llmcomm" and len(parts) > 1 and parts[1] in
                        {"derive", "predict", "measure", "compare", "report", "cli"}), f"{base} imports {name}"


def _torchless(tmp_path) -> dict:
    """An environment in which ``import torch`` (and deepspeed, transformers) fails."""
    for mod in ("torch", "deepspeed", "transformers"):
        (tmp_path / mod).mkdir()
        (tmp_path / mod / "__init__.py").write_text(f"raise ImportError('{mod} is not available here (test)')\n")
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT / 'src'}"
    return env


def test_predict_and_advise_run_without_torch(tmp_path):
    env = _torchless(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "not available here" in check.stderr
    runs = [["predict", "--model", "llama-3.1-8b", "--tp", "4", "--pp", "2", "--hardware", "h100-sxm", "--json"],
            ["advise", "--model", "llama-3.1-70b", "--gpus", "16", "--json"],
            ["predict", "--model", "no-such-model"]]
    outs = [subprocess.run([sys.executable, "-m", "llmcomm", *argv], env=env, capture_output=True, text=True,
                           cwd=tmp_path) for argv in runs]
    assert outs[0].returncode == 0, outs[0].stderr
    assert json.loads(outs[0].stdout)["latency"]["ttft_s"] > 0
    assert outs[1].returncode == 0, outs[1].stderr
    assert len(json.loads(outs[1].stdout)["layouts"]) == 4
    assert outs[2].returncode == 2 and "Traceback" not in outs[2].stderr
    code = ("import sys, pkgutil, importlib, llmcomm.derive, llmcomm.predict\n"
            "for pkg in (llmcomm.derive, llmcomm.predict):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# ------------------------------------------------------------------------------------------------- chapters
BOOK = ROOT / "book"


def _code_cells(path: Path):
    nb = json.loads(path.read_text())
    return [("".join(c["source"]) if isinstance(c["source"], list) else c["source"])
            for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", sorted(BOOK.glob("*.ipynb")), ids=lambda p: p.name)
def test_chapters_are_thin(path):
    bad = []
    for i, src in enumerate(_code_cells(path)):
        try:
            tree = ast.parse("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines()))
        except SyntaxError as e:
            bad.append(f"code cell {i}: not Python ({e})")
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                bad.append(f"code cell {i}: defines {type(node).__name__} (logic belongs in the library)")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("subprocess", "os", "pathlib", "json") for n in names):
                    bad.append(f"code cell {i}: imports {names} (files and processes go through the library)")
        if re.search(r"src/llmcomm|\.\./shared", src):
            bad.append(f"code cell {i}: a path into the source tree or outside the repository")
    assert not bad, f"{path.name}:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------------------------- references
_DOCS = [ROOT / "README.md", *sorted(BOOK.glob("*.md")), *sorted(BOOK.glob("*.ipynb")), *sorted(SRC.rglob("*.py")),
         *sorted(SRC.rglob("*.md")), *sorted((ROOT / "tools").rglob("*.py")), *sorted((ROOT / "tools").rglob("*.md")),
         *sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "Makefile"]


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _text(path: Path) -> str:
    """What a file says: a notebook's cell sources (its outputs are records of a run, not references)."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        return "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"])
    return path.read_text()


def test_every_llmcomm_name_in_docs_and_code_exists():
    missing = set()
    for path in _DOCS:
        for m in re.finditer(r"\bllmcomm(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?![\w/])", _text(path)):
            name = m.group(0).rstrip(".")
            if any(part.isupper() for part in name.split(".")):      # a placeholder (llmcomm.measure.runs.NAME)
                continue
            if not _resolves(name):
                missing.add(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "references to names that do not exist:\n  " + "\n  ".join(sorted(missing))


def test_every_repository_path_in_docs_exists():
    missing = set()
    pat = re.compile(r"(?<![\w/.-])((?:src|tools|tests|book|benchmarks|data)/[\w./-]+\.(?:py|md|json|csv|sh|yml|ipynb))")
    for path in _DOCS:
        for m in pat.finditer(_text(path)):
            rel = m.group(1)
            if any(ch in rel for ch in "<*") or any(part.split(".")[0].isupper() for part in rel.split("/")):
                continue                                                  # a pattern or a placeholder
            if not (ROOT / rel).exists():
                missing.add(f"{path.relative_to(ROOT)}: {rel}")
    assert not missing, "paths that do not exist:\n  " + "\n  ".join(sorted(missing))


def test_no_reference_to_files_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in _DOCS if re.search(r"\.\./shared|STACK\.md", _text(p))]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------- one idea once
def _windows(path: Path, size: int = 6):
    lines = []
    for ln in path.read_text().splitlines():
        s = " ".join(ln.split())
        if not s or s.startswith(("#", "import ", "from ", '"""', ")", "]", "}")) or len(s) < 12:
            continue
        lines.append(s)
    for i in range(len(lines) - size + 1):
        yield tuple(lines[i:i + size])


def test_no_block_of_six_lines_stands_twice_in_src():
    seen: dict[tuple, str] = {}
    dups = []
    for path in sorted(SRC.rglob("*.py")):
        local = set()
        for win in _windows(path):
            if win in local:
                continue
            local.add(win)
            if win in seen and seen[win] != str(path):
                dups.append(f"{path.relative_to(SRC)} repeats {seen[win]}:\n    " + "\n    ".join(win))
            seen.setdefault(win, str(path.relative_to(SRC)))
    assert not dups, "\n".join(dups[:5])
