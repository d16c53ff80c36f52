"""Closed-form communication volumes, derived symbolically with sympy.

The model is deliberately small: an *engine pattern* is data — a list of :class:`Msg`, each one kind of message that
an engine sends during **one forward** over ``s`` new tokens (the prefill has ``s = S``; each decode step ``s = 1``).
Everything else is derived from those lists by the same few lines of sympy:

* calls and bytes per (phase, op, group size): prefill = one forward with ``s = S``; decode = ``G − 1`` forwards with
  ``s = 1`` (generating G tokens = 1 prefill + G−1 decodes; the prefill yields token 1);
* totals, ratios between engines or layouts, crossovers (:func:`solve_crossover`);
* fast numeric evaluation from the very same expressions (``sympy.lambdify`` → numpy), used by :func:`predict_rows`
  and by the vectorised grids of the latency model.

Counting conventions (nccl-tests' size S): all_reduce S = buffer bytes; all_gather and gather S = total gathered
bytes; broadcast S = buffer bytes; a send/recv pair counts once with S = tensor bytes. A collective on a group counts
once per group (not once per rank). Messages that exist only when t > 1 (TP) or p > 1 (PP) carry that condition as a
:class:`sympy.Piecewise`, so the same formula holds for every layout, t = 1 and p = 1 included.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np
import sympy as sp

from .spec import Layout, ModelSpec, SpecError, Workload, load_model

__all__ = ["b", "S", "G", "h", "L", "V", "t", "p", "w", "s", "Msg", "ENGINES", "PHASES", "P2P_MODES", "pattern",
           "engine_for", "per_forward", "volumes", "total_bytes", "total_wire_bytes", "bus_factor", "predict_rows",
           "forward_messages", "solve_crossover", "rows_table", "evaluator", "layouts_frame", "branch"]

# One notation everywhere (see llmcomm.spec): integer, positive symbols so that sympy simplifies as a human would.
b, S, G, h, L, V, t, p, w = sp.symbols("b S G h L V t p w", integer=True, positive=True)
s = sp.Symbol("s", integer=True, positive=True)  # tokens carried by one forward (S in prefill, 1 in decode)
SYMBOLS = (b, S, G, h, L, V, t, p, w)
PHASES = ("prefill", "decode")
#: Bytes of one token id as engines move it (torch.int64).
W_TOKEN = 8


def _tp(expr):
    """``expr`` when tensor parallelism is on (t > 1), else 0."""
    return sp.Piecewise((expr, sp.Gt(t, 1)), (0, True))


def _pp(expr):
    """``expr`` when pipeline parallelism is on (p > 1), else 0."""
    return sp.Piecewise((expr, sp.Gt(p, 1)), (0, True))


@dataclass(frozen=True)
class Msg:
    """One kind of message in one forward: ``calls`` calls of ``op`` on groups of ``group`` ranks, each of
    ``elems`` elements of ``width`` bytes (the nccl-tests size S of one call is ``elems · width``)."""

    op: str
    group: sp.Expr
    calls: sp.Expr
    elems: sp.Expr
    why: str
    width: sp.Expr = w
    #: which ranks it joins, for the latency model's link choice: "tp" (a TP group), "pp" (neighbouring stages), or
    #: "wrap" (last stage → stage 0). Empty: "pp" for point-to-point ops, "tp" for collectives.
    path: str = ""

    @property
    def bytes_per_call(self) -> sp.Expr:
        return self.elems * self.width


# --------------------------------------------------------------------------------------------------------------------
# Engine patterns. Each line cites what it models; the deepspeed lines were read from DeepSpeed 0.19.8's source
# (module_inject/auto_tp.py, layers.py) and confirmed by capture (book: "Tensor parallelism: measured vs predicted").
# --------------------------------------------------------------------------------------------------------------------
def _deepspeed(p2p: str = "partitioned") -> list[Msg]:
    """DeepSpeed AutoTP, and the llmcomm pipeline runner on DeepSpeed's PipelineModule + p2p when p > 1. ``p2p``:
    the runner's stage-to-stage mode — ``"partitioned"`` (its default: 1/t per TP rank, then an all-gather) or
    ``"full"`` (every TP rank sends the whole [b, s, h]; no all-gather). With t = 1 the two are the same."""
    if p2p == "full":
        hops = [Msg("send_recv", 2, _pp(t * (p - 1)), b * s * h,
                    "hidden state, whole [b, s, h] from every TP rank, at each of the p−1 stage boundaries")]
    else:
        hops = [
            # At each of the p−1 boundaries every TP rank sends its 1/t of the hidden state [b, s, h] to its peer
            # (DeepSpeed's PartitionedTensor; with t = 1 that is the whole tensor) ...
            Msg("send_recv", 2, _pp(t * (p - 1)), b * s * h / t,
                "hidden state, 1/t per TP rank, at each of the p−1 stage boundaries"),
            # ... and the receiving stage all-gathers the t parts.
            Msg("all_gather", t, _pp(_tp(p - 1)), b * s * h, "next stage all-gathers the t parts of [b, s, h]"),
        ]
    return [
        # AutoTP makes o_proj and down_proj LinearAllreduce: a row-parallel matmul then an all-reduce of the
        # full activation [b, s, h] — two per decoder layer. Embedding, norms, rotary: replicated, no traffic.
        Msg("all_reduce", t, _tp(2 * L), b * s * h,
            "o_proj and down_proj are LinearAllreduce: all-reduce of [b, s, h], twice per layer"),
        # lm_head becomes LmHeadLinearAllreduce: row-parallel over h, so every rank holds partial logits of the
        # whole vocabulary and they are all-reduced: [b, s_keep, V] with s_keep = 1 (only the last position's logits
        # are kept, as HF generate does). With tied embeddings DeepSpeed clones the head's weight first, so the
        # embedding stays replicated and the pattern is the same.
        Msg("all_reduce", t, _tp(1), b * V,
            "lm_head is LmHeadLinearAllreduce: all-reduce of the last position's logits [b, 1, V]"),
        # Pipeline (llmcomm.runs.pipeline: DeepSpeed PipelineModule + deepspeed.runtime.pipe.p2p, KV cache per stage;
        # see runs/PIPELINE_PATTERN.md): the stage-to-stage hops above, then the token hand-back.
        *hops,
        # The last stage hands the greedy token (int64 [b, 1]) back to stage 0 after every forward, from each TP rank.
        Msg("send_recv", 2, _pp(t), b, "token ids int64 [b, 1], last stage → stage 0, from every TP rank",
            width=W_TOKEN, path="wrap"),
    ]


def _vllm() -> list[Msg]:
    # The pattern the paper (arXiv 2507.14392) describes for vLLM's TP: a vocabulary-parallel embedding (each rank
    # looks up its vocabulary shard, then all-reduce of [b, s, h]), two all-reduces per layer, and a
    # column-parallel head whose vocabulary shards of the last position's logits are gathered to one rank.
    return [
        Msg("all_reduce", t, _tp(1), b * s * h, "VocabParallelEmbedding: all-reduce of [b, s, h]"),
        Msg("all_reduce", t, _tp(2 * L), b * s * h, "attention out and MLP down projections: all-reduce of [b, s, h]"),
        Msg("gather", t, _tp(1), b * V, "ParallelLMHead: gather of [b, 1, V/t] shards to rank 0 (S = b·V·w)"),
        # Pipeline: vLLM sends the hidden state and the residual, each [b, s, h], at each stage boundary; in a
        # hybrid each TP rank sends its 1/t slice and the next stage all-gathers them.
        Msg("send_recv", 2, _pp(2 * (p - 1) * t), b * s * h / t,
            "hidden state and residual, 1/t slice per TP rank, at each of the p−1 stage boundaries"),
        Msg("all_gather", t, _pp(_tp(2 * (p - 1))), b * s * h,
            "next stage all-gathers the t slices of hidden state and residual"),
    ]


ENGINES: dict[str, Callable[[], list[Msg]]] = {"deepspeed": _deepspeed, "deepspeed-full": lambda: _deepspeed("full"),
                                               "vllm": _vllm}
#: Stage-to-stage modes of the DeepSpeed pipeline runner (``llmcomm measure --p2p``); the engine of each.
P2P_MODES = {"partitioned": "deepspeed", "full": "deepspeed-full"}


def engine_for(engine: str = "deepspeed", p2p: str = "partitioned") -> str:
    """The pattern name for ``engine`` with stage-to-stage mode ``p2p``: ``deepspeed`` + ``full`` →
    ``deepspeed-full``; ``partitioned`` leaves any engine as it is (vLLM's pattern has its own pipeline rows)."""
    if p2p not in P2P_MODES:
        raise SpecError(f"p2p mode {p2p!r} is not one of {', '.join(P2P_MODES)}")
    if p2p == "partitioned":
        return engine
    if engine not in ("deepspeed", "deepspeed-full"):
        raise SpecError(f"p2p mode {p2p!r} models the DeepSpeed pipeline runner; engine {engine!r} has its own")
    return P2P_MODES[p2p]


def pattern(engine: str) -> list[Msg]:
    """The messages of one forward for ``engine`` (symbolic in b, s, h, L, V, t, p, w)."""
    try:
        return ENGINES[engine]()
    except KeyError:
        raise SpecError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}") from None


