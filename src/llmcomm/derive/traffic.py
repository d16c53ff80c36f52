"""Traffic: the bytes a call puts on the links — per sending rank, over all links, and across nodes.

The nccl-tests size m names a call (:mod:`llmcomm.derive.conventions`); it is not what the call moves. What moves
depends on the algorithm. For one call of ``op`` on a group of n ranks (in group order r₀ … r_{n−1}):

==============  =====================================  ====================  ====================
op              ring (the default)                     busiest rank sends    all links carry
==============  =====================================  ====================  ====================
all_reduce      rᵢ → rᵢ₊₁: 2(n−1)/n·m                  2(n−1)/n·m            2(n−1)·m
all_gather      rᵢ → rᵢ₊₁: (n−1)/n·m                   (n−1)/n·m             (n−1)·m
reduce_scatter  rᵢ → rᵢ₊₁: (n−1)/n·m                   (n−1)/n·m             (n−1)·m
broadcast       chain from the root: m on n−1 edges    m                     (n−1)·m
reduce          chain into the root: m on n−1 edges    m                     (n−1)·m
gather          every non-root → root: m/n             m/n                   (n−1)/n·m
scatter         root → every non-root: m/n             (n−1)/n·m             (n−1)/n·m
all_to_all      every rank → every other: m/n          (n−1)/n·m             (n−1)·m
send_recv       sender → receiver: m                   m                     m
==============  =====================================  ====================  ====================

``direct`` (one-shot: every rank sends its whole buffer to every other rank — NCCL's and vLLM's one-shot
all-reduce) changes all_reduce to (n−1)·m per rank, n(n−1)·m in all; the other ops are the same as ring. ``shm``
(DeepSpeed's CPU shared-memory all-reduce, :mod:`llmcomm.derive.conventions`) takes the one-shot path for the
bytes of a last chunk below 1 MiB and the two-phase path for the rest (:func:`~llmcomm.derive.conventions.shm_split`):
one-shot bytes move as ``direct``; two-phase bytes as a reduce-scatter then an all-gather between every pair of
ranks, 2(n−1)/n per rank and 2(n−1) in all, as a ring (each rank's slice is m/n: DeepSpeed's slices are whole
elements with the remainder on the last rank, equal when n divides the element count — every measured message).
For n = 2 the two paths move the same bytes; from n = 3 on the one-shot path moves more. A group of one rank moves
nothing. A ring over ranks placed in order, g per node,
crosses nodes once per node boundary it spans (and once more to close the ring when it spans two nodes or more).

Two uses, one source: :func:`flows` enumerates one call's transfers (rank to rank) — what the capture's measured
rows and the predicted rows of a concrete layout are both counted from — and :func:`sent_bytes` /
:func:`link_bytes` are the same numbers as formulas (sympy or numpy), for the closed forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable

import numpy as np
import sympy as sp

from ..spec import SpecError
from .conventions import COLLECTIVES, TRAFFIC_ALGORITHMS, canonical_op, shm_split

__all__ = ["sent_factor", "link_factor", "sent_bytes", "link_bytes", "flows", "Traffic", "traffic_of",
           "node_of_placement", "rows_of_calls", "number", "algorithm_name", "summary"]


def _check(op: str, algorithm: str) -> str:
    if algorithm not in TRAFFIC_ALGORITHMS:
        raise SpecError(f"traffic algorithm {algorithm!r} is not one of {', '.join(TRAFFIC_ALGORITHMS)}")
    return canonical_op(op)


def _ones(n):
    return (sp.Integer(1), sp.Integer(2)) if isinstance(n, sp.Basic) else (1.0, 2.0)


def _out(x, n):
    if isinstance(n, sp.Basic):
        return x
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def sent_factor(op: str, n, algorithm: str = "ring"):
    """Bytes the busiest rank of one call sends, per byte of m (sympy for a symbolic ``n``, else numpy), under
    ``ring`` or ``direct`` (``shm`` depends on m: :func:`sent_bytes`)."""
    op = _check(op, algorithm)
    if algorithm == "shm":
        if op == "all_reduce":
            raise SpecError("the shm all-reduce's bytes depend on the size: use sent_bytes(op, n, m, 'shm')")
        algorithm = "ring"
    one, two = _ones(n)
    if not isinstance(n, sp.Basic):
        n = np.asarray(n, dtype=float)
    if op == "all_reduce":
        f = (n - one) if algorithm == "direct" else two * (n - one) / n
    elif op in ("all_gather", "reduce_scatter", "all_to_all", "scatter"):
        f = (n - one) / n
    elif op == "gather":
        f = one / n
    else:                                           # broadcast, reduce, send_recv
        f = one + 0 * n
    if not isinstance(n, sp.Basic):
        f = np.where(np.asarray(n) > 1, f, 0.0) if op != "send_recv" else f
    return _out(f, n)


def link_factor(op: str, n, algorithm: str = "ring"):
    """Bytes all links together carry for one call, per byte of m (``ring`` or ``direct``; ``shm``:
    :func:`link_bytes`)."""
    op = _check(op, algorithm)
    if algorithm == "shm":
        if op == "all_reduce":
            raise SpecError("the shm all-reduce's bytes depend on the size: use link_bytes(op, n, m, 'shm')")
        algorithm = "ring"
    one, two = _ones(n)
    if not isinstance(n, sp.Basic):
        n = np.asarray(n, dtype=float)
    if op == "all_reduce":
        f = n * (n - one) if algorithm == "direct" else two * (n - one)
    elif op in ("all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce"):
        f = n - one
    elif op in ("gather", "scatter"):
        f = (n - one) / n
    else:                                           # send_recv
        f = one + 0 * n
    return _out(f, n)


def _by_path(factor, op: str, n, m, algorithm: str):
    """Bytes of one call of ``m`` bytes: ``factor(op, n, alg)·m``, the shm all-reduce's one-shot and two-phase parts
    each at its own factor."""
    op = _check(op, algorithm)
    if algorithm == "shm" and op == "all_reduce":
        one, two = shm_split(m)
        return factor(op, n, "direct") * one + factor(op, n, "ring") * two
    return factor(op, n, "ring" if algorithm == "shm" else algorithm) * m


def sent_bytes(op: str, n, m, algorithm: str = "ring"):
    """Bytes the busiest rank of one call of ``m`` bytes sends (sympy or numpy, every algorithm)."""
    return _by_path(sent_factor, op, n, m, algorithm)


def link_bytes(op: str, n, m, algorithm: str = "ring"):
    """Bytes all links together carry for one call of ``m`` bytes (sympy or numpy, every algorithm)."""
    return _by_path(link_factor, op, n, m, algorithm)


def flows(op: str, ranks: tuple[int, ...], m, algorithm: str = "ring",
          root: int | None = None) -> list[tuple[int, int, Fraction]]:
    """The transfers ``(src, dst, bytes)`` of one call of ``op`` of size ``m`` on the group ``ranks`` (global ranks,
    in group order; for send_recv ``ranks = (sender, receiver)``), in exact arithmetic. ``root`` (a global rank) for
    rooted ops; default the group's first rank. A barrier moves nothing."""
    if op == "barrier":
        return []
    op = _check(op, algorithm)
    m = Fraction(m)
    n = len(ranks)
    if op == "send_recv":
        src, dst = ranks
        return [(src, dst, m)]
    if n < 2:
        return []
    r = list(ranks)
    k = r.index(root) if root is not None and root in r else 0
    if op == "all_reduce" and algorithm == "direct":
        return [(a, c, m) for a in r for c in r if a != c]
    if op == "all_reduce" and algorithm == "shm":       # one-shot part, then both phases of the two-phase part
        one, two = (Fraction(x) for x in shm_split(m))
        return [(a, c, one + 2 * two / n) for a in r for c in r if a != c]
    if op in ("all_reduce", "all_gather", "reduce_scatter"):
        per = (2 if op == "all_reduce" else 1) * Fraction(n - 1, n) * m
        return [(r[i], r[(i + 1) % n], per) for i in range(n)]
    if op == "broadcast":                          # chain from the root around the ring
        order = r[k:] + r[:k]
        return [(order[i], order[i + 1], m) for i in range(n - 1)]
    if op == "reduce":                             # chain ending at the root
        order = r[k + 1:] + r[:k + 1]
        return [(order[i], order[i + 1], m) for i in range(n - 1)]
    if op == "gather":
        return [(x, r[k], m / n) for x in r if x != r[k]]
    if op == "scatter":
        return [(r[k], x, m / n) for x in r if x != r[k]]
    if op == "all_to_all":
        return [(a, c, m / n) for a in r for c in r if a != c]
    raise SpecError(f"no traffic model for {op!r}")


