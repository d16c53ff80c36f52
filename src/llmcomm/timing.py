"""Latency model: TTFT, TPOT and E2E of one batch of requests from a roofline compute model and α-β collectives.

Compute (per rank, per decoder layer, one forward over ``s`` new tokens with a KV cache of ``n_kv`` tokens)::

    P_l   = [2·h·heads·hd + 2·h·kv·hd + 3·h·ffn]/t + 2h                      weights of one layer on one rank
    F_l   = 2·b·s·(P_l − 2h) + 4·b·s·c·(heads/t)·hd                           matmul + attention (QKᵀ and AV) FLOPs
    B_l   = w·P_l + w·b·(n_kv + s)·2·(kv/t)·hd + w·b·s·A                       weights + KV read/write + activations
    A     = 14h + (4·heads + 2·kv)·hd/t + 6·ffn/t                              activations read+written per token
    T_l   = max(F_l / (peak·e_f), B_l / (bw·e_m)) + o                          roofline + per-layer overhead o

with ``c`` the mean number of keys a query attends to: prefill (causal) ``c = (S+1)/2``, ``n_kv = S``; decode
(the mean over the G−1 steps) ``c = n_kv = S + G/2``. Embedding (first stage, replicated): ``2·b·s·h·w`` bytes.
Final norm + lm_head (last stage, row-parallel under AutoTP): ``2·b·h·V/t`` FLOPs (only the last position's logits,
as HF ``generate`` keeps) and ``w·h·V/t + 4·b·V`` bytes, plus one overhead ``o``.

A single batch passes the p stages one after another, so one forward costs the sum over stages:
``L·T_l + T_embed + T_head``.

Communication per forward: the engine's message list from :mod:`llmcomm.volumes` (``pattern(engine)``: op, group
size, calls, bytes per call, all symbolic), each call charged the α-β time of its op on its group
(:mod:`llmcomm.collectives`, parameters from :mod:`llmcomm.hardware`) at the right **link level**: ranks are placed
in order, ``gpus_per_node`` = K per node, TP groups are consecutive ranks; a TP group that spans nodes uses the
``inter`` link; a stage-to-stage send whose two ranks sit on different nodes uses the ``inter`` link. Calls on one
request's critical path are sequential (send_recv calls that scale with t are the t TP ranks' concurrent sends: one
charge per boundary).

Phases: ``TTFT = prefill forward``; ``TPOT = one decode forward`` at the mean KV length; ``E2E = TTFT + (G−1)·TPOT``.

What-if levers (book: "Choosing a layout"): ``comm_w`` (bytes per element on the wire), ``overlap`` (``max`` instead
of the sum of compute and communication: a bound), :func:`scale_links` (β / factor). CPU validation:
:func:`hardware_for_ranks` (the compute calibration at the runs' thread count), :func:`validate_latency` (measure,
predict from the calibration only, :func:`latency_errors`).

Everything is vectorised: :func:`predict_latency_grid` takes numpy arrays of t, p, b, S, G (broadcast together) and
evaluates millions of points per second; :func:`predict_latency` is the one-point form with a breakdown.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from functools import lru_cache
from typing import Any

import numpy as np

from .hardware import Hardware, load_hardware
from .spec import Layout, ModelSpec, SpecError, Workload, load_model, stage_layers

__all__ = ["layer_shapes", "layer_cost", "forward_compute", "forward_comm", "predict_latency",
           "predict_latency_grid", "tp_inter_fraction", "pp_inter_fraction", "placement_fractions",
           "placement_reference",
           "calibrate_compute", "dtype_of_width", "rank_threads", "hardware_for_ranks", "scale_links",
           "latency_errors", "measured_comm_s", "validate_latency", "METRICS"]

_W_TO_DTYPE = {4: "fp32", 2: "bf16"}


def dtype_of_width(w: int) -> str:
    return _W_TO_DTYPE.get(int(w), "fp32")


# ---------------------------------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------------------------------
def layer_shapes(model: ModelSpec, t) -> dict:
    """Per-rank weight and activation element counts of one decoder layer (``t`` scalar or array)."""
    t = np.asarray(t, dtype=float)
    h, hd, H, K, F = model.h, model.head_dim, model.heads, model.kv_heads, model.ffn
    matmul = (2 * h * H * hd + 2 * h * K * hd + 3 * h * F) / t
    return {"params": matmul + 2 * h, "matmul_params": matmul, "heads": H / t, "kv_heads": K / t,
            "act_per_token": 14 * h + (4 * H + 2 * K) * hd / t + 6 * F / t}


def layer_cost(model: ModelSpec, t, b, s, n_kv, ctx, w):
    """(FLOPs, bytes) of one decoder layer forward on one rank: ``s`` new tokens, ``n_kv`` cached keys before the
    step, ``ctx`` mean keys attended per query. All arguments broadcast (scalars stay scalars)."""
    return _layer_cost_inv(model, 1.0 / np.asarray(t, dtype=float), b, s, n_kv, ctx, w)


def _layer_cost_inv(model: ModelSpec, inv_t, b, s, n_kv, ctx, w):
    """:func:`layer_cost` factorised in 1/t (fewer temporaries over big grids)."""
    h, hd, H, K, F = model.h, model.head_dim, model.heads, model.kv_heads, model.ffn
    M = 2 * h * H * hd + 2 * h * K * hd + 3 * h * F          # matmul weights of a layer (unsharded)
    bs = b * s
    # F_l = 2·b·s·M/t + 4·b·s·c·(H/t)·hd
    flops = bs * inv_t * (2 * M + (4 * H * hd) * ctx)
    # B_l = w·(M/t + 2h) + w·b·(n_kv + s)·2·(K/t)·hd + w·b·s·(14h + ((4H + 2K)·hd + 6F)/t)
    nbytes = w * (inv_t * (M + (2 * K * hd) * b * (n_kv + s) + ((4 * H + 2 * K) * hd + 6 * F) * bs)
                  + 2 * h + 14 * h * bs)
    return flops, nbytes


def _phase_tokens(phase: str, S, G):
    """(s, n_kv, ctx) of a phase's forward: prefill s=S, n_kv=0 before (S written), ctx=(S+1)/2; decode: the mean
    step, s=1, n_kv=S+G/2−1 cached before, ctx=S+G/2."""
    if phase == "prefill":
        S = np.asarray(S, dtype=float)
        return S, 0.0, (S + 1) / 2
    if phase == "decode":
        n = np.asarray(S, dtype=float) + np.asarray(G, dtype=float) / 2
        return 1.0, n - 1, n
    raise ValueError(f"unknown phase {phase!r}")


def forward_compute(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, inv_t=None) -> dict:
    """Compute time of one forward of ``phase`` summed over all stages (one batch crosses them in sequence)."""
    s, n_kv, ctx = _phase_tokens(phase, S, G)
    if inv_t is None:
        inv_t = 1.0 / np.asarray(t, dtype=float)
    b = np.asarray(b, dtype=float)
    w = np.asarray(w, dtype=float)
    f32, f16 = hw.flops("fp32"), hw.flops("bf16")
    if w.ndim == 0:
        inv_rate = 1.0 / (f32 if w >= 4 else f16)
    else:
        inv_rate = np.where(w >= 4, 1.0 / f32, 1.0 / f16)     # w = 2: bf16/fp16 tensor-core rate
    inv_bw, o = 1.0 / hw.bandwidth(), hw.layer_overhead_s
    fl, by = _layer_cost_inv(model, inv_t, b, s, n_kv, ctx, w)
    t_fl, t_by = fl * inv_rate, by * inv_bw
    t_layer = np.maximum(t_fl, t_by) + o
    h, V = model.h, model.V
    bsh = b * s * h
    emb_bytes = 2 * w * bsh
    head_flops = (2 * h * V) * b * inv_t
    head_bytes = w * ((h * V) * inv_t + bsh) + (4 * V) * b
    t_head = np.maximum(head_flops * inv_rate, head_bytes * inv_bw) + o
    total = model.L * t_layer + emb_bytes * inv_bw + t_head
    return {"compute_s": total, "layer_s": t_layer, "flops": model.L * fl + head_flops,
            "bytes": model.L * by + emb_bytes + head_bytes, "compute_bound": t_fl >= t_by}


# ---------------------------------------------------------------------------------------------------------------------
# Placement: which collectives cross nodes
# ---------------------------------------------------------------------------------------------------------------------
def placement_reference(L: int, t: int, p: int, K: int) -> tuple[float, float]:
    """(layer-weighted fraction of TP groups spanning nodes, fraction of stage boundaries crossing nodes), by
    enumerating ranks (rank r on node r // K; stage i holds ranks i·t … i·t+t−1; TP rank j of stage i sends to TP
    rank j of stage i+1). The reference the closed forms below are tested against."""
    layers = stage_layers(L, p)
    node = lambda r: r // K  # noqa: E731
    span = [len({node(i * t + j) for j in range(t)}) > 1 for i in range(p)]
    f_tp = sum(n for n, sp_ in zip(layers, span) if sp_) / L
    if p == 1:
        return f_tp, 0.0
    cross = [any(node(i * t + j) != node((i + 1) * t + j) for j in range(t)) for i in range(p - 1)]
    return f_tp, sum(cross) / (p - 1)


def tp_inter_fraction(L: int, t, p, K):
    """Vectorised layer-weighted fraction of TP groups spanning nodes: 0 when t | K, 1 when K | t (t ≥ K), else
    enumerated (a layout whose TP groups straddle node boundaries unevenly)."""
    t, p, K = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (t, p, K)))
    shape = t.shape
    t, p, K = (np.atleast_1d(x) for x in (t, p, K))
    f = np.where(t % K == 0, (t > 1) & (t >= K), 0).astype(float)
    f = np.where((K % t == 0) & (t <= K), 0.0, f)
    mixed = (K % t != 0) & (t % K != 0)
    if mixed.any():
        for idx in zip(*np.nonzero(mixed)):
            f[idx] = placement_reference(L, int(t[idx]), int(p[idx]), int(K[idx]))[0]
    return f.reshape(shape)


def pp_inter_fraction(L: int, t, p, K):
    """Vectorised fraction of the p−1 stage boundaries whose send crosses nodes: ⌊(p−1)·t/K⌋/(p−1) when t | K,
    1 when K | t, else enumerated; 0 when p = 1."""
    t, p, K = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (t, p, K)))
    shape = t.shape
    t, p, K = (np.atleast_1d(x) for x in (t, p, K))
    pm1 = np.maximum(p - 1, 1)
    f = np.where(K % t == 0, ((p - 1) * t // K) / pm1, 0.0)
    f = np.where((t % K == 0) & (t >= K), 1.0, f)
    mixed = (K % t != 0) & (t % K != 0)
    if mixed.any():
        for idx in zip(*np.nonzero(mixed)):
            f[idx] = placement_reference(L, int(t[idx]), int(p[idx]), int(K[idx]))[1]
    return np.where(p > 1, f, 0.0).reshape(shape)


def placement_fractions(L: int, t, p, K):
    """(f_tp, f_pp) arrays for a grid: exact (from :func:`placement_reference`) for every distinct (t, p, K) in the
    grid, tabulated once and gathered (falls back to the closed forms above for a very sparse code space)."""
    t, p, K = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (t, p, K)))
    tmax, pmax, kmax = int(t.max()), int(p.max()), int(K.max())
    space = (tmax + 1) * (pmax + 1) * (kmax + 1)
    if space > 20_000_000:
        return tp_inter_fraction(L, t, p, K), pp_inter_fraction(L, t, p, K)
    code = (t * (pmax + 1) + p) * (kmax + 1) + K
    present = np.flatnonzero(np.bincount(code.ravel(), minlength=1))
    tab_tp = np.zeros(space)
    tab_pp = np.zeros(space)
    for c in present:
        tk, kk = divmod(int(c), kmax + 1)
        tt, pp_ = divmod(tk, pmax + 1)
        if tt * pp_ > 1_000_000:                        # enumeration too long: closed forms
            tab_tp[c] = float(tp_inter_fraction(L, tt, pp_, kk))
            tab_pp[c] = float(pp_inter_fraction(L, tt, pp_, kk))
        else:
            tab_tp[c], tab_pp[c] = placement_reference(L, tt, pp_, kk)
    return tab_tp[code], tab_pp[code]


# ---------------------------------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _messages(engine: str):
    """[(op, group_fn, critical_calls_fn, calls_fn, bytes_fn, why)] of one forward, lambdified in
    (b, s, h, L, V, t, p, w); ``critical_calls`` are the calls on one request's critical path (``calls`` / t for
    sends that every TP rank makes concurrently), ``calls`` all of them (what bytes count).

    Taken from :func:`llmcomm.volumes.pattern`. The deepspeed pattern there has no pipeline send yet; until it does,
    the hand pattern is added here: one send_recv of [b, s, h] per stage boundary per forward (DeepSpeed
    ``PipelineModule``; in a hybrid every TP rank sends its copy concurrently).
    """
    import sympy as sp

    from . import volumes as V

    syms = (V.b, V.s, V.h, V.L, V.V, V.t, V.p, V.w)
    msgs = list(V.pattern(engine))
    out = []
    for m in msgs:
        calls = sp.piecewise_fold(m.calls)
        crit = calls
        if m.op in ("send_recv", "send"):
            per_t = sp.simplify(calls / V.t)
            if V.t not in per_t.free_symbols:      # t concurrent sends per boundary: one on the critical path
                crit = per_t
        path = m.path or ("pp" if m.op in ("send_recv", "send") else "tp")
        out.append((m.op, sp.lambdify(syms, sp.sympify(m.group), "numpy"), sp.lambdify(syms, crit, "numpy"),
                    sp.lambdify(syms, calls, "numpy"), sp.lambdify(syms, m.bytes_per_call, "numpy"), m.why, path))
    return out


def forward_comm(model: ModelSpec, hw: Hardware, t, p, b, S, G, w, phase: str, K, engine: str = "deepspeed",
                 detail: bool = False, fractions=None, comm_w=None):
    """Communication time of one forward of ``phase`` (sum of its messages' α-β times at their link levels).

    ``comm_w``: bytes per element on the wire when it differs from the compute width ``w`` (what-if: fp8 or bf16
    communication of an fp32/bf16 model); token ids keep their own width. TP collectives of a hybrid (p > 1: the TP
    group is a proper sub-group of the world) use the preset's ``subgroup_collectives`` fits when it has them."""
    s, _, _ = _phase_tokens(phase, S, G)
    if comm_w is not None:
        w = comm_w
    t, p, b, s, w, K = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, s, w, K)))
    args = (b.astype(float), s, model.h, model.L, model.V, t.astype(float), p.astype(float), w.astype(float))
    f_tp, f_pp = placement_fractions(model.L, t, p, K) if fractions is None else fractions
    total = np.zeros(t.shape)
    parts = []
    # last stage → stage 0 crosses nodes whenever the t·p ranks span more than one node (ranks are placed in order)
    f_wrap = (t * p > K).astype(float)
    for op, group_fn, calls_fn, _all_calls, bytes_fn, why, path in _messages(engine):
        calls = np.broadcast_to(np.asarray(calls_fn(*args), dtype=float), t.shape)
        if not calls.any():
            continue
        n = np.broadcast_to(np.asarray(group_fn(*args)), t.shape).astype(np.int64)
        nbytes = np.broadcast_to(np.asarray(bytes_fn(*args), dtype=float), t.shape)
        frac = {"tp": f_tp, "pp": f_pp, "wrap": f_wrap}[path]
        sub = hw.subgroup_collectives and path == "tp" and bool((p > 1).any())

        def level_time(level):
            tm = hw.collective_time(op, n, nbytes, level)
            if sub:
                tm = np.where(p > 1, hw.collective_time(op, n, nbytes, level, subgroup=True), tm)
            return tm
        ti = level_time("intra")
        if frac.any():
            te = level_time("inter")
            cost = calls * (ti + frac * (te - ti))
        else:
            cost = calls * ti
        total = total + cost
        if detail:
            parts.append({"op": op, "group_size": n, "calls": calls, "bytes_per_call": nbytes, "time_s": cost,
                          "inter_fraction": frac, "why": why})
    return (total, parts) if detail else total


