"""Advice for disaggregated prefill and decode (``advise --disaggregate``): on N GPUs, every split — a prefill side
of N_P GPUs and a decode side of N_D = N − N_P — beside every co-located deployment of all N, ranked by TTFT, TPOT,
E2E or the bytes that cross nodes, memory-feasible — and when splitting pays.

**Deployments.** A side (or a co-located deployment) of n GPUs is r replicas of one t×p layout, r·t·p = n (data
parallelism: an 8B model on 8 GPUs is as likely eight single-GPU engines as one TP-8 engine); the b sequences of the
batch are spread over the replicas, ⌈b/r⌉ each, and so are the arriving prompts. The ranks are placed in order, g per
node: the prefill side's replicas first, then the decode side's (N GPUs on ⌈N/g⌉ nodes, as a co-located deployment
of N); each replica's latency is predicted as if it started on a node (:func:`~.latency.predict_latency_grid`), its
bytes crossing nodes where it really lies.

**The serving model (an ASSUMPTION, and a parameter).** One request's TTFT and a decode step's TPOT alone never favour
a split: each phase gets fewer GPUs and the hand-off is added. What a split removes is the **interference of
co-location** (DistServe's argument): under continuous batching of b sequences that each generate G tokens, in steady
state b/G sequences finish per decode step and as many new prompts arrive; on a co-located engine their prefills run
on the same GPUs and stall the decode step. With x prefills per decode step over the whole deployment
(``prefills_per_step``, default b/G: every sequence generates exactly G tokens and is replaced at once; prefills
neither chunked nor piggybacked onto decode steps):

* co-located, r replicas of c:        TTFT = prefill_c           TPOT = decode_c(⌈b/r⌉) + (x/r) · prefill_c
* split, r_P × P then r_D × D:        TTFT = prefill_P + hand-off   TPOT = decode_D(⌈b/r_D⌉)

with prefill_c the prefill of one request (b = 1, S tokens) and decode_c(b) a decode step at the mean KV length; the
hand-off is one request's (:func:`llmcomm.predict.handoff.handoff_time`, from the first prefill replica to the first
decode replica; its exposed part with ``layerwise``); E2E = TTFT + (G − 1)·TPOT. A split's prefill side must keep up:
its load ``x · prefill_P / (r_P · TPOT)`` ≤ 1 (``keeps_up``; a split that cannot is ranked after those that can, like
a deployment that does not fit). Queueing (waiting for a free prefill replica or for the current decode step) is not
modelled on either side.

**When splitting pays (on TPOT).** A split's TPOT does not depend on x; a co-located deployment's grows by
(x/r)·prefill_c. The split beats every fitting co-located deployment once x > max_c r_c·(TPOT_split − decode_c) /
prefill_c (``pays_above``), as long as its prefill side keeps up, x ≤ r_P·TPOT_split / prefill_P
(``prefill_limit``). :func:`when_splitting_pays` reads the rows and says whether that window is empty and where the
given x falls. A split pays for it in TTFT: the hand-off, and fewer GPUs for a prefill than a co-located layout of all
N could give it (compare the rows' ``ttft_s``).

**Memory** (every replica holds the whole model's weights over its ranks, :func:`~.advise.memory_per_rank`): a
prefill replica the KV of one request's S tokens and its activations; a decode replica the KV of ⌈b/r⌉·(S + G) tokens
and a decode step's activations; a co-located replica both (advise's count: KV of ⌈b/r⌉·(S + G), activations of
⌈b/r⌉·S). KV counted in the KV dtype. **Bytes crossing nodes** over a generation of the b sequences:
every replica's forwards (a split: the prefill forwards on its side, the G − 1 decode forwards on the other) and the
b hand-offs (request i from prefill replica i mod r_P to decode replica i mod r_D), all at their placed ranks.
"""
from __future__ import annotations

import numpy as np