def _phase_forwards(phase: str) -> tuple[sp.Expr, sp.Expr]:
    """(tokens per forward, number of forwards) of a phase."""
    if phase == "prefill":
        return S, sp.Integer(1)
    if phase == "decode":
        return sp.Integer(1), G - 1
    raise ValueError(f"unknown phase {phase!r}")


def per_forward(engine: str) -> dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(op, group): (calls, bytes)} of one forward over ``s`` tokens."""
    out: dict[tuple[str, sp.Expr], tuple[sp.Expr, sp.Expr]] = {}
    for m in pattern(engine):
        calls, nbytes = out.get((m.op, m.group), (sp.Integer(0), sp.Integer(0)))
        out[(m.op, m.group)] = (calls + m.calls, nbytes + m.calls * m.bytes_per_call)
    return {k: (_tidy(c), _tidy(nb)) for k, (c, nb) in out.items()}


def _readable(expr: sp.Expr) -> sp.Expr:
    """Factor, then group the activation terms inside sums: ``b(Shw(p − 1) + 8t)``, not ``b(Shpw − Shw + 8t)``."""
    return sp.factor(expr).replace(lambda x: x.is_Add, lambda x: sp.collect(x, [S * h * w, h * w], sp.factor))


def _tidy(expr: sp.Expr) -> sp.Expr:
    """Fold conditions outward and factor each branch: ``(G − 1)(2L + 1)`` rather than ``2GL + G − 2L − 1``."""
    expr = sp.piecewise_fold(expr)
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*[(_readable(e), c) for e, c in expr.args])
    return _readable(expr)


@lru_cache(maxsize=None)
def volumes(engine: str = "deepspeed") -> dict[tuple[str, str, sp.Expr], tuple[sp.Expr, sp.Expr]]:
    """{(phase, op, group): (calls, bytes)} closed forms for a whole generation (1 prefill + G−1 decodes)."""
    out = {}
    for phase in PHASES:
        tokens, forwards = _phase_forwards(phase)
        for (op, group), (calls, nbytes) in per_forward(engine).items():
            out[(phase, op, group)] = (_tidy(forwards * calls), _tidy(forwards * nbytes.subs(s, tokens)))
    return out


def total_bytes(engine: str = "deepspeed", phase: str | None = None) -> sp.Expr:
    """Total bytes of a generation (or of one phase), all ops summed."""
    terms = [nb for (ph, _, _), (_, nb) in volumes(engine).items() if phase in (None, ph)]
    return sp.piecewise_fold(sp.Add(*terms))


def solve_crossover(lhs: sp.Expr, rhs: sp.Expr, var: sp.Symbol, **values) -> list[sp.Expr]:
    """Values of ``var`` where two volume expressions are equal, after substituting ``values`` (by symbol name)."""
    subs = {sym: values[sym.name] for sym in SYMBOLS if sym.name in values}
    x = sp.Symbol(var.name, positive=True)  # a crossover may fall between integers: solve over the reals
    subs[var] = x
    eq = sp.Eq(sp.piecewise_fold(lhs).subs(subs), sp.piecewise_fold(rhs).subs(subs))
    return sp.solve(eq, x)


def bus_factor(op: str, n) -> sp.Expr:
    """nccl-tests bus factor f(n) as a sympy expression (the symbolic twin of
    :func:`llmcomm.collectives.busbw_factor`): all_reduce 2(n−1)/n; all_gather, reduce_scatter, gather, scatter
    (n−1)/n; broadcast, reduce, send_recv 1."""
    n = sp.sympify(n)
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "gather", "scatter"):
        return (n - 1) / n
    return sp.Integer(1)


def total_wire_bytes(engine: str = "deepspeed", phase: str | None = None) -> sp.Expr:
    """Symbolic twin of :func:`wire_bytes`: the bytes one rank of each group puts on its links over a generation
    (or one phase), nccl-tests size × f(group size) summed over ops."""
    terms = [nb * bus_factor(op, group) for (ph, op, group), (_, nb) in volumes(engine).items() if phase in (None, ph)]
    return sp.piecewise_fold(sp.Add(*terms))


# --------------------------------------------------------------------------------------------------------------------
# Numeric evaluation, lambdified once per engine from the expressions above.
# --------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def evaluator(engine: str = "deepspeed") -> list[tuple[str, str, sp.Expr, Callable, Callable]]:
    """[(phase, op, group, calls_fn, bytes_fn)] with fns of (b, S, G, h, L, V, t, p, w) that accept numpy arrays."""
    return [(phase, op, group, sp.lambdify(SYMBOLS, calls, "numpy"), sp.lambdify(SYMBOLS, nbytes, "numpy"))
            for (phase, op, group), (calls, nbytes) in volumes(engine).items()]


def _values(model: ModelSpec, layout: Layout, workload: Workload) -> tuple:
    return (workload.b, workload.S, workload.G, model.h, model.L, model.V, layout.t, layout.p, workload.w)


def _exact(x) -> int:
    """An exact integer count from a lambdified value; refuses silently fractional results."""
    v = float(x)
    if abs(v - round(v)) > 1e-9 * max(1.0, abs(v)):
        raise SpecError(f"non-integer count {v} (a hidden size not divisible by t?)")
    return int(round(v))


def predict_rows(model, layout: Layout, workload: Workload, engine: str = "deepspeed") -> list[dict]:
    """Predicted rows ``{"phase","op","group_size","calls","bytes"}`` (no setup rows), same schema and order as a
    measurement's aggregated rows; rows with zero calls are omitted."""
    model = load_model(model)
    layout.validate(model)
    workload.validate(model)
    vals = _values(model, layout, workload)
    merged: dict[tuple, list[int]] = {}  # two symbolic groups may be the same size here (e.g. t = 2 and 2)
    for phase, op, group, calls_fn, bytes_fn in evaluator(engine):
        calls = _exact(calls_fn(*vals))
        if calls:
            key = (phase, op, _exact(sp.sympify(group).subs(t, layout.t)))
            acc = merged.setdefault(key, [0, 0])
            acc[0] += calls
            acc[1] += _exact(bytes_fn(*vals))
    order = {"setup": 0, "prefill": 1, "decode": 2}
    rows = [{"phase": ph, "op": op, "group_size": n, "calls": c, "bytes": nb} for (ph, op, n), (c, nb) in merged.items()]
    return sorted(rows, key=lambda r: (order[r["phase"]], r["op"], r["group_size"]))


