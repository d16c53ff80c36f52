"""Closed-form communication volumes, derived symbolically with sympy from the engine patterns.

From the message list of one forward (:func:`llmcomm.derive.patterns.pattern`) and the phase convention
(:mod:`llmcomm.derive.phases`):

* :func:`per_forward` — calls and bytes per (op, group) of one forward over ``s`` tokens;
* :func:`volumes` — calls and bytes per (phase, op, group) of a whole generation;
* :func:`total_bytes` — all ops summed, for a generation or one phase;
* :func:`regime` — the branch of such an expression for a named layout regime (TP, PP, hybrid, single rank);
* the readable totals :data:`B_TP`, :data:`B_PP`, :data:`B_hybrid` of DeepSpeed's pattern (typed once here, checked
  against the derivation by the tests; chapters import them);
* :func:`solve_crossover` — where two volumes are equal.

Sizes follow nccl-tests (:mod:`llmcomm.derive.conventions`); a collective on a group counts once per group.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from ..notation import G, L, S, V, b, h, p, s, t, w
from .conventions import bus_factor
from .patterns import W_TOKEN, pattern
from .phases import PHASES, forwards

__all__ = ["per_forward", "volumes", "total_bytes", "total_wire_bytes", "regime", "REGIMES", "branch", "solve_crossover", "tidy",
           "B_TP", "B_PP", "B_hybrid"]

#: Layout regimes by name → the truth values of the conditions the patterns carry (t > 1, p > 1).
REGIMES = {"single": (False, False), "TP": (True, False), "PP": (False, True), "hybrid": (True, True)}


def _readable(expr: sp.Expr) -> sp.Expr:
    """Factor, then group the activation terms inside sums: ``b(Shw(p − 1) + 8t)``, not ``b(Shpw − Shw + 8t)``."""
    return sp.factor(expr).replace(lambda x: x.is_Add, lambda x: sp.collect(x, [S * h * w, h * w], sp.factor))


def tidy(expr: sp.Expr) -> sp.Expr:
    """Fold conditions outward and factor each branch: ``(G − 1)(2L + 1)`` rather than ``2GL + G − 2L − 1``."""
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*[(_readable(e), c) for e, c in expr.args])
    return _readable(expr)


def per_forward(engine: str) -> dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(op, group): (calls, bytes)} of one forward over ``s`` tokens."""
    out: dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]] = {}
    for msg in pattern(engine):
        calls, nbytes = out.get((msg.op, msg.group), (sp.Integer(0), sp.Integer(0)))
        out[(msg.op, msg.group)] = (calls + msg.calls, nbytes + msg.calls * msg.bytes_per_call)
    return {key: (tidy(c), tidy(nb)) for key, (c, nb) in out.items()}


@lru_cache(maxsize=None)
def volumes(engine: str = "deepspeed") -> dict[tuple[str, str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(phase, op, group): (calls, bytes)} closed forms for a whole generation (1 prefill + G−1 decodes)."""
    out = {}
    for phase in PHASES:
        tokens, count = forwards(phase)
        for (op, group), (calls, nbytes) in per_forward(engine).items():
            out[(phase, op, group)] = (tidy(count * calls), tidy(count * nbytes.subs(s, tokens)))
    return out


def total_bytes(engine: str = "deepspeed", phase: str | None = None) -> sp.Expr:
    """Total bytes of a generation (or of one phase), all ops summed."""
    terms = [nb for (ph, _, _), (_, nb) in volumes(engine).items() if phase in (None, ph)]
    return sp.piecewise_fold(sp.Add(*terms))


def total_wire_bytes(engine: str = "deepspeed", phase: str | None = None) -> sp.Expr:
    """Symbolic twin of :func:`llmcomm.report.tables.wire_bytes`: nccl-tests size × f(group size) summed over the
    ops of a generation (or one phase)."""
    terms = [nb * bus_factor(op, sp.sympify(group)) for (ph, op, group), (_, nb) in volumes(engine).items()
             if phase in (None, ph)]
    return sp.piecewise_fold(sp.Add(*terms))


def regime(expr: sp.Expr, name: str) -> sp.Expr:
    """The branch of ``expr`` that holds in layout regime ``name`` (:data:`REGIMES`): ``"TP"`` (t > 1, p = 1 —
    ``p`` is then replaced by 1), ``"PP"`` (t = 1, p > 1), ``"hybrid"`` (t > 1, p > 1) or ``"single"`` (t = p = 1).
    Conditions are resolved by name, never by branch position."""
    try:
        tp_on, pp_on = REGIMES[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; one of {', '.join(REGIMES)}") from None
    expr = sp.piecewise_fold(sp.sympify(expr))
    truth = {sp.Gt(t, 1): sp.true if tp_on else sp.false, sp.Gt(p, 1): sp.true if pp_on else sp.false}
    expr = expr.xreplace(truth)
    if not tp_on:
        expr = expr.subs(t, 1)
    if not pp_on:
        expr = expr.subs(p, 1)
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):           # all conditions resolved: pick the true branch
        expr = next(e for e, c in expr.args if c == sp.true)
    return expr


def branch(expr: sp.Expr) -> tuple[sp.Expr, sp.Expr | None]:
    """(value, condition) of a one-branch Piecewise (``value`` when ``condition``, else 0); ``(expr, None)`` for an
    expression without condition. For tables that show a formula and the case it holds in."""
    expr = sp.piecewise_fold(sp.sympify(expr))
    if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1] == (0, True):
        value, cond = expr.args[0]
        return value, cond
    return expr, None


def solve_crossover(lhs: sp.Expr, rhs: sp.Expr, var: sp.Symbol, **values) -> list[sp.Expr]:
    """Values of ``var`` where two volume expressions are equal, after substituting ``values`` (by symbol name).
    Solved over the positive reals (a crossover may fall between integers); the roots are returned in ``var``."""
    subs = {sym: values[sym.name] for sym in (lhs.free_symbols | rhs.free_symbols) if sym.name in values}
    x = sp.Symbol(var.name, positive=True)
    subs[var] = x
    eq = sp.Eq(sp.piecewise_fold(lhs).subs(subs), sp.piecewise_fold(rhs).subs(subs))
    return [r.subs(x, var) for r in sp.solve(eq, x)]


# --------------------------------------------------------------------------------------------------------------------
# The readable totals of DeepSpeed's pattern (nccl-tests sizes summed over a generation), typed once; the tests check
# each against regime(total_bytes("deepspeed"), …).
# --------------------------------------------------------------------------------------------------------------------
#: TP only (t > 1, p = 1): 2L all-reduces of the activation per forward and one of the logits; independent of t.
B_TP = b * w * (2 * L * h * (S + G - 1) + G * V)
#: PP only (t = 1, p > 1): one hop of the activation per stage boundary per forward, and the token hand-back.
B_PP = (p - 1) * b * h * w * (S + G - 1) + W_TOKEN * b * G
#: Hybrid (t > 1, p > 1), partitioned hops: TP's all-reduces, plus per boundary the t sends of 1/t and the
#: all-gather that rebuilds the activation, plus the hand-back from every TP rank of the last stage.
B_hybrid = B_TP + 2 * (p - 1) * b * h * w * (S + G - 1) + W_TOKEN * t * b * G
