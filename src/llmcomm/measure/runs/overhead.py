"""Rank-side entry of the capture-overhead benchmark (``benchmarks/capture_overhead.py`` launches it).

One TP engine per rank; then the same greedy generation repeated under each way of observing the communication —
``none`` (baseline), ``llmcomm`` (:class:`~llmcomm.measure.capture.Capture`), ``ds_logger`` (DeepSpeed's comms logger,
``deepspeed.comm.configure(enabled=True, prof_all=True)``), ``torch_profiler`` (``torch.profiler.profile`` with shapes) —
in a rotating order per repetition, so that drift of a shared machine hits every mode alike. All ranks run the same
schedule (they are in lockstep through the all-reduces). Options (``spec["options"]``): ``reps``, ``warmup``,
``modes``.
"""
from __future__ import annotations

import contextlib
import sys

from llmcomm.measure.runs.rankio import RankContext, rank_main

MODES = ("none", "llmcomm", "ds_logger", "torch_profiler")


@contextlib.contextmanager
def observed(mode: str, rank: int):
    """Observe the communication by ``mode`` inside the block; yields the llmcomm Capture in mode ``llmcomm``."""
    if mode == "none":
        yield None
    elif mode == "llmcomm":
        from llmcomm.measure.capture import Capture

        with Capture(rank=rank) as cap:
            yield cap
    elif mode == "ds_logger":
        import deepspeed.comm as dist

        dist.configure(enabled=True, prof_all=True, verbose=False)
        try:
            yield None
        finally:
            dist.configure(enabled=False, prof_all=False)
            dist.comm.comms_logger.comms_dict.clear()
    elif mode == "torch_profiler":
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True):
            yield None
    else:
        raise ValueError(f"unknown observation mode {mode!r} (one of {', '.join(MODES)})")


def run(ctx: RankContext) -> dict:
    import torch
    import deepspeed
    import deepspeed.comm as dist

    from llmcomm.measure.runs.common import build_model, prompt_ids, generate, TORCH_DTYPES

    opts = ctx.options
    modes = list(opts.get("modes", MODES))
    reps, warmup = int(opts.get("reps", 7)), int(opts.get("warmup", 1))
    wl = ctx.workload
    hf = build_model(ctx.model, wl.dtype, ctx.device, seed=ctx.seed)
    ids = prompt_ids(wl, ctx.model.V, seed=ctx.seed, device=ctx.device)
    engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": ctx.layout.t}, dtype=TORCH_DTYPES[wl.dtype],
                                      replace_with_kernel_inject=False)
    lineup = torch.ones(1, device=ctx.device, dtype=TORCH_DTYPES[wl.dtype])
    samples = {m: [] for m in modes}
    calls = None
    for rep in range(warmup + reps):
        k = rep % len(modes)
        for mode in modes[k:] + modes[:k]:                   # rotate the order: no mode always runs first
            with observed(mode, ctx.rank) as cap:
                # untimed, outside the phases: entering a mode takes different time on each rank; without this
                # the first all-reduce of the prefill would absorb the difference
                dist.inference_all_reduce(lineup, group=engine.mp_group)
                gen = generate(engine, engine.module, ids, wl.G, phase=cap.phase if cap else None)
            if cap is not None:
                calls = sum(e.phase in ("prefill", "decode") for e in cap.events)
            if rep >= warmup:
                samples[mode].append({"e2e_s": gen.e2e_s, "ttft_s": gen.ttft_s, "tpot_s": gen.tpot_s})
    return {"tokens": gen.tokens, "samples": samples, "calls_per_generation": calls,
            "wrapper_cost": wrapper_cost(engine.mp_group, ctx, batches=int(opts.get("micro_batches", 200))),
            "timings": {"ttft_s": gen.ttft_s, "tpot_s": gen.tpot_s, "e2e_s": gen.e2e_s}}


def wrapper_cost(group, ctx: RankContext, batches: int = 200, calls: int = 20) -> dict:
    """Per-call cost of the llmcomm wrapper on the real path: a decode-sized all-reduce ([1, 1, h]) issued ``calls``
    times, alternately bare and captured, ``batches`` times; minimum per-call time of each (robust on a busy
    machine, where medians of whole generations drown in noise)."""
    import time
    import torch
    import deepspeed.comm as dist

    from llmcomm.measure.capture import Capture

    x = torch.ones(1, 1, ctx.model.h, device=ctx.device)

    def batch():
        dist.inference_all_reduce(x, group=group)      # untimed: lines the ranks up, so no wait is timed below
        t0 = time.perf_counter()
        for _ in range(calls):
            dist.inference_all_reduce(x, group=group)
        return (time.perf_counter() - t0) / calls

    bare, captured = [], []
    for _ in range(batches):
        bare.append(batch())
        with Capture(rank=ctx.rank):
            captured.append(batch())
    return {"bare_call_us": min(bare) * 1e6, "captured_call_us": min(captured) * 1e6,
            "overhead_us": (min(captured) - min(bare)) * 1e6, "batches": batches, "calls_per_batch": calls}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.overhead"))
