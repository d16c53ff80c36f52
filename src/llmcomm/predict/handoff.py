"""The time of the KV-cache hand-off of a disaggregated deployment, and the TTFT/TPOT it gives.

The hand-off's messages are :func:`llmcomm.derive.disagg.handoff_messages` (layer l's K and V of a head range, from a
prefill rank to a decode rank; the first token's ids). A message crosses nodes when its two ranks are on different
nodes under :func:`llmcomm.derive.disagg.node_of` (``separate``: the decode side on nodes of its own); its **level** is
then ``inter`` (the network), else ``intra`` (NVLink in one node). One message of m bytes in P pieces costs

    τ_msg = floor_s + m / bytes_per_s + P · piece_s

with the level's parameters (:func:`kv_transfer_params`): a per-message floor (posting, completion), the bandwidth of
**one rank's** link at that level (a GPU's NVLink, its NIC), and a per-piece cost (one descriptor of a paged cache:
:func:`llmcomm.derive.disagg.message_pieces`; without a block size every message is one piece).

Concurrency (the choice made here): every rank has its own link per level, full duplex. The messages a rank sends at
one level queue on its egress, those it receives on its ingress; messages of different ranks run at once. So a level
takes the **busiest endpoint's** sum, ``max over ranks r of max(Σ_{src=r} τ_msg, Σ_{dst=r} τ_msg)``, and the hand-off
the slower level (NVLink and the NICs are different hardware and run at once). For a bipartite plan of equal messages
this bound is a schedule (König's edge colouring); with unequal sizes it is a lower bound.

Layer-wise overlap (:func:`exposed_seconds`): a connector that sends layer l's KV while layer l+1 is prefilled hides
the transfer behind the prefill; with the hand-off's time τ spread evenly over the L layers and a prefill of L equal
layers of c = prefill/L each, the link finishes ``max(τ/L, τ − (L−1)·c)`` after the prefill — what stays exposed.

:func:`disaggregated_latency` composes TTFT = the prefill side's prefill (:func:`~.latency.predict_latency` of its
layout) + the (exposed) hand-off; TPOT is the decode side's; :func:`handoff_share_frame`
is the share of TTFT the hand-off takes over a grid of prompt lengths S and batches b.

The per-level parameters come from the hardware preset's ``kv_transfer`` block (``{"intra"|"inter": {"floor_s",
"bytes_per_s", "piece_s"}}``, each figure with a ``source`` entry); a level the block lacks falls back to the link's α
and achievable bandwidth and no per-piece cost (an ASSUMPTION the result names in ``params_from``).
"""
from __future__ import annotations

import math

import pandas as pd

from ..derive.disagg import handoff_messages, message_pieces, node_of
from ..spec import Disaggregation, ModelSpec, SpecError, Workload
from .hardware import Hardware
from .latency import predict_latency

__all__ = ["LEVELS", "PARAMS", "kv_transfer_params", "handoff_time", "exposed_seconds",
           "disaggregated_latency", "handoff_share_frame"]

#: the link levels of the hand-off
LEVELS = ("intra", "inter")
#: the parameters of one level
PARAMS = ("floor_s", "bytes_per_s", "piece_s")
FROM_LINKS = "links (ASSUMPTION: the link's alpha and achievable bandwidth, no per-piece cost)"


