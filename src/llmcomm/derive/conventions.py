"""Counting conventions for collectives, as nccl-tests defines them (``doc/PERFORMANCE.md`` of NVIDIA/nccl-tests).

The size ``m`` of one call, in bytes:

* all_reduce, broadcast, reduce → the buffer;
* all_gather, gather → the total gathered buffer (n × the per-rank input);
* reduce_scatter, scatter → the total input (n × the per-rank output);
* all_to_all → the bytes one rank sends in total;
* send_recv → the tensor sent (a send/recv pair counts once).

A collective called on a group counts once per group, not once per rank. The bus-bandwidth factor ``f(n)``
(busbw = algbw · f(n), algbw = m / τ) is 2(n−1)/n for all_reduce; (n−1)/n for all_gather, reduce_scatter, gather,
scatter, all_to_all; 1 for broadcast, reduce, send_recv.

These conventions are used by every layer: the closed forms (:mod:`llmcomm.derive.volumes`), the capture
(:mod:`llmcomm.measure.capture`), the microbenchmark and the α-β model (:mod:`llmcomm.predict.collectives`).
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..spec import SpecError

__all__ = ["OPS", "canonical_op", "bus_factor"]

#: the operations the project knows (nccl-tests names, without ``_perf``)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "gather", "scatter", "broadcast", "reduce", "all_to_all",
       "send_recv")

_SYNONYMS = {"allreduce": "all_reduce", "inference_all_reduce": "all_reduce", "allgather": "all_gather",
             "all_gather_into_tensor": "all_gather", "reducescatter": "reduce_scatter",
             "reduce_scatter_tensor": "reduce_scatter", "alltoall": "all_to_all", "all_to_all_single": "all_to_all",
             "sendrecv": "send_recv", "send": "send_recv", "recv": "send_recv", "isend": "send_recv",
             "irecv": "send_recv", "p2p": "send_recv"}


def canonical_op(op: str) -> str:
    """The nccl-tests name of ``op`` (``inference_all_reduce`` → ``all_reduce``, ``send`` → ``send_recv`` …); an
    unknown name is a :class:`~llmcomm.spec.SpecError` naming the known ones."""
    name = _SYNONYMS.get(op, op)
    if name not in OPS:
        raise SpecError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    return name


def bus_factor(op: str, n):
    """nccl-tests bus-bandwidth factor f(n) of ``op`` on ``n`` ranks: a sympy expression when ``n`` is symbolic,
    else a float (or a numpy array for an array ``n``)."""
    op = canonical_op(op)
    if isinstance(n, sp.Basic):
        one, two = sp.Integer(1), sp.Integer(2)
    else:
        n = np.asarray(n, dtype=float)
        one, two = 1.0, 2.0
    if op == "all_reduce":
        f = two * (n - one) / n
    elif op in ("all_gather", "reduce_scatter", "gather", "scatter", "all_to_all"):
        f = (n - one) / n
    else:                                       # broadcast, reduce, send_recv
        f = one + 0 * n
    if isinstance(f, np.ndarray) and f.ndim == 0:
        return float(f)
    return f
