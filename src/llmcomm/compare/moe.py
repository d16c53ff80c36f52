"""Mixture-of-experts runs beside their closed forms: every all-to-all of an expert-parallel run tied to the
routing that sized it.

An EP run (:mod:`llmcomm.measure.runs.ep`) records, per rank, every collective (the capture: each
``all_to_all_single`` with its bytes and per-peer split) and, for each MoE layer of each forward, the router's
per-expert counts κ of the rank's tokens and the capacity C DeepSpeed used (``routing`` of each rank's result).
:func:`a2a_exactness` pairs them: MoE layer j of forward f issues the dispatch and the combine all-to-all, in that
order, so the 2·(f·L_moe + j)-th and next all-to-all of a rank belong to it. Each call's predicted size is the
closed form m = E·C·h·w (:data:`llmcomm.derive.moe.A2A_BYTES`) with C

* capacity routing — :func:`llmcomm.derive.moe.capacity` of the rank's tokens (no count needed: routing-independent);
* dropless routing — :func:`llmcomm.derive.moe.dropless_capacity` of the **measured** counts of every EP rank.

The run is exact when every call's predicted size equals the measured one.
"""
from __future__ import annotations

import pandas as pd

from ..derive.moe import A2A_BYTES, Routing, capacity, dropless_capacity, expected_max_count
from ..notation import C, E, h, w
from ..spec import Layout, ModelSpec, Workload

__all__ = ["routing_frame", "a2a_exactness", "phase_totals", "count_distribution"]


def _records(result) -> list[dict]:
    return sorted(result.ranks, key=lambda r: r["rank"])


def routing_frame(result) -> pd.DataFrame:
    """Every rank's routing log: rank, forward, phase (forward 0 is the prefill), layer, tokens T, capacity C and the
    per-expert counts κ (one column per expert, ``k0 … k{E−1}``)."""
    rows = []
    for rec in _records(result):
        for x in rec.get("routing") or []:
            rows.append({"rank": rec["rank"], "forward": x["forward"],
                         "phase": "prefill" if x["forward"] == 0 else "decode", "layer": x["layer"],
                         "tokens": x["tokens"], "capacity": x["capacity"],
                         **{f"k{j}": c for j, c in enumerate(x["counts"])}})
    return pd.DataFrame(rows)


def a2a_exactness(result, model: ModelSpec, layout: Layout, workload: Workload,
                  routing: Routing | None = None) -> pd.DataFrame:
    """One row per all-to-all call of the run (the dispatch and the combine of each MoE layer of each forward), as
    the lowest rank of the EP group issued it: phase, forward, layer, which (dispatch / combine), C predicted from
    the routing (see the module docs) and as DeepSpeed used it, the predicted and the measured size m, the measured
    per-peer split, and whether they are equal."""
    routing = routing or Routing()
    k = model.moe.top_k
    logs = routing_frame(result)
    experts = [f"k{j}" for j in range(model.E)]
    rank0 = min(r["rank"] for r in result.ranks)
    calls = [ev for ev in result.events if ev["rank"] == rank0 and ev["op"] == "all_to_all"
             and ev["phase"] in ("prefill", "decode")]
    mine = logs[logs["rank"] == rank0].reset_index(drop=True)
    if len(calls) != 2 * len(mine):
        raise ValueError(f"{len(calls)} all-to-all calls on rank {rank0} for {len(mine)} MoE layer forwards: "
                         "expected a dispatch and a combine for each")
    size = A2A_BYTES.subs({E: model.E, h: model.h, w: workload.w})
    rows = []
    for i, x in mine.iterrows():
        if routing.mode == "capacity":
            c_pred = capacity(int(x.tokens), model.E, k, routing.capacity_factor, routing.min_capacity)
        else:
            same = logs[(logs.forward == x.forward) & (logs.layer == x.layer)]
            c_pred = dropless_capacity(same[experts].to_numpy())
        m_pred = int(size.subs(C, c_pred))
        for j, which in enumerate(("dispatch", "combine")):
            ev = calls[2 * i + j]
            rows.append({"phase": x.phase, "forward": int(x.forward), "layer": int(x.layer), "call": which,
                         "tokens_per_rank": int(x.tokens), "C_predicted": int(c_pred), "C_run": int(x.capacity),
                         "bytes_predicted": m_pred, "bytes_measured": int(ev["bytes"]),
                         "split_measured": ev.get("splits"), "equal": m_pred == int(ev["bytes"])})
    return pd.DataFrame(rows)


def phase_totals(exact: pd.DataFrame) -> pd.DataFrame:
    """:func:`a2a_exactness` summed per phase: calls, predicted and measured bytes, and whether every call matched."""
    g = exact.groupby("phase", sort=False)
    return pd.DataFrame({"calls": g.size(), "bytes_predicted": g.bytes_predicted.sum(),
                         "bytes_measured": g.bytes_measured.sum(), "all_equal": g.equal.all()}).reset_index()


def count_distribution(result, model: ModelSpec, layout: Layout) -> pd.DataFrame:
    """Per phase: the measured dropless C of each MoE layer forward (the largest count over experts and EP ranks)
    beside its expectation under uniform routing (:func:`llmcomm.derive.moe.expected_max_count`, with the method
    it used) — how far the router of these random weights is from uniform."""
    logs = routing_frame(result)
    experts = [f"k{j}" for j in range(model.E)]
    rows = []
    for (phase, fwd, layer), same in logs.groupby(["phase", "forward", "layer"], sort=False):
        T = int(same.tokens.iloc[0])
        expect, method = expected_max_count(T, model.E, model.moe.top_k, layout.e)
        rows.append({"phase": phase, "forward": fwd, "layer": layer, "tokens_per_rank": T,
                     "C_measured": int(same[experts].to_numpy().max()), "C_uniform_expected": float(expect),
                     "method": method})
    return pd.DataFrame(rows)
