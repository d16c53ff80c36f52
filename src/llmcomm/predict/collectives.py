"""Time models of collectives, numpy-vectorised, in the nccl-tests conventions of :mod:`llmcomm.derive.conventions`
(size m; algbw = m/τ; busbw = algbw · f(n)): the α-β forms of links and microbenchmark fits, and NCCL's own
structure for GPUs.

**α-β** (Hockney): a message of m bytes over one link costs α + m·β (α latency in s, β inverse bandwidth in s/B).
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

The bandwidth term of a ring or tree row is ``m·β·f(n)`` (the bus factor): a fitted β is the inverse of the
asymptotic busbw. ``direct`` is the one-shot form (vLLM's one-shot custom all-reduce, DeepSpeed's shm one-shot path):
one latency and **the bytes a rank sends under the one-shot algorithm** — ONE definition with the traffic counts,
:func:`llmcomm.derive.traffic.sent_factor` (``direct``: (n−1)·m per rank for an all-reduce, every rank sends its whole
buffer to every other), so ``α + sent(n)·m·β`` where β is the inverse of the bandwidth at which one rank sends. For
n = 2 this equals the busbw form (sent = f = 1); from n = 3 on the one-shot moves (n−1)·m, not 2(n−1)/n·m, and its
time grows as its bytes do (:func:`bytes_factor`). ``shm`` is DeepSpeed's CPU shared-memory all-reduce, which picks
its path by size (:func:`llmcomm.derive.conventions.shm_split`): the one-shot bytes cost ``α₁ + sent_direct(n)·m₁·β₁``
and the two-phase bytes ``⌈m₂/32 MiB⌉·α₂ + f(n)·m₂·β₂`` (one α₂ per 32 MiB chunk), each path with its own fitted α and
β (:func:`shm_time`). The latency steps of every op and algorithm come from the registry
(:func:`llmcomm.derive.conventions.latency_steps`). Every function takes scalars or numpy arrays (broadcast together).

**NCCL** (:func:`nccl_time`): the structure of NCCL's own tuning model (``src/graph/tuning.cc``,
``ncclTopoTuneModel`` and ``ncclTopoGetAlgoTime``): for every allowed (algorithm, protocol) a latency — a base
(``baseLat[a][p]``) plus a per-hop latency times the hops (``hwLat[NVLINK|PCI|NET][a][p]``: intra-node hops and network
hops apart) — plus the bytes over a bus bandwidth scaled by the protocol's efficiency (LL ×1/4, LL128 ×0.92 of Simple
in tuning.cc); the time is the minimum over the allowed pairs. Algorithms: ``ring`` (every op), ``tree`` (all-reduce
across nodes: on one node NCCL's tree is a chain with the ring's hops and less bandwidth), ``nvls`` (NVLink SHARP: the
all-reduce on one NVSwitch node of more than 2 GPUs (``ncclNvlsInit``: no NVLS for ≤ 2 GPUs) in a dtype the switch
reduces (``ncclNvlsSupported``: fp16/bf16/fp32/int32/int64, not int8)); protocols LL, LL128, Simple. The NUMBERS are
not NCCL's: every latency, hop, efficiency and bandwidth is fitted per system to public kernel times
(:func:`llmcomm.predict.fit.fit_nccl`; what fitted each is in the calibration's ``source``). For a message of m bytes
on n ranks of one node::

    ring, protocol P:  τ = latency_s[P] + hops(op, n)·hop_s[P] + f(op, n)·m / (efficiency[P] · bw(op, n))
    nvls:              τ = nvls.latency_s + (n+1)/n · m / nvls.bytes_per_s

``hops`` = 2(n−1) for all_reduce, n−1 for the others (tuning.cc's ``nsteps``); ``bw(op, n)`` is Simple's fitted bus
bandwidth of a group of n (``ring_bytes_per_s``: one table for all_reduce, one for the n−1-step ops — all_gather,
reduce_scatter, broadcast, reduce, all_to_all; interpolated in log n between measured n, held at the ends). NVLS
moves (n+1)/n·m per rank each way (multimem reduce-load of the m bytes every GPU holds plus m/n of its slice's result;
multicast store of its m/n and receipt of the whole m): derived from NVLS's two phases, not from tuning.cc's fixed
ratio. ``all_to_all`` is NCCL's grouped send/recv (the nccl-tests ``alltoall_perf``): one p2p hop with every peer's
transfer on its own channels (concurrent), LL when a peer's chunk m/n ≤ 16 KiB (``NCCL_P2P_LL_THRESHOLD``) else
Simple, (n−1)/n·m per rank at the n−1-step ops' bandwidth — a PREDICTION: no all-to-all time is fitted.

Across ``nodes`` nodes of g = n/nodes GPUs (``net`` = {``hop_s``: extra latency of a network hop, ``bytes_per_s``:
what one rail moves, ``rails``: rails a node's rings spread over}, from the cluster's own send/recv; the node's network
carries ``min(rails, g)·bytes_per_s`` each way: one NIC per GPU, only the g GPUs' own NICs carry the group)::

    ring:  τ = latency_s[P] + (hops − inter)·hop_s[P] + inter·(hop_s[P] + net.hop_s) + f·m / (eff[P]·min(bw(g), net))
    tree:  τ = latency_s[P] + 2·((g−1)·hop_s[P] + ⌈log2 nodes⌉·(hop_s[P] + net.hop_s))
               + max(2(g−1)/g·m / bw(g), m·(1 if nodes = 2 else 2) / net) / eff[P]

``inter`` = 2·nodes network hops for all_reduce, nodes−1 for the n−1-step ops (tuning.cc's ``nInterSteps``). NCCL's
double binary tree sends m each way across the boundary of two nodes (each tree carries m/2 up and m/2 down, the
roots on opposite nodes), about 2m through an interior node of more. Cross-node times are PREDICTIONS.

Floors (:mod:`llmcomm.predict.paths`): a code path that launches collectives eagerly from Python pays
``max(floor_s, τ)``; in a CUDA graph a collective costs its kernel time.
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import SHM_CHUNK, bus_factor, canonical_op, latency_steps, shm_split
from ..derive.traffic import sent_factor

__all__ = ["algbw", "busbw", "bytes_factor", "alpha_beta_time", "best_time", "shm_time", "NCCL_ALGORITHMS",
           "NCCL_PROTOCOLS", "P2P_LL_THRESHOLD", "ring_bandwidth", "nccl_candidates", "nccl_time", "nccl_ring_time",
           "nccl_sendrecv_time", "custom_allreduce_time"]


def _out(x):
    x = np.asarray(x)
    return x[()] if x.ndim == 0 else x


def algbw(size_bytes, seconds):
    """Algorithm bandwidth m/τ in bytes per second."""
    return _out(np.asarray(size_bytes, dtype=float) / np.asarray(seconds, dtype=float))


def busbw(op: str, n, size_bytes, seconds):
    """Bus bandwidth algbw·f(n) in bytes per second."""
    return _out(algbw(size_bytes, seconds) * bus_factor(op, n))


def bytes_factor(op: str, n, algorithm: str = "ring"):
    """What the bandwidth term of ``algorithm`` multiplies m by: the bytes one rank sends under the one-shot
    algorithm (``direct``: :func:`llmcomm.derive.traffic.sent_factor`, the traffic model's own count — (n−1) for an
    all-reduce), else the bus factor f(n) (ring and tree move f(n)·m per rank; β is then the inverse busbw). 0 for a
    group of one (send_recv always moves its message)."""
    op = canonical_op(op)
    n_arr = np.asarray(n, dtype=float)
    if algorithm == "direct":
        f = np.asarray(sent_factor(op, n_arr, "direct"), dtype=float)
    else:
        f = np.asarray(bus_factor(op, n_arr), dtype=float)
    if op != "send_recv":
        f = np.where(n_arr > 1, f, 0.0)
    return _out(f)


def alpha_beta_time(op: str, n, size_bytes, alpha, beta, algorithm: str = "ring"):
    """Seconds of ``op`` of size m = ``size_bytes`` on ``n`` ranks: ``steps(op, n)·α + bytes_factor·m·β``.

    ``alpha`` in seconds per step, ``beta`` in seconds per byte (1/busbw for ring and tree; for ``direct`` 1/the
    bandwidth one rank sends at, its bytes being :func:`llmcomm.derive.traffic.sent_factor`'s); ``algorithm`` one of
    ring, tree, direct, ``auto`` (the faster of ring and tree; ``shm`` needs two parameter sets: :func:`shm_time`).
    A group of one rank costs nothing (except send_recv, which always moves its message)."""
    if algorithm == "auto":
        return best_time(op, n, size_bytes, alpha, beta)
    if algorithm == "shm":
        raise ValueError("the shm all-reduce has a one-shot and a two-phase path: use shm_time")
    op = canonical_op(op)
    n_arr = np.asarray(n, dtype=float)
    f = np.asarray(bytes_factor(op, n_arr, algorithm), dtype=float)
    return _out(latency_steps(op, n_arr, algorithm) * np.asarray(alpha, dtype=float)
                + f * np.asarray(size_bytes, dtype=float) * np.asarray(beta, dtype=float))


def best_time(op, n, size_bytes, alpha, beta):
    """The faster of ring and tree for each point (what NCCL's tuner approximates)."""
    return np.minimum(alpha_beta_time(op, n, size_bytes, alpha, beta, "ring"),
                      alpha_beta_time(op, n, size_bytes, alpha, beta, "tree"))


def shm_time(n, size_bytes, one_shot: tuple[float, float], two_phase: tuple[float, float]):
    """Seconds of DeepSpeed's shm all-reduce of ``size_bytes`` on ``n`` ranks: the one-shot bytes m₁ at
    ``one_shot`` = (α₁, β₁) with the one-shot's bytes per rank ((n−1)·m₁: :func:`bytes_factor` ``direct``), the
    two-phase bytes m₂ at ``two_phase`` = (α₂, β₂) with f(n)·m₂, one α per chunk
    (:func:`llmcomm.derive.conventions.shm_split`). A group of one rank costs nothing."""
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    one, two = (np.asarray(x, dtype=float) for x in shm_split(m))
    f_one = np.asarray(bytes_factor("all_reduce", n, "direct"), dtype=float)
    f_two = np.asarray(bus_factor("all_reduce", n), dtype=float)
    tau = np.where(one > 0, one_shot[0] + f_one * one * one_shot[1], 0.0) + \
        np.ceil(two / SHM_CHUNK) * two_phase[0] + f_two * two * two_phase[1]
    return _out(np.where(n > 1, tau, 0.0))


# ------------------------------------------------------------------------------------------------------------------
# NCCL as its tuner models it (module doc), with fitted numbers.
# ------------------------------------------------------------------------------------------------------------------
NCCL_ALGORITHMS = ("ring", "tree", "nvls")
NCCL_PROTOCOLS = ("LL", "LL128", "Simple")
#: NCCL's send/recv switches from LL to Simple above this many bytes per peer (``NCCL_P2P_LL_THRESHOLD``,
#: src/enqueue.cc, default 16384)
P2P_LL_THRESHOLD = 16384
#: the ops of n−1 ring steps whose bandwidth is the all_gather table
_GATHER_KIND = ("all_gather", "reduce_scatter", "broadcast", "reduce", "gather", "scatter", "all_to_all")


def ring_bandwidth(params, op: str, n):
    """Simple's fitted ring bus bandwidth (B/s) of ``op`` on groups of ``n``: the ``ring_bytes_per_s`` table of
    all_reduce, or of all_gather for the other ring ops (either one when the data had only the other), interpolated
    linearly in (log2 n, log bandwidth) between the measured group sizes and held at the ends."""
    tables = params["ring_bytes_per_s"]
    kind = "all_reduce" if canonical_op(op) == "all_reduce" else "all_gather"
    table = tables.get(kind) or tables.get("all_gather" if kind == "all_reduce" else "all_reduce")
    keys = sorted(int(x) for x in table)
    x = np.log2(np.maximum(np.asarray(n, dtype=float), 1.0))
    return np.exp(np.interp(x, np.log2(keys), np.log([float(table[str(x)]) for x in keys])))


def _protocol(params, name):
    pr = params["protocols"][name]
    return float(pr["latency_s"]), float(pr["hop_s"]), float(pr.get("efficiency", 1.0))


def nccl_candidates(op: str, n, size_bytes, params, nodes=1, nvls=True):
    """Every allowed (algorithm, protocol) of ``op`` and its seconds (module doc): ``(labels, times)`` with
    ``labels`` a list of ``(algorithm, protocol)`` and ``times`` an array of shape ``(len(labels),) + shape`` (inf
    where a pair is not allowed for a point). ``nodes``: nodes the n ranks span (g = n/nodes per node); ``nvls``:
    whether the dtype allows NVLS's in-switch reduction (bool or array)."""
    op = canonical_op(op)
    n, m = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(size_bytes, dtype=float))
    nodes = np.broadcast_to(np.asarray(nodes, dtype=float), n.shape)
    g = n / nodes
    multi = nodes > 1
    net = params.get("net") or {}
    if multi.any() and not net:
        raise ValueError("a group across nodes needs the 'net' parameters (hop_s, bytes_per_s, rails)")
    net_hop = float(net.get("hop_s", 0.0))
    net_bw = np.minimum(float(net.get("rails") or 1.0), g) * float(net.get("bytes_per_s", np.inf))
    bw_g = np.where(g > 1, ring_bandwidth(params, op, g), np.inf)
    f = np.asarray(bus_factor(op, n), dtype=float)
    labels, times = [], []
    if op == "all_to_all":
        ll = m / n <= P2P_LL_THRESHOLD
        for proto in ("LL", "Simple"):
            lat, hop, eff = _protocol(params, proto)
            intra = (g - 1) / n * m / bw_g
            over = g * (n - g) / n * m / net_bw
            tau = lat + hop + np.where(multi, net_hop, 0.0) + np.maximum(np.where(g > 1, intra, 0.0),
                                                                         np.where(multi, over, 0.0)) / eff
            labels.append(("pairwise", proto))
            times.append(np.where(ll == (proto == "LL"), tau, np.inf))
        return labels, np.stack(times)
    hops = 2 * (n - 1) if op == "all_reduce" else n - 1
    inter = np.where(multi, 2 * nodes if op == "all_reduce" else nodes - 1, 0.0)
    bw_ring = np.minimum(bw_g, np.where(multi, net_bw, np.inf))
    for proto in NCCL_PROTOCOLS:
        lat, hop, eff = _protocol(params, proto)
        labels.append(("ring", proto))
        times.append(lat + hops * hop + inter * net_hop + f * m / (eff * bw_ring))
        if op == "all_reduce":
            tree = lat + 2 * ((g - 1) * hop + np.ceil(np.log2(np.maximum(nodes, 1.0))) * (hop + net_hop)) + \
                np.maximum(np.where(g > 1, 2 * (g - 1) / g * m / bw_g, 0.0),
                           m * np.where(nodes > 2, 2.0, 1.0) / net_bw) / eff
            labels.append(("tree", proto))
            times.append(np.where(multi, tree, np.inf))
    nv = params.get("nvls")
    if op == "all_reduce" and nv:
        ok = (~multi) & (n > 2) & (n <= float(nv.get("max_ranks", np.inf))) & np.asarray(nvls, dtype=bool)
        labels.append(("nvls", "Simple"))
        times.append(np.where(ok, float(nv["latency_s"]) + (n + 1) / n * m / float(nv["bytes_per_s"]), np.inf))
    return labels, np.stack(np.broadcast_arrays(*times))


def nccl_time(op: str, n, size_bytes, params, nodes=1, nvls=True, floor_s=0.0, detail: bool = False):
    """Seconds of one ``op`` of m = ``size_bytes`` on ``n`` ranks (over ``nodes`` nodes) under the fitted NCCL model
    ``params``: the fastest allowed (algorithm, protocol), at least ``floor_s`` (a code path's floor). A group of one
    costs nothing. ``detail``: also the chosen algorithm and protocol (arrays of names)."""
    labels, times = nccl_candidates(op, n, size_bytes, params, nodes, nvls)
    best = times.argmin(axis=0)
    tau = np.take_along_axis(times, best[None], axis=0)[0]
    n_arr = np.broadcast_to(np.asarray(n, dtype=float), tau.shape)
    tau = np.where(n_arr > 1, np.maximum(float(floor_s), tau), 0.0)
    if not detail:
        return _out(tau)
    names = np.array([x[0] for x in labels]), np.array([x[1] for x in labels])
    return _out(tau), _out(names[0][best]), _out(names[1][best])


def nccl_ring_time(op: str, n, size_bytes, params, floor_s=0.0):
    """Seconds of ``op`` under the ring algorithm alone (its fastest protocol; one node), at least ``floor_s``: the
    form a single α-β line cannot follow, and what :func:`nccl_time` takes where no other algorithm is faster."""
    labels, times = nccl_candidates(op, n, size_bytes, params, nvls=False)
    ring = np.array([alg == "ring" for alg, _ in labels])
    tau = times[ring].min(axis=0)
    return _out(np.where(np.broadcast_to(np.asarray(n, dtype=float), tau.shape) > 1, np.maximum(float(floor_s), tau),
                         0.0))


def nccl_sendrecv_time(size_bytes, params, floor: bool = True):
    """Seconds of one send/recv of m = ``size_bytes`` under the fitted model ``params``:
    max(floor_s, latency_s + m/bytes_per_s + (⌈m/chunk_bytes⌉−1)·chunk_s); ``floor``: apply ``floor_s`` (the eager
    floor of the source's back-to-back launches)."""
    m = np.asarray(size_bytes, dtype=float)
    chunk = float(params.get("chunk_bytes", 2 ** 20))
    tau = params["latency_s"] + m / params["bytes_per_s"] \
        + np.maximum(np.ceil(m / chunk) - 1.0, 0.0) * params.get("chunk_s", 0.0)
    return _out(np.maximum(float(params.get("floor_s", 0.0)), tau) if floor else tau)


def custom_allreduce_time(n, size_bytes, fit, detail: bool = False):
    """Seconds of a custom (vLLM / SGLang / TRT-LLM) all-reduce kernel of m = ``size_bytes`` on ``n`` ranks of one
    node under ``fit``: the faster of the one-shot ``one_shot_latency_s + sent_direct(n)·m / one_shot_bytes_per_s``
    (every rank reads every peer's whole buffer: (n−1)·m, :func:`bytes_factor` ``direct``) and the two-shot
    ``two_shot_latency_s + f(n)·m / two_shot_bytes_per_s`` (a reduce-scatter then an all-gather: 2(n−1)/n·m), at least
    ``floor_s`` (the eager host floor; absent in a CUDA graph). ``detail``: also which shot."""
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    one = float(fit["one_shot_latency_s"]) + bytes_factor("all_reduce", n, "direct") * m / \
        float(fit["one_shot_bytes_per_s"])
    if "two_shot_latency_s" in fit:
        two = float(fit["two_shot_latency_s"]) + bytes_factor("all_reduce", n) * m / float(fit["two_shot_bytes_per_s"])
    else:
        two = np.full(np.broadcast(one, m).shape, np.inf)
    tau = np.maximum(float(fit.get("floor_s", 0.0)), np.minimum(one, two))
    tau = np.where(n > 1, tau, 0.0)
    return (_out(tau), _out(np.where(two < one, "two-shot", "one-shot"))) if detail else _out(tau)
