"""Rank-side entry of a pipeline (p > 1) or hybrid t×p measurement with real KV-cache decode:
``python -m llmcomm.measure.runs.pipeline --spec RUN/spec.json --out RUN`` (started on t·p ranks by
:func:`llmcomm.measure.launch.measure`; arguments and result file as in :mod:`llmcomm.measure.runs.rankio`).

Why not DeepSpeed's ``PipelineEngine``
--------------------------------------
``PipelineEngine.eval_batch`` (DeepSpeed 0.19.8) keeps no KV cache — every call is a full forward of what it is
given, so greedy decoding through it re-runs the whole prefix each step; it sends shape metadata only once unless
``dynamic_shape=True`` (a decode-sized activation after a prefill is then silently received into the stale prefill
buffer: wrong logits, no error); and ``return_logits`` returns only the last micro-batch. ``tools/proofs/`` proves each
of these on CPU. So this runner keeps DeepSpeed for what fits and adds the thinnest schedule on top:

* ``deepspeed.pipe.PipelineModule`` partitions the L decoder layers (``partition_method="uniform"`` =
  :func:`llmcomm.spec.stage_layers`: the first L mod p stages take one more), holds the stage's layers and runs them
  in order; its ``PipelineParallelGrid`` over ``PipeModelDataParallelTopology(p, t, 1)`` gives the groups (global
  rank = stage·t + tp_rank; the TP group of a stage = its t consecutive ranks);
* AutoTP shards each stage exactly as it shards a whole model in TP-only runs: ``deepspeed.init_inference`` on the
  stage's slice of the HF model (``LlamaForCausalLM`` whose ``model.layers`` holds only the stage's layers; the
  embedding only on stage 0; final norm and ``lm_head`` only on the last stage, where ``lm_head`` becomes
  ``LmHeadLinearAllreduce``), with ``InferenceEngine.inference_mp_group`` set to the stage's TP group first
  (init_inference ignores a passed ``tp_group``: proof ``init_inference_ignores_tp_group.py``);
* stage-to-stage messages go through ``deepspeed.runtime.pipe.p2p`` (stage ids → global ranks through the grid, the
  same blocking ``send``/``recv`` the PipelineEngine uses) and, for partitioned transfers, DeepSpeed's own
  ``PartitionedTensor`` (its pipe-partitioning: each TP rank sends 1/t of the flattened activation, the next stage
  all-gathers in its TP group);
* every forward carries ``s`` tokens' hidden state ``[b, s, h]`` (s = S on the prefill, 1 on each decode step) and
  each stage keeps the KV cache of its own layers in a ``DynamicCache``.

Shapes are never sent: every rank derives ``[b, s, h]`` from the schedule it runs (the shared greedy loop of
:func:`llmcomm.measure.runs.common.generate` calls each stage with the same ``input_ids`` shape), so there is no metadata
message and no stale buffer — exactness is checked by comparing tokens (and last-stage logits) with the
single-process reference.

Token hand-back: after each forward the last stage takes the argmax and every one of its TP ranks sends the token ids
(int64 ``[b, 1]``) to its peer on stage 0 (``p2p.send(tok, 0)``: DeepSpeed's p2p allows the last→first wrap-around).
One hand-back per forward, the last one included, so stage 0 — where requests come in — ends holding all G tokens.

Stage-to-stage mode (each configuration's ``p2p`` option: it may change from one configuration to the next, as the
hops are this runner's own sends): ``"partitioned"`` (default when t > 1, what DeepSpeed's pipe engine does with
``pipe_partitioned``) or ``"full"`` (every TP rank sends the whole ``[b, s, h]`` to its peer). With t = 1 both are the
plain send of the whole tensor.

Expert parallelism in stages (``layout.e`` > 1, t = 1; a mixture of experts): the grid's slice dimension holds the
e EP ranks of a stage (global rank = stage·e + EP rank), each running its own b/e sequences through every stage —
EP rank j sends its hidden state [b/e, s, h] to EP rank j of the next stage and the last stage's EP rank j hands its
b/e tokens back to EP rank j of stage 0. After AutoTP (t = 1: nothing sharded) the stage's sparse blocks become
DeepSpeed's MoE layer with ``ep_size = e`` (:func:`llmcomm.measure.moe_adapter.adapt`); DeepSpeed's legacy group
layout makes the EP groups consecutive ranks, i.e. exactly each stage's e ranks (checked). The reference of each rank's
share is the same weights adapted with ``ep_size = 1`` in one process (as :mod:`llmcomm.measure.runs.ep`: capacity
routing drops by the rank's own token count).

All-reduce path: the shm all-reduce ignores sub-groups (proof ``shm_allreduce_ignores_subgroups.py``), so a hybrid
must run its TP all-reduces on gloo. The launcher asks for backend ``gloo`` (rankio then drops ``LOCAL_SIZE`` — no
/dev/shm buffer — and sets ``cdb.shm_vector_kernel_level = 0``, DeepSpeed's own fallback to
``torch.distributed.all_reduce(group=...)``); this runner also sets it itself when its TP group is not the world.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from llmcomm.deployment import P2P_MODES
from llmcomm.measure.runs.rankio import RankContext, rank_main
from llmcomm.spec import Layout, ModelSpec, SpecError, stage_layers

__all__ = ["check_layout", "run"]


def check_layout(model: ModelSpec, layout: Layout, world_size: int, p2p: str = "partitioned") -> list[int]:
    """Layers per stage for this run, or one :class:`SpecError` that says what is wrong."""
    if layout.p < 2:
        raise SpecError(f"the pipeline runner needs p >= 2, got p={layout.p} (p = 1 is llmcomm.measure.runs.tp)")
    layout.validate(model)                                   # t divides the heads, p <= L (every stage has a layer)
    if layout.ranks != world_size:
        raise SpecError(f"layout t={layout.t} x p={layout.p} x e={layout.e} needs {layout.ranks} ranks, but "
                        f"{world_size} were launched")
    if p2p not in P2P_MODES:
        raise SpecError(f"p2p mode {p2p!r} is not one of {', '.join(P2P_MODES)}")
    if p2p == "partitioned" and layout.t > 1 and model.h % layout.t:
        # PartitionedTensor.full() gathers uneven parts with broadcasts whose src is a group-local rank (wrong for
        # any TP group but the first); even parts use all_gather_into_tensor, which is right.
        raise SpecError(f"partitioned p2p needs t={layout.t} to divide h={model.h}; use p2p 'full'")
    return stage_layers(model.L, layout.p)


@dataclass
class _Step:
    """What one forward passes from layer to layer inside a stage: PipelineModule hands exactly one object from each
    layer to the next, so the per-forward context (positions, rotary embeddings, mask, KV cache) rides along with
    the hidden state."""

    hidden: Any
    mask: Any
    position_ids: Any
    position_embeddings: Any
    cache: Any
    cache_kw: str


def _decoder_pipe_class():
    from torch import nn

    class DecoderPipe(nn.Module):
        """One HF decoder layer as a PipelineModule layer (``layer`` is re-pointed at the AutoTP-sharded module)."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, step: _Step) -> _Step:
            step.hidden = self.layer(step.hidden, attention_mask=step.mask, position_ids=step.position_ids,
                                     position_embeddings=step.position_embeddings, use_cache=True,
                                     **{step.cache_kw: step.cache})
            return step

    return DecoderPipe


