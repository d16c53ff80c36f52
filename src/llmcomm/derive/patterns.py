"""Each framework's messages, as data: the message patterns.

A *message pattern* is a list of :class:`Msg`: each one kind of message a framework sends during **one forward** over
``s`` new tokens per sequence (``s = S`` in the prefill, ``s = 1`` in a decode step), symbolic in the notation of
:mod:`llmcomm.notation`. Everything else — closed forms per phase, totals, numbers — is derived from these lists
(:mod:`llmcomm.derive.volumes`, :mod:`llmcomm.derive.evaluate`); a pattern is never copied into another module.

Messages that exist only when t > 1 (TP) or p > 1 (PP) carry that condition as a :class:`sympy.Piecewise`
(:func:`when_tp`, :func:`when_pp`), so one formula holds for every layout, t = 1 and p = 1 included.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import sympy as sp

from ..notation import C, E, L, L_moe, V, b, e, h, p, s, t, w
from ..spec import SpecError

__all__ = ["Msg", "PATTERNS", "PATHS", "WHERE", "W_TOKEN", "W_COUNT", "pattern", "when_tp",
           "when_pp", "when_ep"]

#: Bytes of one token id as frameworks move it (torch.int64).
W_TOKEN = 8
#: Bytes of the expert capacity DeepSpeed's dropless routing all-reduces (an int64 scalar).
W_COUNT = 8
#: Which ranks a message joins (the latency model's link choice): a TP group, neighbouring stages, or the wrap from
#: the last stage back to stage 0.
PATHS = ("tp", "pp", "wrap")
#: Which groups issue a message's calls (global rank = stage·q + j with q = t·e ranks per stage — t TP ranks, or e
#: EP ranks under expert parallelism; the group of a stage is its q consecutive ranks): ``layers`` — every stage's
#: group, in proportion to the decoder layers it holds; ``head`` — the last stage's group; ``embed`` — the first
#: stage's; ``receivers`` — the group of each stage that receives a hop (stages 1 … p−1), equally; ``boundary`` —
#: rank j of stage k to rank j of stage k+1, at each of the p−1 boundaries, equally; ``wrap`` — rank j of the last
#: stage to rank j of stage 0; ``experts`` — the EP group of each stage, in proportion to the MoE layers it holds.
WHERE = ("layers", "head", "embed", "receivers", "boundary", "wrap", "experts")


def when_tp(expr):
    """``expr`` when tensor parallelism is on (t > 1), else 0."""
    return sp.Piecewise((expr, sp.Gt(t, 1)), (0, True))


def when_pp(expr):
    """``expr`` when pipeline parallelism is on (p > 1), else 0."""
    return sp.Piecewise((expr, sp.Gt(p, 1)), (0, True))


def when_ep(expr):
    """``expr`` when expert parallelism is on (e > 1), else 0."""
    return sp.Piecewise((expr, sp.Gt(e, 1)), (0, True))


@dataclass(frozen=True)
class Msg:
    """One kind of message in one forward: ``calls`` calls of ``op`` on groups of ``group`` ranks, each of ``elems``
    elements of ``width`` bytes (the nccl-tests size m of one call is ``elems · width``); ``where`` says which groups
    issue them (:data:`WHERE`), ``path`` which link they cross (:data:`PATHS`, implied by ``where``)."""

    op: str
    group: sp.Expr
    calls: sp.Expr
    elems: sp.Expr
    why: str
    where: str = "layers"
    width: sp.Expr = w

    def __post_init__(self):
        if self.where not in WHERE:
            raise ValueError(f"where {self.where!r} is not one of {WHERE}")

    @property
    def path(self) -> str:
        return {"boundary": "pp", "wrap": "wrap"}.get(self.where, "tp")

    @property
    def bytes_per_call(self) -> sp.Expr:
        return self.elems * self.width


# --------------------------------------------------------------------------------------------------------------------
# Engine patterns. Each line cites what it models; the deepspeed lines were read from DeepSpeed 0.19.8's source
# (module_inject/auto_tp.py, layers.py) and confirmed by capture (book: "Tensor parallelism: measured vs predicted";
# the pipeline lines: measure/runs/PIPELINE_PATTERN.md).
# --------------------------------------------------------------------------------------------------------------------
def _deepspeed(p2p: str = "partitioned") -> list[Msg]:
    """DeepSpeed AutoTP, and the llmcomm pipeline runner on DeepSpeed's PipelineModule + p2p when p > 1. ``p2p``:
    the runner's stage-to-stage mode (:data:`llmcomm.deployment.P2P_MODES`) — ``"partitioned"`` (its default: 1/t per TP rank, then an
    all-gather) or ``"full"`` (every TP rank sends the whole [b, s, h]; no all-gather). With t = 1 the two are the
    same."""
    if p2p == "full":
        hops = [Msg("send_recv", 2, when_pp(t * (p - 1)), b * s * h,
                    "hidden state, whole [b, s, h] from every TP rank, at each of the p−1 stage boundaries",
                    where="boundary")]
    else:
        hops = [
            # At each of the p−1 boundaries every TP rank sends its 1/t of the hidden state [b, s, h] to its peer
            # (DeepSpeed's PartitionedTensor; with t = 1 that is the whole tensor) ...
            Msg("send_recv", 2, when_pp(t * (p - 1)), b * s * h / t,
                "hidden state, 1/t per TP rank, at each of the p−1 stage boundaries", where="boundary"),
            # ... and the receiving stage all-gathers the t parts.
            Msg("all_gather", t, when_pp(when_tp(p - 1)), b * s * h,
                "next stage all-gathers the t parts of [b, s, h]", where="receivers"),
        ]
    return [
        # AutoTP makes o_proj and down_proj LinearAllreduce: a row-parallel matmul then an all-reduce of the
        # full activation [b, s, h] — two per decoder layer. Embedding, norms, rotary: replicated, no traffic.
        Msg("all_reduce", t, when_tp(2 * L), b * s * h,
            "o_proj and down_proj are LinearAllreduce: all-reduce of [b, s, h], twice per layer"),
        # lm_head becomes LmHeadLinearAllreduce: row-parallel over h, so every rank holds partial logits of the
        # whole vocabulary and they are all-reduced: [b, s_keep, V] with s_keep = 1 (only the last position's logits
        # are kept, as HF generate does). With tied embeddings DeepSpeed clones the head's weight first, so the
        # embedding stays replicated and the pattern is the same.
        Msg("all_reduce", t, when_tp(1), b * V,
            "lm_head is LmHeadLinearAllreduce: all-reduce of the last position's logits [b, 1, V]", where="head"),
        # Pipeline (llmcomm.measure.runs.pipeline: DeepSpeed PipelineModule + deepspeed.runtime.pipe.p2p, KV cache
        # per stage): the stage-to-stage hops above, then the token hand-back.
        *hops,
        # The last stage hands the greedy token (int64 [b, 1]) back to stage 0 after every forward, from each TP rank.
        Msg("send_recv", 2, when_pp(t), b, "token ids int64 [b, 1], last stage → stage 0, from every TP rank",
            where="wrap", width=W_TOKEN),
    ]


def _vllm() -> list[Msg]:
    # The pattern the paper (arXiv 2507.14392) describes for vLLM's TP: a vocabulary-parallel embedding (each rank
    # looks up its vocabulary shard, then all-reduce of [b, s, h]), two all-reduces per layer, and a
    # column-parallel head whose vocabulary shards of the last position's logits are gathered to one rank.
    return [
        Msg("all_reduce", t, when_tp(1), b * s * h, "VocabParallelEmbedding: all-reduce of [b, s, h]", where="embed"),
        Msg("all_reduce", t, when_tp(2 * L), b * s * h,
            "attention out and MLP down projections: all-reduce of [b, s, h]"),
        Msg("gather", t, when_tp(1), b * V, "ParallelLMHead: gather of [b, 1, V/t] shards to rank 0 (m = b·V·w)",
            where="head"),
        # Pipeline: vLLM sends the hidden state and the residual, each [b, s, h], at each stage boundary; in a
        # hybrid each TP rank sends its 1/t slice and the next stage all-gathers them.
        Msg("send_recv", 2, when_pp(2 * (p - 1) * t), b * s * h / t,
            "hidden state and residual, 1/t slice per TP rank, at each of the p−1 stage boundaries", where="boundary"),
        Msg("all_gather", t, when_pp(when_tp(2 * (p - 1))), b * s * h,
            "next stage all-gathers the t slices of hidden state and residual", where="receivers"),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Mixtures of experts (DeepSpeed 0.19.8, transformers 5.24; measured in a scratch investigation of the MoE layer and
# AutoTP on a tiny Mixtral, to be re-measured by the project's capture). L_moe of the L layers are MoE layers.
# --------------------------------------------------------------------------------------------------------------------
def _moe_autotp() -> list[Msg]:
    """DeepSpeed AutoTP on an HF mixture of experts as it is: attention sharded t ways (o_proj LinearAllreduce), the
    fused expert tensors (``experts.gate_up_proj`` [E, 2F_ex, h], ``experts.down_proj`` [E, h, F_ex]) bare
    Parameters that AutoTP leaves whole on every rank — so an MoE layer has one all-reduce, not two, and the experts
    are replicated t times. A dense layer of the same model (Qwen ``mlp_only_layers``) keeps its down_proj
    all-reduce. Head and pipeline hops as DeepSpeed's dense pattern."""
    dense = _deepspeed()
    return [
        Msg("all_reduce", t, when_tp(L), b * s * h,
            "o_proj is LinearAllreduce: all-reduce of [b, s, h], once per layer (experts replicated, no reduction)"),
        Msg("all_reduce", t, when_tp(L - L_moe), b * s * h,
            "down_proj of the dense (non-MoE) layers is LinearAllreduce: all-reduce of [b, s, h]"),
        *dense[1:],
    ]


