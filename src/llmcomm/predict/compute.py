"""Compute time of one forward: the sum of its kernels (:mod:`.kernels`) plus the framework's host overhead per layer.

Per rank, per decoder layer, one forward over ``s`` new tokens per sequence, ``ell`` tokens already cached, ``c``
keys attended per query (mean), weights sharded 1/t: the layer's ops (:func:`llmcomm.predict.kernels.layer_ops`:
four GEMMs, norms, rotary, SiLU·mul, residual adds, attention) each cost their kernel time on the device
(:meth:`llmcomm.predict.hardware.Hardware.kernels`), and the layer adds the host overhead ``o`` of the host
profile (:mod:`.profiles`: eager kernel launches, or none under CUDA graphs)::

    τ_l = Σ_ops τ_op(T = b·s, shapes / t) + o          CPU ranks (the ops run on the host itself)
    τ_l = max(Σ_ops τ_op, o)                            GPUs (the host enqueues while the device runs)

Prefill: s = S, ell = 0, c = (S+1)/2 (causal). Decode, the mean of the G−1 steps: s = 1, ell = S + G/2 − 1,
c = S + G/2. Embedding (first stage, replicated): a gather of b·s rows of h. Final norm + lm_head (last stage,
only the last position's logits, as HF ``generate`` keeps them): a norm over b rows and the GEMM [b, h/t]×[h/t, V]
of AutoTP's row-parallel head (vLLM's column-parallel head, [b, h]×[h, V/t], has the same FLOPs and weight bytes),
plus one overhead o. One batch crosses the p stages in sequence, so a forward costs the sum:
``L·τ_l + τ_embed + τ_head``.

A mixture of experts (``model.is_moe``): its L_moe MoE layers cost the MoE ops of
:func:`llmcomm.predict.kernels.layer_ops` under the deployment's expert layout (:func:`expert_layout`: experts whole
on every TP rank under ``autotp``, sharded t ways under ``tp-experts``, E/e per rank on the e·C rows of the capacity
buffer under ``ep``; :data:`llmcomm.deployment.EXPERT_LAYOUTS`), its L − L_moe dense layers the dense ops; a forward costs
``(L − L_moe)·τ_dense + L_moe·τ_moe + τ_embed + τ_head``. A MoE layer's host overhead is its own (``moe_overhead_s``:
the host profile's count of the MoE block's ops in place of the dense MLP's,
:meth:`llmcomm.predict.profiles.HostProfile.moe_layer_overhead_s`). Under expert parallelism every rank runs attention,
embedding and head on its own b/e sequences (data-parallel attention).

``flops`` and ``bytes`` (what :func:`layer_cost` returns) are those of the same ops: GEMM operands read once and
results written, the KV cache read, every memory-bound op's reads and writes.
"""
from __future__ import annotations

import numpy as np

from ..deployment import EXPERT_LAYOUTS, Routing
from ..spec import ModelSpec, SpecError
from .hardware import Hardware
from .kernels import ExpertLayout, gemm_time, layer_ops, memop_time, op_times

__all__ = ["layer_cost", "phase_context", "forward_compute", "layer_op_times", "expert_layout"]


