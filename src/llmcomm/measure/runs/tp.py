"""Rank-side entry of a tensor-parallel measurement: ``python -m llmcomm.measure.runs.tp --spec RUN/spec.json --out RUN``.

Started on every rank by :func:`llmcomm.measure.launch.measure_many` (through the DeepSpeed launcher), it

1. initialises ``deepspeed.comm`` (``--backend gloo`` in the spec disables DeepSpeed's shared-memory all-reduce so
   that every all-reduce goes through the gloo process group: needed for sub-groups: book appendix "Dependency facts");
2. builds the seeded model once; rank 0 first runs the single-process reference generation of every configuration
   on it (before any sharding);
3. under a capture of its own (phase ``setup``): ``deepspeed.init_inference(tp_size=t,
   replace_with_kernel_inject=False)`` (AutoTP), once;
4. one uncaptured, untimed warm-up generation (the first configuration's shape, at most 2 tokens), so that no
   configuration's timings depend on its place in the sweep (the first forward of a process pays one-time costs);
5. for every configuration of ``spec["workloads"]``, under a fresh capture: the generation (phases ``prefill``,
   ``decode``) with a fresh KV cache, then ``rank{r}.c{i}.json`` (format in :mod:`llmcomm.measure.runs.rankio`).
   Before the first configuration whose expert layout is ``tp-experts`` a mixture of experts has every expert
   sharded t ways (:func:`llmcomm.measure.moe_adapter.shard_experts`: local, it sends nothing), and stays so: the
   launcher runs those configurations last. With the launch option ``profile`` one more, untimed generation of
   the configuration runs under ``torch.profiler`` (:meth:`~llmcomm.measure.runs.rankio.RankContext.profiled`).
"""
from __future__ import annotations

import sys

from llmcomm.measure.runs.rankio import RankContext, rank_main


def run(ctx: RankContext):
    """The TP experiment on this rank: yields the rank-specific part of each configuration's result (tokens,
    timings)."""
    import deepspeed

    from llmcomm.measure.runs.common import (TORCH_DTYPES, build_model, generate, prompt_ids, reference_generations,
                                             warm_up)

    model, layout = ctx.model, ctx.layout
    hf = build_model(model, ctx.dtype, ctx.device, seed=ctx.seed)
    prompts = [prompt_ids(w, model.V, seed=ctx.seed, device=ctx.device) for w in ctx.workloads]
    # Same weights (same seed), not yet sharded: the single-process answers the TP run must reproduce.
    references = reference_generations(hf, prompts, ctx.workloads, on=ctx.rank == 0 and ctx.reference)

    with ctx.setup_capture() as cap, cap.phase("setup"):
        engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": layout.t}, dtype=TORCH_DTYPES[ctx.dtype],
                                          replace_with_kernel_inject=False)
    warm_up(engine, engine.module, prompts[0], ctx.workloads[0])
    sharded = False
    for i, w in ctx.sweep():
        if ctx.deployment().experts == "tp-experts" and not sharded:    # every expert's FFN sharded t ways
            from llmcomm.measure.moe_adapter import shard_experts

            shard_experts(engine.module, engine.mp_group)
            warm_up(engine, engine.module, prompts[i], w)
            sharded = True
        with ctx.capture() as cap:
            gen = generate(engine, engine.module, prompts[i], w.G, phase=ctx.phase_hook(cap), beat=ctx.beat)
        yield {"tokens": gen.tokens, "reference_tokens": references[i] and references[i].tokens,
               "timings": gen.timings, **ctx.profiled(engine, engine.module, prompts[i], w.G)}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.tp"))
