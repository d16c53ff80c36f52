"""Collectives: nccl-tests size conventions (algbw, busbw) and α-β cost models, numpy-vectorised.

Conventions (as nccl-tests defines them, see ``doc/PERFORMANCE.md`` of NVIDIA/nccl-tests):

* ``S`` is the size of the operation in bytes: all_reduce / broadcast / reduce → the buffer; all_gather and
  gather → the total gathered buffer (``n`` × the per-rank input); reduce_scatter and scatter → the total input
  (``n`` × the per-rank output); send_recv → the tensor sent (a pair counts once).
* algorithm bandwidth ``algbw = S / t``.
* bus bandwidth ``busbw = algbw · f(n)`` with ``f`` = 2(n−1)/n (all_reduce), (n−1)/n (all_gather, reduce_scatter,
  gather, scatter), 1 (broadcast, reduce, send_recv). busbw is comparable with the link's peak bandwidth whatever ``n``.

α-β (Hockney) model: a message of ``m`` bytes over one link costs ``α + m·β`` (α latency in s, β inverse bandwidth in
s/B). Collective costs below are the standard ones (Thakur, Rabenseifner & Gropp, IJHPCA 2005; NCCL's ring and tree):

=============  ==========================================  =============================================
op             ring (``ring``)                             tree / log-depth (``tree``)
=============  ==========================================  =============================================
all_reduce     2(n−1)·α + 2(n−1)/n · S·β                   2⌈log2 n⌉·α + 2(n−1)/n · S·β  (Rabenseifner)
all_gather     (n−1)·α + (n−1)/n · S·β                     ⌈log2 n⌉·α + (n−1)/n · S·β (recursive doubling)
reduce_scatter (n−1)·α + (n−1)/n · S·β                     ⌈log2 n⌉·α + (n−1)/n · S·β (recursive halving)
gather/scatter (n−1)·α + (n−1)/n · S·β   (S = total)       ⌈log2 n⌉·α + (n−1)/n · S·β (binomial tree)
broadcast      (n−1)·α + S·β      (pipelined chain)        ⌈log2 n⌉·α + S·β  (pipelined tree)
send_recv      α + S·β                                     α + S·β
=============  ==========================================  =============================================

The bandwidth term of every row is ``S·β·busbw_factor(op, n)``: a fitted β is the inverse of the asymptotic busbw.
``direct`` is the one-shot shared-memory form (DeepSpeed's CPU shm all-reduce, NCCL's one-shot NVLS): a single
latency and the busbw term, ``α + f(n)·S·β``.

Every function takes scalars or numpy arrays (broadcast together) and returns floats or arrays.
"""
from __future__ import annotations

import numpy as np

__all__ = ["OPS", "ALGORITHMS", "busbw_factor", "algbw", "busbw", "latency_steps", "alpha_beta_time",
           "ring_time", "tree_time", "direct_time", "best_time", "collective_time"]

#: the operations the microbenchmark and the models know (nccl-tests names without ``_perf``)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "gather", "scatter", "broadcast", "reduce", "send_recv")
ALGORITHMS = ("ring", "tree", "direct", "auto")

_SYNONYMS = {"allreduce": "all_reduce", "inference_all_reduce": "all_reduce", "allgather": "all_gather",
             "all_gather_into_tensor": "all_gather", "reducescatter": "reduce_scatter",
             "reduce_scatter_tensor": "reduce_scatter", "sendrecv": "send_recv", "send": "send_recv",
             "recv": "send_recv", "isend": "send_recv", "irecv": "send_recv", "p2p": "send_recv"}


def canonical_op(op: str) -> str:
    """The nccl-tests name of ``op`` (``inference_all_reduce`` → ``all_reduce``, ``send`` → ``send_recv`` …)."""
    name = _SYNONYMS.get(op, op)
    if name not in OPS:
        raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    return name


def busbw_factor(op: str, n):
    """nccl-tests bus-bandwidth factor f(n): busbw = algbw · f(n)."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    if op == "all_reduce":
        f = 2.0 * (n - 1.0) / n
    elif op in ("all_gather", "reduce_scatter", "gather", "scatter"):  # gather: (n−1)/n · S arrives at the root
        f = (n - 1.0) / n
    else:                                       # broadcast, reduce, send_recv
        f = np.ones_like(n)
    return f[()] if f.ndim == 0 else f


def algbw(size_bytes, time_s):
    """Algorithm bandwidth S/t in bytes per second."""
    out = np.asarray(size_bytes, dtype=float) / np.asarray(time_s, dtype=float)
    return out[()] if out.ndim == 0 else out


def busbw(op: str, n, size_bytes, time_s):
    """Bus bandwidth algbw·f(n) in bytes per second."""
    out = algbw(size_bytes, time_s) * busbw_factor(op, n)
    return out


def _log2ceil(n):
    return np.ceil(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0)))


def latency_steps(op: str, n, algorithm: str = "ring"):
    """Number of sequential α terms of ``op`` on ``n`` ranks under ``algorithm`` (0 when n = 1)."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    if algorithm == "direct" or op == "send_recv":
        k = np.ones_like(n)
    elif algorithm == "ring":
        k = 2.0 * (n - 1.0) if op == "all_reduce" else (n - 1.0)
    elif algorithm == "tree":
        k = 2.0 * _log2ceil(n) if op == "all_reduce" else _log2ceil(n)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: ring, tree, direct")
    if op != "send_recv":
        k = np.where(n > 1, k, 0.0)
    return k[()] if k.ndim == 0 else k


def alpha_beta_time(op: str, n, size_bytes, alpha, beta, algorithm: str = "ring"):
    """Time (s) of ``op`` of S = ``size_bytes`` on ``n`` ranks: ``steps(op,n)·α + f(op,n)·S·β``.

    ``alpha`` in seconds per step, ``beta`` in seconds per byte (1/busbw). A group of one rank costs nothing (except
    send_recv, which always moves its message).
    """
    if algorithm == "auto":
        return best_time(op, n, size_bytes, alpha, beta)
    op_c = canonical_op(op)
    n_arr = np.asarray(n, dtype=float)
    f = busbw_factor(op_c, n_arr)
    if op_c != "send_recv":
        f = np.where(n_arr > 1, f, 0.0)
    t = latency_steps(op_c, n_arr, algorithm) * np.asarray(alpha, dtype=float) \
        + f * np.asarray(size_bytes, dtype=float) * np.asarray(beta, dtype=float)
    t = np.asarray(t)
    return t[()] if t.ndim == 0 else t


def ring_time(op, n, size_bytes, alpha, beta):
    return alpha_beta_time(op, n, size_bytes, alpha, beta, "ring")


def tree_time(op, n, size_bytes, alpha, beta):
    return alpha_beta_time(op, n, size_bytes, alpha, beta, "tree")


def direct_time(op, n, size_bytes, alpha, beta):
    return alpha_beta_time(op, n, size_bytes, alpha, beta, "direct")


def best_time(op, n, size_bytes, alpha, beta):
    """The faster of ring and tree for each point (what NCCL's tuner approximates)."""
    return np.minimum(ring_time(op, n, size_bytes, alpha, beta), tree_time(op, n, size_bytes, alpha, beta))


def collective_time(op, n, size_bytes, alpha, beta, algorithm="ring"):
    """Alias of :func:`alpha_beta_time` (``algorithm`` in ring, tree, direct, auto)."""
    return alpha_beta_time(op, n, size_bytes, alpha, beta, algorithm)
