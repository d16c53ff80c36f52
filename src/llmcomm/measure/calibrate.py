"""Compute timings of this CPU, the raw material of the ``cpu-local`` preset's compute calibration.

:func:`time_compute` measures (a few seconds): the fp32 (and bf16) matmul rate of a 1024³ product, the memory
bandwidth of a 64 MiB tensor copy (read + write bytes), and the forward time of one Llama decoder layer for a prefill
(b = 1, s = S) and a decode step (s = 1, S cached), from the difference between a 6-layer and a 2-layer model
(embedding and head cancel). Turning these into roofline parameters is :mod:`llmcomm.compare.calibration`'s job.

:func:`time_cpu_kernels` measures what the CPU kernel model needs (≈ 15 s): GEMM times over a grid of rows M_g and
generic shapes (weights cycled so that they stream from memory, as a model's layers do), and decode and prefill
forwards of HF Llama models of two shapes with 1 and 3 layers (per-layer and per-forward host time). Medians
throughout: the validation compares medians of runs. :mod:`llmcomm.compare.cpu_calibration` fits the model.
"""
from __future__ import annotations

import math
import time

__all__ = ["best_time", "median_time", "time_compute", "time_cpu_kernels", "CALIBRATION_SHAPE", "CPU_GEMM_SHAPES",
           "CPU_GEMM_ROWS", "CPU_LAYER_SHAPES"]

#: the decoder layer timed by default (h, heads, kv_heads, ffn, S)
CALIBRATION_SHAPE = {"h": 512, "heads": 8, "kv_heads": 8, "ffn": 1376, "S": 128}


