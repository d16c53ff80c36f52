"""One vocabulary: a letter of the notation (:data:`llmcomm.notation.NOTATION`) means one thing project-wide.

The models (``predict/``) and the comparisons (``compare/``) may bind a notation name — a parameter, an assignment,
loop, ``with`` or comprehension target, a lambda argument, an import alias — or spell it as a string (a dict key, a
DataFrame column, a keyword argument) only where it means the notation's meaning. Every such place is listed below,
module by module; a new one fails with its module, line and letter, and a listed one that no longer occurs fails too
(the list cannot rot). ``except … as e`` is not a binding of the EP degree e: exceptions are not notation.
"""
from __future__ import annotations

import ast
from pathlib import Path

from llmcomm.notation import GROUPS, NOTATION

SRC = Path(__file__).resolve().parents[1] / "src" / "llmcomm"
PACKAGES = ("predict", "compare")

# (module, kind, name): ``kind`` is "name" (a binding) or "key" (a string: dict key, column, keyword argument). Each
# entry was reviewed: there the letter means exactly its notation meaning.
ALLOWED: set[tuple[str, str, str]] = set()


def _allow(module: str, kind: str, names: str) -> None:
    ALLOWED.update((module, kind, x) for x in names.split())


# predict/: the workload (b, S, G, w), the layout (t, p, e, g GPUs per node), the model's shapes (h, L, V, a, d, E, k,
# F_ex, F_sh), one forward's tokens (s, T) and capacity C, a GEMM's M_g, N_g, K_g, a message of m bytes on n ranks,
# the α-β parameters alpha, beta of a link and a time tau.
_allow("predict/advise.py", "name", "b S G w h L V t p g e")
_allow("predict/advise.py", "key", "b S G e")                   # the workload of each advice row
_allow("predict/collectives.py", "name", "g m n alpha beta tau")
_allow("predict/compute.py", "name", "b S G w h V t p e s T")
_allow("predict/disagg_advice.py", "name", "b S G g t p m")         # the workload, layouts, a call's m bytes
_allow("predict/disagg_advice.py", "key", "b S G")                 # the workload of the advice report
_allow("predict/handoff.py", "name", "G g")
_allow("predict/handoff.py", "key", "b S")                      # the share frame's workload columns
_allow("predict/compute.py", "key", "e C")                      # ExpertLayout(e=…, C=…)
_allow("predict/cost.py", "name", "w h V t g T m")
_allow("predict/cost.py", "key", "g")                           # collective_time(…, g=…)
_allow("predict/fit.py", "name", "w M_g N_g K_g m n alpha beta tau")
_allow("predict/hardware.py", "name", "w t p g n alpha beta tau")
_allow("predict/kernels.py", "name", "b w h a d E k F_ex F_sh t e s T C M_g N_g K_g tau")
_allow("predict/latency.py", "name", "b S G w t p e g s m n")
_allow("predict/latency.py", "key", "e g m n")                  # a message's m and n; e=…, g=… arguments
_allow("predict/moe_advice.py", "name", "b S G w h V t p e g")
_allow("predict/moe_advice.py", "key", "e b S G")
_allow("predict/placement.py", "name", "L t p g")

# compare/: measured and predicted frames carry the configuration's columns (t, p, e, b, S, G), model tables the
# model's (h, L, V, a_kv, E, k, F_ex, L_moe), the public data's frames m (message bytes), n (ranks) and T (tokens).
_allow("compare/calibration.py", "name", "S h t p n")
_allow("compare/calibration.py", "key", "S h L V T m n")
_allow("compare/cpu_calibration.py", "name", "S G s M_g N_g K_g")
_allow("compare/cpu_calibration.py", "key", "S L V h")                # ModelSpec(L=…, V=…) of a timed layer shape
_allow("compare/disaggregated.py", "key", "b S G")
_allow("compare/handoff.py", "name", "g")                       # GPUs per node of the public setup
_allow("compare/gpu.py", "name", "b S t")
_allow("compare/gpu.py", "key", "b S G t")
_allow("compare/inrun.py", "name", "b S G w t p m n beta")
_allow("compare/inrun.py", "key", "b S G n")
_allow("compare/moe.py", "name", "b S G w h E k T C phi m")
_allow("compare/moe.py", "key", "b S G h L a_kv E k F_ex L_moe t p e C phi")
_allow("compare/paper.py", "name", "b S G w h L V t p")         # the sympy symbols of the paper's formulas
_allow("compare/paper.py", "key", "S G w V g t")                # NOTATION_MAP's symbols; g=, the floors' t
_allow("compare/sweeps.py", "name", "b S G t p e")              # Config's fields
_allow("compare/sweeps.py", "key", "b S G t p e")
_allow("compare/validate.py", "name", "t p")
_allow("compare/validate.py", "key", "G t p")
_allow("compare/vidur.py", "name", "w h a d T M_g N_g K_g m n tau")
_allow("compare/vidur.py", "key", "T m n")                   # a network row's m and n
_allow("compare/nccl_data.py", "name", "m n tau")
_allow("compare/nccl_data.py", "key", "m n")               # a table row's m (bytes) and n (ranks)

