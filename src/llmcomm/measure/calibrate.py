"""Compute timings of this CPU, the raw material of the ``cpu-local`` preset's compute calibration.

:func:`time_compute` measures (a few seconds): the fp32 (and bf16) matmul rate of a 1024³ product, the memory
bandwidth of a 64 MiB tensor copy (read + write bytes), and the forward time of one Llama decoder layer for a prefill
(b = 1, s = S) and a decode step (s = 1, S cached), from the difference between a 6-layer and a 2-layer model
(embedding and head cancel). Turning these into roofline parameters is :mod:`llmcomm.compare.calibration`'s job.
"""
from __future__ import annotations

import math
import time

__all__ = ["best_time", "time_compute", "CALIBRATION_SHAPE"]

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