class Stage:
    """This rank's part of the pipeline, callable like an HF causal LM so that the shared greedy loop
    (:func:`llmcomm.measure.runs.common.generate`: phases, timing, argmax) drives it unchanged.

    What a call returns as ``.logits``: the last stage its real logits ``[b, keep, V]``; stage 0 a one-hot of the
    token handed back (so the loop's argmax yields it and feeds it to the next decode step); middle stages a
    placeholder (their ``input_ids`` are only read for their shape).
    """

    def __init__(self, ctx: RankContext, hf, p2p_mode: str, routing=None):
        import torch
        import deepspeed
        import deepspeed.comm as dist
        from deepspeed.inference.engine import InferenceEngine
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe import p2p
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        from llmcomm.measure.runs.common import TORCH_DTYPES, cache_kwarg, keep_stage

        model, layout = ctx.model, ctx.layout
        t, p, e = layout.t, layout.p, layout.e
        q = t * e                                            # ranks per stage: t TP ranks, or e EP ranks (t = 1)
        self.parts = check_layout(model, layout, ctx.world_size, p2p_mode)
        self.h, self.V = model.h, model.V
        self.dtype = TORCH_DTYPES[ctx.dtype]
        self.device = ctx.device
        self.p2p = p2p

        # 1. Partition and grid. PipelineModule builds its layer list on every rank but registers (and moves to the
        #    device) only the stage's slice. The grid's new_group calls rendezvous over the TCP store: no collective.
        DecoderPipe = _decoder_pipe_class()
        wrappers = [DecoderPipe(layer) for layer in hf.model.layers]
        topo = PipeModelDataParallelTopology(num_pp=p, num_mp=q, num_dp=1)
        self.pipe = PipelineModule(layers=wrappers, topology=topo, partition_method="uniform")
        grid = self.pipe._grid
        self.stage, self.tp_rank = grid.get_stage_id(), grid.get_slice_parallel_rank()
        self.first, self.last = self.stage == 0, self.stage == p - 1
        self.start, self.stop = self.pipe._local_start, self.pipe._local_stop
        got = [self.pipe.parts[i + 1] - self.pipe.parts[i] for i in range(p)]
        if got != self.parts:                                # DeepSpeed's split must be the one the formulas use
            raise SpecError(f"PipelineModule split the layers {got}, expected stage_layers = {self.parts}")
        assert ctx.rank == self.stage * q + self.tp_rank, "TP (EP) groups must be consecutive ranks"
        p2p.init_process_groups(grid)                        # only records the grid (torch >= 1.8: no groups made)
        self.tp_group = grid.get_slice_parallel_group()

        # 2. The stage's slice of the HF model, sharded by AutoTP as the TP-only runs shard the whole model.
        keep_stage(hf, self.start, self.stop, self.first, self.last)
        if t > 1:
            if torch.distributed.get_world_size(self.tp_group) != torch.distributed.get_world_size():
                # A TP group inside a larger world: the shm all-reduce would sum over the world (see module doc).
                dist.comm.cdb.shm_vector_kernel_level = 0
            InferenceEngine.inference_mp_group = self.tp_group
        engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": t}, dtype=self.dtype,
                                          replace_with_kernel_inject=False)
        self.hf = engine.module
        if e > 1:                                            # the stage's sparse blocks: DeepSpeed's MoE layer
            from deepspeed.utils import groups

            from llmcomm.measure.moe_adapter import adapt
            from llmcomm.measure.runs.common import moe_options

            # Every rank creates the EP groups (new_group is collective over the world), whether or not its stage
            # holds a MoE layer; DeepSpeed's legacy layout: consecutive ranks, i.e. this stage's e ranks.
            if f"ep_size_{e}" not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(e)
            ranks = list(groups._EXPERT_PARALLEL_GROUP_RANKS[f"ep_size_{e}"])
            if ranks != list(range(self.stage * e, self.stage * e + e)):
                raise SpecError(f"DeepSpeed put rank {ctx.rank} in EP group {ranks}, not its stage's ranks")
            self.hf = adapt(self.hf, e, **moe_options(routing))
        for k, layer in enumerate(self.hf.model.layers):     # run what AutoTP left in the model, whatever it replaced
            self.pipe.forward_funcs[k].layer = layer
        self.first_layer = self.start                         # global index of this stage's first layer (its cache)
        self.cache_kw = cache_kwarg(next(iter(self.hf.model.layers)))
        self.t = t
        self.set_p2p(p2p_mode)
        self.step_logits: list = []                           # last stage: logits of the last position per forward

    def set_p2p(self, mode: str) -> None:
        """The stage-to-stage mode from the next forward on (every rank of the launch switches together)."""
        self.partitioned = mode == "partitioned" and self.t > 1
        self.p2p_mode = mode if self.t > 1 else "full"

    # ------------------------------------------------------------------------------------------------ messages
    def _send_hidden(self, hidden) -> None:
        from deepspeed.runtime.utils import PartitionedTensor

        if self.partitioned:   # my 1/t of the flattened [b, s, h] to my peer on the next stage
            self.p2p.send(PartitionedTensor(tensor=hidden, group=self.tp_group).data(), self.stage + 1)
        else:
            self.p2p.send(hidden.contiguous(), self.stage + 1)

    def _recv_hidden(self, b: int, s: int):
        import torch
        from deepspeed.runtime.utils import PartitionedTensor

        shape = (b, s, self.h)                                # known from the schedule: no metadata message
        if not self.partitioned:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.p2p.recv(buf, self.stage - 1)
            return buf
        # The partition layout (what the sender's to_meta() carries in DeepSpeed's engine) is a function of the
        # shape and the TP rank, both known here; then DeepSpeed's PartitionedTensor all-gathers the t parts.
        meta = PartitionedTensor(tensor=torch.empty(shape, dtype=self.dtype, device=self.device),
                                 group=self.tp_group).to_meta()
        part = torch.empty(b * s * self.h // torch.distributed.get_world_size(self.tp_group), dtype=self.dtype,
                           device=self.device)
        self.p2p.recv(part, self.stage - 1)
        full = PartitionedTensor.from_meta(meta=meta, local_part=part, group=self.tp_group, device=self.device)
        return full.full().view(shape)

    # ------------------------------------------------------------------------------------------------ one forward
    def __call__(self, input_ids, use_cache=True, logits_to_keep=0, **kw):
        import torch
        from types import SimpleNamespace
        from transformers.masking_utils import create_causal_mask

        cache = kw[self.cache_kw]
        b, s = input_ids.shape
        past = cache.get_seq_length(self.first_layer)
        position_ids = torch.arange(past, past + s, device=self.device).unsqueeze(0)
        hidden = self.hf.model.embed_tokens(input_ids) if self.first else self._recv_hidden(b, s)
        m = self.hf.model
        mask = create_causal_mask(config=self.hf.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                                  position_ids=position_ids, layer_idx=self.first_layer)
        step = _Step(hidden=hidden, mask=mask, position_ids=position_ids,
                     position_embeddings=m.rotary_emb(hidden, position_ids=position_ids), cache=cache,
                     cache_kw=self.cache_kw)
        hidden = self.pipe(step).hidden                       # PipelineModule.forward: this stage's layers in order
        if not self.last:
            self._send_hidden(hidden)
        if self.last:
            hidden = m.norm(hidden)
            keep = logits_to_keep or s                        # as LlamaForCausalLM: 0 keeps every position
            logits = self.hf.lm_head(hidden[:, -keep:, :])    # LmHeadLinearAllreduce when t > 1
            self.step_logits.append(logits[:, -1, :].detach().float().clone())
            tok = logits[:, -1, :].argmax(dim=-1).view(b, 1).to(torch.int64)
            self.p2p.send(tok, 0)                             # token hand-back, last stage -> stage 0
            return SimpleNamespace(logits=logits)
        if self.first:
            tok = torch.empty((b, 1), dtype=torch.int64, device=self.device)
            self.p2p.recv(tok, self.stage_count - 1)
            onehot = torch.zeros((b, 1, self.V), device=self.device)
            return SimpleNamespace(logits=onehot.scatter_(2, tok.view(b, 1, 1), 1.0))
        return SimpleNamespace(logits=torch.zeros((b, 1, 1), device=self.device))

    @property
    def stage_count(self) -> int:
        return len(self.parts)


