"""The one compiled evaluator: an engine's messages, lambdified once, evaluated for numbers or numpy grids.

Every numeric use of the patterns goes through :func:`compiled` — the predicted rows of ``llmcomm predict``
(:func:`rows`), the bytes of a grid of layouts (:func:`phase_bytes`), the messages the latency model charges
(:func:`messages`). All compiled functions take the arguments :data:`ARGS` in that order; a model's symbols come
from its :class:`~llmcomm.spec.ModelSpec`, resolved once by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import sympy as sp

from ..notation import L, V, b, h, p, s, t, w
from ..spec import Layout, ModelSpec, SpecError, Workload
from .patterns import pattern
from .phases import PHASES, forwards, order

__all__ = ["ARGS", "Compiled", "compiled", "messages", "phase_bytes", "rows", "forward_messages", "exact"]

#: the argument order of every compiled function
ARGS = (b, s, h, L, V, t, p, w)


@dataclass(frozen=True)
class Compiled:
    """One message kind of one forward, compiled: each field a function of :data:`ARGS` (numpy arrays welcome).

    ``calls`` counts every call (what bytes count); ``critical`` the calls on one request's critical path — the t
    concurrent sends of a stage boundary (one per TP rank) count once there."""

    op: str
    path: str
    why: str
    group: Callable
    calls: Callable
    critical: Callable
    size: Callable


def _critical_calls(msg) -> sp.Expr:
    calls = sp.piecewise_fold(msg.calls)
    if msg.op == "send_recv":
        per_t = sp.simplify(calls / t)
        if t not in per_t.free_symbols:              # t concurrent sends per boundary: one on the critical path
            return per_t
    return calls


@lru_cache(maxsize=None)
def compiled(engine: str) -> tuple[Compiled, ...]:
    """The messages of one forward of ``engine``, each lambdified once (cached per engine)."""
    fn = lambda e: sp.lambdify(ARGS, sp.sympify(e), "numpy")  # noqa: E731
    return tuple(Compiled(op=m.op, path=m.path, why=m.why, group=fn(m.group), calls=fn(sp.piecewise_fold(m.calls)),
                          critical=fn(_critical_calls(m)), size=fn(m.bytes_per_call)) for m in pattern(engine))


def _model_args(model: ModelSpec, t_, p_, b_, s_, w_) -> tuple:
    return (b_, s_, model.h, model.L, model.V, t_, p_, w_)


def messages(engine: str, model: ModelSpec, t_, p_, b_, s_, w_) -> list[dict]:
    """Every message kind of one forward over ``s_`` tokens, evaluated on broadcast arrays of t, p, b, s, w:
    ``{"op", "path", "why", "n", "calls", "critical", "m"}`` (group size, calls, critical-path calls and bytes per
    call, each an array of the broadcast shape). Kinds with no call anywhere in the grid are left out."""
    arrs = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (t_, p_, b_, s_, w_)))
    shape = arrs[0].shape
    args = _model_args(model, *arrs)
    out = []
    for c in compiled(engine):
        calls = np.broadcast_to(np.asarray(c.calls(*args), dtype=float), shape)
        if not calls.any():
            continue
        out.append({"op": c.op, "path": c.path, "why": c.why,
                    "n": np.broadcast_to(np.asarray(c.group(*args), dtype=float), shape).astype(np.int64),
                    "calls": calls,
                    "critical": np.broadcast_to(np.asarray(c.critical(*args), dtype=float), shape),
                    "m": np.broadcast_to(np.asarray(c.size(*args), dtype=float), shape)})
    return out


def phase_bytes(engine: str, model: ModelSpec, t_, p_, b_, S_, G_, w_) -> dict[str, np.ndarray]:
    """nccl-tests bytes of a whole generation over a broadcast grid: ``{"prefill", "decode", "total"}`` arrays."""
    arrs = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (t_, p_, b_, S_, G_, w_)))
    tt, pp, bb, SS, GG, ww = arrs
    out = {}
    for phase in PHASES:
        s_val = SS if phase == "prefill" else np.ones_like(SS)
        n_fwd = np.ones_like(GG) if phase == "prefill" else GG - 1
        tot = np.zeros(tt.shape)
        for msg in messages(engine, model, tt, pp, bb, s_val, ww):
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


def rows(model: ModelSpec, layout: Layout, workload: Workload, engine: str = "deepspeed") -> list[dict]:
    """Predicted rows ``{"phase", "op", "group_size", "calls", "bytes"}`` of a generation (no setup rows), in the
    order and schema of a measurement's rows; rows with no call are omitted. Validates the layout and workload."""
    layout.validate(model)
    workload.validate(model)
    merged: dict[tuple, list[int]] = {}
    for phase in PHASES:
        tokens, count = _tokens(phase, workload)
        if not count:
            continue
        for msg in messages(engine, model, layout.t, layout.p, workload.b, tokens, workload.w):
            calls = exact(msg["calls"])
            if calls:
                acc = merged.setdefault((phase, msg["op"], exact(msg["n"])), [0, 0])
                acc[0] += count * calls
                acc[1] += count * calls * exact(msg["m"])
    out = [{"phase": ph, "op": op, "group_size": n, "calls": c, "bytes": nb} for (ph, op, n), (c, nb) in merged.items()]
    return sorted(out, key=lambda r: (order(r["phase"]), r["op"], r["group_size"]))


def forward_messages(model: ModelSpec, layout: Layout, workload: Workload, phase: str,
                     engine: str = "deepspeed") -> list[dict]:
    """The messages of ONE forward of ``phase``: ``{"op", "group_size", "calls", "bytes_per_call", "why"}``."""
    tokens, _ = _tokens(phase, workload)
    return [{"op": msg["op"], "group_size": exact(msg["n"]), "calls": exact(msg["calls"]),
             "bytes_per_call": exact(msg["m"]), "why": msg["why"]}
            for msg in messages(engine, model, layout.t, layout.p, workload.b, tokens, workload.w)]
