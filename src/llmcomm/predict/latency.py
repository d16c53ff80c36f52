"""Latency model: TTFT, TPOT and E2E of one batch of requests, from the compute roofline (:mod:`.compute`) and α-β
collectives (:mod:`.collectives`, parameters from :mod:`.hardware`).

Communication per forward: the deployment's messages (:func:`llmcomm.derive.evaluate.messages`: op, group size n,
calls, bytes per call m), each call charged the α-β time of its op on its group at the right **link level**
(:mod:`.placement`: ranks placed in order, g per node). Calls on one request's critical path are sequential (the t
concurrent sends of a stage boundary, one per TP rank, are charged once).

What runs is a :class:`~llmcomm.deployment.Deployment` (framework, expert layout, routing, p2p mode, host profile),
resolved at the edge; its message pattern is :meth:`~llmcomm.deployment.Deployment.pattern`. A mixture of experts runs
under its expert layout (AutoTP as it is by default, or with e > 1 expert parallelism): the
compute counts the experts a rank computes (:func:`llmcomm.predict.compute.forward_compute`) and the messages take
the EP degree e and the capacity C of each phase, so the dispatch and combine all-to-alls are charged
(:meth:`llmcomm.predict.hardware.Hardware.collective_time`: α-β on the link). The EP group of a stage is its e
consecutive ranks, placed g per node like a TP group: its messages cross the inter-node link when it spans nodes
(e > g on one stage); with p > 1 stages each EP rank's hop carries its own b/e sequences.

Phases: ``TTFT = prefill forward``; ``TPOT = one decode forward`` at the mean KV length; ``E2E = TTFT + (G−1)·TPOT``.

Host overheads come from the host profile (:mod:`.profiles`, :func:`~llmcomm.predict.profiles.profile_for` the
deployment and the hardware): per layer and per forward, per phase; each phase's collectives take the profile's code
path (:mod:`.paths`: eager NCCL pays the eager floor, a CUDA graph does not, a custom all-reduce replaces NCCL for the
sizes it takes).

What-if levers (book: "Choosing a layout"): ``comm_w`` (bytes per element on the wire), ``overlap`` (``max``
instead of the sum of compute and communication: a bound), :func:`llmcomm.predict.hardware.scale_links`.

Everything is vectorised: :func:`predict_latency_grid` takes numpy arrays of t, p, b, S, G (broadcast together) and
evaluates hundreds of thousands of points per second on one core (``benchmarks/predict_speed.py``); :func:`predict_latency` is the one-point form with a breakdown.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..deployment import Deployment
from ..derive.evaluate import messages
from ..spec import Layout, ModelSpec, SpecError, Workload
from .compute import expert_layout, forward_compute, phase_context
from .hardware import Hardware
from .placement import placement_fractions, wrap_inter_fraction
from .profiles import profile_for
from .unique import on_unique

__all__ = ["forward_comm", "predict_latency", "predict_latency_grid", "METRICS"]

#: the latency metrics, in the order tables show them
METRICS = ("ttft_s", "tpot_s", "e2e_s")


def forward_comm(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, g, deployment: Deployment | None = None,
                 detail: bool = False, fractions=None, comm_w=None, e: int = 1):
    """Communication seconds of one forward of ``phase`` (the sum of its messages' α-β times at their link levels).

    ``comm_w``: bytes per element on the wire when it differs from the compute width ``w`` (what-if: fp8 or bf16
    communication of an fp32/bf16 model); token ids keep their own width. TP collectives of a hybrid (p > 1: the TP
    group is a proper sub-group of the world) use the preset's ``subgroup_collectives`` fits when it has them.
    ``deployment`` (default DeepSpeed as it is): its pattern, host profile and routing. ``e``: the expert-parallel
    degree of a mixture of experts (the capacity C of the phase, :func:`~.compute.expert_layout`)."""
    dep = (deployment or Deployment()).resolve(model, Layout(1, 1, int(e)))
    pattern = dep.pattern(model, Layout(1, 1, int(e)))
    prof = profile_for(dep, hw)
    path = prof.collective_path(phase)
    s, _, _ = phase_context(phase, S, G)
    xl = expert_layout(model, dep.experts, t, e, b, s, dep.routing)
    cap = 0 if xl is None else xl.C
    if comm_w is not None:
        w = comm_w
    t, p, b, s, w, g = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, s, w, g)))
    g_one = int(g.flat[0]) if g.size and (g == g.flat[0]).all() else None     # GPUs per node, when uniform
    q = t * int(e)                                   # ranks per stage: t TP ranks, or e EP ranks (t = 1)
    f_tp, f_pp = placement_fractions(model.L, q, p, g) if fractions is None else fractions
    # a stage's EP group is its e consecutive ranks, placed like a TP group: the same spanning fraction
    frac_of = {"tp": f_tp, "pp": f_pp, "wrap": wrap_inter_fraction(q, p, g), "experts": f_tp}
    sub = bool(hw.subgroup_collectives) and bool((p > 1).any())
    total = np.zeros(t.shape)
    parts = []
    for msg in messages(pattern, model, t, p, b, s, w, e, cap):
        op, n, m = msg["op"], msg["n"], msg["m"]
        sub_here = sub and msg["path"] == "tp"

        def level_time(level):
            sec = hw.collective_time(op, n, m, level, g=g_one, path=path, custom=prof.custom_allreduce)
            if sub_here:
                sec = np.where(p > 1, hw.collective_time(op, n, m, level, subgroup=True, g=g_one, path=path,
                                                         custom=prof.custom_allreduce), sec)
            return sec

        frac = frac_of["experts" if msg["where"] == "experts" else msg["path"]]
        intra = level_time("intra")
        per_call = intra + frac * (level_time("inter") - intra) if frac.any() else intra
        cost = msg["critical"] * per_call
        total = total + cost
        if detail:
            parts.append({"op": op, "group_size": n, "calls": msg["critical"], "bytes_per_call": m, "time_s": cost,
                          "inter_fraction": frac, "why": msg["why"]})
    return (total, parts) if detail else total


def predict_latency_grid(model: ModelSpec, hw: Hardware, t, p, b, S, G, w=2, gpus_per_node=None,
                         deployment: Deployment | None = None, comm_w=None, overlap: bool = False,
                         e: int = 1) -> dict:
    """TTFT/TPOT/E2E (s) over a broadcast grid of layouts (t, p) × workloads (b, S, G, w). Returns arrays:
    ``ttft_s, tpot_s, e2e_s, prefill_compute_s, prefill_comm_s, decode_compute_s, decode_comm_s``.

    What-if levers: ``comm_w`` bytes per element on the wire (e.g. 1 = fp8 communication); ``overlap=True`` charges
    each forward ``max(compute, comm)`` instead of ``compute + comm`` (perfect overlap of communication with
    compute: a lower bound, not a schedule any framework here runs).

    ``deployment``: what runs (default DeepSpeed as it is). A mixture of experts: ``e`` (one EP degree for the whole
    grid; e > 1 needs t = 1 and e dividing b), the routing of expert parallelism in the deployment.

    No validation here (the grid is the caller's): t must divide the heads, p ≤ L (see
    :func:`llmcomm.predict.advise.candidate_layouts`)."""
    dep = (deployment or Deployment()).resolve(model, Layout(1, 1, int(e)))
    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    prof = profile_for(dep, hw)
    t, p, b, S, G, w, g = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, S, G, w, g)))
    w_compute = float(w.flat[0]) if w.size and (w == w.flat[0]).all() else w       # one dtype: keep w a scalar

    def compute(phase, t_, p_, b_, S_, G_):
        return forward_compute(
            model, hw, t_, p_, b_, S_, G_, w_compute, phase, 1.0 / np.asarray(t_, dtype=float),
            overhead_s=prof.layer_overhead_s(phase, hw), host_overlaps=prof.host_overlaps(phase), experts=dep.experts,
            e=e, routing=dep.routing, moe_overhead_s=prof.moe_layer_overhead_s(phase, hw, model, dep.experts, e,
                                                                                dep.routing))["compute_s"] \
            + prof.forward_overhead_s(phase, hw)

    def comm(phase, t_, p_, b_, S_, G_, w_, g_):
        return forward_comm(model, hw, t_, p_, b_, S_, G_, w_, phase, g_, dep, comm_w=comm_w, e=e,
                            fractions=placement_fractions(model.L, np.asarray(t_) * int(e), p_, g_))

    # Evaluated once per distinct input of what each part depends on (llmcomm.predict.unique): a prefill does not
    # depend on G (phase_context), a decode step's communication on neither S nor G (one token per sequence), its
    # compute on both (the mean KV length S + G/2).
    G0 = G.flat[0] if G.size else 2
    out = {}
    out["prefill_compute_s"], out["prefill_comm_s"] = on_unique(
        lambda t_, p_, b_, S_, w_, g_: (compute("prefill", t_, p_, b_, S_, G0),
                                        comm("prefill", t_, p_, b_, S_, G0, w_, g_)), t, p, b, S, w, g)
    out["decode_compute_s"] = compute("decode", t, p, b, S, G)
    out["decode_comm_s"] = on_unique(lambda t_, p_, b_, w_, g_: comm("decode", t_, p_, b_, S.flat[0], G0, w_, g_),
                                     t, p, b, w, g)
    join = np.maximum if overlap else np.add
    out["ttft_s"] = join(out["prefill_compute_s"], out["prefill_comm_s"])
    out["tpot_s"] = join(out["decode_compute_s"], out["decode_comm_s"])
    out["e2e_s"] = out["ttft_s"] + (G - 1) * out["tpot_s"]
    return out


def _plain(x):
    """A JSON-ready scalar from a numpy value."""
    x = np.asarray(x)
    kind = x.dtype.kind
    return float(x) if kind == "f" else int(x) if kind in "iu" else bool(x) if x.dtype == np.bool_ else x.item()


def predict_latency(model: ModelSpec, layout: Layout, workload: Workload, hw: Hardware,
                    deployment: Deployment | None = None, gpus_per_node: int | None = None, comm_w=None,
                    overlap: bool = False) -> dict:
    """One point: ``{"ttft_s", "tpot_s", "e2e_s", "breakdown": {"prefill": {...}, "decode": {...}}, ...}``.

    ``deployment``: what runs (default DeepSpeed as it is; its pattern is the result's ``pattern`` for a mixture of
    experts, whose expert parallelism is ``layout.e`` under the deployment's routing).

    ``breakdown[phase]`` has ``compute_s`` and ``comm_s`` of one forward, its flops and bytes moved per rank summed
    over stages, whether a decoder layer is compute-bound, and ``messages``: each message kind with its α-β time.
    """
    layout = layout.validate(model)
    workload = workload.validate(model)
    g = hw.gpus_per_node if gpus_per_node is None else int(gpus_per_node)
    if g < 1:
        raise SpecError(f"gpus_per_node={g} must be at least 1")
    args = (layout.t, layout.p, workload.b, workload.S, workload.G, workload.w)
    dep = (deployment or Deployment()).resolve(model, layout)
    pattern = dep.pattern(model, layout)
    if model.is_moe and layout.e > 1:
        from ..derive.moe import rank_batch

        rank_batch(workload.b, layout.e)                         # e must divide b: one line, not a traceback
    prof = profile_for(dep, hw)
    res: dict[str, Any] = {"model": model.name, "hardware": hw.name, "gpus_per_node": g, "engine": dep.engine,
                           "pattern": pattern, "host_profile": prof.name, "tp": layout.t, "pp": layout.p,
                           "breakdown": {}}
    if model.is_moe:
        res["ep"] = layout.e
    for phase in ("prefill", "decode"):
        comp = forward_compute(model, hw, *args, phase, overhead_s=prof.layer_overhead_s(phase, hw),
                               host_overlaps=prof.host_overlaps(phase), experts=dep.experts, e=layout.e,
                               routing=dep.routing, moe_overhead_s=prof.moe_layer_overhead_s(
                                   phase, hw, model, dep.experts, layout.e, dep.routing))
        host = prof.forward_overhead_s(phase, hw)
        comm, parts = forward_comm(model, hw, *args, phase, g, dep, detail=True, comm_w=comm_w, e=layout.e)
        res["breakdown"][phase] = {
            "compute_s": _plain(comp["compute_s"] + host), "comm_s": _plain(comm), "host_forward_s": host,
            "flops": _plain(comp["flops"]),
            "bytes": _plain(comp["bytes"]), "layer_s": _plain(comp["layer_s"]),
            "compute_bound": _plain(comp["compute_bound"]),
            "messages": [{x: (_plain(v) if x != "why" else v) for x, v in msg.items()} for msg in parts]}
    pre, dec = res["breakdown"]["prefill"], res["breakdown"]["decode"]
    join = max if overlap else (lambda x, y: x + y)
    res["ttft_s"] = join(pre["compute_s"], pre["comm_s"])
    res["tpot_s"] = join(dec["compute_s"], dec["comm_s"])
    res["e2e_s"] = res["ttft_s"] + (workload.G - 1) * res["tpot_s"]
    return res