def run(ctx: RankContext):
    """The pipeline experiment on this rank: yields the rank-specific part of each configuration's result (one
    model build, one partition and AutoTP sharding for the whole sweep; see :mod:`llmcomm.measure.runs.tp`)."""
    import torch

    from llmcomm.measure.runs.common import build_model, generate, prompt_ids, reference_generations, warm_up

    model, layout = ctx.model, ctx.layout
    deps = [ctx.deployment(i) for i in range(len(ctx.workloads))]
    for d in deps:                                          # before any collective: one clear error on every rank
        check_layout(model, layout, ctx.world_size, d.p2p)
    hf = build_model(model, ctx.dtype, ctx.device, seed=ctx.seed)
    prompts = [prompt_ids(w, model.V, seed=ctx.seed, device=ctx.device) for w in ctx.workloads]
    if layout.e > 1:
        yield from _run_ep(ctx, hf, prompts, [d.routing for d in deps])
        return
    last_stage_rank0 = (layout.p - 1) * layout.t
    # Same weights, not yet cut or sharded: the single-process answers. Rank 0 reports their tokens; the first rank
    # of the last stage keeps their next-token logits to compare with the pipeline's.
    ref_logits: list[list] = []

    def recorder(**kw):
        out = hf(**kw)
        ref_logits[-1].append(out.logits[:, -1, :].detach().float().clone())
        return out

    on = ctx.reference and ctx.rank in (0, last_stage_rank0)
    references = []
    for ids, w in zip(prompts, ctx.workloads):
        ref_logits.append([])
        references += reference_generations(recorder, [ids], [w], on=on, hf_model=hf)

    with ctx.setup_capture() as cap, cap.phase("setup"):
        stage = Stage(ctx, hf, deps[0].p2p)
    warm_up(stage, stage.hf, prompts[0], ctx.workloads[0])
    cdb_level = getattr(__import__("deepspeed").comm.comm.cdb, "shm_vector_kernel_level", 0)
    comm = {"backend": torch.distributed.get_backend(),
            "allreduce_path": "shm" if (layout.t > 1 and cdb_level > 0 and
                                        hasattr(torch.ops.deepspeed, "inference_all_reduce_")) else "process_group"}
    for i, w in ctx.sweep():
        stage.set_p2p(deps[i].p2p)
        stage.step_logits = []
        with ctx.capture() as cap:
            gen = generate(stage, stage.hf, prompts[i], w.G, phase=ctx.phase_hook(cap), beat=ctx.beat)
        diff = None
        if on and ref_logits[i] and stage.last:
            diff = max((a - r).abs().max().item() for a, r in zip(stage.step_logits, ref_logits[i]))
        yield {"tokens": gen.tokens if (stage.first or stage.last) else None,
               "reference_tokens": references[i].tokens if ctx.rank == 0 and references[i] else None,
               "timings": gen.timings, "comm": comm, **ctx.profiled(stage, stage.hf, prompts[i], w.G),
               "pipeline": {"stage": stage.stage, "tp_rank": stage.tp_rank, "layers": [stage.start, stage.stop],
                            "stage_layers": stage.parts, "p2p": stage.p2p_mode,
                            "token_handback": "last stage -> stage 0, int64 [b, 1], every TP rank, once per forward",
                            "logits_max_abs_diff": diff}}