# ---------------------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------------------
def predict_latency_grid(model, hardware, t, p, b, S, G, w=2, gpus_per_node=None, engine: str = "deepspeed",
                         comm_w=None, overlap: bool = False) -> dict:
    """TTFT/TPOT/E2E (s) over a broadcast grid of layouts (t, p) × workloads (b, S, G, w). Returns arrays:
    ``ttft_s, tpot_s, e2e_s, prefill_compute_s, prefill_comm_s, decode_compute_s, decode_comm_s``.

    What-if levers: ``comm_w`` bytes per element on the wire (e.g. 1 = fp8 communication); ``overlap=True`` charges
    each forward ``max(compute, comm)`` instead of ``compute + comm`` (perfect overlap of communication with
    compute: a lower bound, not a schedule any engine here runs).

    No validation here (the grid is the caller's): t must divide the heads, p ≤ L (see :func:`llmcomm.advise`)."""
    model = load_model(model)
    hw = load_hardware(hardware)
    K = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    t, p, b, S, G, w, K = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, b, S, G, w, K)))
    inv_t = 1.0 / t.astype(float)
    wf = float(w.flat[0]) if w.size and (w == w.flat[0]).all() else w       # one dtype: keep w a scalar
    fractions = placement_fractions(model.L, t, p, K)
    out = {}
    for phase in ("prefill", "decode"):
        out[f"{phase}_compute_s"] = forward_compute(model, hw, t, p, b, S, G, wf, phase, inv_t)["compute_s"]
        out[f"{phase}_comm_s"] = forward_comm(model, hw, t, p, b, S, G, w, phase, K, engine,
                                              fractions=fractions, comm_w=comm_w)
    join = np.maximum if overlap else np.add
    out["ttft_s"] = join(out["prefill_compute_s"], out["prefill_comm_s"])
    out["tpot_s"] = join(out["decode_compute_s"], out["decode_comm_s"])
    out["e2e_s"] = out["ttft_s"] + (G - 1) * out["tpot_s"]
    return out