def expert_layout(model: ModelSpec, experts: str | None, t, e: int, b, s, routing=None) -> ExpertLayout | None:
    """The :class:`~llmcomm.predict.kernels.ExpertLayout` of one forward over ``s`` tokens per sequence of ``b``
    under the expert layout ``experts`` (:data:`llmcomm.deployment.EXPERT_LAYOUTS`; None for a dense model; a
    mixture of experts without one: ``autotp``, or ``ep`` when e > 1). Expert parallelism takes the capacity C of the
    forward from ``routing`` (:func:`llmcomm.derive.moe.forward_capacity`, default DeepSpeed's capacity routing),
    point by point over broadcast ``b`` and ``s``."""
    if not model.is_moe:
        return None
    kind = experts or ("ep" if int(e) > 1 else "autotp")
    if kind not in EXPERT_LAYOUTS:
        raise SpecError(f"expert layout {kind!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
    if (kind == "ep") != (int(e) > 1):
        raise SpecError(f"expert layout {kind!r} with e={int(e)}: expert parallelism needs e > 1, the others e = 1")
    if kind != "ep":
        return ExpertLayout(t_exp=t if kind == "tp-experts" else 1)
    from ..derive.moe import forward_capacity

    routing = routing or Routing()
    cap = np.vectorize(lambda bb, ss: forward_capacity(routing, model.E, model.moe.top_k, int(bb), int(ss), int(e)),
                       otypes=[float])(b, s)
    return ExpertLayout(t_exp=1, e=int(e), C=cap[()] if cap.ndim == 0 else cap)


def layer_cost(model: ModelSpec, t, b, s, kv_len, ctx, w, experts: ExpertLayout | None = None):
    """(flops, bytes) of one decoder layer forward on one rank: ``s`` new tokens, ``kv_len`` (ell) cached before,
    ``ctx`` (c) mean keys attended per query; ``experts``: a MoE layer so laid out. All arguments broadcast (scalars
    stay scalars)."""
    ops = layer_ops(model, t, b, s, kv_len, ctx, w, experts)
    flops = sum(op.get("flops", 0.0) * op.get("count", 1) for op in ops.values())
    nbytes = sum(op["bytes"] * op.get("count", 1) for op in ops.values())
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


def _w_scalar(w):
    w = np.asarray(w, dtype=float)
    if w.ndim and not (w == w.flat[0]).all():
        raise ValueError("one forward_compute call takes one dtype (bytes per element w)")
    return float(w.flat[0]) if w.ndim else float(w)


def layer_op_times(model: ModelSpec, hw: Hardware, t, b, s, kv_len, ctx, w,
                   experts: ExpertLayout | None = None) -> dict:
    """Seconds of each op of one decoder layer on one rank (``llmcomm cost`` and :func:`forward_compute`)."""
    w = _w_scalar(w)
    return op_times(layer_ops(model, t, b, s, kv_len, ctx, w, experts), hw.kernels(w), w)


def forward_compute(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, inv_t=None,
                    overhead_s=None, host_overlaps: bool = False, experts: str | None = None, e: int = 1,
                    routing=None, moe_overhead_s=None) -> dict:
    """Compute seconds of one forward of ``phase`` summed over all stages (one batch crosses them in sequence):
    ``{"compute_s", "layer_s", "flops", "bytes", "compute_bound"}``. ``overhead_s``: host seconds per layer (the
    host profile's, :meth:`llmcomm.predict.profiles.HostProfile.layer_overhead_s`; default the hardware
    preset's calibrated ``layer_overhead_us``). ``host_overlaps``: the host enqueues kernels while the device runs
    (a GPU): a layer costs max(host, kernels); else (CPU ranks run their ops themselves) the sum.

    A mixture of experts takes its expert layout ``experts`` (:func:`expert_layout`), the EP degree ``e`` and, for
    expert parallelism, the ``routing``; ``layer_s`` is then the mean over the L layers, ``b`` the whole batch (each
    EP rank computes b/e sequences). ``moe_overhead_s``: host seconds per MoE layer (the host profile's
    :meth:`~llmcomm.predict.profiles.HostProfile.moe_layer_overhead_s`: the MoE block's counted host ops in place of
    the dense MLP's; default ``overhead_s``)."""
    s, kv_len, ctx = phase_context(phase, S, G)
    t = np.asarray(t, dtype=float) if inv_t is None else 1.0 / np.asarray(inv_t, dtype=float)
    b = np.asarray(b, dtype=float)
    w = _w_scalar(w)
    kern = hw.kernels(w)
    overhead = hw.layer_overhead_s if overhead_s is None else overhead_s
    join = np.maximum if host_overlaps else np.add
    if model.is_moe:
        xl = expert_layout(model, experts, t, e, b, s, routing)
        b = b / xl.e                                    # data-parallel attention: b/e sequences per EP rank
        moe_overhead = overhead if moe_overhead_s is None else moe_overhead_s
        kinds = [(layers, x, o) for layers, x, o in ((model.L - model.L_moe, None, overhead),
                                                     (model.L_moe, xl, moe_overhead)) if layers]
    else:
        kinds = [(model.L, None, overhead)]
    layers_s, flops, nbytes = 0.0, 0.0, 0.0
    for layers, xl, layer_overhead in kinds:
        ops = layer_ops(model, t, b, s, kv_len, ctx, w, xl)
        one_s = join(sum(op_times(ops, kern, w).values()), layer_overhead)
        layers_s = layers_s + layers * one_s
        flops = flops + layers * sum(op.get("flops", 0.0) * op.get("count", 1) for op in ops.values())
        nbytes = nbytes + layers * sum(op["bytes"] * op.get("count", 1) for op in ops.values())
    layer_s = one_s if len(kinds) == 1 else layers_s / model.L
    h, V = model.h, model.V
    T = b * s
    emb_s = memop_time(2 * w * T * h, 2 * w * h, kern["memops"].get("emb") or kern["memops"]["add"])
    head_norm_s = memop_time(2 * w * b * h, 2 * w * h, kern["memops"]["rmsnorm"])
    head_gemm_s = gemm_time(b, V, h / t, w, kern["gemm"])
    head_s = join(head_norm_s + head_gemm_s, overhead)
    head_flops = 2 * b * h * V / t
    head_bytes = w * (b * h / t + h * V / t + b * V) + 2 * w * b * h
    emb_bytes = 2 * w * T * h
    total = layers_s + emb_s + head_s
    flops_per_s, bytes_per_s = float(kern["gemm"]["flops_per_s"]), float(kern["gemm"]["bytes_per_s"])
    return {"compute_s": total, "layer_s": layer_s, "flops": flops + head_flops,
            "bytes": nbytes + emb_bytes + head_bytes, "compute_bound": flops / flops_per_s >= nbytes / bytes_per_s}