def forward_messages(model, layout: Layout, workload: Workload, phase: str, engine: str = "deepspeed") -> list[dict]:
    """The messages of ONE forward of ``phase``: ``{"op", "group_size", "calls", "bytes_per_call", "why"}`` — what a
    latency model charges α-β costs for."""
    model = load_model(model)
    tokens, _ = _phase_forwards(phase)
    subs = dict(zip(SYMBOLS, _values(model, layout, workload)))
    subs[s] = tokens.subs(subs)
    out = []
    for m in pattern(engine):
        calls = _exact(m.calls.subs(subs))
        if calls:
            out.append({"op": m.op, "group_size": _exact(sp.sympify(m.group).subs(subs)), "calls": calls,
                        "bytes_per_call": _exact(m.bytes_per_call.subs(subs)), "why": m.why})
    return out


def rows_table(rows: Iterable[dict]):
    """Rows as a pandas DataFrame (the book's and the CLI's tables)."""
    import pandas as pd

    return pd.DataFrame(list(rows), columns=["phase", "op", "group_size", "calls", "bytes"])


def grid(engine: str, model, t_values, p_values, b_values, S_values, G_values, w_value: int) -> dict[str, np.ndarray]:
    """Total bytes per phase over a broadcast grid of layouts × workloads (numpy arrays in, arrays out)."""
    model = load_model(model)
    arrs = np.broadcast_arrays(*(np.asarray(x) for x in (b_values, S_values, G_values)),
                               model.h, model.L, model.V, np.asarray(t_values), np.asarray(p_values), w_value)
    bb, SS, GG, hh, LL, VV, tt, pp, ww = arrs
    out = {ph: np.zeros(bb.shape) for ph in PHASES}
    for phase, _, _, _, bytes_fn in evaluator(engine):
        out[phase] = out[phase] + np.broadcast_to(bytes_fn(bb, SS, GG, hh, LL, VV, tt, pp, ww), bb.shape)
    out["total"] = out["prefill"] + out["decode"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Presentation: the same expressions as tables for the book (LaTeX cells render in HTML, text/plain stays exact).
# --------------------------------------------------------------------------------------------------------------------
def _latex(expr) -> str:
    return f"${sp.latex(expr)}$"


def branch(expr: sp.Expr) -> tuple[sp.Expr, str]:
    """(value, condition) of a one-branch Piecewise (``value`` when ``condition``, else 0), for table cells."""
    expr = sp.piecewise_fold(sp.sympify(expr))
    if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1] == (0, True):
        value, cond = expr.args[0]
        return value, _latex(cond)
    return expr, "always"