def node_of_placement(gpus_per_node: int) -> Callable[[int], int]:
    """Ranks placed in order, ``gpus_per_node`` per node: rank r on node ⌊r/g⌋."""
    if gpus_per_node < 1:
        raise SpecError(f"gpus_per_node={gpus_per_node} must be at least 1")
    return lambda r: r // gpus_per_node


def algorithm_name(op: str, algorithm: str = "ring") -> str:
    """How :func:`flows` moves ``op``'s bytes: the all-reduce's ``algorithm``; the registry's ``flow`` for the others
    (ring for all_gather and reduce_scatter; a chain for broadcast and reduce; direct to or from the root for gather
    and scatter; pairwise for all_to_all; p2p for send_recv)."""
    c = COLLECTIVES.get(op)
    if c is None:
        return "-"
    return algorithm if op == "all_reduce" else c.flow


def number(x: Fraction | int):
    """An exact byte count as JSON wants it: an int when whole, else a float."""
    x = Fraction(x)
    return int(x) if x.denominator == 1 else float(x)


@dataclass
class Traffic:
    """Bytes over a set of calls: ``sent`` per sending rank, ``link`` all links together, ``inter_node`` the part
    that crosses nodes (None without a placement). Exact (fractions)."""

    sent: dict[int, Fraction]
    link: Fraction
    inter_node: Fraction | None

    @property
    def busiest(self) -> tuple[int | None, Fraction]:
        """(rank, bytes) of the rank that sends the most (the lowest such rank on a tie)."""
        if not self.sent:
            return None, Fraction(0)
        rank = min(self.sent, key=lambda x: (-self.sent[x], x))
        return rank, self.sent[rank]


