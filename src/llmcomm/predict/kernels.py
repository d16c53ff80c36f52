"""What one op of a decoder layer costs on one device: GEMMs, memory-bound ops and attention, per TP rank.

One compute model for every caller: :func:`llmcomm.predict.compute.forward_compute` (the latency model, ``predict``,
``advise``) and ``llmcomm cost`` both sum :func:`op_times`. numpy throughout: scalars or arrays in, seconds out.

GEMMs (:func:`gemm_time`): [M_g, K_g]×[K_g, N_g], ``w`` bytes per element
-------------------------------------------------------------------------
The GEMM dimensions are notation symbols of their own (:mod:`llmcomm.notation`, group "gemm"): M_g rows (the T tokens
of a layer's linear op), N_g columns, K_g the inner dimension; an op record spells them ``"M"``, ``"N"``, ``"K"``.
A tiled kernel gives each thread block (CTA) one tm×tn output tile and loops over K_g::

    tm(M_g)    = tm_small if M_g <= m_small else tm        (small-M_g kernels use 64-row tiles)
    tiles      = ceil(M_g/tm) · ceil(N_g/tn)               (tile padding: a partial tile costs a full one)
    split-K    : pieces = tiles·split (split from ``splits``, ceil(K_g/split) >= kmin);
                 waves = ceil(pieces/SM) with wave quantisation, else max(pieces/SM, 1)
    τ_comp     = min over split of [ waves · 2·tm·tn·(ceil(K_g/split) + K0) / (flops_per_s/SM)
                                     + [split>1]·8·M_g·N_g·split/bytes_per_s ]
                 (K0: pipeline fill and epilogue in K-steps; fp32 partials of split-K written and read), also
                 minimised over ``alt_tiles`` (a smaller tile at efficiency ``eff`` < 1)
    τ_mem      = w·(M_g·K_g + K_g·N_g + M_g·N_g) / bytes_per_s      (each operand streamed from HBM once)
    τ          = t0 + (τ_mem^q + τ_comp^q)^(1/q),  q = norm_order   (smooth max; q → ∞ is the hard roofline)

Per device (the keys of the ``kernels`` → ``gemm`` section): ``flops_per_s`` (achieved tensor FLOP/s at 2-byte
elements), ``bytes_per_s`` (achieved HBM B/s), ``t0`` (kernel floor), ``norm_order``, ``K0``, the alternative tile's
efficiency, and stated structure (SM count, tile shape, wave quantisation, split-K menu). Fitted to public kernel
times (:mod:`llmcomm.compare.vidur`); a device without a tile structure (a CPU) is the plain roofline
``t0 + smooth-max(τ_mem, τ_comp)`` with τ_comp = 2·M_g·N_g·K_g/flops_per_s, and, with ``gemv_bytes_per_s``, one-row
products streamed at that rate (a CPU BLAS's matrix-vector kernel; :mod:`llmcomm.compare.cpu_calibration`).

Memory-bound ops (:func:`memop_time`): one CTA per token row::

    τ = t0 + ((bytes/bytes_per_s)^4 + (row_bytes/b_row)^4)^(1/4)

``bytes`` are what the op reads and writes, ``row_bytes`` one token's row: at small T only T CTAs run, each streams
its row at ``b_row``, so time stops falling with T. Parameters per (device, kernel kind).

Mixture-of-experts layers (:func:`layer_ops` with an :class:`ExpertLayout`): the dense MLP is replaced by the
router GEMM [T, h]×[h, E] and the experts' GEMMs [M_g, h]×[h, 2F_ex/t_exp] (gate_up) and [M_g, F_ex/t_exp]×[·, h]
(down) with their SiLU·mul, plus the always-on shared expert (Qwen2-MoE) as a dense MLP of width F_sh — as the
pinned stack runs them:

* the TP schemes (``autotp``, ``tp-experts``) run the HF sparse block, whose experts transformers 5.24 computes with
  ``experts_implementation="grouped_mm"`` by default (proof ``tools/proofs/experts_grouped_mm.py``): ONE grouped
  GEMM per projection over the T·k routed rows sorted by expert — priced as a grouped GEMM (below) of
  ``groups`` = the experts the T tokens touch (:func:`touched_experts`: an expectation under uniform routing), each
  on M_g = T·k/groups rows;
* expert parallelism (e > 1) runs DeepSpeed's MoE layer, a Python loop over its E/e local experts, each an
  ``nn.Linear`` pair on the whole capacity-padded buffer: E/e separate GEMMs of M_g = e·C rows.

Grouped GEMMs (``groups`` = n_g): n_g problems [M_g, K_g]×[K_g, N_g] in one kernel::

    tiles  = n_g · ceil(M_g/tm) · ceil(N_g/tn)    (every group pads its own tiles; all share one wave schedule)
    τ_comp = min over tiles of waves · 2·tm·tn·(K_g + K0) / (flops_per_s/SM)       (no split-K)
    τ_mem  = w · n_g · (M_g·K_g + K_g·N_g + M_g·N_g) / bytes_per_s                 (each group's weights read once)
    τ      = t0 + (τ_mem^q + τ_comp^q)^(1/q)                                        (one launch: one floor)

ASSUMPTION (no public grouped-GEMM times were fitted): the grouped kernel (torch's ``grouped_mm``, CUTLASS on SM80+)
runs its tiles at the per-SM rate and streams at the HBM rate of the dense GEMMs the ``gemm`` parameters were
fitted on (Vidur's linear-op times, :mod:`llmcomm.compare.vidur`; cuBLAS): a grouped GEMM is priced as the dense
GEMM of the same tiles, FLOPs and bytes, with one floor and no split-K (torch's grouped kernel has none). On a CPU
preset (no tile structure) it is the roofline of the groups' FLOPs and bytes, one t0.

Attention (:func:`attention_time`) — **not validated** (the public data have no attention kernel times): a roofline
of its FLOPs 4·b·s·c·(a/t)·d at the GEMM rate ``flops_per_s`` and its bytes (KV cache read, q/o read and written) at
``bytes_per_s``, plus t0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..spec import ModelSpec, SpecError
from .unique import on_unique

__all__ = ["LINEAR_OPS", "MEMORY_OPS", "MOE_MEMORY_OPS", "DEFAULT_SPLITS", "ExpertLayout", "touched_experts",
           "gemm_time", "gemm_time_parts", "memop_time", "attention_time", "layer_ops", "op_times", "roofline_device"]

#: the linear layers of a decoder layer, in the public data's names (one TP rank's shard)
LINEAR_OPS = ("qkv_proj", "attn_out_proj", "mlp_gate_up_proj", "mlp_down_proj")
#: memory-bound ops of a layer and their kernel kind (kinds share fitted parameters)
MEMORY_OPS = {"input_norm": "rmsnorm", "post_attention_norm": "rmsnorm", "rope": "rope", "mlp_act": "silu_mul",
              "residual_add": "add"}
#: memory-bound ops of a MoE layer's MLP and their kernel kind (the dense ``mlp_act`` is replaced by these)
MOE_MEMORY_OPS = {"expert_act": "silu_mul", "shared_expert_act": "silu_mul"}
DEFAULT_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)


def _tile_m(M_g, params):
    return np.where(M_g <= params.get("m_small", 64), params.get("tm_small", 64), params["tm"])


def gemm_time_parts(M_g, N_g, K_g, w, params: Mapping[str, Any], groups=None):
    """(τ_mem, τ_comp) in seconds, before the floor and the smooth max (module doc). ``groups``: a grouped GEMM of
    that many [M_g, K_g]×[K_g, N_g] problems in one kernel (:func:`gemm_time`); None: one plain GEMM."""
    M_g, N_g, K_g = (np.asarray(x, dtype=float) for x in (M_g, N_g, K_g))
    n_g = 1.0 if groups is None else np.asarray(groups, dtype=float)
    flops_per_s, bytes_per_s = float(params["flops_per_s"]), float(params["bytes_per_s"])
    tau_mem = np.asarray(w, dtype=float) * n_g * (M_g * K_g + K_g * N_g + M_g * N_g) / bytes_per_s
    if "gemv_bytes_per_s" in params:       # a CPU BLAS: one row is a matrix-vector product, streamed at its own rate
        tau_mem = np.where(M_g <= 1, tau_mem * bytes_per_s / float(params["gemv_bytes_per_s"]), tau_mem)
    if "sm" not in params:                                   # no tile structure: the plain roofline
        return tau_mem, 2.0 * n_g * M_g * N_g * K_g / flops_per_s
    sm, K0, kmin = float(params["sm"]), float(params.get("K0", 0.0)), float(params.get("kmin", 128))
    per_sm = flops_per_s / sm
    tau_comp = np.full(np.broadcast(M_g, N_g, K_g, n_g).shape, np.inf)
    shapes = [(_tile_m(M_g, params).astype(float), float(params["tn"]), 1.0)]
    for tm_a, tn_a, eff in params.get("alt_tiles", []):
        shapes.append((np.full_like(M_g, float(tm_a)), float(tn_a), float(eff)))
    splits = params.get("splits", DEFAULT_SPLITS) if groups is None else (1,)
    for tm, tn, eff in shapes:
        tiles = n_g * np.ceil(M_g / tm) * np.ceil(N_g / tn)
        for split in splits:
            ks = np.ceil(K_g / split)
            pieces = tiles * split
            waves = np.ceil(pieces / sm) if params.get("wave_quant", True) else np.maximum(pieces / sm, 1.0)
            tau = waves * 2.0 * tm * tn * (ks + K0) / (per_sm * eff)
            if split > 1:
                tau = tau + 8.0 * M_g * N_g * split / bytes_per_s
            ok = (ks >= kmin) | (split == 1)
            tau_comp = np.where(ok, np.minimum(tau_comp, tau), tau_comp)
    return tau_mem, tau_comp


def _smooth_max(x, y, q: float):
    if not np.isfinite(q):
        return np.maximum(x, y)
    hi = np.maximum(np.maximum(x, y), 1e-300)                # overflow-safe
    if q == 4.0:                                             # the memory-bound ops' norm: products, not pow (5× faster)
        rx, ry = x / hi, y / hi
        rx, ry = rx * rx, ry * ry
        return hi * np.sqrt(np.sqrt(rx * rx + ry * ry))
    return hi * ((x / hi) ** q + (y / hi) ** q) ** (1.0 / q)


def gemm_time(M_g, N_g, K_g, w, params: Mapping[str, Any], groups=None):
    """Kernel seconds of the GEMM [M_g, K_g]×[K_g, N_g] with ``w``-byte elements on the device ``params``;
    ``groups``: a grouped GEMM, that many such problems in ONE kernel (one floor t0, the groups' tiles in one wave
    schedule, no split-K, the bytes of every group — the module docs' *Grouped GEMMs*). Over a grid: once per
    distinct shape (:func:`llmcomm.predict.unique.on_unique`)."""
    t0, q = float(params.get("t0", 0.0)), float(params.get("norm_order", np.inf))
    def one(m_rows, n_cols, k_inner, width, n_groups=None):
        return t0 + _smooth_max(*gemm_time_parts(m_rows, n_cols, k_inner, width, params, n_groups), q)
    return on_unique(one, M_g, N_g, K_g, w) if groups is None else on_unique(one, M_g, N_g, K_g, w, groups)


def memop_time(nbytes, row_bytes, params: Mapping[str, Any]):
    """Kernel seconds of a memory-bound op: t0 + 4-norm smooth max of (bytes/bytes_per_s, row_bytes/b_row)."""
    by_bytes = np.asarray(nbytes, dtype=float) / float(params["bytes_per_s"])
    by_row = np.asarray(row_bytes, dtype=float) / float(params.get("b_row", np.inf))
    return float(params.get("t0", 0.0)) + _smooth_max(by_bytes, by_row, 4.0)


def attention_time(flops, nbytes, gemm: Mapping[str, Any]):
    """Attention seconds (unvalidated roofline): t0 + max(flops/flops_per_s, bytes/bytes_per_s) with the device's
    GEMM rates."""
    return float(gemm.get("t0", 0.0)) + np.maximum(np.asarray(flops, dtype=float) / float(gemm["flops_per_s"]),
                                                   np.asarray(nbytes, dtype=float) / float(gemm["bytes_per_s"]))


def roofline_device(flops_per_s: float, bytes_per_s: float, t0: float = 0.0) -> dict:
    """Kernel parameters of a device described by two rates only (a CPU preset): every GEMM, memory-bound op and
    attention is ``t0 + max(flops/flops_per_s, bytes/bytes_per_s)``."""
    gemm = {"flops_per_s": float(flops_per_s), "bytes_per_s": float(bytes_per_s), "t0": float(t0)}
    mem = {"bytes_per_s": float(bytes_per_s), "t0": float(t0)}
    return {"gemm": gemm, "memops": {kind: mem for kind in set(MEMORY_OPS.values()) | {"emb"}}}


@dataclass(frozen=True)
class ExpertLayout:
    """How one rank holds and computes the experts of a MoE layer (:func:`layer_ops`).

    ``t_exp``: the ways each expert's FFN is sharded — 1 under DeepSpeed AutoTP (``deepspeed-moe-autotp``: the fused
    expert tensors are bare Parameters AutoTP leaves whole, so every TP rank computes whole experts), t under
    ``tp-experts`` (the serving engines' column/row-sharded experts). ``e``: expert parallelism (``deepspeed-ep*``:
    E/e experts per rank, attention data-parallel over b/e sequences), with ``C`` the capacity of the forward
    (:func:`llmcomm.derive.moe.forward_capacity`; scalars or arrays)."""

    t_exp: Any = 1
    e: int = 1
    C: Any = 0


def touched_experts(E, k, T):
    """Expected number of distinct experts the ``T`` tokens of a forward route to: E·(1 − (1 − k/E)^T).

    ASSUMPTION (uniform routing, as the issue states it): every token picks a uniformly random set of k of the E
    experts, independently of the other tokens, so an expert is missed by one token with probability 1 − k/E. Real
    routers are skewed, which touches fewer experts (fewer weight bytes at decode, more tokens per expert)."""
    E, k, T = (np.asarray(x, dtype=float) for x in (E, k, T))
    return E * (1.0 - (1.0 - k / E) ** T)


def _gemm(M_g, N_g, K_g, w, count=None, groups=None) -> dict:
    n_g = 1 if groups is None else groups
    op = {"kind": "gemm", "M": M_g, "N": N_g, "K": K_g, "flops": 2 * n_g * M_g * N_g * K_g,
          "bytes": w * n_g * (M_g * K_g + K_g * N_g + M_g * N_g)}
    if count is not None:
        op["count"] = count
    if groups is not None:
        op["groups"] = groups
    return op


def _moe_mlp_ops(model: ModelSpec, T, w, xl: ExpertLayout) -> dict[str, dict]:
    """The MLP ops of one MoE layer on one rank that routes ``T`` tokens (module doc), as the pinned stack runs them:

    * without EP (the TP schemes: the HF sparse block, ``experts_implementation="grouped_mm"``, transformers 5.24's
      default — proof ``tools/proofs/experts_grouped_mm.py``): ONE grouped GEMM per projection over the T·k routed
      rows, grouped by expert (``groups`` = the experts touched, an expectation; M_g = T·k/groups rows each), and one
      SiLU·mul over the T·k rows;
    * with EP (DeepSpeed's MoE layer): a Python loop over the E/e local experts, one ``nn.Linear`` pair each on the
      e·C rows of its capacity buffer (``count`` = E/e calls of each GEMM and of the SiLU·mul).

    ASSUMPTION: the router ([T, h]×[h, E]) is whole on every rank (AutoTP leaves it unsharded: the measured bytes
    show no gather of router logits); the routing softmax/top-k and the token gather/scatter (DeepSpeed's dispatch
    and combine, HF's sort and index) are not charged as kernels (their host ops are: :mod:`.profiles`).
    ASSUMPTION: the shared expert (Qwen2-MoE) and its sigmoid gate are sharded like the routed experts (t_exp;
    unsharded under EP) and run on all T tokens."""
    moe, h = model.moe, model.h
    E, k, F_ex = moe.experts, moe.top_k, moe.expert_ffn
    t_exp = np.asarray(xl.t_exp, dtype=float)
    out = {"router": _gemm(T, E, h, w)}
    row = 3 * w * F_ex / t_exp
    if xl.e > 1:
        count = np.asarray(E / xl.e, dtype=float) + 0 * T
        M_g = xl.e * np.asarray(xl.C, dtype=float) + 0 * T
        out["expert_gate_up_proj"] = _gemm(M_g, 2 * F_ex / t_exp, h, w, count)
        out["expert_down_proj"] = _gemm(M_g, h, F_ex / t_exp, w, count)
        out["expert_act"] = {"kind": MOE_MEMORY_OPS["expert_act"], "bytes": M_g * row, "row_bytes": row + 0 * M_g,
                             "count": count}
    else:
        groups = touched_experts(E, k, T)
        M_g = T * k / groups
        out["expert_gate_up_proj"] = _gemm(M_g, 2 * F_ex / t_exp, h, w, groups=groups)
        out["expert_down_proj"] = _gemm(M_g, h, F_ex / t_exp, w, groups=groups)
        out["expert_act"] = {"kind": MOE_MEMORY_OPS["expert_act"], "bytes": T * k * row, "row_bytes": row + 0 * T}
    if moe.shared_ffn:
        F_sh = moe.shared_ffn
        out["shared_expert_gate_up_proj"] = _gemm(T, 2 * F_sh / t_exp, h, w)
        out["shared_expert_down_proj"] = _gemm(T, h, F_sh / t_exp, w)
        out["shared_expert_gate"] = _gemm(T, 1 + 0 * T, h, w)
        row = 3 * w * F_sh / t_exp
        out["shared_expert_act"] = {"kind": MOE_MEMORY_OPS["shared_expert_act"], "bytes": T * row,
                                    "row_bytes": row + 0 * T}
    return out


def layer_ops(model: ModelSpec, t, b, s, kv_len, ctx, w, experts: ExpertLayout | None = None) -> dict[str, dict]:
    """The ops of one decoder layer forward on one TP rank (``s`` new tokens per sequence of ``b``, ``kv_len``
    cached before, ``ctx`` mean keys attended per query), as a TP rank holds them under AutoTP or vLLM:

    * linear: ``{"kind": "gemm", "M", "N", "K", "flops", "bytes"}`` (the GEMM's M_g, N_g, K_g) with M_g = T = b·s
      tokens — qkv_proj [T,h]×[h,(a+2a_kv)d/t], attn_out_proj [T,a·d/t]×[·,h], mlp_gate_up_proj [T,h]×[h,2F/t],
      mlp_down_proj [T,F/t]×[·,h];
    * memory-bound: ``{"kind": <kernel kind>, "bytes", "row_bytes", "count"}`` (bytes of one call) — two RMSNorms
      over h, rotary on the local q and k heads, SiLU·mul over 2F/t → F/t, residual add of [T, h] (count 2);
    * attention: ``{"kind": "attention", "flops", "bytes"}`` — QKᵀ and AV over ``ctx`` keys, KV cache read and the
      new keys/values written.

    ``experts``: a MoE layer of ``model`` laid out so (:class:`ExpertLayout`): the two MLP GEMMs and ``mlp_act`` are
    replaced by the MoE ops (:func:`_moe_mlp_ops`: ``router``, ``expert_gate_up_proj``, ``expert_down_proj``,
    ``expert_act``, and the shared expert's when the model has one); without EP the expert GEMMs are grouped GEMMs
    (``groups`` = experts touched; ``flops`` and ``bytes`` of all groups: one call), with EP they carry ``count`` =
    E/e calls (``flops`` and ``bytes`` of one call, as for every op). Without it: a dense layer (MLP width
    ``model.ffn``).
    Under expert parallelism ``b`` is the rank's own b/e sequences (the caller divides).

    All values broadcast over array arguments."""
    t, b, s, kv_len, ctx, w = (np.asarray(x, dtype=float) for x in (t, b, s, kv_len, ctx, w))
    h, d, a, akv, ffn = model.h, model.head_dim, model.heads, model.kv_heads, model.ffn
    T = b * s
    moe = experts is not None
    if moe and not model.is_moe:
        raise SpecError(f"{model.name} is dense: it has no expert layout")
    out: dict[str, dict] = {}
    linear = (("qkv_proj", (a + 2 * akv) * d / t, h), ("attn_out_proj", h, a * d / t))
    if not moe:
        linear += (("mlp_gate_up_proj", 2 * ffn / t, h), ("mlp_down_proj", h, ffn / t))
    for name, N_g, K_g in linear:
        out[name] = _gemm(T, N_g, K_g, w)
    if moe:
        out.update(_moe_mlp_ops(model, T, w, experts))
    rows = {"input_norm": 2 * w * h, "post_attention_norm": 2 * w * h, "rope": 2 * w * (a + akv) / t * d,
            "mlp_act": 3 * w * ffn / t, "residual_add": 3 * w * h}
    if moe:
        del rows["mlp_act"]
    for name, row in rows.items():
        out[name] = {"kind": MEMORY_OPS[name], "bytes": T * row, "row_bytes": row + 0 * T,
                     "count": 2 if name == "residual_add" else 1}          # two residual adds per layer
    out["attention"] = {"kind": "attention", "flops": 4 * T * ctx * (a / t) * d,
                        "bytes": w * (b * (kv_len + s) * 2 * (akv / t) * d + 2 * T * (a / t) * d)}
    return out


def op_times(ops: Mapping[str, Mapping[str, Any]], kernels: Mapping[str, Any], w) -> dict[str, Any]:
    """Seconds of each op of :func:`layer_ops` (or any op list of the same form; ``count`` calls of it) on a device
    with kernel parameters ``kernels`` = ``{"gemm": {...}, "memops": {kind: {...}}}`` (:meth:`Hardware.kernels`)."""
    gemm, mem = kernels["gemm"], kernels["memops"]
    out = {}
    for name, op in ops.items():
        kind = op["kind"]
        if kind == "gemm":
            out[name] = gemm_time(op["M"], op["N"], op["K"], w, gemm, op.get("groups"))
        elif kind == "attention":
            out[name] = attention_time(op["flops"], op["bytes"], gemm)
        else:
            out[name] = memop_time(op["bytes"], op["row_bytes"], mem.get(kind) or mem["add"])
        if "count" in op:                                    # calls of the op (arrays for expected expert counts)
            out[name] = out[name] * op["count"]
    return out