def _checked(level: str, given, where: str) -> dict:
    if not isinstance(given, dict):
        raise SpecError(f"{where}: kv_transfer.{level} must be an object with {', '.join(PARAMS)}")
    out = {}
    for key in PARAMS:
        if key not in given:
            raise SpecError(f"{where}: kv_transfer.{level} lacks {key}")
        try:
            value = float(given[key])
        except (TypeError, ValueError):
            raise SpecError(f"{where}: kv_transfer.{level}.{key}={given[key]!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (key == "bytes_per_s" and value <= 0):
            raise SpecError(f"{where}: kv_transfer.{level}.{key}={given[key]!r} must be "
                            f"{'positive' if key == 'bytes_per_s' else 'non-negative'} and finite")
        out[key] = value
    return out


def kv_transfer_params(hw: Hardware, params: dict | None = None) -> dict[str, dict]:
    """Per level ``{"floor_s", "bytes_per_s", "piece_s", "from"}``: ``params[level]`` when given (e.g. a fit), else
    the preset's ``kv_transfer[level]``, else the link's α and 1/β with no per-piece cost (``from`` says which)."""
    block = hw.raw.get("kv_transfer") or {}
    params = params or {}
    unknown = set(params) - set(LEVELS)
    if unknown:
        raise SpecError(f"kv_transfer levels {sorted(unknown)} are not {' or '.join(LEVELS)}")
    out = {}
    for level in LEVELS:
        if level in params:
            out[level] = dict(_checked(level, params[level], "given parameters"), **{"from": "given"})
        elif level in block:
            out[level] = dict(_checked(level, block[level], f"hardware {hw.name!r}"),
                              **{"from": f"{hw.name} kv_transfer"})
        else:
            link = hw.links[level]
            out[level] = {"floor_s": link.alpha_s, "bytes_per_s": 1.0 / link.beta_s_per_B, "piece_s": 0.0,
                          "from": FROM_LINKS}
    return out


def handoff_time(model: ModelSpec, dis: Disaggregation, workload: Workload, hw: Hardware,
                 gpus_per_node: int | None = None, separate: bool = True, params: dict | None = None,
                 block_layout: str = "HND", tokens: bool = True, placement=None) -> dict:
    """Seconds of one hand-off (module docs): ``{"seconds", "levels": {level: {"seconds", "messages", "bytes",
    "pieces", "busiest": [rank, "send"|"recv"]}}, "bytes", "inter_node_bytes", "messages", "pieces", "params"}``.

    ``params``: per-level parameters replacing the preset's (:func:`kv_transfer_params`); ``tokens=False`` leaves
    the first token's messages out (a KV connector alone, as the public measurements time it); ``placement``: rank →
    node, replacing :func:`~llmcomm.derive.disagg.node_of` (a replica pair placed among others)."""
    workload = workload.validate(model)
    g = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise SpecError(f"gpus_per_node={g!r} must be a positive integer")
    where = node_of(dis, g, separate) if placement is None else placement
    par = kv_transfer_params(hw, params)
    load: dict[str, dict] = {level: {} for level in LEVELS}
    levels = {level: {"seconds": 0.0, "messages": 0, "bytes": 0, "pieces": 0, "busiest": None} for level in LEVELS}
    for msg in handoff_messages(model, dis, workload):
        if msg.kind == "token" and not tokens:
            continue
        level = "inter" if where(msg.src) != where(msg.dst) else "intra"
        q = par[level]
        pieces = message_pieces(msg.kind, workload, dis, block_layout)
        cost = q["floor_s"] + msg.nbytes / q["bytes_per_s"] + pieces * q["piece_s"]
        for end in ((msg.src, "send"), (msg.dst, "recv")):
            load[level][end] = load[level].get(end, 0.0) + cost
        row = levels[level]
        row["messages"] += 1
        row["bytes"] += msg.nbytes
        row["pieces"] += pieces
    for level, row in levels.items():
        if load[level]:
            end = max(load[level], key=lambda x: (load[level][x], -x[0]))
            row["seconds"], row["busiest"] = load[level][end], [end[0], end[1]]
    return {"seconds": max(row["seconds"] for row in levels.values()), "levels": levels,
            "bytes": sum(row["bytes"] for row in levels.values()), "inter_node_bytes": levels["inter"]["bytes"],
            "messages": sum(row["messages"] for row in levels.values()),
            "pieces": sum(row["pieces"] for row in levels.values()), "params": par}


def exposed_seconds(handoff_s: float, prefill_s: float, layers: int) -> float:
    """The hand-off's time left after the prefill when layer l moves during the prefill of layer l+1 (module docs):
    ``max(τ/L, τ − (L−1)·prefill/L)``."""
    if layers < 1:
        raise SpecError(f"layers={layers!r} must be at least 1")
    if handoff_s < 0 or prefill_s < 0:
        raise SpecError("hand-off and prefill seconds must be non-negative")
    return max(handoff_s / layers, handoff_s - (layers - 1) * prefill_s / layers)


def disaggregated_latency(model: ModelSpec, dis: Disaggregation, workload: Workload, hw: Hardware,
                          gpus_per_node: int | None = None, layerwise: bool = False, separate: bool = True,
                          deployment=None, params: dict | None = None) -> dict:
    """TTFT = the prefill side's prefill + the hand-off (its exposed part with ``layerwise``); TPOT = the decode
    side's; E2E = TTFT + (G − 1)·TPOT. Returns ``{"ttft_s", "tpot_s", "e2e_s", "prefill_s", "handoff_s",
    "handoff_exposed_s", "handoff_share", "handoff", "prefill", "decode"}`` (the last two: :func:`predict_latency`
    of each side)."""
    dis = dis.validate(model)
    workload = workload.validate(model)
    pre = predict_latency(model, dis.prefill, workload, hw, deployment, gpus_per_node)
    dec = predict_latency(model, dis.decode, workload, hw, deployment, gpus_per_node)
    hand = handoff_time(model, dis, workload, hw, gpus_per_node, separate, params)
    exposed = exposed_seconds(hand["seconds"], pre["ttft_s"], model.L) if layerwise else hand["seconds"]
    ttft = pre["ttft_s"] + exposed
    return {"ttft_s": ttft, "tpot_s": dec["tpot_s"], "e2e_s": ttft + (workload.G - 1) * dec["tpot_s"],
            "prefill_s": pre["ttft_s"], "handoff_s": hand["seconds"], "handoff_exposed_s": exposed,
            "handoff_share": exposed / ttft, "layerwise": layerwise, "handoff": hand, "prefill": pre, "decode": dec}


def handoff_share_frame(model: ModelSpec, dis: Disaggregation, hw: Hardware, prompts, batches, G: int = 2,
                        dtype: str = "bf16", gpus_per_node: int | None = None, layerwise: bool = False,
                        params: dict | None = None) -> pd.DataFrame:
    """The share of TTFT the hand-off takes over prompt lengths ``prompts`` × batches ``batches``: one row per (b,
    S) with ``b, S, prefill_s, handoff_s, handoff_exposed_s, ttft_s, handoff_share, handoff_bytes``."""
    rows = []
    for size in batches:
        for length in prompts:
            res = disaggregated_latency(model, dis, Workload(int(size), int(length), G, dtype), hw, gpus_per_node,
                                        layerwise, params=params)
            rows.append({"b": int(size), "S": int(length), "prefill_s": res["prefill_s"],
                         "handoff_s": res["handoff_s"], "handoff_exposed_s": res["handoff_exposed_s"],
                         "ttft_s": res["ttft_s"], "handoff_share": res["handoff_share"],
                         "handoff_bytes": res["handoff"]["bytes"]})
    return pd.DataFrame(rows)
