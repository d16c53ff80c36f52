"""The collective registry: everything the project knows about each collective, in one table.

Every other table reads :data:`COLLECTIVES` — the capture (which torch/DeepSpeed names mean which op), the closed
forms and the traffic fields (:mod:`llmcomm.derive.traffic`: what the busiest rank sends and all links carry under
each algorithm), the α-β time model (:mod:`llmcomm.predict.collectives`: latency steps per algorithm), the
microbenchmark (which ops it times), ``llmcomm cost`` (which ops it prices) and the command line's choices.

The size ``m`` of one call, in bytes, as nccl-tests defines it (``doc/PERFORMANCE.md`` of NVIDIA/nccl-tests):

* all_reduce, broadcast, reduce → the buffer;
* all_gather, gather → the total gathered buffer (n × the per-rank input);
* reduce_scatter, scatter → the total input (n × the per-rank output);
* all_to_all → the bytes one rank sends in total (its own chunk included);
* send_recv → the tensor sent (a send/recv pair counts once).

A collective called on a group counts once per group, not once per rank. The bus-bandwidth factor ``f(n)``
(busbw = algbw · f(n), algbw = m / τ) is 2(n−1)/n for all_reduce; (n−1)/n for all_gather, reduce_scatter, gather,
scatter, all_to_all; 1 for broadcast, reduce, send_recv.

Algorithms (:data:`ALGORITHMS`) — how a call moves its bytes:

* ``ring`` — NCCL's and gloo's bandwidth algorithm (broadcast and reduce: a pipelined chain; all_to_all pairwise);
* ``tree`` — log-depth forms (latency steps only: the bytes are the ring's);
* ``direct`` — one-shot: every rank sends its whole buffer to every other rank (an all-reduce moves (n−1)·m per rank);
* ``shm`` — DeepSpeed's CPU shared-memory all-reduce (``csrc/cpu/comm/shm.cpp``), which picks its path by size:
  the message is cut into chunks of :data:`SHM_CHUNK` (32 MiB); a chunk below :data:`SHM_ONE_SHOT_BELOW` (1 MiB) is
  reduced one-shot (``symmetric_naive_all_reduce``: every rank reads every other rank's buffer — ``direct``), a larger
  one in two phases (``distributed_naive_reduce``: each rank reduces its 1/n slice from every buffer, then gathers
  the other n−1 reduced slices — 2(n−1)/n·chunk per rank, as a ring). :func:`shm_split` says how many bytes of a
  message take which path;
* ``auto`` — the faster of ring and tree (time only).

The bytes a call moves under each algorithm are in :mod:`llmcomm.derive.traffic`; the steps of its latency here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sympy as sp

from ..spec import SpecError

__all__ = ["Collective", "COLLECTIVES", "OPS", "ALGORITHMS", "TRAFFIC_ALGORITHMS", "TIME_ALGORITHMS",
           "SHM_CHUNK", "SHM_ONE_SHOT_BELOW", "canonical_op", "bus_factor", "latency_steps", "shm_split"]

#: DeepSpeed's CPU shm all-reduce: chunk size (``MAX_BUF_SIZE``) and the one-shot threshold
#: (``NAIVE_ALLREDUCE_THRESHOLD``) of ``csrc/cpu/comm/shm.cpp`` (DeepSpeed 0.19.8)
SHM_CHUNK = 32 * 2 ** 20
SHM_ONE_SHOT_BELOW = 2 ** 20

#: every algorithm name; those the traffic fields count; those the time model prices
ALGORITHMS = ("ring", "tree", "direct", "shm", "auto")
TRAFFIC_ALGORITHMS = ("ring", "direct", "shm")
TIME_ALGORITHMS = ("ring", "tree", "direct", "shm", "auto")


def _log2ceil(n):
    if isinstance(n, sp.Basic):
        return sp.ceiling(sp.log(n, 2))
    return np.ceil(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0)))


@dataclass(frozen=True)
class Collective:
    """One collective: its nccl-tests ``name``, the ``synonyms`` torch and DeepSpeed give it, how its size is
    counted (``size_rule``, words), its bus factor ``bus(n)``, its latency steps per algorithm ``steps[alg](n)``,
    how its bytes flow (``flow``: the algorithm name its rows show when it is not the all-reduce's), whether it has
    a root, whether the time model prices it (``timed``) and the microbenchmark times it (``benched``)."""

    name: str
    synonyms: tuple[str, ...]
    size_rule: str
    bus: Callable
    steps: dict[str, Callable] = field(repr=False)
    flow: str = "ring"
    rooted: bool = False
    timed: bool = False
    benched: bool = False


def _steps_ring(k):        # k·(n−1) sequential steps on a ring or chain
    return lambda n: k * (n - 1)


def _steps_tree(k):        # k·⌈log2 n⌉ steps of a log-depth tree
    return lambda n: k * _log2ceil(n)


_ONE = {"ring": lambda n: 1 + 0 * n, "tree": lambda n: 1 + 0 * n, "direct": lambda n: 1 + 0 * n}

COLLECTIVES: dict[str, Collective] = {c.name: c for c in (
    Collective("all_reduce", ("allreduce", "inference_all_reduce", "all_reduce_coalesced"), "the buffer",
               lambda n: 2 * (n - 1) / n,
               {"ring": _steps_ring(2), "tree": _steps_tree(2), "direct": lambda n: 1 + 0 * n,
                "shm": lambda n: 1 + 0 * n},
               flow="", timed=True, benched=True),
    Collective("all_gather", ("allgather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single"),
               "the total gathered buffer (n × the input)", lambda n: (n - 1) / n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n},
               timed=True, benched=True),
    Collective("reduce_scatter", ("reducescatter", "reduce_scatter_tensor", "_reduce_scatter_base",
                                  "reduce_scatter_single"),
               "the total input (n × the output)", lambda n: (n - 1) / n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n}),
    Collective("gather", (), "the total gathered buffer (n × the input)", lambda n: (n - 1) / n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n}, flow="direct",
               rooted=True),
    Collective("scatter", (), "the total input (n × the output)", lambda n: (n - 1) / n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n}, flow="direct",
               rooted=True),
    Collective("broadcast", (), "the buffer", lambda n: 1 + 0 * n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n}, flow="chain",
               rooted=True, timed=True, benched=True),
    Collective("reduce", (), "the buffer", lambda n: 1 + 0 * n,
               {"ring": _steps_ring(1), "tree": _steps_tree(1), "direct": lambda n: 1 + 0 * n}, flow="chain",
               rooted=True),
    # the pairwise exchange: n−1 steps whatever the algorithm (no log-depth all-to-all)
    Collective("all_to_all", ("alltoall", "all_to_all_single"), "the bytes one rank sends in total",
               lambda n: (n - 1) / n,
               {"ring": _steps_ring(1), "tree": _steps_ring(1), "direct": _steps_ring(1)}, flow="pairwise",
               timed=True),
    Collective("send_recv", ("sendrecv", "send", "recv", "isend", "irecv", "p2p"), "the tensor (a pair once)",
               lambda n: 1 + 0 * n, dict(_ONE), flow="p2p", timed=True, benched=True),
)}

#: the operations the project knows (nccl-tests names, without ``_perf``)
OPS = tuple(COLLECTIVES)
_SYNONYMS = {s: c.name for c in COLLECTIVES.values() for s in c.synonyms}


def canonical_op(op: str) -> str:
    """The nccl-tests name of ``op`` (``inference_all_reduce`` → ``all_reduce``, ``send`` → ``send_recv`` …); an
    unknown name is a :class:`~llmcomm.spec.SpecError` naming the known ones."""
    name = _SYNONYMS.get(op, op)
    if name not in COLLECTIVES:
        raise SpecError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    return name


def _out(f, n):
    if isinstance(n, sp.Basic):
        return f
    f = np.asarray(f, dtype=float)
    return float(f) if f.ndim == 0 else f


def bus_factor(op: str, n):
    """nccl-tests bus-bandwidth factor f(n) of ``op`` on ``n`` ranks: a sympy expression when ``n`` is symbolic,
    else a float (or a numpy array for an array ``n``)."""
    c = COLLECTIVES[canonical_op(op)]
    if not isinstance(n, sp.Basic):
        n = np.asarray(n, dtype=float)
    return _out(c.bus(n), n)


def latency_steps(op: str, n, algorithm: str = "ring"):
    """Sequential α terms of one call of ``op`` on ``n`` ranks under ``algorithm`` (0 when n = 1, except
    send_recv). ``shm`` is one step per chunk (:func:`llmcomm.predict.collectives.alpha_beta_time` adds the chunks)."""
    c = COLLECTIVES[canonical_op(op)]
    alg = algorithm if algorithm in c.steps else ("direct" if algorithm == "shm" else algorithm)
    if alg not in c.steps:
        raise SpecError(f"unknown algorithm {algorithm!r} for {c.name}; known: {', '.join(c.steps)}")
    if isinstance(n, sp.Basic):
        return c.steps[alg](n)
    n = np.asarray(n, dtype=float)
    steps = np.asarray(c.steps[alg](n), dtype=float)
    if c.name != "send_recv":
        steps = np.where(n > 1, steps, 0.0)
    return _out(steps, n)


def shm_split(m):
    """(one-shot bytes, two-phase bytes) of an all-reduce of ``m`` bytes on DeepSpeed's shm path: every full chunk of
    :data:`SHM_CHUNK` and a last chunk of at least :data:`SHM_ONE_SHOT_BELOW` take the two-phase path, a last chunk
    below it the one-shot path. ``m`` may be a number, a numpy array or a sympy expression."""
    if isinstance(m, sp.Basic):
        rest = sp.Mod(m, SHM_CHUNK)
        one = sp.Piecewise((rest, rest < SHM_ONE_SHOT_BELOW), (0, True))
        return one, m - one
    if not isinstance(m, np.ndarray) and float(m) == int(m):
        rest = int(m) % SHM_CHUNK                       # exact for whole byte counts (a Fraction stays exact)
        one = rest if rest < SHM_ONE_SHOT_BELOW else 0
        return one, m - one
    arr = np.asarray(m, dtype=float)
    rest = np.mod(arr, SHM_CHUNK)
    one = np.where(rest < SHM_ONE_SHOT_BELOW, rest, 0.0)
    return _out(one, arr), _out(arr - one, arr)
