"""Latency model: TTFT, TPOT and E2E of one batch of requests, from the compute roofline (:mod:`.compute`) and α-β
collectives (:mod:`.collectives`, parameters from :mod:`.hardware`).

Communication per forward: the engine's messages (:func:`llmcomm.derive.evaluate.messages`: op, group size n,
calls, bytes per call m), each call charged the α-β time of its op on its group at the right **link level**
(:mod:`.placement`: ranks placed in order, g per node). Calls on one request's critical path are sequential (the t
concurrent sends of a stage boundary, one per TP rank, are charged once).

Phases: ``TTFT = prefill forward``; ``TPOT = one decode forward`` at the mean KV length; ``E2E = TTFT + (G−1)·TPOT``.

What-if levers (book: "Choosing a layout"): ``comm_w`` (bytes per element on the wire), ``overlap`` (``max``
instead of the sum of compute and communication: a bound), :func:`llmcomm.predict.hardware.scale_links`.

Everything is vectorised: :func:`predict_latency_grid` takes numpy arrays of t, p, b, S, G (broadcast together) and
evaluates millions of points per second; :func:`predict_latency` is the one-point form with a breakdown.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..derive.evaluate import messages
from ..spec import Layout, ModelSpec, SpecError, Workload
from .compute import forward_compute, phase_context
from .hardware import Hardware
from .placement import placement_fractions, wrap_inter_fraction

__all__ = ["forward_comm", "predict_latency", "predict_latency_grid", "METRICS"]

#: the latency metrics, in the order tables show them
METRICS = ("ttft_s", "tpot_s", "e2e_s")


def forward_comm(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, g, engine: str = "deepspeed",
                 detail: bool = False, fractions=None, comm_w=None):
    """Communication seconds of one forward of ``phase`` (the sum of its messages' α-β times at their link levels).

    ``comm_w``: bytes per element on the wire when it differs from the compute width ``w`` (what-if: fp8 or bf16
    communication of an fp32/bf16 model); token ids keep their own width. TP collectives of a hybrid (p > 1: the TP
    group is a proper sub-group of the world) use the preset's ``subgroup_collectives`` fits when it has them."""
    s, _, _ = phase_context(phase, S, G)
    if comm_w is not None:
        w = comm_w
    t, p, b, s, w, g = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, s, w, g)))
    f_tp, f_pp = placement_fractions(model.L, t, p, g) if fractions is None else fractions
    frac_of = {"tp": f_tp, "pp": f_pp, "wrap": wrap_inter_fraction(t, p, g)}
    sub = bool(hw.subgroup_collectives) and bool((p > 1).any())
    total = np.zeros(t.shape)
    parts = []
    for msg in messages(engine, model, t, p, b, s, w):
        op, n, m = msg["op"], msg["n"], msg["m"]
        sub_here = sub and msg["path"] == "tp"

        def level_time(level):
            sec = hw.collective_time(op, n, m, level)
            if sub_here:
                sec = np.where(p > 1, hw.collective_time(op, n, m, level, subgroup=True), sec)
            return sec

        frac = frac_of[msg["path"]]
        intra = level_time("intra")
        per_call = intra + frac * (level_time("inter") - intra) if frac.any() else intra
        cost = msg["critical"] * per_call
        total = total + cost
        if detail:
            parts.append({"op": op, "group_size": n, "calls": msg["critical"], "bytes_per_call": m, "time_s": cost,
                          "inter_fraction": frac, "why": msg["why"]})
    return (total, parts) if detail else total


