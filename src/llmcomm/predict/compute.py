"""Compute time of one forward: a per-layer roofline with stated efficiencies (symbols of :mod:`llmcomm.notation`).

Per rank, per decoder layer, one forward over ``s`` new tokens per sequence, ``ell`` tokens already cached, ``c``
keys attended per query (mean), weights sharded 1/t::

    P_l   = (2·h·a·d + 2·h·a_kv·d + 3·h·F)/t + 2h                       weights of one layer on one rank
    flops = 2·b·s·(P_l − 2h) + 4·b·s·c·(a/t)·d                           matmul + attention (QKᵀ and AV)
    bytes = w·P_l + w·b·(ell + s)·2·(a_kv/t)·d + w·b·s·A                 weights + KV read/write + activations
    A     = 14h + (4·a + 2·a_kv)·d/t + 6·F/t                              activations read and written per token
    τ_l   = max(flops / (peak·e_f), bytes / (bw·e_m)) + o                 roofline + per-layer overhead o

Prefill: s = S, ell = 0, c = (S+1)/2 (causal). Decode, the mean of the G−1 steps: s = 1, ell = S + G/2 − 1,
c = S + G/2. Embedding (first stage, replicated): 2·b·s·h·w bytes. Final norm + lm_head (last stage, row-parallel
under AutoTP): 2·b·h·V/t flops (only the last position's logits, as HF ``generate`` keeps) and w·h·V/t + 4·b·V
bytes, plus one overhead o. One batch crosses the p stages in sequence, so a forward costs the sum:
``L·τ_l + τ_embed + τ_head``.
"""
from __future__ import annotations

import numpy as np

from ..spec import ModelSpec
from .hardware import Hardware

__all__ = ["layer_cost", "phase_context", "forward_compute"]


def layer_cost(model: ModelSpec, t, b, s, kv_len, ctx, w):
    """(flops, bytes) of one decoder layer forward on one rank: ``s`` new tokens, ``kv_len`` (ell) cached before,
    ``ctx`` (c) mean keys attended per query. All arguments broadcast (scalars stay scalars)."""
    return _layer_cost_inv(model, 1.0 / np.asarray(t, dtype=float), b, s, kv_len, ctx, w)


def _layer_cost_inv(model: ModelSpec, inv_t, b, s, kv_len, ctx, w):
    """:func:`layer_cost` factorised in 1/t (fewer temporaries over big grids)."""
    h, d, a, a_kv, ffn = model.h, model.head_dim, model.heads, model.kv_heads, model.ffn
    weights = 2 * h * a * d + 2 * h * a_kv * d + 3 * h * ffn          # matmul weights of a layer (unsharded)
    bs = b * s
    flops = bs * inv_t * (2 * weights + (4 * a * d) * ctx)
    nbytes = w * (inv_t * (weights + (2 * a_kv * d) * b * (kv_len + s) + ((4 * a + 2 * a_kv) * d + 6 * ffn) * bs)
                  + 2 * h + 14 * h * bs)
    return flops, nbytes


def phase_context(phase: str, S, G):
    """(s, ell, c) of a phase's forward: prefill s = S, ell = 0, c = (S+1)/2; decode (the mean step) s = 1,
    ell = S + G/2 − 1, c = S + G/2."""
    if phase == "prefill":
        S = np.asarray(S, dtype=float)
        return S, 0.0, (S + 1) / 2
    if phase == "decode":
        mean = np.asarray(S, dtype=float) + np.asarray(G, dtype=float) / 2
        return 1.0, mean - 1, mean
    raise ValueError(f"unknown phase {phase!r}")


def forward_compute(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, inv_t=None) -> dict:
    """Compute seconds of one forward of ``phase`` summed over all stages (one batch crosses them in sequence):
    ``{"compute_s", "layer_s", "flops", "bytes", "compute_bound"}``."""
    s, kv_len, ctx = phase_context(phase, S, G)
    if inv_t is None:
        inv_t = 1.0 / np.asarray(t, dtype=float)
    b = np.asarray(b, dtype=float)
    w = np.asarray(w, dtype=float)
    f32, f16 = hw.flops("fp32"), hw.flops("bf16")
    if w.ndim == 0:
        inv_rate = 1.0 / (f32 if w >= 4 else f16)
    else:
        inv_rate = np.where(w >= 4, 1.0 / f32, 1.0 / f16)     # w = 2: bf16/fp16 tensor-core rate
    inv_bw, overhead = 1.0 / hw.bandwidth(), hw.layer_overhead_s
    fl, by = _layer_cost_inv(model, inv_t, b, s, kv_len, ctx, w)
    sec_fl, sec_by = fl * inv_rate, by * inv_bw
    layer_s = np.maximum(sec_fl, sec_by) + overhead
    h, V = model.h, model.V
    bsh = b * s * h
    emb_bytes = 2 * w * bsh
    head_flops = (2 * h * V) * b * inv_t
    head_bytes = w * ((h * V) * inv_t + bsh) + (4 * V) * b
    head_s = np.maximum(head_flops * inv_rate, head_bytes * inv_bw) + overhead
    total = model.L * layer_s + emb_bytes * inv_bw + head_s
    return {"compute_s": total, "layer_s": layer_s, "flops": model.L * fl + head_flops,
            "bytes": model.L * by + emb_bytes + head_bytes, "compute_bound": sec_fl >= sec_by}
