"""Disaggregated prefill and decode: the KV-cache hand-off, derived.

The prefill side (t_P TP ranks × p_P stages, global ranks 0 … N_P − 1) runs the prefill forward over the S prompt
tokens; the decode side (t_D × p_D, ranks N_P … N_P + N_D − 1) runs the G − 1 decode forwards. In between, every
layer's keys and values of the S prompt tokens move from the prefill rank that computed them to the decode rank that
attends over them (phase ``kv_transfer``, op ``send_recv``), plus the first token (int64 ids, b of them) to every
rank of the decode side's first stage, which feeds it to the first decode forward.

Who holds what (the same on both sides, :class:`~llmcomm.spec.Layout` numbering): layer l lives on the stage
:func:`~llmcomm.spec.stage_layers` gives it; TP rank i of a side with degree t holds the a_kv/t KV heads
[i·a_kv/t, (i+1)·a_kv/t) — AutoTP shards attention by KV heads, contiguously (:meth:`llmcomm.spec.Layout.validate`
refuses a t that does not divide a_kv). So prefill TP rank i sends layer l's K and V of the heads it shares with decode
TP rank j, one message per layer and (i, j) pair whose head ranges overlap: the tensor ``[2, b, heads, S, d]`` (K and
V stacked, as a layer-wise connector sends a layer). Overlaying the two partitions of the a_kv heads gives
t_P + t_D − gcd(t_P, t_D) overlapping pairs (the cut points of both partitions, the common ones counted once), so

* bytes  = 2·L·a_kv·d·w_kv·b·S  (+ 8·b·t_D for the first token), whatever the layouts;
* messages = L·(t_P + t_D − gcd(t_P, t_D))  (+ t_D);
* a message's size: 2·b·S·d·w_kv times the heads of the overlap — a_kv/max(t_P, t_D) heads when one degree divides
  the other; in general multiples of a_kv/lcm(t_P, t_D);
* per rank: a prefill rank of stage σ sends 2·L_σ·(a_kv/t_P)·d·w_kv·b·S, a decode rank of stage σ' receives
  2·L_σ'·(a_kv/t_D)·d·w_kv·b·S (L_σ the layers of the stage); the busiest sender is on stage 0, with ⌈L/p_P⌉ layers;
* the re-layout: with t_P < t_D a prefill rank splits its heads among t_D/t_P decode ranks; with t_P > t_D a decode
  rank concatenates, per layer, the head slices of t_P/t_D senders along the head axis; equal degrees copy one block
  as it is.

Pieces under a paged cache (blocks of B tokens, K and V in separate blocks, each block laid out heads-major — HND —
so a range of heads inside a block is contiguous): a message is 2·b·⌈S/B⌉ pieces (every request its own blocks), so
pieces = 2·b·⌈S/B⌉·L·(t_P + t_D − gcd(t_P, t_D)). With the token-major block layout (NHD: ``[B, heads, d]``, vLLM's
default for FlashAttention) a head range that is not the whole block is B strided pieces per block: unequal TP
degrees multiply the pieces by B — the re-layout's price a transfer engine pays per descriptor.

Everything here is sympy (closed forms, :func:`closed_forms`) or exact integers from the concrete plan
(:func:`handoff_messages`, :func:`handoff_calls`), the latter in the ``(phase, op, ranks, m, count, root)`` form of
:func:`llmcomm.derive.traffic.rows_of_calls`, which builds measured and predicted rows alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from ..notation import B, L, S, a_kv, b, d, p_D, p_P, t_D, t_P, w_kv
from ..spec import Disaggregation, ModelSpec, SpecError, Workload, stage_layers
from .phases import KV_TRANSFER

__all__ = ["KV_PHASE", "TOKEN_BYTES", "gcd", "closed_forms", "HandoffMessage", "head_ranges", "handoff_messages",
           "handoff_calls", "handoff_summary", "rank_split", "pieces", "message_pieces", "layer_stages", "check_disaggregation", "node_of", "values",
           "disaggregated_calls"]

#: the phase of the hand-off's messages (between the prefill and the decode phases)
KV_PHASE = KV_TRANSFER
#: bytes of one token id as the runs hand it over (int64)
TOKEN_BYTES = 8


class gcd(sp.Function):
    """The greatest common divisor of two positive integers, kept symbolic until both are numbers (sympy's own
    ``sp.gcd`` is the polynomial gcd: ``gcd(t_P, t_D)`` would be 1)."""

    @classmethod
    def eval(cls, x, y):
        if x.is_Integer and y.is_Integer:
            return sp.Integer(math.gcd(int(x), int(y)))
        if x == y:
            return x

    def _latex(self, printer):
        return r"\gcd(%s, %s)" % tuple(printer._print(a) for a in self.args)


def _overlap_pairs(tp, td):
    """Pairs (i, j) of prefill TP rank i and decode TP rank j whose KV-head ranges overlap: the cut points of both
    partitions of a_kv (t_P − 1 and t_D − 1 inside, gcd − 1 of them shared) cut a_kv into this many pieces."""
    return tp + td - gcd(tp, td)


@lru_cache(maxsize=None)
def closed_forms() -> dict[str, sp.Expr]:
    """The hand-off's closed forms (sympy, in the notation's symbols), derived by summing over the layers:

    ``kv_bytes_per_token`` (2·L·a_kv·d·w_kv), ``kv_bytes`` (the whole batch's KV: × b·S), ``token_bytes`` (8·b·t_D),
    ``bytes`` (both), ``kv_messages`` L·(t_P + t_D − gcd), ``messages`` (+ t_D), ``message_bytes_dividing`` (one
    message's size when one TP degree divides the other), ``sent_bytes_busiest`` (the prefill rank of stage 0:
    ⌈L/p_P⌉ layers of its a_kv/t_P heads), ``received_bytes_busiest`` (the decode side's, likewise), ``pieces``
    (paged, HND: 2·b·⌈S/B⌉ per message), ``pieces_nhd`` (token-major blocks: × B when t_P ≠ t_D)."""
    layer = sp.Symbol("l", integer=True, nonnegative=True)
    per_layer_token = 2 * a_kv * d * w_kv                       # K and V of every KV head, one token, one layer
    kv_per_token = sp.summation(per_layer_token, (layer, 0, L - 1))
    pairs = _overlap_pairs(t_P, t_D)
    kv_messages = sp.summation(pairs, (layer, 0, L - 1))
    blocks = sp.ceiling(S / B)
    out = {
        "kv_bytes_per_token": sp.factor(kv_per_token),
        "kv_bytes": sp.factor(kv_per_token * b * S),
        "token_bytes": TOKEN_BYTES * b * t_D,
        "kv_messages": kv_messages,
        "message_bytes_dividing": 2 * b * S * d * w_kv * a_kv / sp.Max(t_P, t_D),
        "sent_bytes_busiest": 2 * sp.ceiling(L / p_P) * (a_kv / t_P) * d * w_kv * b * S,
        "received_bytes_busiest": 2 * sp.ceiling(L / p_D) * (a_kv / t_D) * d * w_kv * b * S,
        "pieces": 2 * b * blocks * kv_messages,
        "pieces_nhd": 2 * b * blocks * kv_messages * sp.Piecewise((1, sp.Eq(t_P, t_D)), (B, True)),
    }
    out["bytes"] = out["kv_bytes"] + out["token_bytes"]
    out["messages"] = out["kv_messages"] + t_D
    return out


def head_ranges(kv_heads: int, t: int) -> list[tuple[int, int]]:
    """The KV heads [lo, hi) of each TP rank of a side of degree t (contiguous, equal: t divides a_kv)."""
    if kv_heads % t:
        raise SpecError(f"t={t} does not divide the {kv_heads} KV heads")
    q = kv_heads // t
    return [(i * q, (i + 1) * q) for i in range(t)]


def check_disaggregation(model: ModelSpec, dis: Disaggregation, ranks: int | None = None) -> Disaggregation:
    """``dis`` validated on ``model`` (one :class:`SpecError` naming the side and the value), and, with ``ranks``
    (the GPUs given), N_P + N_D ≤ ranks."""
    dis.validate(model)
    if ranks is not None and dis.ranks > ranks:
        raise SpecError(f"prefill {dis.prefill.t}x{dis.prefill.p} + decode {dis.decode.t}x{dis.decode.p} = "
                        f"{dis.ranks} ranks, more than the {ranks} given")
    return dis


@dataclass(frozen=True)
class HandoffMessage:
    """One message of the hand-off: ``kind`` "kv" (layer ``layer``'s K and V of heads [lo, hi): ``[2, b, hi − lo,
    S, d]``) or "token" (the first token's ids, ``[b, 1]`` int64; layer −1, heads (0, 0)); ``src``/``dst`` global
    ranks; ``nbytes`` its size."""

    kind: str
    src: int
    dst: int
    layer: int
    lo: int
    hi: int
    nbytes: int


def layer_stages(L_: int, p_: int) -> list[int]:
    """The stage of each of the L layers on a side of p stages (:func:`llmcomm.spec.stage_layers`)."""
    out = []
    for stage, n_layers in enumerate(stage_layers(L_, p_)):
        out += [stage] * n_layers
    return out


def handoff_messages(model: ModelSpec, dis: Disaggregation, workload: Workload) -> list[HandoffMessage]:
    """Every message of one hand-off, in the order the runs send them (layer, then prefill TP rank, then decode TP
    rank; the token messages last, to the decode side's first-stage ranks in order)."""
    check_disaggregation(model, dis)
    P, D = dis.prefill, dis.decode
    w_ = dis.w_kv(workload)
    pre, dec = head_ranges(model.kv_heads, P.t), head_ranges(model.kv_heads, D.t)
    sp_, sd_ = layer_stages(model.L, P.p), layer_stages(model.L, D.p)
    base = P.ranks                                            # the decode side's first global rank
    per_head = 2 * workload.b * workload.S * model.head_dim * w_
    out = []
    for layer in range(model.L):
        for i, (lo_i, hi_i) in enumerate(pre):
            for j, (lo_j, hi_j) in enumerate(dec):
                lo, hi = max(lo_i, lo_j), min(hi_i, hi_j)
                if lo < hi:
                    out.append(HandoffMessage("kv", sp_[layer] * P.t + i, base + sd_[layer] * D.t + j, layer, lo, hi,
                                              (hi - lo) * per_head))
    last = (P.p - 1) * P.t                                    # the prefill's last stage, TP rank 0: it has the logits
    out += [HandoffMessage("token", last, base + j, -1, 0, 0, TOKEN_BYTES * workload.b) for j in range(D.t)]
    return out


def handoff_calls(model: ModelSpec, dis: Disaggregation, workload: Workload) -> list[tuple]:
    """The hand-off as concrete calls ``(phase, op, ranks, m, count, root)`` for
    :func:`llmcomm.derive.traffic.rows_of_calls` / :func:`~llmcomm.derive.traffic.summary`."""
    return [(KV_PHASE, "send_recv", (x.src, x.dst), x.nbytes, 1, None)
            for x in handoff_messages(model, dis, workload)]


def disaggregated_calls(model: ModelSpec, dis: Disaggregation, workload: Workload, prefill_pattern: str,
                        decode_pattern: str | None = None) -> list[tuple]:
    """Every call of a disaggregated generation ``(phase, op, ranks, m, count, root)``: the prefill side's prefill
    forward (pattern ``prefill_pattern`` on its layout, global ranks 0 …), the hand-off (:func:`handoff_calls`), the
    decode side's G − 1 decode forwards (``decode_pattern``, default the same, its ranks shifted by N_P)."""
    from .evaluate import generation_calls

    check_disaggregation(model, dis)
    first = Workload(workload.b, workload.S, 1, workload.dtype)            # the prefill side runs no decode step
    out = [c for c in generation_calls(model, dis.prefill, first, prefill_pattern) if c[0] == "prefill"]
    out += handoff_calls(model, dis, workload)
    base = dis.prefill.ranks
    for phase, op, ranks, m_, count, root in generation_calls(model, dis.decode, workload,
                                                               decode_pattern or prefill_pattern):
        if phase == "decode":
            out.append((phase, op, tuple(r + base for r in ranks), m_, count, None if root is None else root + base))
    return out


def message_pieces(kind: str, workload: Workload, dis: Disaggregation, block_layout: str = "HND",
                   block: int | None = None) -> int:
    """Pieces (contiguous memory regions a transfer engine registers as descriptors) of ONE message under a paged
    cache of ``block`` tokens (default ``dis.block``): a KV message 2·b·⌈S/B⌉ blocks (K and V apart), each one piece
    in the heads-major layout ``HND``; ``NHD`` (token-major) splits a block into B pieces when t_P ≠ t_D (a head
    range is contiguous in a block only when it is all of the block's heads, on the sending and on the receiving side
    at once — with unequal degrees one of the two never is). Without a block size, and for a token message: one."""
    if block_layout not in ("HND", "NHD"):
        raise SpecError(f"block layout {block_layout!r} is not HND or NHD")
    block = dis.block if block is None else block
    if kind != "kv" or block is None:
        return 1
    strided = block_layout == "NHD" and dis.prefill.t != dis.decode.t
    return 2 * workload.b * -(-workload.S // block) * (block if strided else 1)


def pieces(model: ModelSpec, dis: Disaggregation, workload: Workload, block: int | None = None,
           block_layout: str = "HND") -> int:
    """Pieces of all the KV messages of a hand-off (:func:`message_pieces` each; default block ``dis.block``)."""
    return sum(message_pieces(x.kind, workload, dis, block_layout, block)
               for x in handoff_messages(model, dis, workload) if x.kind == "kv")


def rank_split(model: ModelSpec, dis: Disaggregation, workload: Workload) -> list[dict]:
    """Per (sender, receiver) pair: ``{"src", "dst", "side_src": (stage, tp_rank), "side_dst": (stage, tp_rank),
    "layers": [first, last], "heads": [[lo, hi], ...], "messages", "bytes"}`` — who sends which heads and layers to
    whom (the token messages apart, as kind "token")."""
    P, D = dis.prefill, dis.decode
    pairs: dict[tuple, dict] = {}
    for x in handoff_messages(model, dis, workload):
        key = (x.kind, x.src, x.dst)
        row = pairs.setdefault(key, {"kind": x.kind, "src": x.src, "dst": x.dst,
                                     "side_src": list(divmod(x.src, P.t)),
                                     "side_dst": list(divmod(x.dst - P.ranks, D.t)),
                                     "layers": [x.layer, x.layer], "heads": [], "messages": 0, "bytes": 0})
        row["layers"][1] = x.layer
        if x.kind == "kv" and [x.lo, x.hi] not in row["heads"]:
            row["heads"].append([x.lo, x.hi])
        row["messages"] += 1
        row["bytes"] += x.nbytes
    return list(pairs.values())


def handoff_summary(model: ModelSpec, dis: Disaggregation, workload: Workload) -> dict:
    """The hand-off in numbers: ``bytes``, ``kv_bytes``, ``token_bytes``, ``messages``, ``kv_messages``,
    ``message_sizes`` (size → count), ``pieces`` (with ``dis.block``, HND; None without), ``sent_bytes_busiest``,
    ``received_bytes_busiest`` — from the concrete plan; the tests check each against :func:`closed_forms`."""
    msgs = handoff_messages(model, dis, workload)
    kv = [x for x in msgs if x.kind == "kv"]
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for x in kv:
        sent[x.src] = sent.get(x.src, 0) + x.nbytes
        got[x.dst] = got.get(x.dst, 0) + x.nbytes
        sizes[x.nbytes] = sizes.get(x.nbytes, 0) + 1
    return {"bytes": sum(x.nbytes for x in msgs), "kv_bytes": sum(x.nbytes for x in kv),
            "token_bytes": sum(x.nbytes for x in msgs if x.kind == "token"), "messages": len(msgs),
            "kv_messages": len(kv), "message_sizes": dict(sorted(sizes.items())),
            "pieces": pieces(model, dis, workload) if dis.block is not None else None,
            "sent_bytes_busiest": max(sent.values()), "received_bytes_busiest": max(got.values())}


def node_of(dis: Disaggregation, gpus_per_node: int, separate: bool = True):
    """Global rank → node: the prefill side's ranks g per node from node 0; the decode side's likewise, starting on a
    node of its own (``separate``: how disaggregated deployments place them — the two sides never share a node) or
    right after the prefill's last rank (``separate=False``: the ranks of both sides in order, g per node)."""
    from .traffic import node_of_placement

    if not separate:
        return node_of_placement(gpus_per_node)
    plain = node_of_placement(gpus_per_node)
    n_p = dis.prefill.ranks
    first = -(-n_p // gpus_per_node)                         # the decode side's first node
    return lambda r: plain(r) if r < n_p else first + plain(r - n_p)


def values(model: ModelSpec, dis: Disaggregation, workload: Workload, block: int | None = None) -> dict:
    """The symbols of :func:`closed_forms` for a concrete case (substitute with ``expr.subs(values(...))``)."""
    out = {L: model.L, a_kv: model.kv_heads, d: model.head_dim, w_kv: dis.w_kv(workload), b: workload.b,
           S: workload.S, t_P: dis.prefill.t, p_P: dis.prefill.p, t_D: dis.decode.t, p_D: dis.decode.p}
    if (block or dis.block) is not None:
        out[B] = block or dis.block
    return out