def predict_latency_grid(model: ModelSpec, hw: Hardware, t, p, b, S, G, w=2, gpus_per_node=None,
                         engine: str = "deepspeed", comm_w=None, overlap: bool = False) -> dict:
    """TTFT/TPOT/E2E (s) over a broadcast grid of layouts (t, p) × workloads (b, S, G, w). Returns arrays:
    ``ttft_s, tpot_s, e2e_s, prefill_compute_s, prefill_comm_s, decode_compute_s, decode_comm_s``.

    What-if levers: ``comm_w`` bytes per element on the wire (e.g. 1 = fp8 communication); ``overlap=True`` charges
    each forward ``max(compute, comm)`` instead of ``compute + comm`` (perfect overlap of communication with
    compute: a lower bound, not a schedule any engine here runs).

    No validation here (the grid is the caller's): t must divide the heads, p ≤ L (see
    :func:`llmcomm.predict.advise.candidate_layouts`)."""
    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    t, p, b, S, G, w, g = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, S, G, w, g)))
    inv_t = 1.0 / t.astype(float)
    w_compute = float(w.flat[0]) if w.size and (w == w.flat[0]).all() else w       # one dtype: keep w a scalar
    fractions = placement_fractions(model.L, t, p, g)
    out = {}
    for phase in ("prefill", "decode"):
        out[f"{phase}_compute_s"] = forward_compute(model, hw, t, p, b, S, G, w_compute, phase, inv_t)["compute_s"]
        out[f"{phase}_comm_s"] = forward_comm(model, hw, t, p, b, S, G, w, phase, g, engine, fractions=fractions,
                                              comm_w=comm_w)
    join = np.maximum if overlap else np.add
    out["ttft_s"] = join(out["prefill_compute_s"], out["prefill_comm_s"])
    out["tpot_s"] = join(out["decode_compute_s"], out["decode_comm_s"])
    out["e2e_s"] = out["ttft_s"] + (G - 1) * out["tpot_s"]
    return out


def _plain(x):
    """A JSON-ready scalar from a numpy value."""
    x = np.asarray(x)
    kind = x.dtype.kind
    return float(x) if kind == "f" else int(x) if kind in "iu" else bool(x) if kind == "b" else x.item()


def predict_latency(model: ModelSpec, layout: Layout, workload: Workload, hw: Hardware,
                    gpus_per_node: int | None = None, engine: str = "deepspeed", comm_w=None,
                    overlap: bool = False) -> dict:
    """One point: ``{"ttft_s", "tpot_s", "e2e_s", "breakdown": {"prefill": {...}, "decode": {...}}, ...}``.

    ``breakdown[phase]`` has ``compute_s`` and ``comm_s`` of one forward, its flops and bytes moved per rank summed
    over stages, whether a decoder layer is compute-bound, and ``messages``: each message kind with its α-β time.
    """
    layout = layout.validate(model)
    workload = workload.validate(model)
    g = hw.gpus_per_node if gpus_per_node is None else int(gpus_per_node)
    if g < 1:
        raise SpecError(f"gpus_per_node={g} must be at least 1")
    args = (layout.t, layout.p, workload.b, workload.S, workload.G, workload.w)
    res: dict[str, Any] = {"model": model.name, "hardware": hw.name, "gpus_per_node": g, "engine": engine,
                           "tp": layout.t, "pp": layout.p, "breakdown": {}}
    for phase in ("prefill", "decode"):
        comp = forward_compute(model, hw, *args, phase)
        comm, parts = forward_comm(model, hw, *args, phase, g, engine, detail=True, comm_w=comm_w)
        res["breakdown"][phase] = {
            "compute_s": _plain(comp["compute_s"]), "comm_s": _plain(comm), "flops": _plain(comp["flops"]),
            "bytes": _plain(comp["bytes"]), "layer_s": _plain(comp["layer_s"]),
            "compute_bound": _plain(comp["compute_bound"]),
            "messages": [{x: (_plain(v) if x != "why" else v) for x, v in msg.items()} for msg in parts]}
    pre, dec = res["breakdown"]["prefill"], res["breakdown"]["decode"]
    join = max if overlap else (lambda x, y: x + y)
    res["ttft_s"] = join(pre["compute_s"], pre["comm_s"])
    res["tpot_s"] = join(dec["compute_s"], dec["comm_s"])
    res["e2e_s"] = res["ttft_s"] + (workload.G - 1) * res["tpot_s"]
    return res