def pattern_frame(engine: str = "deepspeed"):
    """One forward's messages as a table: op, group, calls, bytes per call, when (else none), why."""
    import pandas as pd

    rows = []
    for m in pattern(engine):
        calls, when = branch(_tidy(m.calls))
        rows.append({"op": m.op, "group": _latex(m.group), "calls per forward": _latex(calls),
                     "bytes per call": _latex(m.bytes_per_call), "when": when, "why": m.why})
    return pd.DataFrame(rows)


def volumes_frame(engine: str = "deepspeed", **values):
    """The closed forms per (phase, op, group) as a table; ``values`` (by symbol name) are substituted first."""
    import pandas as pd

    subs = {sym: values[sym.name] for sym in SYMBOLS if sym.name in values}
    rows = []
    for (phase, op, group), (calls, nbytes) in volumes(engine).items():
        c, when = branch(_tidy(calls.subs(subs)))
        nb, _ = branch(_tidy(nbytes.subs(subs)))
        rows.append({"phase": phase, "op": op, "group": _latex(sp.sympify(group).subs(subs)),
                     "calls": _latex(c), "bytes": _latex(nb), "when": when})
    return pd.DataFrame(rows)


def model_bytes_frame(models: Iterable[str], layout: Layout, workload: Workload, engines=("deepspeed", "vllm")):
    """Bytes per phase for real models (one row per model × engine): the numbers the book quotes."""
    import pandas as pd

    rows = []
    for name in models:
        for engine in engines:
            r = predict_rows(name, layout, workload, engine)
            pre = sum(x["bytes"] for x in r if x["phase"] == "prefill")
            dec = sum(x["bytes"] for x in r if x["phase"] == "decode")
            rows.append({"model": name, "engine": engine, "prefill MB": pre / 1e6, "decode MB": dec / 1e6,
                         "total MB": (pre + dec) / 1e6,
                         "calls": sum(x["calls"] for x in r)})
    return pd.DataFrame(rows)


