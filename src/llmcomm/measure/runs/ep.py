"""Rank-side entry of an expert-parallel measurement: ``python -m llmcomm.measure.runs.ep --spec RUN/spec.json --out RUN``.

Expert parallelism with data-parallel attention on e = world-size ranks (a MoE model; each configuration's routing:
its options' ``routing``, the fields of :class:`llmcomm.deployment.Routing` — set on the gates before it runs,
:func:`llmcomm.measure.moe_adapter.set_routing`). Every rank

1. builds the seeded model once and takes its share of each configuration's batch: sequences
   ``[r·b/e, (r+1)·b/e)`` (attention, norms, embedding and head run on the rank's own sequences, replicated weights);
2. computes the single-process reference of its share: the same model adapted with ``ep_size = 1`` (DeepSpeed's MoE
   layer with every expert local issues no collective), run before the EP model exists;
3. under a capture of its own (phase ``setup``): :func:`llmcomm.measure.moe_adapter.adapt` with ``ep_size = e`` —
   DeepSpeed's MoE layer holding this rank's E/e experts; the EP process groups are created here;
4. one untimed warm-up generation, then for every configuration, under a fresh capture: the generation of its share
   (each MoE layer of each forward: dispatch ``all_to_all``, experts, combine ``all_to_all``; dropless adds the
   capacity ``all_reduce`` MAX first), with the router's per-expert counts and the capacity of every MoE forward
   (:class:`~llmcomm.measure.moe_adapter.RoutingLog`) in the result's ``routing``.
"""
from __future__ import annotations

import sys

from llmcomm.measure.runs.rankio import RankContext, rank_main


def run(ctx: RankContext):
    """The EP experiment on this rank: yields, per configuration, this rank's share of the tokens, its reference,
    timings and routing log."""
    from llmcomm.measure.moe_adapter import RoutingLog, adapt, set_routing
    from llmcomm.measure.runs.common import build_model, ep_share, generate, moe_options, prompt_ids, warm_up

    model, e, r = ctx.model, ctx.world_size, ctx.rank
    routings = [ctx.deployment(i).routing for i in range(len(ctx.workloads))]
    hf = build_model(model, ctx.dtype, ctx.device, seed=ctx.seed)
    prompts = [prompt_ids(w, model.V, seed=ctx.seed, device=ctx.device) for w in ctx.workloads]
    shares, prompts, references = ep_share(hf, prompts, ctx.workloads, r, e, routings, ctx.reference)

    with ctx.setup_capture() as cap, cap.phase("setup"):
        ep_model = adapt(hf, e, **moe_options(routings[0]))
    log = RoutingLog(ep_model)
    warm_up(ep_model, ep_model, prompts[0], ctx.workloads[0])
    for i, w in ctx.sweep():
        set_routing(ep_model, **moe_options(routings[i]))
        log.take()
        with ctx.capture() as cap:
            gen = generate(ep_model, ep_model, prompts[i], w.G, phase=ctx.phase_hook(cap), beat=ctx.beat)
        yield {"tokens": gen.tokens, "reference_tokens": references[i] and references[i].tokens,
               "timings": gen.timings, "share": list(shares[i]), "routing": log.take()}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.ep"))
