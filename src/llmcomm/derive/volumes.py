"""Closed-form communication volumes, derived symbolically with sympy from the message patterns.

From the message list of one forward (:func:`llmcomm.derive.patterns.pattern`) and the phase convention
(:mod:`llmcomm.derive.phases`):

* :func:`per_forward` — calls and bytes per (op, group) of one forward over ``s`` tokens;
* :func:`volumes` — calls and bytes per (phase, op, group) of a whole generation;
* :func:`total_bytes` — all ops summed, for a generation or one phase;
* :func:`regime` — the branch of such an expression for a named layout regime (TP, PP, hybrid, single rank);
* the readable totals :data:`B_TP`, :data:`B_PP`, :data:`B_hybrid` of DeepSpeed's pattern (typed once here, checked
  against the derivation by the tests; chapters import them);
* :func:`solve_crossover` — where two volumes are equal;
* traffic, what moves rather than the nccl-tests size (:mod:`llmcomm.derive.traffic`): :func:`link_bytes` (all
  links together) and :func:`busiest_sent` (the rank that sends the most, over the rank classes of a pipeline).

Sizes follow nccl-tests (:mod:`llmcomm.derive.conventions`); a collective on a group counts once per group.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from ..notation import G, L, S, V, b, g, h, p, s, t, w
from . import patterns
from .patterns import W_TOKEN
from . import traffic
from .conventions import shm_split
from .phases import PHASES, forwards

__all__ = ["per_forward", "volumes", "total_bytes", "RANK_CLASSES", "stage_class_layers",
           "class_sent", "busiest_sent", "link_bytes", "inter_node_bytes", "even_split", "regime", "REGIMES", "branch", "solve_crossover", "tidy", "lighter_condition", "LIGHTER_METRICS",
           "hop_traffic",
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


def per_forward(pattern: str) -> dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(op, group): (calls, bytes)} of one forward over ``s`` tokens."""
    out: dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]] = {}
    for msg in patterns.pattern(pattern):
        calls, nbytes = out.get((msg.op, msg.group), (sp.Integer(0), sp.Integer(0)))
        out[(msg.op, msg.group)] = (calls + msg.calls, nbytes + msg.calls * msg.bytes_per_call)
    return {key: (tidy(c), tidy(nb)) for key, (c, nb) in out.items()}