def _f(x):
    x = np.asarray(x)
    return float(x) if x.dtype.kind == "f" else int(x) if x.dtype.kind in "iu" else bool(x) if x.dtype.kind == "b" \
        else x.item()


def predict_latency(model, layout: Layout, workload: Workload, hardware, gpus_per_node: int | None = None,
                    engine: str = "deepspeed", comm_w=None, overlap: bool = False) -> dict:
    """One point: ``{"ttft_s", "tpot_s", "e2e_s", "breakdown": {"prefill": {...}, "decode": {...}}, ...}``.

    ``breakdown[phase]`` has ``compute_s`` and ``comm_s`` of one forward, its FLOPs and bytes moved per rank summed
    over stages, whether a decoder layer is compute-bound, and ``messages``: each message kind with its α-β time.
    """
    model = load_model(model)
    layout = layout.validate(model)
    workload = workload.validate(model)
    hw = load_hardware(hardware)
    K = hw.gpus_per_node if gpus_per_node is None else int(gpus_per_node)
    if K < 1:
        raise SpecError(f"gpus_per_node={K} must be at least 1")
    args = (layout.t, layout.p, workload.b, workload.S, workload.G, workload.w)
    res: dict[str, Any] = {"model": model.name, "hardware": hw.name, "gpus_per_node": K, "engine": engine,
                           "tp": layout.t, "pp": layout.p, "breakdown": {}}
    for phase in ("prefill", "decode"):
        c = forward_compute(model, hw, *args, phase)
        comm, parts = forward_comm(model, hw, *args, phase, K, engine, detail=True, comm_w=comm_w)
        res["breakdown"][phase] = {
            "compute_s": _f(c["compute_s"]), "comm_s": _f(comm), "flops": _f(c["flops"]), "bytes": _f(c["bytes"]),
            "layer_s": _f(c["layer_s"]), "compute_bound": _f(c["compute_bound"]),
            "messages": [{k: (_f(v) if k != "why" else v) for k, v in m.items()} for m in parts]}
    pre, dec = res["breakdown"]["prefill"], res["breakdown"]["decode"]
    join = max if overlap else (lambda a, c: a + c)
    res["ttft_s"] = join(pre["compute_s"], pre["comm_s"])
    res["tpot_s"] = join(dec["compute_s"], dec["comm_s"])
    res["e2e_s"] = res["ttft_s"] + (workload.G - 1) * res["tpot_s"]
    return res


