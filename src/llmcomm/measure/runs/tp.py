"""Rank-side entry of a tensor-parallel measurement: ``python -m llmcomm.measure.runs.tp --spec RUN/spec.json --out RUN``.

Started on every rank by :func:`llmcomm.measure.launch.measure` (through the DeepSpeed launcher), it

1. initialises ``deepspeed.comm`` (``--backend gloo`` in the spec disables DeepSpeed's shared-memory all-reduce so
   that every all-reduce goes through the gloo process group: needed for sub-groups: book appendix "Dependency facts");
2. builds the seeded model; rank 0 first runs the single-process reference generation on it (before any sharding);
3. under a :class:`~llmcomm.measure.capture.Capture`: ``deepspeed.init_inference(tp_size=t, replace_with_kernel_inject=False)``
   (AutoTP) in phase ``setup``, then the generation (phases ``prefill``, ``decode``);
4. writes ``rank{r}.json`` (format in :mod:`llmcomm.measure.runs.rankio`) atomically.

The flow is in :func:`run_rank`, shared with other runners through :mod:`llmcomm.measure.runs.rankio`.
"""
from __future__ import annotations

import sys

from llmcomm.measure.runs.rankio import RankContext, rank_main


def run(ctx: RankContext) -> dict:
    """The TP experiment on this rank; returns the rank-specific part of the result (tokens, timings)."""
    import deepspeed

    from llmcomm.measure.runs.common import build_model, prompt_ids, generate, TORCH_DTYPES

    model, layout, workload = ctx.model, ctx.layout, ctx.workload
    hf = build_model(model, workload.dtype, ctx.device, seed=ctx.seed)
    ids = prompt_ids(workload, model.V, seed=ctx.seed, device=ctx.device)
    reference = None
    if ctx.rank == 0 and ctx.reference:
        # Same weights (same seed), not yet sharded: the single-process answer the TP run must reproduce.
        reference = generate(hf, hf, ids, workload.G).tokens

    with ctx.capture() as cap:
        phase = ctx.phase_hook(cap)
        with phase("setup"):
            engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": layout.t},
                                              dtype=TORCH_DTYPES[workload.dtype], replace_with_kernel_inject=False)
        gen = generate(engine, engine.module, ids, workload.G, phase=phase)
    return {"tokens": gen.tokens, "reference_tokens": reference,
            "timings": {"ttft_s": gen.ttft_s, "tpot_s": gen.tpot_s, "e2e_s": gen.e2e_s,
                        "decode_steps_s": gen.decode_steps_s}}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.tp"))
