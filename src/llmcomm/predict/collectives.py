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

all_to_all is the pairwise exchange (n−1 steps, each rank sends (n−1)/n of its m bytes): ASSUMPTION — no public
all-to-all time is fitted here; GPU presets charge it on the link's α and β (:meth:`llmcomm.predict.hardware.Hardware.collective_time`).

The bandwidth term of every row is ``m·β·f(n)`` (the bus factor): a fitted β is the inverse of the asymptotic busbw.
``direct`` is the one-shot form (NCCL's one-shot NVLS, vLLM's custom all-reduce): a single latency and the busbw
term, ``α + f(n)·m·β``. ``shm`` is DeepSpeed's CPU shared-memory all-reduce, which picks its path by size
(:func:`llmcomm.derive.conventions.shm_split`): the one-shot bytes cost ``α₁ + f(n)·m₁·β₁`` and the two-phase bytes
``⌈m₂/32 MiB⌉·α₂ + f(n)·m₂·β₂`` (one α₂ per 32 MiB chunk), each path with its own fitted α and β
(:func:`shm_time`). The latency steps of every op and algorithm come from the registry
(:func:`llmcomm.derive.conventions.latency_steps`). Every function takes scalars or numpy arrays (broadcast
together).
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import SHM_CHUNK, bus_factor, canonical_op, latency_steps, shm_split

__all__ = ["algbw", "busbw", "alpha_beta_time", "best_time", "shm_time", "nccl_ring_time",
           "nccl_allreduce_switch_size", "nccl_sendrecv_time", "cross_node_allreduce_time"]


def _out(x):
    x = np.asarray(x)
    return x[()] if x.ndim == 0 else x


def algbw(size_bytes, seconds):
    """Algorithm bandwidth m/τ in bytes per second."""
    return _out(np.asarray(size_bytes, dtype=float) / np.asarray(seconds, dtype=float))


def busbw(op: str, n, size_bytes, seconds):
    """Bus bandwidth algbw·f(n) in bytes per second."""
    return _out(algbw(size_bytes, seconds) * bus_factor(op, n))


def alpha_beta_time(op: str, n, size_bytes, alpha, beta, algorithm: str = "ring"):
    """Seconds of ``op`` of size m = ``size_bytes`` on ``n`` ranks: ``steps(op, n)·α + f(op, n)·m·β``.

    ``alpha`` in seconds per step, ``beta`` in seconds per byte (1/busbw); ``algorithm`` one of ring, tree, direct,
    ``auto`` (the faster of ring and tree; ``shm`` needs two parameter sets: :func:`shm_time`). A group of one rank
    costs nothing (except send_recv, which always moves its message)."""
    if algorithm == "auto":
        return best_time(op, n, size_bytes, alpha, beta)
    if algorithm == "shm":
        raise ValueError("the shm all-reduce has a one-shot and a two-phase path: use shm_time")
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


def shm_time(n, size_bytes, one_shot: tuple[float, float], two_phase: tuple[float, float]):
    """Seconds of DeepSpeed's shm all-reduce of ``size_bytes`` on ``n`` ranks: the one-shot bytes m₁ at
    ``one_shot`` = (α₁, β₁), the two-phase bytes m₂ at ``two_phase`` = (α₂, β₂), one α per chunk, each bandwidth term
    f(n)·m·β (:func:`llmcomm.derive.conventions.shm_split`). A group of one rank costs nothing."""
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    one, two = (np.asarray(x, dtype=float) for x in shm_split(m))
    f = np.asarray(bus_factor("all_reduce", n), dtype=float)
    tau = np.where(one > 0, one_shot[0] + f * one * one_shot[1], 0.0) + \
        np.ceil(two / SHM_CHUNK) * two_phase[0] + f * two * two_phase[1]
    return _out(np.where(n > 1, tau, 0.0))


# ------------------------------------------------------------------------------------------------------------------
# NCCL as measured: the fitted model of single-node NCCL kernels, and the cross-node prediction built on it.
#
# On NVSwitch/NVLink nodes NCCL's ring all-reduce switches protocol with size (LL/LL128 for low latency, Simple for
# bandwidth) and its bus bandwidth grows with n (more channels; NVLS on H100 n = 8), which one α-β line cannot follow.
# The fitted form (parameters per system, keyed by what they are; :mod:`llmcomm.compare.vidur` fits them to public
# kernel times), for a message of m bytes on n ranks::
#
#     f(n) = 2(n−1)/n,  steps = 2(n−1),  bw(n) = bytes_per_s·(n/2)^bw_growth
#     τ_simple = latency_s    + steps·step_s    + f·m/bw(n)
#     τ_ll     = latency_ll_s + steps·step_ll_s + f·m/(ll_efficiency·bw(n))
#     τ        = max(floor_s, min(τ_simple, τ_ll))     floor_s: the launch-bound floor of eager, back-to-back launches
#
# send_recv: τ = max(floor_s, latency_s + m/bytes_per_s + (⌈m/chunk_bytes⌉ − 1)·chunk_s), chunk_bytes = 1 MiB. Other
# ring collectives (all_gather, reduce_scatter, gather, broadcast) are *derived* from the all-reduce parameters (n−1
# steps, their own bus factor): no public data checks them. Across nodes (``nodes`` nodes of g GPUs, one NIC per
# GPU): every ring enters and leaves each node once and the rings spread over the rails, so busbw =
# min(bw(g), rails·nic_bytes_per_s) and each ring step waits for the network hop (step_net_s); NCCL's tree for small
# sizes: 2(⌈log2 nodes⌉·step_net_s + (g−1)·step_s). A PREDICTION: the public data hold no cross-node all-reduce.
# ------------------------------------------------------------------------------------------------------------------
def _bw_n(params, n):
    return float(params["bytes_per_s"]) * (np.asarray(n, dtype=float) / 2.0) ** float(params.get("bw_growth", 0.0))