from ..deployment import Deployment
from ..derive.disagg import handoff_calls
from ..derive.evaluate import generation_calls
from ..derive.traffic import node_of_placement, summary
from ..spec import KV_DTYPE_BYTES, Disaggregation, Layout, ModelSpec, SpecError, Workload
from .advise import candidate_layouts, check_request, memory_per_rank
from .handoff import exposed_seconds, handoff_time
from .hardware import GiB, Hardware
from .latency import predict_latency_grid

__all__ = ["OBJECTIVES", "deployments", "advise_disaggregated", "when_splitting_pays", "disaggregated_advice_report"]

#: what the deployments can be ranked by
OBJECTIVES = ("ttft", "tpot", "e2e", "inter_node_bytes")


def _check(objective, prefills_per_step, hw, gpus, gpus_per_node) -> int:
    if objective not in OBJECTIVES:
        raise SpecError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    g = check_request("ttft", gpus, gpus_per_node, hw)
    if gpus < 2:
        raise SpecError(f"gpus={gpus} leaves no split: a prefill and a decode side need at least 2 GPUs")
    if prefills_per_step is not None and (isinstance(prefills_per_step, bool) or not isinstance(
            prefills_per_step, (int, float)) or not np.isfinite(prefills_per_step) or prefills_per_step < 0):
        raise SpecError(f"prefills_per_step={prefills_per_step!r} must be a non-negative number")
    return g