def _run_ep(ctx: RankContext, hf, prompts, routings: list):
    """EP×PP (see the module docs): this rank's share of each batch through the stages, its routing log, and the
    single-process reference of the share (the same weights, ``ep_size = 1``) on every rank of stage 0; each
    configuration under its own routing."""
    from llmcomm.measure.moe_adapter import RoutingLog, set_routing
    from llmcomm.measure.runs.common import ep_share, generate, moe_options, warm_up

    e = ctx.layout.e
    j = ctx.rank % e                                        # EP rank: which b/e sequences this rank runs
    shares, prompts, references = ep_share(hf, prompts, ctx.workloads, j, e, routings, ctx.reference and ctx.rank < e)
    with ctx.setup_capture() as cap, cap.phase("setup"):
        stage = Stage(ctx, hf, "full", routings[0])
    log = RoutingLog(stage.hf, first_layer=stage.start)
    warm_up(stage, stage.hf, prompts[0], ctx.workloads[0])
    for i, w in ctx.sweep():
        set_routing(stage.hf, **moe_options(routings[i]))
        log.take()
        with ctx.capture() as cap:
            gen = generate(stage, stage.hf, prompts[i], w.G, phase=ctx.phase_hook(cap), beat=ctx.beat)
        first = stage.first
        yield {"tokens": gen.tokens if first else None,
               "reference_tokens": references[i].tokens if first and references[i] else None,
               "share": list(shares[i]) if first else None, "timings": gen.timings, "routing": log.take(),
               "pipeline": {"stage": stage.stage, "ep_rank": j, "layers": [stage.start, stage.stop],
                            "stage_layers": stage.parts, "p2p": "full (each EP rank its own b/e sequences)",
                            "token_handback": "last stage -> stage 0, int64 [b/e, 1], every EP rank, once per "
                                              "forward"}}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.pipeline"))
