"""Layout advice for a mixture of experts: every (expert layout, t, e, p) of N GPUs, its memory per GPU, predicted
latency per phase and bytes, ranked — the MoE counterpart of :func:`llmcomm.predict.advise.advise`.

Three expert layouts (:data:`llmcomm.deployment.EXPERT_LAYOUTS`; the rows' ``scheme``), one MoE message pattern
each, all under the deployment's host profile:

* ``autotp`` — DeepSpeed AutoTP as it is (``deepspeed-moe-autotp``): t×p ranks, attention sharded t ways, the fused
  expert tensors left whole on every TP rank (what a DeepSpeed user gets today: measured exact on CPU);
* ``tp-experts`` — t×p ranks, every expert's FFN sharded t ways as serving frameworks shard it (closed forms only);
* ``ep`` — expert parallelism with data-parallel attention (``deepspeed-ep`` or ``deepspeed-ep-dropless`` by the
  routing): e·p = N ranks, t = 1, E/e experts per rank, each rank running attention on b/e sequences, optionally
  in p pipeline stages of e ranks each. A candidate when e > 1 divides the E experts and the batch b (each EP rank
  runs whole sequences) and p ≤ L; EP combined with TP is not (:meth:`llmcomm.spec.Layout.validate` refuses it).

Memory per GPU (bytes, the fullest pipeline stage), per decoder layer a rank holds, with ``t'`` = t under the TP
schemes and 1 under EP, ``b_r`` = b/e the sequences a rank runs::

    attention   (2·h·n_h·d + 2·h·n_kv·d)/t' + 2h (norms) + the family's per-layer extra (q/k norms, biases)
    dense MLP   3·h·F/t'
    MoE block   E·h (router, never sharded) + E·3·h·F_ex / x + (3·h·F_sh + h)/t_exp   x = 1 (autotp), t (tp-experts),
                                                                                        e (ep); t_exp = t under
                                                                                        tp-experts, else 1
    KV cache    w·b_r·(S+G)·2·(n_kv/t')·d

plus the embedding V·h on the first stage and the head V·h/t' + h on the last (one shared copy when tied and the
model is on one stage), and an activation margin ``w·b_r·S·(2h + (n_h+2n_kv)·d/t' + 2·(k·F_ex + F_sh)/t_exp +
2·k·h·[ep]) + 4·b_r·V`` (the prefill's largest live tensors: the attention projections, the k routed copies of
each token's expert intermediate, EP's dispatch and combine buffers, fp32 logits). ``fits`` when the total is at
most the device memory × (1 − reserve_fraction). The router and the shared expert's sharding under AutoTP follow
the compute model's ASSUMPTION (:func:`llmcomm.predict.kernels.layer_ops`).

Latency: :func:`llmcomm.predict.latency.predict_latency_grid` with the scheme's pattern (uniform routing,
α-β all-to-all: the assumptions the MoE chapter names); traffic: :func:`llmcomm.derive.evaluate.traffic_totals`
(exact for capacity routing; the uniform-routing expectation for dropless).

Lossless layouts only, unless the routing is asked for: capacity routing drops the routes beyond C of every expert
(:func:`llmcomm.derive.moe.dropped_fraction`), a different computation from the TP schemes' exact one, so by default
EP is ranked under dropless routing (and under capacity routing only where C ≥ T: it provably drops nothing);
``routing_asked`` ranks the deployment's routing as it is, each row with its expected dropped share.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..deployment import EXPERT_LAYOUTS, Deployment, Routing
from ..derive.evaluate import traffic_totals
from ..derive.moe import generation_dropped
from ..spec import DTYPE_BYTES, Layout, ModelSpec, SpecError, Workload, stage_layers
from .advise import (PARETO_REL_TOL, candidate_layouts, check_request, host_overlap_bounds, node_crossings,
                     pareto_front, robustness_verdict)
from .hardware import GiB, Hardware
from .latency import predict_latency_grid

__all__ = ["candidate_moe_layouts", "moe_memory_per_rank", "advise_moe", "moe_layout_name", "moe_winner_robustness"]


def candidate_moe_layouts(model: ModelSpec, gpus: int, b: int) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """(candidates ``(scheme, t, p, e)`` with t·p·e = ``gpus``, reasons a scheme has none). TP schemes: every (t, p)
    :meth:`~llmcomm.spec.Layout.validate` accepts (``tp-experts`` only with t > 1: at t = 1 nothing is sharded and
    it is the ``autotp`` layout); EP: every e > 1 with e·p = ``gpus`` that divides the experts and the batch."""
    if not model.is_moe:
        raise SpecError(f"{model.name} is dense: MoE advice needs a mixture of experts (use llmcomm advise)")
    out, why = [], []
    tp = candidate_layouts(model, gpus)
    out += [("autotp", t, p, 1) for t, p in tp]
    out += [("tp-experts", t, p, 1) for t, p in tp if t > 1]       # t = 1: the same layout as autotp's
    if not tp:
        why.append(f"no t×p layout: t must divide the {model.heads} heads and {model.kv_heads} KV heads, p ≤ "
                   f"{model.L} layers")
    for e in range(2, gpus + 1):
        if gpus % e:
            continue
        p = gpus // e
        if model.E % e:
            why.append(f"ep: e={e} does not divide the {model.E} experts")
        elif b % e:
            why.append(f"ep: e={e} does not divide the batch b={b} (each EP rank runs b/e whole sequences)")
        elif p > model.L:
            why.append(f"ep: e={e} leaves p={p} stages for {model.L} layers")
        else:
            out.append(("ep", 1, p, e))
    if gpus == 1:
        why.append("ep: one GPU is no expert parallelism")
    return out, why


def _layer_elements(model: ModelSpec, scheme: str, t: int, e: int) -> list[float]:
    """Parameters of each decoder layer one rank holds (elements; see the module docstring)."""
    h, hd, moe = model.h, model.head_dim, model.moe
    tq = 1 if scheme == "ep" else t
    t_exp = t if scheme == "tp-experts" else 1
    x = {"autotp": 1, "tp-experts": t, "ep": e}[scheme]
    attn = (2 * h * model.heads * hd + 2 * h * model.kv_heads * hd) / tq + 2 * h + moe.layer_extra
    dense = 3 * h * model.ffn / tq
    shared = (3 * h * moe.shared_ffn + h) / t_exp if moe.shared_ffn else 0.0
    block = moe.experts * h + moe.experts * 3 * h * moe.expert_ffn / x + shared
    moe_layers = set(moe.layers)
    return [attn + (block if i in moe_layers else dense) for i in range(model.L)]


def moe_memory_per_rank(model: ModelSpec, scheme: str, t: int, p: int, e: int, b: int, S: int, G: int,
                        w: float) -> dict:
    """Bytes per GPU of the fullest pipeline stage of a MoE layout: ``weights``, ``kv``, ``act``, ``total``."""
    if scheme not in EXPERT_LAYOUTS:
        raise SpecError(f"expert layout {scheme!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
    moe, h, hd, V = model.moe, model.h, model.head_dim, model.V
    ep = scheme == "ep"
    tq = 1 if ep else t
    t_exp = t if scheme == "tp-experts" else 1
    b_r = b / e
    per_layer = _layer_elements(model, scheme, t, e)
    kv_layer = w * b_r * (S + G) * 2 * (model.kv_heads / tq) * hd
    sizes = stage_layers(model.L, p)
    starts = np.cumsum([0] + sizes[:-1])
    best = None
    for i, (lo, layers) in enumerate(zip(starts, sizes)):
        weights = sum(per_layer[lo:lo + layers])
        if i == 0:
            weights += V * h
        if i == p - 1:
            weights += h + (0 if (p == 1 and model.tied and tq == 1) else V * h / tq)
        stage = {"weights": w * weights, "kv": layers * kv_layer}
        if best is None or stage["weights"] + stage["kv"] > best["weights"] + best["kv"]:
            best = stage
    ffn_act = 2 * (moe.top_k * moe.expert_ffn + moe.shared_ffn) / t_exp + (2 * moe.top_k * h if ep else 0)
    if model.L > model.L_moe:
        ffn_act = max(ffn_act, 2 * model.ffn / tq)
    act = w * b_r * S * (2 * h + (model.heads + 2 * model.kv_heads) * hd / tq + ffn_act) + 4 * b_r * V
    return {"weights": best["weights"], "kv": best["kv"], "act": act, "total": best["weights"] + best["kv"] + act}


def _ep_routings(model: ModelSpec, routing: Routing, asked: bool, b: int, S: int, G: int, e: int):
    """The routings EP with degree ``e`` is ranked under: ``routing`` as asked; else the lossless ones — dropless, and
    ``routing`` too when it is capacity routing that provably drops nothing at this load (C ≥ T in both phases).
    Returns (routings, None) or, when ``routing`` was dropped for being lossy, (routings, its prefill drop share)."""
    if asked or routing.mode == "dropless":
        return [routing], None
    drop = generation_dropped(routing, model.E, model.moe.top_k, b, S, G, e)
    if drop["lossless"]:
        return [Routing("dropless"), routing], None
    return [Routing("dropless")], drop["prefill"]


def advise_moe(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024, G: int = 128,
               b: int = 1, objective: str = "e2e", dtype: str = "bf16", deployment: Deployment | None = None,
               include_infeasible: bool = True, routing_asked: bool = False) -> tuple[list[dict], list[str]]:
    """(ranked rows, best first; reasons a scheme has no candidate). Each row: ``scheme``, ``pattern``, ``tp``,
    ``pp``, ``ep``, ``routing`` (EP's routing mode, None for the TP schemes), the latencies and their per-phase
    compute and communication, the traffic metrics of the whole generation, ``dropped_route_fraction`` (the expected
    share of routes capacity routing drops: ``prefill``, ``decode``, ``generation``;
    :func:`llmcomm.derive.moe.generation_dropped`) and ``lossless``, memory, ``fits`` and ``pareto`` (as
    :func:`llmcomm.predict.advise.advise`).

    Lossless layouts only unless ``routing_asked``: the TP schemes compute every route; EP is ranked under dropless
    routing, and under the deployment's capacity routing only where it provably drops nothing at this load (C ≥ T in
    both phases) — a lossy capacity routing is named among the reasons instead. ``routing_asked`` (the user named
    the routing, ``--moe-routing``): EP under exactly the deployment's routing, lossy or not (its rows say so).

    Raises :class:`SpecError` when no candidate exists or none fits the device memory (one sentence saying why)."""
    g = check_request(objective, gpus, gpus_per_node, hw)
    deployment = deployment or Deployment()
    if deployment.experts is not None:
        raise SpecError("MoE advice ranks every expert layout; leave the deployment's expert layout unset")
    wl = Workload(b, S, G, dtype).validate(model)
    cands, why = candidate_moe_layouts(model, gpus, b)
    if not cands:
        raise SpecError(f"no layout of {model.name} on {gpus} GPUs: " + "; ".join(why))
    w = DTYPE_BYTES[dtype]
    usable = hw.usable_memory_bytes
    runs, lossy = [], []
    for scheme, t, p, e in cands:
        if scheme != "ep":
            runs.append((scheme, t, p, e, None))
            continue
        routings, dropped = _ep_routings(model, deployment.routing, routing_asked, b, S, G, e)
        runs += [(scheme, t, p, e, r) for r in routings]
        if dropped is not None:
            lossy.append(f"e={e} ({100 * dropped:.2g} % of the prefill's routes)")
    if lossy:
        r = deployment.routing
        why.append(f"ep under capacity routing (γ={r.capacity_factor:g}, C_min={r.min_capacity}) drops routes at this "
                   f"load, expected: {', '.join(lossy)}; not ranked (lossless layouts only): ep is ranked under "
                   f"dropless routing — pass --moe-routing capacity to rank capacity routing")
    rows = []
    for scheme, t, p, e, routing in runs:
        layout = Layout(t, p, e)
        dep = replace(deployment, experts=scheme, routing=routing or deployment.routing)
        pattern = dep.pattern(model, layout)
        lat = predict_latency_grid(model, hw, t, p, b, S, G, w, gpus_per_node=g, deployment=dep, e=e)
        mem = moe_memory_per_rank(model, scheme, t, p, e, b, S, G, w)
        traffic = traffic_totals(model, layout, wl, pattern, "ring", g, dep.routing)
        hops, spanning = node_crossings(model, layout, wl, g, pattern)
        drop = generation_dropped(routing or Routing("dropless"), model.E, model.moe.top_k, b, S, G, e)
        row = {"scheme": scheme, "pattern": pattern, "tp": t, "pp": p, "ep": e,
               "routing": None if routing is None else routing.mode,
               **{key: float(lat[key]) for key in ("ttft_s", "tpot_s", "e2e_s", "prefill_compute_s", "prefill_comm_s",
                                             "decode_compute_s", "decode_comm_s")},
               **{key: traffic[key] for key in ("bytes", "sent_bytes_busiest_rank", "link_bytes", "inter_node_bytes")},
               "inter_node_hops_per_forward": hops, "inter_node_collectives_per_forward": spanning,
               "dropped_route_fraction": {x: drop[x] for x in ("prefill", "decode", "generation")},
               "lossless": drop["lossless"],
               "memory_gib": mem["total"] / GiB, "weights_gib": mem["weights"] / GiB, "kv_gib": mem["kv"] / GiB,
               "usable_gib": usable / GiB, "fits": bool(mem["total"] <= usable), "objective": objective}
        rows.append(row)
    if not any(r["fits"] for r in rows):
        small = min(rows, key=lambda r: r["memory_gib"])
        raise SpecError(
            f"no layout of {model.name} ({dtype}, b={b}, S={S}, G={G}) fits {gpus} x {hw.name}: the smallest needs "
            f"{small['memory_gib']:.1f} GiB per GPU ({small['scheme']} t={small['tp']}, p={small['pp']}, "
            f"e={small['ep']}) but one has {usable / GiB:.1f} GiB usable; use more GPUs, a smaller batch/context or "
            f"a narrower dtype")
    lat_key = f"{objective}_s" if objective in ("ttft", "tpot", "e2e") else "e2e_s"
    score_key = lat_key if objective in ("ttft", "tpot", "e2e") else objective
    front = pareto_front([r[lat_key] for r in rows], [r["inter_node_bytes"] for r in rows],
                         [r["fits"] for r in rows], PARETO_REL_TOL)
    for r, f in zip(rows, front):
        r["pareto"] = bool(f)
        r["score"] = float(r[score_key])
    rows.sort(key=lambda r: (not r["fits"], r["score"], r["inter_node_bytes"], r["scheme"], r["tp"],
                             r["routing"] or ""))
    for place, r in enumerate(rows, 1):
        r["rank"] = place
    return (rows if include_infeasible else [r for r in rows if r["fits"]]), why


def moe_layout_name(row: dict) -> str:
    """A MoE advice row's layout as the book writes it: ``"ep 1×1×8 (dropless)"`` (scheme t×p×e, EP's routing)."""
    routing = f" ({row['routing']})" if row.get("routing") else ""
    return f"{row['scheme']} {row['tp']}×{row['pp']}×{row['ep']}{routing}"


def moe_winner_robustness(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024,
                          G: int = 128, b: int = 8, rel_err: float = 0.0, objective: str = "e2e", dtype: str = "bf16",
                          deployment: Deployment | None = None) -> dict:
    """:func:`llmcomm.predict.advise.winner_robustness` for a mixture of experts: the fitting candidates of
    :func:`advise_moe` (lossless ones, as it ranks them) under no and full overlap of communication with host time
    (:func:`llmcomm.predict.advise.host_overlap_bounds` per expert layout) and the model's error ``rel_err``; layouts
    named by :func:`moe_layout_name`."""
    if objective not in ("ttft", "tpot", "e2e"):
        raise SpecError(f"objective {objective!r} is not one of ttft, tpot, e2e")
    key = f"{objective}_s"
    deployment = deployment or Deployment()
    rows, _ = advise_moe(model, gpus, gpus_per_node, hw, S, G, b, objective, dtype, deployment,
                         include_infeasible=False)
    g = check_request(objective, gpus, gpus_per_node, hw)
    by_bound: dict = {"none": [], "full": []}
    for r in rows:
        routing = deployment.routing if r["routing"] in (None, deployment.routing.mode) else Routing(r["routing"])
        dep = replace(deployment, experts=r["scheme"], routing=routing)
        bounds = host_overlap_bounds(model, hw, r["tp"], r["pp"], b, S, G, DTYPE_BYTES[dtype], g, dep, e=r["ep"])
        for bound in by_bound:
            by_bound[bound].append(float(bounds[bound][key]))
    out: dict = {"model": model.name, "gpus": gpus, "gpus_per_node": g, "b": b, "S": S, "G": G,
                 "objective": objective, "rel_err": rel_err}
    return robustness_verdict(out, rows, [moe_layout_name(r) for r in rows], by_bound, rel_err, key, moe_layout_name)