def deployments(model: ModelSpec, gpus: int) -> list[tuple[int, int, int]]:
    """Every (t, p, r) with r replicas of a valid t×p layout on exactly ``gpus`` GPUs."""
    return [(t, p, gpus // size) for size in range(1, gpus + 1) if gpus % size == 0
            for t, p in candidate_layouts(model, size)]


def _share(b: int, r: int) -> int:
    return -(-b // r)


def _calls(model, lay, r, wl, phases, offset, pattern) -> list[tuple]:
    """The calls of ``phases`` of r replicas of layout ``lay`` (⌈b/r⌉ sequences each), ranks shifted to their places
    from ``offset``."""
    t, p = lay
    one = Workload(_share(wl.b, r), wl.S, wl.G, wl.dtype)
    base = [call for call in generation_calls(model, Layout(t, p), one, pattern) if call[0] in phases]
    out = []
    for replica in range(r):
        shift = offset + replica * t * p
        out += [(ph, op, tuple(x + shift for x in ranks), m, n_, None if root is None else root + shift)
                for ph, op, ranks, m, n_, root in base]
    return out


def _handoffs(model, dis: Disaggregation, wl: Workload, r_p: int, r_d: int, n_p: int) -> list[tuple]:
    """The b hand-offs, request i from prefill replica i mod r_P to decode replica i mod r_D, at their places."""
    one = Workload(1, wl.S, wl.G, wl.dtype)
    base = handoff_calls(model, dis, one)
    size_p, size_d = dis.prefill.ranks, dis.decode.ranks
    pairs: dict[tuple[int, int], int] = {}
    for i in range(wl.b):
        key = (i % r_p, i % r_d)
        pairs[key] = pairs.get(key, 0) + 1
    out = []
    for (kp, kd), count in sorted(pairs.items()):
        place = lambda x, kp=kp, kd=kd: x + kp * size_p if x < size_p else n_p + kd * size_d + x - size_p  # noqa
        out += [(ph, op, tuple(place(x) for x in ranks), m, count * n_, root) for ph, op, ranks, m, n_, root in base]
    return out


def advise_disaggregated(model: ModelSpec, gpus: int, hw: Hardware, gpus_per_node: int | None = None,
                         S: int = 1024, G: int = 128, b: int = 8, dtype: str = "bf16", kv_dtype: str | None = None,
                         prefills_per_step: float | None = None, objective: str = "tpot", layerwise: bool = False,
                         deployment: Deployment | None = None) -> list[dict]:
    """Every co-located deployment of ``gpus`` and every split, ranked by ``objective`` (fitting rows whose prefill
    keeps up first). Each row: ``kind`` ("co-located" | "split"), ``prefill_tp``, ``prefill_pp``,
    ``prefill_replicas``, ``decode_tp``, ``decode_pp``, ``decode_replicas``, ``prefill_gpus``, ``decode_gpus``,
    ``ttft_s``, ``tpot_s``, ``e2e_s``, ``prefill_s`` (one request), ``decode_step_s`` (a replica's share of the
    batch, no stall), ``stall_s``, ``handoff_s``, ``handoff_exposed_s``, ``inter_node_bytes``,
    ``handoff_inter_node_bytes``, ``memory_gib_prefill``, ``memory_gib_decode``, ``usable_gib``, ``fits``,
    ``prefill_load``, ``keeps_up``, ``pays_above``, ``prefill_limit`` (splits), ``prefills_per_step``,
    ``objective``, ``score``, ``rank`` (module docs; a co-located row has its layout on both sides)."""
    g = _check(objective, prefills_per_step, hw, gpus, gpus_per_node)
    wl = Workload(b, S, G, dtype).validate(model)
    if kv_dtype is not None and kv_dtype not in KV_DTYPE_BYTES:
        raise SpecError(f"KV dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")
    x = b / G if prefills_per_step is None else float(prefills_per_step)
    dep = (deployment or Deployment()).resolve(model)
    pattern = dep.pattern(model)
    sides = {size: deployments(model, size) for size in range(1, gpus + 1)}
    if not sides[gpus] and not any(sides[size] and sides[gpus - size] for size in range(1, gpus)):
        raise SpecError(f"no deployment of {model.name} on {gpus} GPUs or any split of them: t must divide its "
                        f"{model.heads} heads and {model.kv_heads} KV heads")
    # latencies: one grid call over every (t, p, batch) a side can run
    keys = sorted({(t, p, 1) for lays in sides.values() for t, p, _ in lays}
                  | {(t, p, _share(b, r)) for lays in sides.values() for t, p, r in lays})
    arr = np.array(keys)
    lat = predict_latency_grid(model, hw, arr[:, 0], arr[:, 1], arr[:, 2], S, G, wl.w, gpus_per_node=g,
                               deployment=dep)
    prefill = {(t, p): float(lat["ttft_s"][i]) for i, (t, p, bb) in enumerate(keys) if bb == 1}
    step = {key: float(lat["tpot_s"][i]) for i, key in enumerate(keys)}
    mem = memory_per_rank(model, arr[:, 0], arr[:, 1], arr[:, 2], S, G, wl.w)
    mem_pre = memory_per_rank(model, arr[:, 0], arr[:, 1], 1, S, 0, wl.w)
    mem_step = memory_per_rank(model, arr[:, 0], arr[:, 1], arr[:, 2], 1, 0, wl.w)
    kv_scale = KV_DTYPE_BYTES[kv_dtype or dtype] / wl.w
    gib = {key: ((mem_pre["weights"][i] + kv_scale * mem_pre["kv"][i] + mem_pre["act"][i]) / GiB,
                 (mem["weights"][i] + kv_scale * mem["kv"][i] + mem_step["act"][i]) / GiB,
                 (mem["weights"][i] + kv_scale * mem["kv"][i] + mem["act"][i]) / GiB) for i, key in enumerate(keys)}
    usable = hw.usable_memory_bytes / GiB
    where = node_of_placement(g)
    rows = []
    for t, p, r in sides[gpus]:
        bb = _share(b, r)
        inter = summary(_calls(model, (t, p), r, wl, ("prefill", "decode"), 0, pattern), where)["inter_node_bytes"]
        rows.append(_row("co-located", (t, p, r), (t, p, r), gpus, 0, prefill[(t, p)], step[(t, p, bb)],
                         x / r * prefill[(t, p)], 0.0, 0.0, inter, 0, gib[(t, p, bb)][2], gib[(t, p, bb)][2], usable,
                         x, G))
    one_req = Workload(1, S, G, dtype)
    for n_p in range(1, gpus):
        for tp, pp, rp in sides[n_p]:
            for td, pd, rd in sides[gpus - n_p]:
                dis = Disaggregation(Layout(tp, pp), Layout(td, pd), kv_dtype=kv_dtype)
                first = lambda x, size=tp * pp: x // g if x < size else (n_p + x - size) // g  # noqa: E731
                hand = handoff_time(model, dis, one_req, hw, g, placement=first)["seconds"]
                pre, dec = prefill[(tp, pp)], step[(td, pd, _share(b, rd))]
                exposed = exposed_seconds(hand, pre, model.L) if layerwise else hand
                moved = _handoffs(model, dis, wl, rp, rd, n_p)
                calls = (_calls(model, (tp, pp), rp, wl, ("prefill",), 0, pattern)
                         + _calls(model, (td, pd), rd, wl, ("decode",), n_p, pattern) + moved)
                row = _row("split", (tp, pp, rp), (td, pd, rd), n_p, gpus - n_p, pre, dec, 0.0, hand, exposed,
                           summary(calls, where)["inter_node_bytes"], summary(moved, where)["inter_node_bytes"],
                           gib[(tp, pp, 1)][0], gib[(td, pd, _share(b, rd))][1], usable, x, G)
                row["prefill_load"] = x * pre / (rp * dec) if dec > 0 else float("inf")
                row["keeps_up"] = bool(row["prefill_load"] <= 1.0)
                rows.append(row)
    co = [r for r in rows if r["kind"] == "co-located" and r["fits"]]
    for r in rows:
        if r["kind"] == "split":
            r["pays_above"] = max([other["prefill_replicas"] * (r["tpot_s"] - other["decode_step_s"])
                                   / other["prefill_s"] for other in co] + [0.0])
            r["prefill_limit"] = r["prefill_replicas"] * r["tpot_s"] / r["prefill_s"]
        r["objective"] = objective
        r["score"] = r["inter_node_bytes"] if objective == "inter_node_bytes" else r[f"{objective}_s"]
    rows.sort(key=lambda r: (not (r["fits"] and r["keeps_up"]), r["score"], r["inter_node_bytes"],
                             r["kind"] != "co-located", r["prefill_gpus"], r["prefill_tp"], r["decode_tp"]))
    for place, r in enumerate(rows, 1):
        r["rank"] = place
    return rows


def _row(kind, pre, dec, n_p, n_d, one, step, stall, hand, exposed, inter, inter_hand, mem_p, mem_d, usable, x, G):
    tpot = step + stall
    ttft = one + exposed
    return {"kind": kind, "prefill_tp": pre[0], "prefill_pp": pre[1], "prefill_replicas": pre[2],
            "decode_tp": dec[0], "decode_pp": dec[1], "decode_replicas": dec[2], "prefill_gpus": n_p,
            "decode_gpus": n_d, "ttft_s": ttft, "tpot_s": tpot, "e2e_s": ttft + (G - 1) * tpot, "prefill_s": one,
            "decode_step_s": step, "stall_s": stall, "handoff_s": hand, "handoff_exposed_s": exposed,
            "inter_node_bytes": int(inter), "handoff_inter_node_bytes": int(inter_hand),
            "memory_gib_prefill": float(mem_p), "memory_gib_decode": float(mem_d), "usable_gib": usable,
            "fits": bool(max(mem_p, mem_d) <= usable), "prefill_load": stall / tpot if tpot > 0 else 0.0,
            "keeps_up": True, "pays_above": None, "prefill_limit": None, "prefills_per_step": x}


def _name(r: dict | None) -> str | None:
    if r is None:
        return None
    side = lambda t, p, reps: f"{reps} x {t}x{p}" if reps > 1 else f"{t}x{p}"  # noqa: E731
    if r["kind"] == "co-located":
        return f"co-located {side(r['prefill_tp'], r['prefill_pp'], r['prefill_replicas'])}"
    return (f"split prefill {side(r['prefill_tp'], r['prefill_pp'], r['prefill_replicas'])} / decode "
            f"{side(r['decode_tp'], r['decode_pp'], r['decode_replicas'])}")


def when_splitting_pays(rows: list[dict]) -> dict:
    """From :func:`advise_disaggregated`'s rows: ``{"best_co_located" (its lowest TPOT), "best_split" (of the
    fitting splits that pay at the rows' x, the lowest TPOT; when none does, the one that pays from the fewest
    prefills per step), "prefills_per_step", "window": [pays_above, prefill_limit] of that split (None when no
    fitting split has one), "pays_now" (x inside it), "statement"}``."""
    if not rows:
        raise SpecError("no rows to judge")
    x = rows[0]["prefills_per_step"]
    co = [r for r in rows if r["kind"] == "co-located" and r["fits"]]
    splits = [r for r in rows if r["kind"] == "split" and r["fits"] and r["pays_above"] < r["prefill_limit"]]
    best_co = min(co, key=lambda r: r["tpot_s"]) if co else None
    inside = [r for r in splits if r["pays_above"] < x <= r["prefill_limit"]]
    best = (min(inside, key=lambda r: (r["tpot_s"], r["ttft_s"])) if inside else
            min(splits, key=lambda r: (r["pays_above"], r["tpot_s"])) if splits else None)
    if best is None:
        return {"best_co_located": _name(best_co), "best_split": None, "prefills_per_step": x, "window": None,
                "pays_now": False, "statement": "No split pays on TPOT here: for every fitting split, some co-located "
                                                "deployment is at least as fast at every load its prefill side can "
                                                "sustain."}
    lo, hi = best["pays_above"], best["prefill_limit"]
    now = bool(lo < x <= hi)
    load = f"when more than {lo:.3g} prompts arrive per decode step, up to" if lo > 0 else "at any load up to"
    text = (f"{_name(best)} beats every co-located deployment on TPOT {load} {hi:.3g} prompts per decode step (what "
            f"its prefill side sustains); at x = {x:.3g} it {'pays' if now else 'does not pay'}")
    if best_co is not None:
        text += (f": TPOT {best['tpot_s'] * 1e3:.3g} ms vs {best_co['tpot_s'] * 1e3:.3g} ms ({_name(best_co)}), "
                 f"at the price of TTFT {best['ttft_s'] * 1e3:.3g} ms vs {best_co['ttft_s'] * 1e3:.3g} ms")
    return {"best_co_located": _name(best_co), "best_split": _name(best), "prefills_per_step": x,
            "window": [lo, hi], "pays_now": now, "statement": text + "."}


def disaggregated_advice_report(model: ModelSpec, gpus: int, gpus_per_node: int | None, hw: Hardware, S: int = 1024,
                                G: int = 128, b: int = 8, objective: str = "tpot", dtype: str = "bf16",
                                prefills_per_step: float | None = None) -> dict:
    """What ``llmcomm advise --disaggregate`` prints: ``{"model", "gpus", "hardware", "workload", "rows"`` (every
    co-located deployment and every split, ranked: :func:`advise_disaggregated`) ``, "verdict"``
    (:func:`when_splitting_pays`) ``}``."""
    rows = advise_disaggregated(model, gpus, hw, gpus_per_node, S, G, b, dtype, objective=objective,
                                prefills_per_step=prefills_per_step)
    return {"model": model.name, "gpus": gpus, "hardware": hw.name, "workload": {"b": b, "S": S, "G": G,
                                                                                "dtype": dtype},
            "objective": objective, "rows": rows, "verdict": when_splitting_pays(rows)}
