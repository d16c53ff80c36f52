"""Layout advice: every t×p layout of N GPUs, its memory feasibility, predicted latency and bytes, ranked.

For ``gpus`` = N, the candidates are all (t, p) with t·p = N, t dividing the attention and KV heads
(:meth:`llmcomm.spec.Layout.validate`) and p ≤ L. For each:

* **memory per GPU** (the fullest stage): weights ``w·P_l·layers`` (+ the replicated embedding ``V·h·w`` on the first
  stage, + the lm_head shard ``V·h·w/t`` and final norm on the last; one copy when tied and t = p = 1), KV cache
  ``w·b·(S+G)·2·(kv/t)·hd`` per layer held, activation margin ``w·b·S·(2h + (heads+2kv)·hd/t + 2·ffn/t) + 4·b·V``;
  ``fits`` when it is at most the device memory × (1 − reserve_fraction);
* **latency**: TTFT, TPOT, E2E from :func:`llmcomm.predict.latency.predict_latency_grid` (TP groups spanning nodes pay
  the inter-node link);
* **traffic** of the generation (1 prefill + G−1 decode forwards, :func:`llmcomm.derive.evaluate.traffic_totals`):
  the nccl-tests ``bytes`` (sizes, naming the calls), the bytes the busiest rank sends, the bytes all links carry,
  and the bytes that cross nodes with the ranks placed in order, g per node — plus how many transfers on a forward's
  critical path cross nodes (``inter_node_hops_per_forward``: stage hops and the token hand-back) and how many
  collectives run on TP groups that span nodes (``inter_node_collectives_per_forward``).

Ranked by ``objective`` (ttft, tpot, e2e, or one of the traffic metrics) with infeasible layouts last. ``pareto``
marks the feasible layouts that no other feasible layout beats on both latency (the objective's; e2e for a traffic
objective) and **inter-node bytes** — what a shared network carries; bytes within 1 % of each other count as equal.
"""
from __future__ import annotations

import numpy as np

from ..deployment import Deployment
from ..derive.evaluate import forward_calls, traffic_totals
from ..spec import DTYPE_BYTES, Layout, ModelSpec, SpecError, Workload
from .compute import forward_compute
from .hardware import GiB, Hardware, scale_links
from .latency import predict_latency_grid
from .placement import placement_fractions
from .profiles import profile_for

__all__ = ["winner_under_error", "host_overlap_bounds", "winner_robustness", "robustness_verdict", "robustness_frame",
           "EXACT_TIE",
           "check_request",
           "advise", "advise_report", "candidate_layouts", "memory_per_rank", "pareto_front", "node_crossings",
           "advice_map", "what_if", "LEVERS", "OBJECTIVES", "PARETO_REL_TOL"]

#: what advice can rank by: latencies, or a traffic metric of the whole generation
OBJECTIVES = ("ttft", "tpot", "e2e", "inter_node_bytes", "sent_bytes_busiest_rank", "link_bytes")
#: bytes within this relative distance of each other count as equal on the Pareto front
PARETO_REL_TOL = 0.01