@lru_cache(maxsize=None)
def volumes(pattern: str = "deepspeed") -> dict[tuple[str, str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(phase, op, group): (calls, bytes)} closed forms for a whole generation (1 prefill + G−1 decodes)."""
    out = {}
    for phase in PHASES:
        tokens, count = forwards(phase)
        for (op, group), (calls, nbytes) in per_forward(pattern).items():
            out[(phase, op, group)] = (tidy(count * calls), tidy(count * nbytes.subs(s, tokens)))
    return out


def total_bytes(pattern: str = "deepspeed", phase: str | None = None) -> sp.Expr:
    """Total bytes of a generation (or of one phase), all ops summed."""
    terms = [nb for (ph, _, _), (_, nb) in volumes(pattern).items() if phase in (None, ph)]
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


#: what :func:`lighter_condition` can compare: the busiest rank's sent bytes, all links' bytes, the nccl-tests sizes
LIGHTER_METRICS = {"busiest": "bytes the busiest rank sends", "links": "bytes all links carry",
                   "sizes": "nccl-tests sizes summed"}


def _positive_for_layout(factor: sp.Expr, name: str) -> bool:
    """Whether ``factor`` is positive for every layout of regime ``name`` (t ≥ 2 when TP is on, p ≥ 2 when PP is;
    every other positive integer symbol ≥ 1)."""
    t_on, p_on = REGIMES[name]
    shifted = {x: sp.Symbol(f"{x.name}_1", nonnegative=True) + 1 for x in factor.free_symbols
               if x.is_integer and x.is_positive}
    if t_on:
        shifted[t] = sp.Symbol("t_2", nonnegative=True) + 2
    if p_on:
        shifted[p] = sp.Symbol("p_2", nonnegative=True) + 2
    return bool(sp.expand(factor.subs(shifted)).is_positive)


@lru_cache(maxsize=None)
def lighter_condition(metric: str = "busiest", lighter: str = "vllm", heavier: str = "deepspeed",
                      regime_name: str = "TP") -> sp.Basic:
    """When pattern ``lighter`` moves fewer bytes than ``heavier`` over a generation, by ``metric``
    (:data:`LIGHTER_METRICS`), in layout regime ``regime_name``: the inequality ``heavier − lighter > 0`` derived from
    the closed forms (:func:`busiest_sent`, :func:`link_bytes`, :func:`total_bytes`), with every factor that is
    positive for all layouts of the regime (b, w, 1/t, t − 1, …) divided out, the terms in V on the left and the rest
    on the right: ``(2t − 3)·G·V > 2(t − 1)(S + G − 1)·h`` for the busiest rank, vLLM against DeepSpeed, under TP.
    ``sympy.false`` when no layout satisfies it (the sizes: vLLM names one more all-reduce and the same logits size).

    With the patterns swapped the coefficient of V is negative and the inequality reads ``|a|·V < …``. Raises
    ValueError if a factor without V has no fixed sign over the regime, or the coefficient of V changes sign (then the
    inequality could not be stated one way for every layout), or the metric is not a polynomial there (a pipeline's
    busiest rank is a maximum over its stages: compare its rank classes instead)."""
    if metric not in LIGHTER_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(LIGHTER_METRICS)}")
    if metric == "busiest" and not REGIMES[regime_name][1]:
        # one stage: the busiest rank is busiest_sent's p = 1 branch, the one class (what regime() would pick, faster)
        of = lambda pat: class_sent(pat, "single").subs(p, 1)  # noqa: E731
    else:
        of = {"busiest": busiest_sent, "links": link_bytes, "sizes": total_bytes}[metric]
    diff = sp.expand(regime(of(heavier), regime_name) - regime(of(lighter), regime_name))
    if diff == 0:
        return sp.false
    if diff.has(sp.Max, sp.Min, sp.Piecewise, sp.floor, sp.ceiling, sp.Mod):
        raise ValueError(f"{LIGHTER_METRICS[metric]} is not one polynomial in the {regime_name} regime")
    num, den = sp.fraction(sp.together(diff))
    (c_num, f_num), (c_den, f_den) = sp.factor_list(num), sp.factor_list(den)
    core, sign = sp.Integer(1), sp.sign(c_num) * sp.sign(c_den)
    for f, k in f_num + [(f, -k) for f, k in f_den]:
        if f.has(V):
            core *= f ** k
        elif _positive_for_layout(f, regime_name):
            continue
        elif _positive_for_layout(-f, regime_name):
            sign *= (-1) ** k
        else:
            raise ValueError(f"the factor {f} of {heavier} − {lighter} has no fixed sign over the {regime_name} regime")
    core = sp.expand(sign * core)
    if not core.has(V):
        return sp.Gt(core, 0)                   # no V: true or false for every layout (sympy decides it when it can)
    a = sp.factor(core.coeff(V))
    rest = sp.expand(core - a * V)
    if _positive_for_layout(a, regime_name):
        return sp.Gt(a * V, sp.factor(-rest), evaluate=False)        # a·V + rest > 0 ⇔ a·V > −rest
    if _positive_for_layout(-a, regime_name):
        return sp.Lt(sp.factor(-a) * V, sp.factor(rest), evaluate=False)   # ⇔ |a|·V < rest
    raise ValueError(f"the coefficient {a} of V changes sign over the {regime_name} regime")


def hop_traffic(pattern: str = "deepspeed") -> dict[str, sp.Expr]:
    """What ONE stage boundary moves in one forward over ``s`` tokens of a hybrid (t > 1, p > 1) under ``pattern``,
    read from its messages (the boundary's sends, ``where == "boundary"``, and the receiving stage's all-gathers,
    ``where == "receivers"``; the token hand-back is not a boundary's): ``{"stage link": bytes the sends put on the
    stage-to-stage links, "TP group's links": bytes the all-gathers put on the receiving stage's TP links, "into each
    receiving rank": bytes one rank of the receiving stage receives}``. A boundary's sends land one on each of the t
    ranks of the next stage; a ring all-gather is symmetric, so each rank receives what each sends
    (:func:`llmcomm.derive.traffic.sent_bytes`)."""
    out = {"stage link": sp.Integer(0), "TP group's links": sp.Integer(0), "into each receiving rank": sp.Integer(0)}
    for msg in patterns.pattern(pattern):
        if msg.where not in ("boundary", "receivers"):
            continue
        calls = regime(sp.piecewise_fold(msg.calls), "hybrid") / (p - 1)
        n, m = sp.sympify(msg.group), msg.bytes_per_call
        out["stage link" if msg.where == "boundary" else "TP group's links"] += calls * traffic.link_bytes(msg.op, n, m)
        out["into each receiving rank"] += (calls / t if msg.where == "boundary" else calls) * \
            traffic.sent_bytes(msg.op, n, m)
    return {key: sp.factor(sp.simplify(x)) for key, x in out.items()}


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


# --------------------------------------------------------------------------------------------------------------------
# Traffic closed forms (what moves, not the nccl-tests size): per rank class of a pipeline, under an algorithm.
# --------------------------------------------------------------------------------------------------------------------
#: The rank classes of a layout: one stage (p = 1); else the first stage, the middle stages (p ≥ 3), the last stage.
RANK_CLASSES = ("single", "first", "middle", "last")


def stage_class_layers(cls: str) -> sp.Expr:
    """Decoder layers a stage of class ``cls`` holds (DeepSpeed's uniform split: the first L mod p stages hold one
    more): single L; first ⌈L/p⌉; last ⌊L/p⌋; middle the most a middle stage holds (⌈L/p⌉ when L mod p ≥ 2)."""
    if cls == "single":
        return L
    if cls == "first":
        return sp.ceiling(L / p)
    if cls == "last":
        return sp.floor(L / p)
    return sp.Piecewise((sp.ceiling(L / p), sp.Mod(L, p) >= 2), (sp.floor(L / p), True))


def _class_calls(msg, cls: str) -> sp.Expr:
    """Calls of ``msg`` one rank of class ``cls`` takes part in (as a sender for p2p) per forward."""
    calls = sp.piecewise_fold(msg.calls)
    where = msg.where
    if where == "layers":
        return calls * stage_class_layers(cls) / L
    if where == "head":
        return calls if cls in ("single", "last") else sp.Integer(0)
    if where == "embed":
        return calls if cls in ("single", "first") else sp.Integer(0)
    if where == "receivers":
        return calls / (p - 1) if cls in ("middle", "last") else sp.Integer(0)
    if where == "boundary":
        return calls / (t * (p - 1)) if cls in ("first", "middle") else sp.Integer(0)
    if where == "wrap":
        return calls / t if cls == "last" else sp.Integer(0)
    if where == "experts":                      # expert parallelism: one stage, every rank in every call
        return calls if cls == "single" else sp.Integer(0)
    raise ValueError(where)


def even_split(expr: sp.Expr) -> sp.Expr:
    """``expr`` when p divides L (every stage holds L/p layers): ⌈L/p⌉ = ⌊L/p⌋ = L/p, L mod p = 0. For display;
    the numbers come from the exact split."""
    return sp.piecewise_fold(expr.replace(sp.ceiling, lambda x: x).replace(sp.floor, lambda x: x)
                             .replace(sp.Mod, lambda *a: sp.Integer(0)))


def _over_generation(pattern: str, per_forward, phase: str | None = None, op: str | None = None) -> sp.Expr:
    """Σ over the phases (or one ``phase``) and the messages of ``pattern`` (or those of ``op``) of
    forwards × ``per_forward(msg)`` with s set to the phase's tokens: the one sum behind every traffic total."""
    total = sp.Integer(0)
    for ph in PHASES:
        if phase not in (None, ph):
            continue
        tokens, count = forwards(ph)
        for msg in patterns.pattern(pattern):
            if op in (None, msg.op):
                total += count * per_forward(msg).subs(s, tokens)
    return sp.piecewise_fold(total)


def class_sent(pattern: str, cls: str, phase: str | None = None, op: str | None = None,
               algorithm: str = "ring") -> sp.Expr:
    """Bytes one rank of class ``cls`` sends over a generation (or one ``phase``; only messages of ``op`` when
    given), under ``algorithm``."""
    return _over_generation(pattern, lambda msg: _class_calls(msg, cls) * traffic.sent_bytes(
        msg.op, sp.sympify(msg.group), msg.bytes_per_call, algorithm), phase, op)


def busiest_sent(pattern: str, phase: str | None = None, op: str | None = None, algorithm: str = "ring") -> sp.Expr:
    """Bytes the busiest rank sends over a generation (or one phase / op): the largest over the rank classes."""
    single = class_sent(pattern, "single", phase, op, algorithm)
    first, middle, last = (class_sent(pattern, c, phase, op, algorithm) for c in ("first", "middle", "last"))
    return sp.Piecewise((single.subs(p, 1), sp.Eq(p, 1)), (sp.Max(first, last), sp.Eq(p, 2)),
                        (sp.Max(first, middle, last), True))


def link_bytes(pattern: str = "deepspeed", phase: str | None = None, op: str | None = None,
               algorithm: str = "ring") -> sp.Expr:
    """Bytes all links carry over a generation (or one phase / op): calls × the bytes one call puts on the links
    (:func:`llmcomm.derive.traffic.link_bytes`), summed."""
    return _over_generation(pattern, lambda msg: sp.piecewise_fold(msg.calls) * traffic.link_bytes(
        msg.op, sp.sympify(msg.group), msg.bytes_per_call, algorithm), phase, op)


def _crossing_bytes_per_call(msg, algorithm: str, spans: bool) -> sp.Expr:
    """Bytes one call of ``msg`` puts across nodes, ranks in order g per node. ``spans``: the TP group spans
    t/g ≥ 2 whole nodes (g | t, t > g); else it sits inside one node (t | g)."""
    m = msg.bytes_per_call
    if msg.where in ("boundary", "wrap"):
        return m                                    # counted per crossing call by the caller
    if not spans:
        return sp.Integer(0)
    n = sp.sympify(msg.group)
    if msg.op == "all_reduce" and algorithm in ("direct", "shm"):     # every rank to every rank of the other nodes
        if algorithm == "direct":
            return n * (n - g) * m
        one, two = shm_split(m)
        return n * (n - g) * (one + 2 * two / n)
    if msg.op in ("all_reduce", "all_gather", "reduce_scatter"):
        return (n / g) * traffic.sent_factor(msg.op, n, algorithm) * m      # the ring crosses once per node it spans
    if msg.op == "gather":
        return (n - g) / n * m                      # the ranks off the root's node send their shards across
    raise ValueError(f"no inter-node form for {msg.op} on a TP group")


def inter_node_bytes(pattern: str = "deepspeed", phase: str | None = None, algorithm: str = "ring") -> sp.Expr:
    """Bytes that cross nodes over a generation (or one phase), ranks placed in order, g per node: 0 on one node
    (t·p ≤ g), and in the two regular placements across nodes: TP groups inside nodes and whole stages per node
    (t | g and g | t·p), or every TP group spanning t/g whole nodes (g | t, t > g). ``nan`` elsewhere
    (:func:`llmcomm.derive.evaluate.traffic_totals` counts any placement)."""
    inside = (sp.Eq(sp.Mod(g, t), 0)) & sp.Eq(sp.Mod(p * t, g), 0)
    spans = sp.Eq(sp.Mod(t, g), 0) & sp.Gt(t, g)

    def crossing(msg, case: str) -> sp.Expr:
        calls = sp.piecewise_fold(msg.calls)
        if msg.where == "boundary":
            calls = calls * ((p * t / g - 1) / (p - 1) if case == "inside" else sp.Integer(1))
        elif msg.where == "wrap" and case == "inside":
            calls = calls * sp.Piecewise((1, sp.Gt(p * t, g)), (0, True))
        return calls * _crossing_bytes_per_call(msg, algorithm, case == "spans")

    totals = {case: _over_generation(pattern, lambda msg, c=case: crossing(msg, c), phase)
              for case in ("inside", "spans")}
    return sp.Piecewise((0, sp.Le(p * t, g)), (totals["inside"], inside), (totals["spans"], spans), (sp.nan, True))