def wire_bytes(rows: Iterable[dict]) -> float:
    """Bytes one rank of each group puts on its links: nccl-tests size × bus factor f(n), summed over rows."""
    from .collectives import busbw_factor

    return float(sum(r["bytes"] * busbw_factor(r["op"], r["group_size"]) for r in rows if r["op"] != "barrier"))


def layouts_frame(models: Iterable[str], layouts: Iterable[Layout], workloads: Iterable[Workload],
                  engines=("deepspeed",)):
    """Tidy bytes of every model × layout × workload × engine: one row per phase (prefill, decode, total) with the
    nccl-tests bytes and the wire bytes (:func:`wire_bytes`). Layouts a model cannot take are skipped. Columns:
    model, engine, layout ("t×p"), t, p, kind ("TP", "PP" or "hybrid"), b, S, G, dtype, phase, bytes, wire_bytes."""
    import pandas as pd

    layouts, workloads = list(layouts), list(workloads)
    rows = []
    for name in models:
        model = load_model(name)
        for lay in layouts:
            try:
                lay.validate(model)
            except SpecError:
                continue
            kind = "TP" if lay.p == 1 else "PP" if lay.t == 1 else "hybrid"
            for wl in workloads:
                for engine in engines:
                    r = predict_rows(model, lay, wl, engine)
                    base = {"model": name, "engine": engine, "layout": f"{lay.t}×{lay.p}", "t": lay.t, "p": lay.p,
                            "kind": kind, "b": wl.b, "S": wl.S, "G": wl.G, "dtype": wl.dtype}
                    for phase in (*PHASES, "total"):
                        sel = [x for x in r if phase in ("total", x["phase"])]
                        rows.append(dict(base, phase=phase, bytes=sum(x["bytes"] for x in sel),
                                         wire_bytes=wire_bytes(sel)))
    return pd.DataFrame(rows)
