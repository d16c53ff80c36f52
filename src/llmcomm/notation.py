"""Every symbol of llmcomm, once: its sympy symbol, its LaTeX, what it means, and where it appears — the code
attribute, the command-line flag, the JSON key, the Hugging Face ``config.json`` key.

No letter means two things anywhere in the project (code, docstrings, formulas, book, JSON). The book's notation
table is generated from :data:`NOTATION` (:func:`llmcomm.report.tables.notation_table`), so the two cannot drift.
Modules that derive formulas take their sympy symbols from here (``from llmcomm.notation import b, S, G, …``).

Words, not letters, for what has no symbol: FLOPs are "flops", bytes moved by compute are "bytes", the nccl-tests
bus-bandwidth factor is the function :func:`llmcomm.derive.conventions.bus_factor`, and the fitted parameters of the
kernel and NCCL models are keyed by what they are (``flops_per_s``, ``bytes_per_s``, ``latency_s``, ``step_s``,
``floor_s`` …: :mod:`llmcomm.predict.kernels`, :mod:`llmcomm.predict.collectives`). ``tests/test_notation.py`` fails
when ``predict/`` or ``compare/`` binds a notation name to anything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

__all__ = ["Notation", "NOTATION", "symbol", "GROUPS"]


@dataclass(frozen=True)
class Notation:
    """One symbol: ``name`` as code spells it (and as sympy names it), its LaTeX, its meaning, its group, and where
    it appears. Empty strings mean "does not appear there"."""

    name: str
    latex: str
    meaning: str
    group: str
    code: str = ""
    cli: str = ""
    json: str = ""
    hf: str = ""
    integer: bool = True
    symbol: sp.Symbol = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        kw = {"integer": True, "positive": True} if self.integer else {"positive": True}
        object.__setattr__(self, "symbol", sp.Symbol(self.name, **kw))


#: groups in the order the book's table shows them
GROUPS = ("workload", "model", "layout", "forward", "gemm", "message", "time")

_ENTRIES = (
    # workload
    Notation("b", "b", "batch: sequences generated together", "workload", "Workload.b", "--batch", "batch"),
    Notation("S", "S", "prompt length (tokens per sequence)", "workload", "Workload.S", "--prompt", "prompt"),
    Notation("G", "G", "generated tokens per sequence (1 prefill + G−1 decode forwards)", "workload", "Workload.G",
             "--generate", "generate"),
    Notation("w", "w", "bytes per element of the model dtype (fp32 4, bf16/fp16 2)", "workload", "Workload.w",
             "--dtype", "dtype"),
    Notation("w_kv", r"w_{\mathrm{kv}}", "bytes per element of the KV cache (the model dtype's w, or fp8: 1)",
             "workload", "Disaggregation.w_kv", "--kv-dtype", "kv_dtype"),
    # model
    Notation("h", "h", "hidden size", "model", "ModelSpec.h", "", "", "hidden_size"),
    Notation("L", "L", "decoder layers", "model", "ModelSpec.L", "", "", "num_hidden_layers"),
    Notation("V", "V", "vocabulary size", "model", "ModelSpec.V", "", "", "vocab_size"),
    Notation("a", "a", "attention (query) heads", "model", "ModelSpec.heads", "", "", "num_attention_heads"),
    Notation("a_kv", "a_{kv}", "key-value heads", "model", "ModelSpec.kv_heads", "", "", "num_key_value_heads"),
    Notation("d", "d", "head dimension", "model", "ModelSpec.head_dim", "", "", "head_dim"),
    Notation("F", "F", "FFN (MLP intermediate) width", "model", "ModelSpec.ffn", "", "", "intermediate_size"),
    Notation("E", "E", "routed experts per MoE layer", "model", "MoESpec.experts", "", "",
             "num_local_experts (Mixtral), num_experts (Qwen-MoE)"),
    Notation("k", "k", "experts each token is routed to (top-k)", "model", "MoESpec.top_k", "", "",
             "num_experts_per_tok"),
    Notation("F_ex", r"F_{\mathrm{ex}}", "FFN width of one routed expert", "model", "MoESpec.expert_ffn", "", "",
             "intermediate_size (Mixtral), moe_intermediate_size (Qwen-MoE)"),
    Notation("F_sh", r"F_{\mathrm{sh}}", "FFN width of the shared expert (0: none)", "model", "MoESpec.shared_ffn",
             "", "", "shared_expert_intermediate_size"),
    Notation("L_moe", r"L_{\mathrm{moe}}", "MoE layers (the others are dense)", "model", "ModelSpec.L_moe", "", "",
             "decoder_sparse_step, mlp_only_layers"),
    # layout
    Notation("t", "t", "tensor-parallel degree (ranks of a TP group)", "layout", "Layout.t", "--tp", "tp"),
    Notation("p", "p", "pipeline-parallel degree (stages)", "layout", "Layout.p", "--pp", "pp"),
    Notation("e", "e", "expert-parallel degree: ranks that split the experts, each running attention on b/e "
             "sequences", "layout", "Layout.e", "--ep", "ep"),
    Notation("N", "N", "GPUs (ranks) of a layout, N = t·p (N = e with expert parallelism)", "layout", "Layout.ranks",
             "--gpus", "gpus"),
    Notation("t_P", r"t_{\mathrm{P}}", "TP degree of the prefill side of a disaggregated layout", "layout",
             "Disaggregation.prefill.t", "--prefill-tp", "prefill_tp"),
    Notation("p_P", r"p_{\mathrm{P}}", "PP degree of the prefill side", "layout", "Disaggregation.prefill.p",
             "--prefill-pp", "prefill_pp"),
    Notation("t_D", r"t_{\mathrm{D}}", "TP degree of the decode side", "layout", "Disaggregation.decode.t",
             "--decode-tp", "decode_tp"),
    Notation("p_D", r"p_{\mathrm{D}}", "PP degree of the decode side", "layout", "Disaggregation.decode.p",
             "--decode-pp", "decode_pp"),
    Notation("g", "g", "GPUs per node (ranks placed in order, g per node)", "layout", "gpus_per_node",
             "--gpus-per-node", "gpus_per_node"),
    # one forward
    Notation("s", "s", "tokens one forward carries per sequence (S in the prefill, 1 in a decode step)", "forward",
             "s"),
    Notation("T", "T", "tokens one rank computes in one forward, T = b·s (the rows M_g of its linear layers' GEMMs)",
             "forward", "tokens"),
    Notation("ell", r"\ell", "tokens already in the KV cache before a forward", "forward", "kv_len"),
    Notation("c", "c", "keys one query attends to (mean over a forward)", "forward", "ctx", "", "", "",
             integer=False),
    Notation("gamma", r"\gamma", "capacity factor of capacity-based routing (DeepSpeed eval_capacity_factor)",
             "forward", "Routing.capacity_factor", "--capacity-factor", "capacity_factor", integer=False),
    Notation("C_min", r"C_{\min}", "minimum expert capacity (DeepSpeed min_capacity)", "forward",
             "Routing.min_capacity", "--min-capacity", "min_capacity"),
    Notation("C", "C", "expert capacity: token slots per expert in one forward, the same on every EP rank",
             "forward", "capacity"),
    Notation("kappa", r"\kappa", "routes one EP rank's tokens send to one expert in one forward (dropless counts)",
             "forward", "counts"),
    Notation("phi", r"\varphi", "routing skew: the share of an EP rank's tokens its busiest expert receives (dropless)",
             "forward", "Routing.skew", "", "phi", integer=False),
    # one GEMM [M_g, K_g]×[K_g, N_g] (llmcomm.predict.kernels); the GEMM literature's M, N, K, which name the columns
    # of the GEMM op records and of the public kernel tables (N alone would be the GPUs of a layout)
    Notation("M_g", r"M_{\mathrm{g}}", "GEMM rows: the tokens it computes (T for a layer's linear layers, the rows one "
             "expert computes in a MoE layer)", "gemm", "M_g", "", "M"),
    Notation("N_g", r"N_{\mathrm{g}}", "GEMM columns: the output features of one rank's weight shard", "gemm", "N_g",
             "", "N"),
    Notation("K_g", r"K_{\mathrm{g}}", "GEMM inner (reduction) dimension: the input features of the shard", "gemm",
             "K_g", "", "K"),
    # messages
    Notation("m", "m", "message size in bytes, as nccl-tests defines it for the op", "message", "size_bytes", "",
             "message_bytes"),
    Notation("B", "B", "KV block (page) size in tokens of a paged KV cache", "message", "Disaggregation.block",
             "--kv-block", "kv_block"),
    Notation("n", "n", "ranks in the group a collective runs on", "message", "group_size", "--ranks",
             "group_size"),
    # time
    Notation("alpha", r"\alpha", "latency of one algorithm step (s)", "time", "alpha_s", "", "alpha_us",
             integer=False),
    Notation("beta", r"\beta", "inverse bus bandwidth (s per byte)", "time", "beta_s_per_B", "", "busbw_GBps",
             integer=False),
    Notation("tau", r"\tau", "a time (s)", "time", "seconds", "", "seconds", integer=False),
)

#: name → :class:`Notation`, in table order
NOTATION: dict[str, Notation] = {x.name: x for x in _ENTRIES}
assert len(NOTATION) == len(_ENTRIES), "a symbol is defined twice"
assert len({x.latex for x in _ENTRIES}) == len(_ENTRIES), "two symbols print alike"


def symbol(name: str) -> sp.Symbol:
    """The sympy symbol of ``name`` (one object per name, project-wide)."""
    return NOTATION[name].symbol



# The symbols as module attributes, for ``from llmcomm.notation import b, S, G, h, L, V, t, p, w, s``.
b, S, G, w = (symbol(x) for x in ("b", "S", "G", "w"))
h, L, V, a, a_kv, d, F = (symbol(x) for x in ("h", "L", "V", "a", "a_kv", "d", "F"))
E, k, F_ex, F_sh, L_moe = (symbol(x) for x in ("E", "k", "F_ex", "F_sh", "L_moe"))
t, p, e, N, g = (symbol(x) for x in ("t", "p", "e", "N", "g"))
s, T, ell, c = (symbol(x) for x in ("s", "T", "ell", "c"))
M_g, N_g, K_g = (symbol(x) for x in ("M_g", "N_g", "K_g"))
gamma, C_min, C, kappa = (symbol(x) for x in ("gamma", "C_min", "C", "kappa"))
m, n = symbol("m"), symbol("n")
w_kv, B = symbol("w_kv"), symbol("B")
t_P, p_P, t_D, p_D = (symbol(x) for x in ("t_P", "p_P", "t_D", "p_D"))
alpha, beta, tau = symbol("alpha"), symbol("beta"), symbol("tau")