# The GEMM dimension columns: the GEMM op records (predict/kernels.py) and the frames and the out-of-sample table built
# from the public kernel times (compare/vidur.py, compare/calibration.py) and this CPU's (compare/cpu_calibration.py)
# call M_g, N_g, K_g "M", "N", "K" — the GEMM
# literature's (and cuBLAS's) names, declared as their columns in llmcomm.notation (``json``). Of the three only "N"
# is also a notation name (the GPUs of a layout, whose column is "gpus"); in these records it is a GEMM dimension.
GEMM_COLUMNS = {("predict/kernels.py", "key", "N"), ("compare/vidur.py", "key", "N"),
                ("compare/calibration.py", "key", "N"), ("compare/cpu_calibration.py", "key", "N")}
ALLOWED |= GEMM_COLUMNS


def _targets(node):
    if isinstance(node, ast.Name):
        yield node.id, node.lineno
    elif isinstance(node, (ast.Tuple, ast.List)):
        for x in node.elts:
            yield from _targets(x)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)


def _uses(tree: ast.AST):
    """(kind, name, line) of every binding and every string constant of ``tree``."""
    text_parts = set()                         # literal parts and format specs of f-strings: text, not keys
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text_parts |= {id(x) for x in node.values if isinstance(x, ast.Constant)}
        elif isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            text_parts |= {id(x) for x in ast.walk(node.format_spec)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                yield "name", arg.arg, arg.lineno
            if not isinstance(node, ast.Lambda):
                yield "name", node.name, node.lineno
        elif isinstance(node, ast.ClassDef):
            yield "name", node.name, node.lineno
        elif isinstance(node, ast.Assign):
            for tg in node.targets:
                yield from (("name", x, line) for x, line in _targets(tg))
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.comprehension,
                               ast.NamedExpr)):
            yield from (("name", x, line) for x, line in _targets(node.target))
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            yield from (("name", x, line) for x, line in _targets(node.optional_vars))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                yield "name", (alias.asname or alias.name).split(".")[0], node.lineno
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg:
                    yield "key", kw.arg, kw.value.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in text_parts:
            yield "key", node.value, node.lineno


def _found() -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            module = path.relative_to(SRC).as_posix()
            for kind, name, line in _uses(ast.parse(path.read_text())):
                if name in NOTATION:
                    out.setdefault((module, kind, name), []).append(line)
    return out


def test_predict_and_compare_bind_notation_letters_only_in_their_meaning():
    found = _found()
    bad = [f"src/llmcomm/{module}:{line}: {'binds' if kind == 'name' else 'spells the key'} {name!r} "
           f"(notation: {NOTATION[name].meaning}) — rename it, or allow it in tests/test_notation.py if it means that"
           for (module, kind, name), lines in sorted(found.items()) if (module, kind, name) not in ALLOWED
           for line in sorted(set(lines))]
    assert not bad, "notation letters with another meaning:\n" + "\n".join(bad)


def test_every_allowed_binding_occurs():
    found = _found()
    stale = sorted(x for x in ALLOWED if x not in found)
    assert not stale, f"allowed in tests/test_notation.py but no longer bound: {stale}"


def test_gemm_dimensions_are_notation():
    gemm = {x.name: x for x in NOTATION.values() if x.group == "gemm"}
    assert set(gemm) == {"M_g", "N_g", "K_g"} and "gemm" in GROUPS
    assert [gemm[x].json for x in ("M_g", "N_g", "K_g")] == ["M", "N", "K"]    # the op records' and tables' columns
    assert len({x.latex for x in NOTATION.values()}) == len(NOTATION)


def test_the_check_sees_every_kind_of_binding():
    src = '''
import numpy as e
def f(S, *, k=1, **F):
    t = 1
    for N, (h, L) in x: pass
    with open(x) as G: pass
    y = [s for s in x]
    g = lambda w: w
    (T := 2)
    c += 1
    try:
        pass
    except ValueError as e:
        pass
    return {"Q": 1, "V": p["b"]}, dict(n=1), f"{x:e} m{x}"
'''
    got = {(kind, name) for kind, name, _ in _uses(ast.parse(src)) if name in NOTATION}
    names = {"e", "S", "k", "F", "t", "N", "h", "L", "G", "s", "g", "w", "T", "c"}
    assert got == {("name", x) for x in names} | {("key", "V"), ("key", "b"), ("key", "n")}