# ---------------------------------------------------------------------------------------------------------------------
# Calibration of a CPU (cpu-local): peak matmul rate, memory bandwidth, and one decoder layer's forward time
# ---------------------------------------------------------------------------------------------------------------------
def _best_time(fn, reps: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate_compute(threads: int = 1, h: int = 512, heads: int = 8, kv_heads: int = 8, ffn: int = 1376,
                      S: int = 128, reps: int = 7) -> dict:
    """Measure this CPU (a few seconds): fp32 matmul FLOP/s (1024³), memory bandwidth (64 MiB copy), and the
    forward time of one Llama decoder layer for a prefill (b=1, s=S) and a decode step (s=1, S cached), from the
    difference between a 6-layer and a 2-layer model (embedding and head cancel). Then fits the roofline
    efficiency ``e_f`` and the per-layer overhead ``o`` so that the model reproduces both layer times:
    ``T = o + max(F/(peak·e_f), B/bw)``. ``threads`` = torch threads per rank (1 = one core per rank)."""
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(1024, 1024)
        bm = torch.randn(1024, 1024)
        peak = 2 * 1024 ** 3 / _best_time(lambda: torch.mm(a, bm), reps)
        try:
            a16, b16 = a.bfloat16(), bm.bfloat16()
            peak_bf16 = 2 * 1024 ** 3 / _best_time(lambda: torch.mm(a16, b16), 2)
        except RuntimeError:
            peak_bf16 = None
        src = torch.empty(16 << 20)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), reps)   # read + write

        from transformers import LlamaConfig, LlamaForCausalLM

        def model_of(layers):
            cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=256,
                              max_position_embeddings=4 * S, head_dim=h // heads)
            return LlamaForCausalLM(cfg).eval()

        ids = torch.randint(0, 256, (1, S))
        times = {}
        with torch.inference_mode():
            for layers in (2, 6):
                m = model_of(layers)
                times[("prefill", layers)] = _best_time(lambda: m(ids, use_cache=False, logits_to_keep=1), reps)

                def decode():
                    out = m(ids, use_cache=True, logits_to_keep=1)
                    key = "cache" if hasattr(out, "cache") and "cache" in inspect.signature(m.forward).parameters \
                        else "past_key_values"          # transformers ≥ 5.2x renamed past_key_values → cache
                    kw = {key: getattr(out, key)}
                    nxt = ids[:, -1:]
                    best = math.inf
                    for _ in range(8):                  # best single step: robust to a busy machine
                        t0 = time.perf_counter()
                        m(nxt, use_cache=True, logits_to_keep=1, **kw)
                        best = min(best, time.perf_counter() - t0)
                    return best
                decode()
                times[("decode", layers)] = min(decode() for _ in range(max(2, reps // 2)))
        layer = {ph: max((times[(ph, 6)] - times[(ph, 2)]) / 4, 1e-7) for ph in ("prefill", "decode")}
    finally:
        torch.set_num_threads(old_threads)

    spec = ModelSpec(name="calib", h=h, L=1, heads=heads, kv_heads=kv_heads, ffn=ffn, V=256, tied=False,
                     head_dim=h // heads)
    fp, bp = (float(x) for x in layer_cost(spec, 1, 1, S, 0, (S + 1) / 2, 4))
    fd, bd = (float(x) for x in layer_cost(spec, 1, 1, 1, S + 3, S + 4, 4))
    e_f, o = 1.0, 0.0
    for _ in range(50):                     # fixed point of the two equations
        o = max(0.0, layer["decode"] - max(fd / (peak * e_f), bd / bw))
        e_f = min(1.5, max(1e-3, fp / (peak * max(layer["prefill"] - o, 1e-9))))
    return {"threads": threads, "peak_flops_fp32": peak, "peak_flops_bf16": peak_bf16, "mem_bw_Bps": bw,
            "layer_prefill_s": layer["prefill"], "layer_decode_s": layer["decode"], "eff_flops": e_f,
            "layer_overhead_s": o, "shape": {"h": h, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "S": S},
            "raw_times_s": {f"{ph}_L{n}": v for (ph, n), v in times.items()}}


# ---------------------------------------------------------------------------------------------------------------------
# CPU runs: the compute calibration for the threads a rank gets; what-if levers; predicted vs measured
# ---------------------------------------------------------------------------------------------------------------------
def rank_threads(ranks: int, cores: int | None = None) -> int:
    """Threads per rank of a CPU run of ``ranks`` ranks: ``OMP_NUM_THREADS = max(1, cores // ranks)`` (what
    :func:`llmcomm.launch.default_env` sets)."""
    import os

    cores = int(cores or os.cpu_count() or 1)
    return max(1, cores // int(ranks))


def hardware_for_ranks(hardware="cpu-local", ranks: int = 2, cores: int | None = None) -> Hardware:
    """``hardware`` with the compute calibration taken at the thread count each of ``ranks`` ranks runs with.

    The ``cpu-local`` preset keeps one compute calibration per thread count (``compute_by_threads``: peak FLOP/s,
    memory bandwidth, flops efficiency, per-layer overhead, written by ``python -m llmcomm.fit --compute``); the
    entry for :func:`rank_threads` (or the nearest calibrated count) replaces the top-level compute numbers. Presets
    without ``compute_by_threads`` (the GPUs) are returned unchanged."""
    hw = load_hardware(hardware)
    by = hw.raw.get("compute_by_threads") or {}
    if not by:
        return hw
    want = rank_threads(ranks, cores)
    key = min(by, key=lambda k: (abs(int(k) - want), int(k)))
    d = dict(hw.raw)
    d.update({k: v for k, v in by[key].items() if k in ("peak_tflops", "mem_bw_GBps", "efficiency",
                                                          "layer_overhead_us")})
    d["threads"] = int(key)
    return Hardware.from_dict(d, name=hw.name)


def scale_links(hardware, factor: float, levels=("intra", "inter")) -> Hardware:
    """What-if: ``hardware`` with the bandwidth of its ``levels`` links (and fitted collectives) × ``factor``
    (β / factor; α unchanged)."""
    hw = load_hardware(hardware)
    d = json.loads(json.dumps(dict(hw.raw))) if hw.raw else None
    if d is None:
        raise SpecError(f"hardware {hw.name!r} has no raw preset to scale")
    if factor <= 0:
        raise SpecError(f"link speed factor {factor!r} must be positive")
    for lvl in levels:
        if lvl in d.get("links", {}):
            d["links"][lvl]["bw_GBps"] = float(d["links"][lvl]["bw_GBps"]) * factor
        for key in ("collectives", "subgroup_collectives"):
            for fits in d.get(key, {}).get(lvl, {}).values():
                for fit in fits.values():
                    fit["busbw_GBps"] = float(fit["busbw_GBps"]) * factor
    d["name"] = f"{hw.name} (links ×{factor:g})"
    return Hardware.from_dict(d, name=d["name"])


METRICS = ("ttft_s", "tpot_s", "e2e_s")


def latency_errors(df):
    """Signed relative error ``(predicted − measured) / measured`` of each metric of a predicted-vs-measured frame
    (columns ``<metric>_measured``, ``<metric>_predicted``); adds ``err_<metric>`` columns (TPOT only where G > 1)
    and returns ``(frame, summary)``, ``summary`` the median |error| per metric and over all of them."""
    import pandas as pd

    df = df.copy()
    errs = []
    for m in METRICS:
        meas, pred = df[f"{m}_measured"].astype(float), df[f"{m}_predicted"].astype(float)
        e = (pred - meas) / meas
        if m == "tpot_s" and "G" in df:
            e = e.where(df["G"] > 1)
        df[f"err_{m[:-2]}"] = e
        errs.append(e.dropna().abs())
    summary = {f"median_abs_err_{m[:-2]}": float(e.median()) for m, e in zip(METRICS, errs)}
    summary["median_abs_err"] = float(pd.concat(errs).median())
    return df, summary


def measured_comm_s(res, phase: str, rank: int = 0) -> float:
    """Seconds rank ``rank`` spent inside collectives and sends/receives during ``phase`` of a measurement (from its
    captured events: each call's start and end; waiting for a slower peer included)."""
    tot = 0.0
    for e in res.events:
        if e.get("rank") == rank and e.get("phase") == phase:
            tot += max(float(e.get("t_end", 0.0)) - float(e.get("t_start", 0.0)), 0.0)
    return tot


def validate_latency(cfgs, hardware="cpu-local", cores: int | None = None, runner=None, progress: bool = True):
    """Measure each configuration (real DeepSpeed ranks, :func:`llmcomm.launch.measure`) and predict it with
    :func:`predict_latency` on ``hardware`` at the rank's thread count (:func:`hardware_for_ranks`; the cpu-local
    calibration only — nothing is fitted to these runs), ``gpus_per_node`` = the cores (one machine).

    Returns one row per configuration: the config, ``<metric>_measured`` / ``<metric>_predicted`` for TTFT, TPOT,
    E2E, the per-phase breakdown (predicted compute and comm of one forward; measured time rank 0 spent in
    communication calls per forward), the threads per rank and the all-reduce path; then :func:`latency_errors`
    adds the signed errors."""
    import os
    from dataclasses import asdict

    import pandas as pd

    if runner is None:
        from functools import partial

        from .launch import measure

        # The cpu-local calibration describes this machine's CPUs: validate against CPU runs even on a GPU node.
        runner = partial(measure, env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    cores = int(cores or os.cpu_count() or 1)
    cfgs = list(cfgs)
    it = cfgs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cfgs, desc="runs", leave=False)
    rows = []
    for c in it:
        res = runner(c.model, c.layout, c.workload)
        ranks = c.t * c.p
        hw = hardware_for_ranks(hardware, ranks, cores)
        pred = predict_latency(c.model, c.layout, c.workload, hw, gpus_per_node=cores)
        pre, dec = pred["breakdown"]["prefill"], pred["breakdown"]["decode"]
        row = dict(asdict(c), ranks=ranks, threads=rank_threads(ranks, cores),
                   allreduce=("shm" if c.p == 1 else "gloo") if c.t > 1 else "-")
        for m in METRICS:
            row[f"{m}_measured"] = float(getattr(res, m))
            row[f"{m}_predicted"] = float(pred[m])
        row.update(prefill_compute_pred_s=pre["compute_s"], prefill_comm_pred_s=pre["comm_s"],
                   decode_compute_pred_s=dec["compute_s"], decode_comm_pred_s=dec["comm_s"],
                   prefill_comm_meas_s=measured_comm_s(res, "prefill"),
                   decode_comm_meas_s=measured_comm_s(res, "decode") / max(c.G - 1, 1))
        rows.append(row)
    return latency_errors(pd.DataFrame(rows))