def nccl_ring_time(op: str, n, size_bytes, params, floor: bool = True):
    """Seconds of ``op`` on ``n`` ranks of one node under the fitted NCCL model ``params`` (all_reduce as fitted; the
    other ring ops derived with their step count and bus factor). ``floor``: apply the eager launch floor
    ``floor_s``."""
    op = canonical_op(op)
    m, n = np.asarray(size_bytes, dtype=float), np.asarray(n, dtype=float)
    f = np.asarray(bus_factor(op, n), dtype=float)
    steps = 2.0 * (n - 1.0) if op == "all_reduce" else (n - 1.0)
    bw = _bw_n(params, n)
    tau = params["latency_s"] + steps * params["step_s"] + f * m / bw
    if "latency_ll_s" in params:
        tau = np.minimum(tau, params["latency_ll_s"] + steps * params["step_ll_s"]
                         + f * m / (params["ll_efficiency"] * bw))
    if floor:
        tau = np.maximum(float(params.get("floor_s", 0.0)), tau)
    return _out(np.where(n > 1, tau, 0.0))


def nccl_allreduce_switch_size(n, params):
    """Size (bytes) where the fitted all-reduce switches from the LL branch to Simple (nan if never)."""
    if "latency_ll_s" not in params:
        return np.nan
    n = np.asarray(n, dtype=float)
    f, steps, bw = 2 * (n - 1) / n, 2 * (n - 1), _bw_n(params, n)
    dlat = (params["latency_s"] + steps * params["step_s"]) - (params["latency_ll_s"] + steps * params["step_ll_s"])
    dbw = f / bw * (1.0 / params["ll_efficiency"] - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = dlat / dbw
    return _out(np.where(size > 0, size, np.nan))


def nccl_sendrecv_time(size_bytes, params, floor: bool = True):
    """Seconds of one send/recv of m = ``size_bytes`` under the fitted model ``params``:
    max(floor_s, latency_s + m/bytes_per_s + (⌈m/chunk_bytes⌉−1)·chunk_s)."""
    m = np.asarray(size_bytes, dtype=float)
    chunk = float(params.get("chunk_bytes", 2 ** 20))
    tau = params["latency_s"] + m / params["bytes_per_s"] \
        + np.maximum(np.ceil(m / chunk) - 1.0, 0.0) * params.get("chunk_s", 0.0)
    return _out(np.maximum(float(params.get("floor_s", 0.0)), tau) if floor else tau)


def cross_node_allreduce_time(size_bytes, n, nodes, intra, net, rails=None, algorithm: str = "auto",
                              floor: bool = True):
    """PREDICTED all-reduce seconds of ``n`` ranks over ``nodes`` nodes (g = n/nodes GPUs each), from the
    single-node fit ``intra`` and the network link ``net`` = ``{"step_net_s", "nic_bytes_per_s"}`` (s per step, B/s
    per NIC); ``rails``: NICs per node (default one per GPU). Not fitted to any cross-node all-reduce: the public
    data have none."""
    m = np.asarray(size_bytes, dtype=float)
    n, nodes = float(n), int(nodes)
    g = n / nodes
    if nodes < 1 or g != int(g):
        raise ValueError(f"n={n:g} ranks cannot be spread evenly over {nodes} nodes")
    if nodes == 1:
        return nccl_ring_time("all_reduce", n, m, intra, floor)
    rails = g if rails is None else float(rails)
    f = 2 * (n - 1) / n
    bw = min(float(_bw_n(intra, g)) if g > 1 else np.inf, rails * float(net["nic_bytes_per_s"]))
    tau_ring = intra["latency_s"] + 2 * (n - 1) * float(net["step_net_s"]) + f * m / bw
    tau_tree = intra["latency_s"] + 2 * (np.ceil(np.log2(nodes)) * float(net["step_net_s"])
                                         + (g - 1) * float(intra["step_s"])) + f * m / bw
    tau = {"ring": tau_ring, "tree": tau_tree, "auto": np.minimum(tau_ring, tau_tree)}[algorithm]
    return _out(np.maximum(float(intra.get("floor_s", 0.0)), tau) if floor else tau)
