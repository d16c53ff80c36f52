"""The one compiled evaluator: a message pattern, lambdified once, evaluated for numbers or numpy grids.

Every numeric use of the patterns goes through :func:`compiled` — the predicted rows of ``llmcomm predict``
(:func:`rows`, from the concrete calls of :func:`forward_calls`), the bytes of a grid of layouts
(:func:`phase_bytes`), the messages the latency model charges (:func:`messages`). All compiled functions take the
arguments :data:`ARGS` in that order; a model's symbols come from its :class:`~llmcomm.spec.ModelSpec`, resolved once
by the caller.

Predicted rows are built exactly as measured rows are (:func:`llmcomm.derive.traffic.rows_of_calls`): the pattern
is expanded to the concrete calls each group of a layout makes (global rank = stage·q + j, q = t·e ranks per
stage), and the calls' transfers give the traffic metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import sympy as sp

from ..notation import C, E, L, L_moe, V, b, e, h, p, s, t, w
from ..spec import Layout, ModelSpec, SpecError, Workload, stage_layers
from . import patterns
from .phases import PHASES, forwards
from .traffic import node_of_placement, rows_of_calls, summary

__all__ = ["ARGS", "Compiled", "compiled", "messages", "phase_bytes", "rows", "forward_messages", "forward_calls",
           "generation_calls", "traffic_totals", "exact"]

#: the argument order of every compiled function (the MoE symbols are 0 for a dense model; C is the expert capacity
#: of the forward, computed by the caller: :func:`llmcomm.derive.moe.forward_capacity`)
ARGS = (b, s, h, L, V, t, p, w, L_moe, E, e, C)


@dataclass(frozen=True)
class Compiled:
    """One message kind of one forward, compiled: each field a function of :data:`ARGS` (numpy arrays welcome).

    ``calls`` counts every call (what bytes count); ``critical`` the calls on one request's critical path — the t
    concurrent sends of a stage boundary (one per TP rank; e per boundary under expert parallelism, one per EP rank)
    count once there."""

    op: str
    where: str
    path: str
    why: str
    group: Callable
    calls: Callable
    critical: Callable
    size: Callable


def _critical_calls(msg) -> sp.Expr:
    calls = sp.piecewise_fold(msg.calls)
    if msg.op == "send_recv":
        for q in (t, e):                             # t (TP) or e (EP) concurrent sends per boundary: one counts
            per_q = sp.piecewise_fold(calls / q)
            values = [a.expr for a in per_q.args] if isinstance(per_q, sp.Piecewise) else [per_q]
            if not any(q in v.free_symbols for v in values):   # q may stay in a condition (e > 1), not a count
                return per_q
    return calls


@lru_cache(maxsize=None)
def compiled(pattern: str) -> tuple[Compiled, ...]:
    """The messages of one forward of message pattern ``pattern``, each lambdified once (cached per pattern)."""
    fn = lambda e: sp.lambdify(ARGS, sp.sympify(e), "numpy")  # noqa: E731
    return tuple(Compiled(op=m.op, where=m.where, path=m.path, why=m.why, group=fn(m.group),
                          calls=fn(sp.piecewise_fold(m.calls)), critical=fn(_critical_calls(m)),
                          size=fn(m.bytes_per_call)) for m in patterns.pattern(pattern))


def _model_args(model: ModelSpec, t_, p_, b_, s_, w_, e_=1, C_=0) -> tuple:
    return (b_, s_, model.h, model.L, model.V, t_, p_, w_, model.L_moe, model.E, e_, C_)


def messages(pattern: str, model: ModelSpec, t_, p_, b_, s_, w_, e_=1, C_=0) -> list[dict]:
    """Every message kind of one forward over ``s_`` tokens, evaluated on broadcast arrays of t, p, b, s, w (and,
    for expert parallelism, e and the capacity C): ``{"op", "path", "where", "why", "n", "calls", "critical", "m"}`` (group
    size, calls, critical-path calls and bytes per call, each an array of the broadcast shape; ``"where"``: which
    groups issue it, :data:`llmcomm.derive.patterns.WHERE`). Kinds with no call
    anywhere in the grid are left out."""
    arrs = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (t_, p_, b_, s_, w_, e_, C_)))
    shape = arrs[0].shape
    args = _model_args(model, *arrs)
    out = []
    for c in compiled(pattern):
        calls = np.broadcast_to(np.asarray(c.calls(*args), dtype=float), shape)
        if not calls.any():
            continue
        out.append({"op": c.op, "path": c.path, "where": c.where, "why": c.why,
                    "n": np.broadcast_to(np.asarray(c.group(*args), dtype=float), shape).astype(np.int64),
                    "calls": calls,
                    "critical": np.broadcast_to(np.asarray(c.critical(*args), dtype=float), shape),
                    "m": np.broadcast_to(np.asarray(c.size(*args), dtype=float), shape)})
    return out


def phase_bytes(pattern: str, model: ModelSpec, t_, p_, b_, S_, G_, w_) -> dict[str, np.ndarray]:
    """nccl-tests bytes of a whole generation over a broadcast grid: ``{"prefill", "decode", "total"}`` arrays."""
    arrs = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (t_, p_, b_, S_, G_, w_)))
    tt, pp, bb, SS, GG, ww = arrs
    out = {}
    for phase in PHASES:
        s_val = SS if phase == "prefill" else np.ones_like(SS)
        n_fwd = np.ones_like(GG) if phase == "prefill" else GG - 1
        tot = np.zeros(tt.shape)
        for msg in messages(pattern, model, tt, pp, bb, s_val, ww):
            tot = tot + msg["calls"] * msg["m"]
        out[phase] = tot * n_fwd
    out["total"] = out["prefill"] + out["decode"]
    return out


def exact(x) -> int:
    """An exact integer count from an evaluated value; refuses silently fractional results."""
    v = float(x)
    if abs(v - round(v)) > 1e-9 * max(1.0, abs(v)):
        raise SpecError(f"non-integer count {v} (a hidden size not divisible by t?)")
    return int(round(v))


def _tokens(phase: str, workload: Workload) -> tuple[int, int]:
    """(s, forwards) of ``phase`` for a concrete workload."""
    tokens, count = forwards(phase)
    vals = {sym: getattr(workload, sym.name) for sym in (tokens.free_symbols | count.free_symbols)}
    return exact(tokens.subs(vals)), exact(count.subs(vals))


def _split(calls: int, parts: int, what: str) -> int:
    if parts < 1 or calls % parts:
        raise SpecError(f"{calls} calls of {what} do not split evenly over {parts} groups")
    return calls // parts


def _bytes(x, cap) -> int | float:
    """An exact byte count, or a float when the capacity is an expectation (dropless routing predicted)."""
    return exact(x) if float(cap).is_integer() else float(x)


def _capacity(model: ModelSpec, layout: Layout, workload: Workload, tokens: int, routing) -> float:
    """The expert capacity C of one forward (0 without expert parallelism: no pattern then uses it)."""
    if layout.e == 1:
        return 0
    from .moe import Routing, forward_capacity

    return forward_capacity(routing or Routing(), model.E, model.moe.top_k, workload.b, tokens, layout.e)


def forward_calls(model: ModelSpec, layout: Layout, workload: Workload, phase: str,
                  pattern: str = "deepspeed", routing=None) -> list[tuple]:
    """The concrete calls of ONE forward of ``phase``: ``(op, ranks, m, count, root)`` with the global ranks of the
    group each call runs on (for send_recv: (sender, receiver)), expanded from each message's ``where``
    (:data:`llmcomm.derive.patterns.WHERE`). The calls of a ``layers`` message are split over the stages by the layers
    each holds (:func:`llmcomm.spec.stage_layers`).

    With expert parallelism (``layout.e`` > 1) the capacity C of the forward comes from ``routing``
    (:class:`llmcomm.derive.moe.Routing`, default DeepSpeed's capacity routing); for dropless routing it is the
    expectation under uniform routing, so the all-to-all sizes are expectations (floats)."""
    tokens, _ = _tokens(phase, workload)
    t, p = layout.t, layout.p
    q = t * layout.e                                                   # ranks per stage: t TP or e EP ranks
    parts = stage_layers(model.L, p)
    cap = _capacity(model, layout, workload, tokens, routing)
    args = _model_args(model, t, p, workload.b, tokens, workload.w, layout.e, cap)
    group = lambda k: tuple(range(k * q, k * q + q))  # noqa: E731 - the TP (or EP) group of stage k
    out = []
    for c in compiled(pattern):
        calls = exact(c.calls(*args))
        if not calls:
            continue
        m = _bytes(c.size(*args), cap)
        where = c.where
        if where == "layers":
            for k, layers in enumerate(parts):
                out.append((c.op, group(k), m, _split(calls * layers, model.L, c.why), None))
        elif where in ("head", "embed"):
            g = group(p - 1 if where == "head" else 0)
            out.append((c.op, g, m, calls, g[0]))
        elif where == "receivers":
            per = _split(calls, p - 1, c.why)
            out += [(c.op, group(k), m, per, None) for k in range(1, p)]
        elif where == "boundary":
            per = _split(calls, q * (p - 1), c.why)
            out += [(c.op, (k * q + j, (k + 1) * q + j), m, per, None) for k in range(p - 1) for j in range(q)]
        elif where == "wrap":
            per = _split(calls, q, c.why)
            out += [(c.op, ((p - 1) * q + j, j), m, per, None) for j in range(q)]
        elif where == "experts":                                       # each stage's EP group, by its MoE layers
            first = 0
            for k, layers in enumerate(parts):
                held = sum(first <= i < first + layers for i in model.moe.layers)
                first += layers
                if held:
                    out.append((c.op, group(k), m, _split(calls * held, model.L_moe, c.why), None))
        else:                                                          # pragma: no cover - WHERE is closed
            raise SpecError(f"no expansion for where={where!r}")
    return out


def generation_calls(model: ModelSpec, layout: Layout, workload: Workload,
                     pattern: str = "deepspeed", routing=None) -> list[tuple]:
    """Every call of a generation: ``(phase, op, ranks, m, count, root)`` (1 prefill + G−1 decode forwards)."""
    out = []
    for phase in PHASES:
        _, count = _tokens(phase, workload)
        if count:
            out += [(phase, op, ranks, m, count * k, root)
                    for op, ranks, m, k, root in forward_calls(model, layout, workload, phase, pattern, routing)]
    return out


def rows(model: ModelSpec, layout: Layout, workload: Workload, pattern: str = "deepspeed",
         algorithm: str = "ring", gpus_per_node: int | None = None, routing=None) -> list[dict]:
    """Predicted rows of a generation (no setup rows), in the order and schema of a measurement's rows:
    ``{"phase", "op", "group_size", "calls", "bytes", "algorithm", "sent_bytes_per_rank", "link_bytes"}`` and, when
    ``gpus_per_node`` places the ranks (g per node, in order), ``"inter_node_bytes"``. ``algorithm`` is the
    all-reduce's (:mod:`llmcomm.derive.traffic`). Rows with no call are omitted; the layout and workload are
    validated. ``routing``: the MoE routing of expert parallelism (:func:`forward_calls`)."""
    layout.validate(model)
    workload.validate(model)
    node_of = node_of_placement(gpus_per_node) if gpus_per_node is not None else None
    return rows_of_calls(generation_calls(model, layout, workload, pattern, routing), node_of, algorithm)


def traffic_totals(model: ModelSpec, layout: Layout, workload: Workload, pattern: str = "deepspeed",
                   algorithm: str = "ring", gpus_per_node: int | None = None, routing=None) -> dict:
    """The traffic of a whole generation (all phases, setup apart): ``{"algorithm", "bytes", "busiest_rank",
    "sent_bytes_busiest_rank", "link_bytes", "inter_node_bytes"}`` — the busiest rank over all ops together (not
    the sum of each row's busiest)."""
    calls = generation_calls(model, layout.validate(model), workload.validate(model), pattern, routing)
    return summary(calls, node_of_placement(gpus_per_node) if gpus_per_node is not None else None, algorithm)


def forward_messages(model: ModelSpec, layout: Layout, workload: Workload, phase: str,
                     pattern: str = "deepspeed", routing=None) -> list[dict]:
    """The messages of ONE forward of ``phase``: ``{"op", "group_size", "calls", "bytes_per_call", "why"}``."""
    tokens, _ = _tokens(phase, workload)
    cap = _capacity(model, layout, workload, tokens, routing)
    return [{"op": msg["op"], "group_size": exact(msg["n"]), "calls": exact(msg["calls"]),
             "bytes_per_call": _bytes(msg["m"], cap), "why": msg["why"]}
            for msg in messages(pattern, model, layout.t, layout.p, workload.b, tokens, workload.w, layout.e, cap)]
