"""Rank-side entry of the collectives microbenchmark (``llmcomm bench-collectives``; the driver is
:mod:`llmcomm.measure.bench`): ``python -m llmcomm.measure.runs.bench --spec RUN/spec.json --out RUN``.

Timing follows nccl-tests: a *sample* is ``inner`` back-to-back calls after a barrier, divided by ``inner`` (so that
the barrier's exit skew is amortised); the sample's time is the slowest rank's. ``reps`` samples per point give the
median (``time_s``) and the spread (``time_p10_s``, ``time_p90_s``). Sizes m as nccl-tests defines them
(:mod:`llmcomm.derive.conventions`). send_recv is nccl-tests' ``sendrecv``: each rank sends m bytes to the next rank
and receives m from the previous one, concurrently.

Options (``spec["options"]``): ``ops``, ``sizes``, ``backends`` (``shm`` = ``deepspeed.comm.inference_all_reduce``,
DeepSpeed's shared-memory kernel on CPU; ``gloo``/``nccl`` = ``deepspeed.comm`` collectives on the process group),
``dtype`` (fp32, bf16, fp16), ``warmup``, ``min_reps``, ``max_reps``, ``point_s``, ``sample_s``. Rank 0 writes its
progress to ``RUN/progress.json`` (points done / total) and returns the rows.
"""
from __future__ import annotations

import json
import math
import sys
import time

from llmcomm.measure.runs.rankio import RankContext, rank_main
from llmcomm.record import atomic_write_text

__all__ = ["elements", "points", "run"]


def elements(op: str, size: int, n: int, itemsize: int) -> tuple[int, int]:
    """(elements per rank buffer, m actually moved) for a requested nccl-tests size ``size``."""
    if op == "all_gather":
        per = max(1, size // (n * itemsize))
        return per, per * n * itemsize
    per = max(1, size // itemsize)
    return per, per * itemsize


def points(opts: dict, n: int, itemsize: int) -> list[tuple[str, str, int]]:
    """(backend, op, size) to time, in order; sizes that round to the same m (below n elements) are timed once."""
    out, seen = [], set()
    for be in opts["backends"]:
        for op in opts["ops"]:
            if be == "shm" and op != "all_reduce":
                continue
            for size in opts["sizes"]:
                key = (be, op, elements(op, size, n, itemsize)[1])
                if key not in seen:
                    seen.add(key)
                    out.append((be, op, size))
    return out


def run(ctx: RankContext) -> dict:
    import numpy as np
    import torch
    import deepspeed.comm as dist

    from llmcomm.measure.runs.common import TORCH_DTYPES, synchronize

    opts = ctx.options
    rank, n = dist.get_rank(), dist.get_world_size()
    device = ctx.device
    dtype = TORCH_DTYPES[opts.get("dtype", "fp32")]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    cuda = device.type == "cuda"

    def make(backend: str, op: str, per: int):
        x = torch.ones(per, dtype=dtype, device=device)
        if op == "all_reduce":
            if backend == "shm":
                return lambda: dist.inference_all_reduce(x)
            return lambda: dist.all_reduce(x)
        if op == "all_gather":
            if cuda:
                out = torch.empty(per * n, dtype=dtype, device=device)
                return lambda: dist.all_gather_into_tensor(out, x)
            outs = [torch.empty_like(x) for _ in range(n)]
            return lambda: dist.all_gather(outs, x)
        if op == "broadcast":
            return lambda: dist.broadcast(x, src=0)
        if op == "send_recv":
            y = torch.empty_like(x)
            nxt, prv = (rank + 1) % n, (rank - 1) % n

            def sendrecv():
                for req in (dist.isend(x, nxt), dist.irecv(y, src=prv)):
                    req.wait()
            return sendrecv
        raise ValueError(op)

    todo = points(opts, n, itemsize)
    # global warm-up: the first calls after start-up (page faults on the shm buffers, gloo connections) are slow
    for be in opts["backends"]:
        fn = make(be, "all_reduce", 1)
        dist.barrier()
        for _ in range(50):
            fn()
        synchronize(device)
    progress = ctx.out_dir / "progress.json"
    rows = []
    for i, (be, op, size) in enumerate(todo):
        ctx.beat()                                           # progress for the launcher's watchdog
        per, nbytes = elements(op, size, n, itemsize)
        fn = make(be, op, per)
        for _ in range(opts["warmup"]):
            fn()
        synchronize(device)
        # estimate one call's time (slowest rank) by blocks of 1, 4, 16 … back-to-back calls until a block lasts
        # sample_s: the first call after a barrier pays the peers' wake-up (ms on a busy CPU), a block amortises it
        block = 1
        while True:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            synchronize(device)
            el = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(el, op=dist.ReduceOp.MAX)        # every rank takes the same decision
            if float(el) >= opts["sample_s"] or block >= 256:
                break
            block *= 4
        est = max(float(el) / block, 1e-7)
        inner = int(min(1000, max(1, math.ceil(opts["sample_s"] / est))))
        reps = int(min(opts["max_reps"], max(opts["min_reps"], opts["point_s"] // (inner * est + 2e-3))))
        times = torch.zeros(reps, dtype=torch.float64)
        for r in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            times[r] = (time.perf_counter() - t0) / inner
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        if rank == 0:
            tv = times.numpy()
            rows.append({"backend": be, "op": op, "group_size": n, "bytes": nbytes, "count": per, "reps": reps,
                         "inner": inner, "time_s": float(np.median(tv)), "time_p10_s": float(np.percentile(tv, 10)),
                         "time_p90_s": float(np.percentile(tv, 90))})
            atomic_write_text(progress, json.dumps({"done": i + 1, "total": len(todo)}))
    dist.barrier()
    return {"bench_rows": rows, "device_name": torch.cuda.get_device_name() if cuda else None}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.bench"))