def candidate_layouts(model: ModelSpec, gpus: int) -> list[tuple[int, int]]:
    """All (t, p) with t·p = gpus that the model can be laid out as."""
    out = []
    for t in range(1, gpus + 1):
        if gpus % t:
            continue
        try:
            Layout(t, gpus // t).validate(model)
        except SpecError:
            continue
        out.append((t, gpus // t))
    return out


def memory_per_rank(model: ModelSpec, t, p, b, S, G, w) -> dict:
    """Bytes per GPU of the fullest pipeline stage (arrays broadcast): ``weights``, ``kv``, ``act``, ``total``."""
    t, p, b, S, G, w = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (t, p, b, S, G, w)))
    h, hd, V, L = model.h, model.head_dim, model.V, model.L
    P = (2 * h * model.heads * hd + 2 * h * model.kv_heads * hd + 3 * h * model.ffn) / t + 2 * h
    kv_layer = b * (S + G) * 2 * (model.kv_heads / t) * hd * w
    q = np.floor(L / p)
    r = L - q * p
    first_layers = np.where(r > 0, q + 1, q)
    head = V * h / t + h
    emb = V * h
    act = w * b * S * (2 * h + (model.heads + 2 * model.kv_heads) * hd / t + 2 * model.ffn / t) + 4 * b * V
    single = (p == 1)
    shared = single & (t == 1) & bool(model.tied)
    w_single = L * P * w + (emb + np.where(shared, 0.0, head) + np.where(shared, h, 0.0)) * w
    w_first = first_layers * P * w + emb * w
    w_last = q * P * w + head * w
    kv_first = first_layers * kv_layer
    kv_last = q * kv_layer
    tot_first = w_first + kv_first
    tot_last = w_last + kv_last
    use_first = tot_first >= tot_last
    weights = np.where(single, w_single, np.where(use_first, w_first, w_last))
    kv = np.where(single, L * kv_layer, np.where(use_first, kv_first, kv_last))
    return {"weights": weights, "kv": kv, "act": act, "total": weights + kv + act}


def pareto_front(latency, nbytes, eligible=None, rel_tol: float = 0.0) -> np.ndarray:
    """Boolean mask of points not dominated (≤ in both, < in one) by another eligible point; minimise both. Byte
    counts within ``rel_tol`` of each other count as equal (a layout that moves 0.04 % fewer bytes than a much
    faster one is not a trade-off)."""
    x = np.asarray(latency, dtype=float)
    y = np.asarray(nbytes, dtype=float)
    ok = np.ones(x.shape, bool) if eligible is None else np.asarray(eligible, bool)
    front = np.zeros(x.shape, bool)
    for i in range(x.size):
        if not ok[i]:
            continue
        y_le = y <= y[i] * (1 + rel_tol)
        y_lt = y < y[i] * (1 - rel_tol)
        dominated = ok & (x <= x[i]) & y_le & ((x < x[i]) | y_lt)
        front[i] = not dominated.any()
    return front


def node_crossings(model: ModelSpec, layout: Layout, workload: Workload, g: int,
                   pattern: str = "deepspeed") -> tuple[int, int]:
    """(transfers on a decode forward's critical path that cross nodes — each stage boundary whose hop crosses, and
    the token hand-back —, collective calls per decode forward on TP groups that span nodes), ranks placed in order,
    ``g`` per node."""
    node = lambda r: r // g  # noqa: E731
    stage = lambda r: r // (layout.t * layout.e)  # noqa: E731 - t TP or e EP ranks per stage
    hops, collectives = set(), 0
    for op, ranks, _, count, _ in forward_calls(model, layout, workload, "decode" if workload.G > 1 else "prefill",
                                               pattern):
        if op == "send_recv":
            src, dst = ranks
            if node(src) != node(dst):
                hops.add((stage(src), stage(dst)))
        elif len({node(r) for r in ranks}) > 1:
            collectives += count
    return len(hops), collectives


def check_request(objective: str, gpus, gpus_per_node, hw: Hardware) -> int:
    """One :class:`SpecError` for an objective, GPU count or GPUs per node advice cannot take; else the GPUs per node
    g (the hardware preset's when ``gpus_per_node`` is None)."""
    if objective not in OBJECTIVES:
        raise SpecError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SpecError(f"gpus={gpus!r} must be a positive integer")
    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise SpecError(f"gpus_per_node={g!r} must be a positive integer")
    return g


def advise(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024, G: int = 128,
           b: int = 1, objective: str = "e2e", dtype: str = "bf16", deployment: Deployment | None = None,
           include_infeasible: bool = True) -> list[dict]:
    """Ranked layouts (best first) as dicts ``{"tp", "pp", "ttft_s", "tpot_s", "e2e_s", "bytes",
    "sent_bytes_busiest_rank", "link_bytes", "inter_node_bytes", "fits", "pareto", …}``.

    Raises :class:`SpecError` when no layout exists or none fits the device memory (one sentence saying why)."""
    g = check_request(objective, gpus, gpus_per_node, hw)
    wl = Workload(b, S, G, dtype).validate(model)
    deployment = (deployment or Deployment()).resolve(model)
    pattern = deployment.pattern(model)
    cands = candidate_layouts(model, gpus)
    if not cands:
        raise SpecError(f"no layout of {model.name} on {gpus} GPUs: t must divide its {model.heads} heads and "
                        f"{model.kv_heads} KV heads, and p = {gpus}/t must not exceed its {model.L} layers")
    t = np.array([lay[0] for lay in cands])
    p = np.array([lay[1] for lay in cands])
    w = wl.w
    lat = predict_latency_grid(model, hw, t, p, b, S, G, w, gpus_per_node=g, deployment=deployment)
    mem = memory_per_rank(model, t, p, b, S, G, w)
    traffic = [traffic_totals(model, Layout(int(ti), int(pi)), wl, pattern, "ring", g) for ti, pi in zip(t, p)]
    metric = {key: np.array([float(x[key]) for x in traffic]) for key in ("bytes", "inter_node_bytes", "link_bytes",
                                                                    "sent_bytes_busiest_rank")}
    usable = hw.usable_memory_bytes
    fits = mem["total"] <= usable
    if not fits.any():
        i = int(np.argmin(mem["total"]))
        raise SpecError(
            f"no layout of {model.name} ({dtype}, b={b}, S={S}, G={G}) fits {gpus} x {hw.name}: the smallest needs "
            f"{mem['total'][i] / GiB:.1f} GiB per GPU (tp={t[i]}, pp={p[i]}) but one has {usable / GiB:.1f} GiB "
            f"usable ({hw.memory_bytes / GiB:.1f} GiB minus {hw.reserve_fraction:.0%} reserve); use more GPUs, a "
            f"smaller batch/context or a narrower dtype")
    lat_key = f"{objective}_s" if objective in ("ttft", "tpot", "e2e") else "e2e_s"
    score = lat[lat_key] if objective in ("ttft", "tpot", "e2e") else metric[objective]
    front = pareto_front(lat[lat_key], metric["inter_node_bytes"], fits, PARETO_REL_TOL)
    nodes = int(np.ceil(gpus / g))
    f_tp, f_pp = placement_fractions(model.L, t, p, g)
    rows = []
    for i in range(len(cands)):
        hops, spanning = node_crossings(model, Layout(int(t[i]), int(p[i])), wl, g, pattern)
        rows.append({
            "tp": int(t[i]), "pp": int(p[i]), "ttft_s": float(lat["ttft_s"][i]), "tpot_s": float(lat["tpot_s"][i]),
            "e2e_s": float(lat["e2e_s"][i]), "bytes": traffic[i]["bytes"],
            "sent_bytes_busiest_rank": traffic[i]["sent_bytes_busiest_rank"], "link_bytes": traffic[i]["link_bytes"],
            "inter_node_bytes": traffic[i]["inter_node_bytes"], "inter_node_hops_per_forward": hops,
            "inter_node_collectives_per_forward": spanning, "fits": bool(fits[i]), "pareto": bool(front[i]),
            "memory_gib": float(mem["total"][i] / GiB), "weights_gib": float(mem["weights"][i] / GiB),
            "kv_gib": float(mem["kv"][i] / GiB), "usable_gib": float(usable / GiB),
            "prefill_comm_s": float(lat["prefill_comm_s"][i]), "decode_comm_s": float(lat["decode_comm_s"][i]),
            "prefill_compute_s": float(lat["prefill_compute_s"][i]),
            "decode_compute_s": float(lat["decode_compute_s"][i]),
            "tp_inter_fraction": float(f_tp[i]), "pp_inter_fraction": float(f_pp[i]), "nodes": nodes,
            "objective": objective, "score": float(score[i])})
    rows.sort(key=lambda r: (not r["fits"], r["score"], r["inter_node_bytes"], r["tp"]))
    for place, r in enumerate(rows, 1):
        r["rank"] = place
    return rows if include_infeasible else [r for r in rows if r["fits"]]


def winner_under_error(rows: list[dict], rel_err: float, metric: str = "e2e_s",
                       ident=lambda r: (r["tp"], r["pp"])) -> dict:
    """Whether the best fitting layout of ``rows`` (:func:`advise`) stays best when every prediction may be off by
    ``rel_err`` (e.g. the time model's measured median error) in either direction: the winner can lose to any
    layout whose ``metric`` is within the band ``winner·(1+e)/(1−e)``. Returns ``{"winner", "runner_up", "margin"
    (runner-up / winner − 1), "rel_err", "stable", "contenders": [(tp, pp), …]}`` (layouts as ``ident`` names
    them)."""
    fit = sorted((r for r in rows if r["fits"]), key=lambda r: r[metric])
    if not fit:
        raise SpecError("no fitting layout to compare")
    best = fit[0]
    band = best[metric] * (1 + rel_err) / max(1 - rel_err, 1e-9)
    contenders = [ident(r) for r in fit[1:] if r[metric] <= band]
    runner = fit[1] if len(fit) > 1 else None
    return {"winner": ident(best), "runner_up": ident(runner) if runner else None,
            "margin": runner[metric] / best[metric] - 1 if runner else float("inf"), "rel_err": rel_err,
            "stable": not contenders, "contenders": contenders}


def host_overlap_bounds(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, gpus_per_node,
                        deployment: Deployment | None = None, e: int = 1) -> dict:
    """TTFT/TPOT/E2E (s) over broadcast layouts (t, p) under the two bounds of how communication meets the host's
    time, per phase, with K the forward's kernels, H the host's time (per layer and per forward, the host profile's;
    a MoE layer's counted host ops) and C its collectives:

    * ``none`` — what the latency model charges: every layer the slower of host and kernels, the collectives on top,
      ``Σ max(o, k) + C`` (no collective runs while the host launches);
    * ``full`` — every collective hidden in the time the device waits for the host: ``max(H, K + C)``; the same as
      ``none`` where the host does not run ahead of the device (CPU ranks run their own ops).

    A mixture of experts: the deployment's expert layout and routing, ``e`` its EP degree. Both are bounds of one
    schedule; an eager engine lies between them. Returns ``{"none": {...}, "full": {...}}``, each with ``ttft_s``,
    ``tpot_s``, ``e2e_s`` arrays."""
    dep = (deployment or Deployment()).resolve(model, Layout(1, 1, int(e)))
    prof = profile_for(dep, hw)
    lat = predict_latency_grid(model, hw, t, p, b, S, G, w, gpus_per_node=gpus_per_node, deployment=dep, e=e)
    moe = dict(experts=dep.experts, e=e, routing=dep.routing)
    out = {"none": {}, "full": {}}
    for phase, key in (("prefill", "ttft_s"), ("decode", "tpot_s")):
        o = prof.layer_overhead_s(phase, hw)
        o_moe = prof.moe_layer_overhead_s(phase, hw, model, dep.experts, e, dep.routing)
        kernels = forward_compute(model, hw, t, p, b, S, G, w, phase, overhead_s=0.0, moe_overhead_s=0.0,
                                  **moe)["compute_s"]
        summed = forward_compute(model, hw, t, p, b, S, G, w, phase, overhead_s=o, moe_overhead_s=o_moe,
                                 **moe)["compute_s"]                                       # Σ (k + o)
        host = summed - kernels + prof.forward_overhead_s(phase, hw)
        comm = lat[f"{phase}_comm_s"]
        out["none"][key] = lat[key]
        out["full"][key] = np.maximum(host, kernels + comm) if prof.host_overlaps(phase) else lat[key]
    for bound in out.values():
        bound["e2e_s"] = bound["ttft_s"] + (np.asarray(G) - 1) * bound["tpot_s"]
    return out


#: predictions closer than this (relative) count as one value: a winner "ties" exactly with these
EXACT_TIE = 1e-9


def winner_robustness(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024,
                      G: int = 128, b: int = 1, rel_err: float = 0.0, objective: str = "e2e", dtype: str = "bf16",
                      deployment: Deployment | None = None) -> dict:
    """Whether the best fitting layout of a dense model (:func:`advise`) survives the assumptions it rests on: the
    winners with no overlap of communication with host time (the model as it is) and with full overlap
    (:func:`host_overlap_bounds`) — each a list, several when their predictions are equal within
    :data:`EXACT_TIE` —, and ``contenders``: every other layout whose no-overlap prediction lies within the model's
    error ``rel_err`` of the winner's (:func:`winner_under_error`). ``verdict``: ``"holds"`` when one layout wins
    under both bounds and none is within the error band, else ``"tie"`` between ``tied`` (all of them, ordered by the
    no-overlap prediction). ``margin_<bound>``: the best other layout's objective over the winner's, minus 1."""
    if objective not in ("ttft", "tpot", "e2e"):
        raise SpecError(f"objective {objective!r} is not one of ttft, tpot, e2e")
    key = f"{objective}_s"
    g = check_request(objective, gpus, gpus_per_node, hw)
    rows = advise(model, gpus, g, hw, S, G, b, objective, dtype, deployment, include_infeasible=False)
    lays = [(r["tp"], r["pp"]) for r in rows]
    bounds = host_overlap_bounds(model, hw, np.array([x[0] for x in lays]), np.array([x[1] for x in lays]), b, S, G,
                                 DTYPE_BYTES[dtype], g, deployment)
    out: dict = {"model": model.name, "gpus": gpus, "gpus_per_node": g, "b": b, "S": S, "G": G,
                 "objective": objective, "rel_err": rel_err}
    return robustness_verdict(out, rows, lays, {bound: vals[key] for bound, vals in bounds.items()}, rel_err, key)


def robustness_verdict(out: dict, rows: list[dict], lays: list, by_bound: dict, rel_err: float, key: str,
                       ident=lambda r: (r["tp"], r["pp"])) -> dict:
    """The verdict of :func:`winner_robustness` (and of :func:`llmcomm.predict.moe_advice.moe_winner_robustness`)
    added to ``out``: ``lays`` the ranked rows' layouts (``ident`` of each row), ``by_bound`` {bound: the objective
    of every layout under that bound}."""
    for bound, vals in by_bound.items():
        v = np.asarray(vals, dtype=float)
        best = v.min()
        co = v <= best * (1 + EXACT_TIE)
        out[f"winners_{bound}"] = [lay for lay, tied in zip(lays, co) if tied]
        out[f"margin_{bound}"] = float(v[~co].min() / best - 1) if (~co).any() else float("inf")
    err = winner_under_error(rows, rel_err, key, ident)
    out["contenders"] = err["contenders"]
    tied = set(out["winners_none"]) | set(out["winners_full"]) | set(err["contenders"])
    out["tied"] = [lay for lay in lays if lay in tied]          # advise's order: by the no-overlap prediction
    out["verdict"] = "holds" if len(out["tied"]) == 1 else "tie"
    return out


def robustness_frame(cases, hw: Hardware, rel_err: float, frameworks=("deepspeed", "vllm"), objective: str = "e2e",
                     G: int = 128, dtype: str = "bf16", judge=None):
    """:func:`winner_robustness` for every case × framework, one row each: ``cases`` is a mapping name →
    ``(model, gpus, gpus_per_node, S, b)`` (a model name or :class:`~llmcomm.spec.ModelSpec`). Columns: framework,
    case, model, gpus, gpus_per_node, S, b, the winner(s) (``a = b`` when equal) and the margin to the next layout
    under no overlap and under full overlap, ``within error`` (the contenders), ``verdict`` and ``tied``;
    ``attrs``: ``rel_err``, ``objective``. ``judge``: another function of :func:`winner_robustness`'s signature and
    result (:func:`llmcomm.predict.moe_advice.moe_winner_robustness`, whose layouts are named already)."""
    import pandas as pd

    from ..spec import load_model

    rows = []
    for fw in frameworks:
        for name, (spec, gpus, g, S, b) in cases.items():
            model = load_model(spec) if isinstance(spec, str) else spec
            r = (judge or winner_robustness)(model, gpus, g, hw, S, G, b, rel_err, objective, dtype, Deployment(fw))
            lay = (lambda x: x) if judge else (lambda x: "t={}×p={}".format(*x))
            rows.append({"framework": fw, "case": name, "model": model.name, "gpus": gpus, "gpus_per_node": g, "S": S,
                         "b": b, "winner, no overlap": " = ".join(lay(x) for x in r["winners_none"]),
                         "margin, no overlap": r["margin_none"],
                         "winner, full overlap": " = ".join(lay(x) for x in r["winners_full"]),
                         "margin, full overlap": r["margin_full"],
                         "within error": ", ".join(lay(x) for x in r["contenders"]) or "—",
                         "verdict": r["verdict"], "tied": [lay(x) for x in r["tied"]]})
    out = pd.DataFrame(rows)
    out.attrs["rel_err"] = rel_err
    out.attrs["objective"] = objective
    return out


def advise_report(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024,
                  G: int = 128, b: int = 1, objective: str = "e2e", dtype: str = "bf16",
                  deployment: Deployment | None = None, routing_asked: bool = False) -> dict:
    """What ``llmcomm advise`` prints: ``{"model", "hardware", "gpus", "gpus_per_node", "engine", "workload",
    "objective", "layouts": [...]}`` (layouts best first). A mixture of experts goes to
    :func:`llmcomm.predict.moe_advice.advise_moe` (every expert layout: AutoTP, sharded experts, expert parallelism
    under the deployment's routing); its report adds ``routing`` (with ``asked`` and ``lossless_only``: lossless
    layouts only unless ``routing_asked``, the user naming the routing) and ``not_candidates`` (why a scheme has no
    layout, or a lossy routing is not ranked)."""
    deployment = deployment or Deployment()
    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    head = {"model": model.name, "hardware": hw.name, "gpus": gpus, "gpus_per_node": g, "engine": deployment.engine,
            "workload": {"b": b, "S": S, "G": G, "dtype": dtype}, "objective": objective}
    if model.is_moe:
        from .moe_advice import advise_moe

        layouts, why = advise_moe(model, gpus, g, hw, S, G, b, objective, dtype, deployment,
                                  routing_asked=routing_asked)
        r = deployment.routing
        return {**head, "routing": {"mode": r.mode, "capacity_factor": r.capacity_factor,
                                    "min_capacity": r.min_capacity, "asked": bool(routing_asked),
                                    "lossless_only": not routing_asked}, "not_candidates": why, "layouts": layouts}
    return {**head, "layouts": advise(model, gpus, g, hw, S, G, b, objective, dtype, deployment)}


# ---------------------------------------------------------------------------------------------------------------------
# Maps and what-if levers (predictions, for the book's "Choosing a layout")
# ---------------------------------------------------------------------------------------------------------------------
def _layout_grid(model: ModelSpec, gpus: int, hw: Hardware, g, b, S, G, w, deployment=None, comm_w=None,
                 overlap=False):
    """(t, p, latency dict, fits) for every candidate layout of ``gpus`` (axis 0) × the broadcast workload grid."""
    cands = candidate_layouts(model, gpus)
    if not cands:
        raise SpecError(f"no layout of {model.name} on {gpus} GPUs")
    t = np.array([lay[0] for lay in cands])
    p = np.array([lay[1] for lay in cands])
    b, S, G = (np.asarray(x) for x in (b, S, G))
    shape = np.broadcast_shapes(b.shape, S.shape, G.shape)
    ext = (slice(None),) + (None,) * len(shape)
    lat = predict_latency_grid(model, hw, t[ext], p[ext], b, S, G, w, gpus_per_node=g, deployment=deployment,
                               comm_w=comm_w, overlap=overlap)
    mem = memory_per_rank(model, t[ext], p[ext], b, S, G, w)["total"]
    fits = mem <= hw.usable_memory_bytes
    return t, p, lat, np.broadcast_to(fits, lat["e2e_s"].shape)


def advice_map(model: ModelSpec, gpus: int, hw: Hardware, gpus_per_node: int | None = None, S=(128, 1024, 8192),
               b=(1, 8, 32), G: int = 128, objective: str = "e2e", dtype: str = "bf16",
               deployment: Deployment | None = None):
    """Which layout wins where: one row per (b, S) with the best feasible layout for ``objective`` (ttft, tpot,
    e2e), its predicted value and the runner-up's (``margin`` = runner-up / best − 1). A prediction of the model."""
    import pandas as pd

    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    if objective not in ("ttft", "tpot", "e2e"):
        raise SpecError(f"objective {objective!r} is not one of ttft, tpot, e2e")
    w = DTYPE_BYTES[dtype]
    bb, SS = np.meshgrid(np.asarray(b), np.asarray(S), indexing="ij")
    deployment = deployment or Deployment()
    t, p, lat, fits = _layout_grid(model, gpus, hw, g, bb, SS, G, w, deployment)
    val = np.where(fits, lat[f"{objective}_s"], np.inf)
    order = np.argsort(val, axis=0)
    rows = []
    for i, j in np.ndindex(bb.shape):
        k0 = order[0, i, j]
        best = val[k0, i, j]
        second = val[order[1, i, j], i, j] if len(t) > 1 else np.inf
        rows.append({"framework": deployment.framework, "model": model.name, "gpus": gpus, "b": int(bb[i, j]),
                     "S": int(SS[i, j]), "G": G,
                     "best": f"t={t[k0]}×p={p[k0]}" if np.isfinite(best) else "none fits",
                     "tp": int(t[k0]), "pp": int(p[k0]), f"{objective}_s": float(best),
                     "margin": float(second / best - 1) if np.isfinite(second) and np.isfinite(best) else np.nan})
    return pd.DataFrame(rows)


#: what-if levers of :func:`what_if`: name → keyword arguments (``link_factor`` scales every link's bandwidth)
LEVERS = {"baseline": {}, "links ×2": {"link_factor": 2.0}, "inter-node ×4": {"link_factor": 4.0,
                                                                             "levels": ("inter",)},
          "fp8 communication (w=1)": {"comm_w": 1}, "overlap comm with compute (bound)": {"overlap": True}}


def what_if(model: ModelSpec, gpus: int, hw0: Hardware, gpus_per_node: int | None = None, S: int = 1024,
            G: int = 128, b: int = 1, dtype: str = "bf16", levers: dict | None = None,
            deployment: Deployment | None = None):
    """Predicted E2E (and TTFT, TPOT) of every feasible layout under each lever of ``levers`` (default
    :data:`LEVERS`): faster links (β / factor), narrower communication (``comm_w`` bytes per element), perfect
    overlap of communication with compute (``max`` instead of sum: a lower bound). One row per (lever, layout)."""
    import pandas as pd

    g = hw0.gpus_per_node if gpus_per_node is None else gpus_per_node
    w = DTYPE_BYTES[dtype]
    rows = []
    for name, kw in (levers or LEVERS).items():
        kw = dict(kw)
        hw = scale_links(hw0, kw.pop("link_factor"), kw.pop("levels", ("intra", "inter"))) \
            if "link_factor" in kw else hw0
        t, p, lat, fits = _layout_grid(model, gpus, hw, g, b, S, G, w, deployment, **kw)
        for i in range(len(t)):
            if fits[i]:
                rows.append({"lever": name, "layout": f"t={t[i]}×p={p[i]}", "tp": int(t[i]), "pp": int(p[i]),
                             "ttft_s": float(lat["ttft_s"][i]), "tpot_s": float(lat["tpot_s"][i]),
                             "e2e_s": float(lat["e2e_s"][i])})
    return pd.DataFrame(rows)