def traffic_of(calls: Iterable[tuple], node_of: Callable[[int], int] | None = None,
               algorithm: str = "ring") -> Traffic:
    """Traffic of ``calls``: ``(op, ranks, m, count, root)`` tuples (``count`` identical calls). ``node_of`` maps a
    global rank to its node (:func:`node_of_placement`, or the hosts a measurement recorded)."""
    sent: dict[int, Fraction] = {}
    link = Fraction(0)
    inter = Fraction(0)
    for op, ranks, m, count, root in calls:
        for src, dst, nbytes in flows(op, tuple(ranks), m, algorithm, root):
            moved = count * nbytes
            sent[src] = sent.get(src, 0) + moved
            link += moved
            if node_of is not None and node_of(src) != node_of(dst):
                inter += moved
    return Traffic(sent, link, inter if node_of is not None else None)


def rows_of_calls(calls: Iterable[tuple], node_of: Callable[[int], int] | None = None,
                  algorithm: str = "ring") -> list[dict]:
    """Rows from concrete calls ``(phase, op, ranks, m, count, root)`` — what a capture recorded, or what a pattern
    expands to on a concrete layout: one row per (phase, op, group size) with ``calls``, ``bytes`` (nccl-tests m
    summed), ``algorithm``, ``sent_bytes_per_rank`` (the busiest rank's), ``link_bytes`` (all links together) and,
    with ``node_of``, ``inter_node_bytes``. Sorted by phase (setup, prefill, decode), op, group size."""
    from .phases import order

    groups: dict[tuple, list] = {}
    for phase, op, ranks, m, count, root in calls:
        key = (phase, op, 2 if op == "send_recv" else len(ranks))
        groups.setdefault(key, []).append((op, tuple(ranks), m, count, root))
    out = []
    for (phase, op, n), items in sorted(groups.items(), key=lambda kv: (order(kv[0][0]), kv[0][1], kv[0][2])):
        tr = traffic_of(items, node_of, algorithm)
        row = {"phase": phase, "op": op, "group_size": n, "calls": sum(c for *_, c, _ in items),
               "bytes": sum(c * m for _, _, m, c, _ in items),
               "algorithm": algorithm_name(op, algorithm),
               "sent_bytes_per_rank": number(tr.busiest[1]), "link_bytes": number(tr.link)}
        if tr.inter_node is not None:
            row["inter_node_bytes"] = number(tr.inter_node)
        out.append(row)
    return out


def summary(calls: Iterable[tuple], node_of: Callable[[int], int] | None = None, algorithm: str = "ring") -> dict:
    """The traffic of a whole generation from its calls ``(phase, op, ranks, m, count, root)`` (setup calls left
    out): ``{"algorithm", "bytes", "busiest_rank", "sent_bytes_busiest_rank", "link_bytes", "inter_node_bytes"}`` —
    the busiest rank over all ops together, not the sum of each row's busiest."""
    calls = [c for c in calls if c[0] != "setup"]
    tr = traffic_of([c[1:] for c in calls], node_of, algorithm)
    rank, sent = tr.busiest
    return {"algorithm": algorithm, "bytes": sum(k * m for _, _, _, m, k, _ in calls), "busiest_rank": rank,
            "sent_bytes_busiest_rank": number(sent), "link_bytes": number(tr.link),
            "inter_node_bytes": None if tr.inter_node is None else number(tr.inter_node)}