def best_time(fn, reps: int = 5) -> float:
    """The fastest of ``reps`` calls of ``fn`` after one warm-up call (robust on a busy machine)."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(fn, reps: int = 5) -> float:
    """The median of ``reps`` calls of ``fn`` after one warm-up call (what a median over runs sees)."""
    import statistics

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: GEMM shapes (K_g, N_g) of the CPU kernel microbenchmark: generic, none of them a validated model's own
CPU_GEMM_SHAPES = ((384, 1024), (1024, 384), (384, 384), (384, 128), (768, 768), (96, 256))
#: GEMM rows M_g: one token (a matrix-vector product on a CPU BLAS) up to a prefill's hundreds
CPU_GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the decoder-layer shapes timed for host time and memory-bound ops: (h, heads, kv_heads, ffn), a tiny one whose
#: kernels are negligible (host time alone) and calib-llama's (neither validated model's)
CPU_LAYER_SHAPES = ((64, 4, 2, 176), (384, 6, 2, 1024))


def time_cpu_kernels(threads: int = 1, reps: int = 5, stream_bytes: int = 96 << 20, prompts=(16, 64, 256),
                     cached: int = 64) -> dict:
    """Median seconds, with ``threads`` torch threads, of what the CPU kernel model is fitted to:

    * ``gemm``: rows ``{"M", "K", "N", "seconds"}`` — one ``F.linear`` [M, K]×[K, N] per call, cycling through as
      many distinct weights as fill ``stream_bytes`` (more than a last-level cache: weights stream from memory, as
      a model's do when it runs layer after layer), over :data:`CPU_GEMM_SHAPES` × :data:`CPU_GEMM_ROWS`;
    * ``forwards``: rows ``{"h", "heads", "kv_heads", "ffn", "layers", "phase", "b", "S", "seconds"}`` — one forward
      of an HF Llama of each :data:`CPU_LAYER_SHAPES` with 1 and 3 layers: a prefill of S ∈ ``prompts`` tokens and
      a one-token decode step with ``cached`` tokens in the cache (b = 1); the difference of the layer counts is
      two layers, the rest a forward's own host time and head.
    """
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from .runs.common import cache_kwarg

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gemm, forwards = [], []
    try:
        with torch.inference_mode():
            for K, N in CPU_GEMM_SHAPES:
                weights = [torch.randn(N, K) for _ in range(max(2, stream_bytes // (4 * K * N)))]
                for M in CPU_GEMM_ROWS:
                    x = torch.randn(M, K)

                    def sweep():
                        for wt in weights:
                            F.linear(x, wt)
                    gemm.append({"M": M, "K": K, "N": N, "seconds": median_time(sweep, reps) / len(weights)})
            for h, heads, kv_heads, ffn in CPU_LAYER_SHAPES:
                for layers in (1, 3):
                    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=256,
                                      max_position_embeddings=1024, head_dim=h // heads)
                    model = LlamaForCausalLM(cfg).eval()
                    kw = cache_kwarg(model)
                    shape = {"h": h, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "layers": layers, "b": 1}
                    for S in prompts:
                        ids = torch.randint(0, 256, (1, S))
                        sec = median_time(lambda: model(ids, use_cache=False, logits_to_keep=1), reps)
                        forwards.append(dict(shape, phase="prefill", S=S, seconds=sec))
                    ids = torch.randint(0, 256, (1, cached))
                    nxt = ids[:, -1:]

                    def step():
                        cache = DynamicCache(config=model.config)
                        model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})
                        t0 = time.perf_counter()
                        model(nxt, use_cache=True, logits_to_keep=1, **{kw: cache})
                        return time.perf_counter() - t0
                    step()
                    import statistics

                    sec = statistics.median(step() for _ in range(3 * reps))
                    forwards.append(dict(shape, phase="decode", S=cached, seconds=sec))
    finally:
        torch.set_num_threads(old_threads)
    return {"threads": threads, "gemm": gemm, "forwards": forwards, "stream_bytes": stream_bytes}


def time_compute(threads: int = 1, h: int = 512, heads: int = 8, kv_heads: int = 8, ffn: int = 1376, S: int = 128,
                 reps: int = 7) -> dict:
    """Seconds and rates of this CPU with ``threads`` torch threads (1 = one core per rank):
    ``{"threads", "peak_flops_fp32", "peak_flops_bf16", "mem_bw_Bps", "layer_prefill_s", "layer_decode_s", "shape",
    "raw_times_s"}``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .runs.common import cache_kwarg

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1024, 1024)
        y = torch.randn(1024, 1024)
        peak = 2 * 1024 ** 3 / best_time(lambda: torch.mm(x, y), reps)
        try:
            x16, y16 = x.bfloat16(), y.bfloat16()
            peak_bf16 = 2 * 1024 ** 3 / best_time(lambda: torch.mm(x16, y16), 2)
        except RuntimeError:
            peak_bf16 = None
        src = torch.empty(16 << 20)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), reps)   # read + write

        def model_of(layers):
            cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=256,
                              max_position_embeddings=4 * S, head_dim=h // heads)
            return LlamaForCausalLM(cfg).eval()

        ids = torch.randint(0, 256, (1, S))
        times = {}
        with torch.inference_mode():
            for layers in (2, 6):
                model = model_of(layers)
                kw_name = cache_kwarg(model)
                times[("prefill", layers)] = best_time(lambda: model(ids, use_cache=False, logits_to_keep=1), reps)

                def decode():
                    out = model(ids, use_cache=True, logits_to_keep=1)
                    kw = {kw_name: out.cache if hasattr(out, "cache") else out.past_key_values}
                    nxt = ids[:, -1:]
                    best = math.inf
                    for _ in range(8):                  # best single step: robust to a busy machine
                        t0 = time.perf_counter()
                        model(nxt, use_cache=True, logits_to_keep=1, **kw)
                        best = min(best, time.perf_counter() - t0)
                    return best
                decode()
                times[("decode", layers)] = min(decode() for _ in range(max(2, reps // 2)))
        layer = {ph: max((times[(ph, 6)] - times[(ph, 2)]) / 4, 1e-7) for ph in ("prefill", "decode")}
    finally:
        torch.set_num_threads(old_threads)
    return {"threads": threads, "peak_flops_fp32": peak, "peak_flops_bf16": peak_bf16, "mem_bw_Bps": bw,
            "layer_prefill_s": layer["prefill"], "layer_decode_s": layer["decode"],
            "shape": {"h": h, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "S": S},
            "raw_times_s": {f"{ph}_L{n}": v for (ph, n), v in times.items()}}
