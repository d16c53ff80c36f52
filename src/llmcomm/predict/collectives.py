"""α-β cost models of collectives, numpy-vectorised, in the nccl-tests conventions of
:mod:`llmcomm.derive.conventions` (size m; algbw = m/τ; busbw = algbw · f(n)).

α-β (Hockney) model: a message of m bytes over one link costs α + m·β (α latency in s, β inverse bandwidth in s/B).
Collective costs are the standard ones (Thakur, Rabenseifner & Gropp, IJHPCA 2005; NCCL's ring and tree):

=============  ==========================================  =============================================
op             ring (``ring``)                             tree / log-depth (``tree``)
=============  ==========================================  =============================================
all_reduce     2(n−1)·α + 2(n−1)/n · m·β                   2⌈log2 n⌉·α + 2(n−1)/n · m·β  (Rabenseifner)
all_gather     (n−1)·α + (n−1)/n · m·β                     ⌈log2 n⌉·α + (n−1)/n · m·β (recursive doubling)
reduce_scatter (n−1)·α + (n−1)/n · m·β                     ⌈log2 n⌉·α + (n−1)/n · m·β (recursive halving)
gather/scatter (n−1)·α + (n−1)/n · m·β   (m = total)       ⌈log2 n⌉·α + (n−1)/n · m·β (binomial tree)
all_to_all     (n−1)·α + (n−1)/n · m·β   (pairwise)        (n−1)·α + (n−1)/n · m·β
broadcast      (n−1)·α + m·β      (pipelined chain)        ⌈log2 n⌉·α + m·β  (pipelined tree)
send_recv      α + m·β                                     α + m·β
=============  ==========================================  =============================================

The bandwidth term of every row is ``m·β·f(n)`` (the bus factor): a fitted β is the inverse of the asymptotic busbw.
``direct`` is the one-shot shared-memory form (DeepSpeed's CPU shm all-reduce, NCCL's one-shot NVLS): a single
latency and the busbw term, ``α + f(n)·m·β``. Every function takes scalars or numpy arrays (broadcast together).
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import bus_factor, canonical_op

__all__ = ["ALGORITHMS", "algbw", "busbw", "latency_steps", "alpha_beta_time", "best_time"]

ALGORITHMS = ("ring", "tree", "direct", "auto")


def _out(x):
    x = np.asarray(x)
    return x[()] if x.ndim == 0 else x


def algbw(size_bytes, seconds):
    """Algorithm bandwidth m/τ in bytes per second."""
    return _out(np.asarray(size_bytes, dtype=float) / np.asarray(seconds, dtype=float))


def busbw(op: str, n, size_bytes, seconds):
    """Bus bandwidth algbw·f(n) in bytes per second."""
    return _out(algbw(size_bytes, seconds) * bus_factor(op, n))


def _log2ceil(n):
    return np.ceil(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0)))


def latency_steps(op: str, n, algorithm: str = "ring"):
    """Number of sequential α terms of ``op`` on ``n`` ranks under ``algorithm`` (0 when n = 1)."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    if algorithm == "direct" or op == "send_recv":
        steps = np.ones_like(n)
    elif algorithm == "ring" or op == "all_to_all":
        steps = 2.0 * (n - 1.0) if op == "all_reduce" else (n - 1.0)
    elif algorithm == "tree":
        steps = 2.0 * _log2ceil(n) if op == "all_reduce" else _log2ceil(n)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: ring, tree, direct")
    if op != "send_recv":
        steps = np.where(n > 1, steps, 0.0)
    return _out(steps)


def alpha_beta_time(op: str, n, size_bytes, alpha, beta, algorithm: str = "ring"):
    """Seconds of ``op`` of size m = ``size_bytes`` on ``n`` ranks: ``steps(op, n)·α + f(op, n)·m·β``.

    ``alpha`` in seconds per step, ``beta`` in seconds per byte (1/busbw); ``algorithm`` one of
    :data:`ALGORITHMS` (``auto``: the faster of ring and tree). A group of one rank costs nothing (except send_recv,
    which always moves its message)."""
    if algorithm == "auto":
        return best_time(op, n, size_bytes, alpha, beta)
    op = canonical_op(op)
    n_arr = np.asarray(n, dtype=float)
    f = np.asarray(bus_factor(op, n_arr), dtype=float)
    if op != "send_recv":
        f = np.where(n_arr > 1, f, 0.0)
    return _out(latency_steps(op, n_arr, algorithm) * np.asarray(alpha, dtype=float)
                + f * np.asarray(size_bytes, dtype=float) * np.asarray(beta, dtype=float))


def best_time(op, n, size_bytes, alpha, beta):
    """The faster of ring and tree for each point (what NCCL's tuner approximates)."""
    return np.minimum(alpha_beta_time(op, n, size_bytes, alpha, beta, "ring"),
                      alpha_beta_time(op, n, size_bytes, alpha, beta, "tree"))