def _tp_experts() -> list[Msg]:
    """The serving frameworks' TP layout of a mixture of experts: every expert's FFN sharded t ways (gate/up by
    columns, down by rows), so the MoE block's output is a partial sum reduced once, like a dense MLP: DeepSpeed's
    dense pattern, two all-reduces per layer."""
    dense = _deepspeed()
    return [replace(dense[0], why="o_proj and the MoE block (every expert sharded t ways; dense layers: down_proj): "
                                  "all-reduce of [b, s, h], twice per layer"), *dense[1:]]


def _ep(dropless: bool = False) -> list[Msg]:
    """Expert parallelism with data-parallel attention through DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``,
    ``ep_size`` = e, in place of the model's sparse block): every rank runs attention on its own b/e sequences and
    holds E/e experts; per MoE layer the dispatch and the combine are ``all_to_all_single`` of the capacity-padded
    [E, C, h] buffer on the EP group (equal splits). Dropless routing first agrees on C: ``all_reduce`` MAX of the
    int64 largest count. C is the capacity of the forward (:mod:`llmcomm.derive.moe`).

    With pipeline stages (p > 1; the llmcomm pipeline runner, each stage an EP group of e ranks): EP rank j of each
    stage sends its own sequences' hidden state [b/e, s, h] to EP rank j of the next stage, and the last stage's EP
    rank j hands its b/e greedy tokens back to EP rank j of stage 0 — the dense pipeline's hops with the batch split
    e ways instead of the hidden state split t ways, and no all-gather (nothing is sharded)."""
    msgs = [Msg("all_to_all", e, when_ep(2 * L_moe), E * C * h,
                "MoE dispatch and combine: all_to_all_single of [E, C, h] on the EP group, twice per MoE layer",
                where="experts"),
            Msg("send_recv", 2, when_ep(when_pp(e * (p - 1))), b * s * h / e,
                "hidden state of the rank's b/e sequences [b/e, s, h], EP rank j to EP rank j, at each of the p−1 "
                "stage boundaries", where="boundary"),
            Msg("send_recv", 2, when_ep(when_pp(e)), b / e, "token ids int64 [b/e, 1], last stage → stage 0, from every EP rank",
                where="wrap", width=W_TOKEN)]
    if dropless:
        msgs.insert(0, Msg("all_reduce", e, when_ep(L_moe), 1,
                           "dropless capacity: all_reduce MAX of the int64 largest expert count, once per MoE layer",
                           where="experts", width=W_COUNT))
    return msgs


#: The message patterns by name (which one a deployment sends: :func:`llmcomm.deployment.pattern_of`).
PATTERNS: dict[str, Callable[[], list[Msg]]] = {"deepspeed": _deepspeed, "deepspeed-full": lambda: _deepspeed("full"),
                                                "vllm": _vllm, "deepspeed-moe-autotp": _moe_autotp,
                                                "tp-experts": _tp_experts, "deepspeed-ep": _ep,
                                                "deepspeed-ep-dropless": lambda: _ep(dropless=True)}


def pattern(name: str) -> list[Msg]:
    """The messages of one forward of pattern ``name`` (symbolic in b, s, h, L, V, t, p, w; MoE: L_moe, E, e, C)."""
    try:
        return PATTERNS[name]()
    except KeyError:
        raise SpecError(f"unknown message pattern {name!r}: choose one of {', '.join(PATTERNS)}") from None
