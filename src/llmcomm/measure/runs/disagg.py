"""Rank-side entry of a disaggregated measurement: a prefill group and a decode group of ranks in one launch, each
running DeepSpeed-Inference (AutoTP) with its own TP degree (and its own pipeline stages), the KV cache handed from
one to the other with ``torch.distributed`` point-to-point messages — what vLLM's NCCL-based KV connectors do.
Started on N_P + N_D ranks by :func:`llmcomm.measure.disaggregate.measure_disaggregated`; the
:class:`~llmcomm.spec.Disaggregation` rides in the launch options (``{"disaggregation": {"prefill": {t, p},
"decode": {t, p}}}``); arguments and result files as in :mod:`llmcomm.measure.runs.rankio`.

Ranks: the prefill side is global ranks 0 … N_P − 1, the decode side N_P … N_P + N_D − 1; inside a side, rank =
stage·t + TP rank (consecutive TP groups, as :class:`~llmcomm.spec.Layout` numbers them). Every rank builds the
seeded model; rank 0 runs the single-process reference first. Then each rank keeps its stage's layers (the
embedding on its side's first stage, the final norm and ``lm_head`` on its last) and shards them with
``deepspeed.init_inference(tp_size=t)`` — with ``InferenceEngine.inference_mp_group`` set to its stage's TP group
first, because ``init_inference`` ignores a passed ``tp_group`` and would shard every side over ranks ``range(t)``
(proof ``init_inference_ignores_tp_group.py``).

The one thin step two TP degrees in one world need: with t > 1, ``init_inference`` broadcasts the RNG state over
the **world** from rank 0 (``dist.broadcast(_rng_state, 0)``, no group), a collective every rank must join; a side
with t = 1 never calls it, so the other side would wait for ever (proof ``disagg_unequal_tp_broadcast.py``). Here a
t = 1 side joins that broadcast itself, with a tensor of the same size, when the other side has t > 1 (and so
receives rank 0's RNG state, as the t > 1 side does). Sub-groups also need the gloo all-reduce on CPU (the shm
all-reduce ignores them: proof ``shm_allreduce_ignores_subgroups.py``): the launcher asks for backend gloo.

One configuration (phases as the capture names them):

* ``prefill`` — the prefill side's forward over the S prompt tokens (``logits_to_keep=1``), stage to stage by plain
  sends of the whole ``[b, S, h]`` from each TP rank to its peer (the ``deepspeed-full`` pattern), then, as
  :mod:`llmcomm.measure.runs.pipeline` does, the last stage's TP ranks hand the first token back to stage 0 (where
  requests come in; with p_P = 1 there is nothing to hand back);
* ``kv_transfer`` — the hand-off (:mod:`llmcomm.derive.disagg`): for every layer, each prefill rank holding it sends
  to each decode rank holding it the K and V of the KV heads both hold, one ``[2, b, heads, S, d]`` tensor; the
  order is layer, prefill TP rank, decode TP rank on every rank (one global order: blocking sends cannot deadlock);
  which heads a rank holds is read from its own cache tensor after sharding (its TP rank × its head count), not
  from the plan. The decode rank concatenates the pieces of a layer along the head axis and puts them in a fresh
  ``DynamicCache``. Then the prefill's last stage, TP rank 0, sends the first token's ids (int64 ``[b, 1]``) to
  every rank of the decode side's first stage;
* ``decode`` — the decode side's G − 1 forwards from that cache (positions S, S + 1, …), stage to stage as above,
  the token handed back from its last stage to its first after every forward (as the pipeline runner does).

Each configuration starts with a world barrier outside the capture (both sides begin together: the decode side is
waiting when the prefill ends, as an idle decode instance would). Tokens: the decode side's first stage reports all G
(the first one received, the others its own); they must equal the single-process reference. Timings (wall clock ``time.time()`` of the machine, so comparable between ranks of one
host only): the prefill ranks report their prefill's start and end, the decode ranks the hand-off's end and their
decode steps; :func:`llmcomm.measure.disaggregate.measure_disaggregated` turns them into TTFT = hand-off end −
prefill start and the hand-off's own time = hand-off end − prefill end.
"""
from __future__ import annotations

import sys
import time

from llmcomm.measure.runs.rankio import RankContext, rank_main
from llmcomm.spec import Disaggregation, Layout, SpecError, stage_layers

__all__ = ["disaggregation_of", "run"]


def disaggregation_of(options: dict) -> Disaggregation:
    """The :class:`Disaggregation` of the launch options (one :class:`SpecError` when absent or malformed)."""
    spec = options.get("disaggregation")
    if not isinstance(spec, dict):
        raise SpecError("a disaggregated run needs options['disaggregation'] = {'prefill': {...}, 'decode': {...}}")
    return Disaggregation(Layout(**spec["prefill"]), Layout(**spec["decode"]), spec.get("kv_dtype"))


class SideStage:
    """This rank's stage of its side: ``side`` ("prefill" or "decode"), ``stage``, ``tp_rank``, its layers
    [start, stop), the sharded HF slice ``hf``; :meth:`forward` runs one forward of the side (receiving and sending
    the hidden state between stages) and returns the last stage's next tokens ``[b]`` (None elsewhere)."""

    def __init__(self, ctx: RankContext, hf, dis: Disaggregation, groups: dict):
        import torch
        import deepspeed
        import deepspeed.comm as dist
        from deepspeed.inference.engine import InferenceEngine

        from llmcomm.measure.runs.common import TORCH_DTYPES, cache_kwarg, keep_stage

        prefill = ctx.rank < dis.prefill.ranks
        self.side, self.layout = ("prefill", dis.prefill) if prefill else ("decode", dis.decode)
        self.base = 0 if prefill else dis.prefill.ranks
        t, p = self.layout.t, self.layout.p
        self.stage, self.tp_rank = divmod(ctx.rank - self.base, t)
        parts = stage_layers(ctx.model.L, p)
        self.start = sum(parts[:self.stage])
        self.stop = self.start + parts[self.stage]
        self.first, self.last = self.stage == 0, self.stage == p - 1
        self.device, self.dtype, self.h = ctx.device, TORCH_DTYPES[ctx.dtype], ctx.model.h

        keep_stage(hf, self.start, self.stop, self.first, self.last)
        other = dis.decode if prefill else dis.prefill
        if t > 1:
            dist.comm.cdb.shm_vector_kernel_level = 0        # a TP group inside a larger world: gloo's all-reduce
            InferenceEngine.inference_mp_group = groups[(self.side, self.stage)]
        elif other.t > 1:                                    # the thin step (module docs): join the world broadcast
            state = torch.get_rng_state()
            dist.broadcast(state, 0)
            torch.set_rng_state(state)
        engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": t}, dtype=self.dtype,
                                          replace_with_kernel_inject=False)
        self.hf = engine.module
        self.cache_kw = cache_kwarg(next(iter(self.hf.model.layers)))

    def peer(self, stage: int) -> int:
        """Global rank of this rank's TP peer on ``stage`` of its side."""
        return self.base + stage * self.layout.t + self.tp_rank

    def forward(self, ids, cache):
        """One forward of the side over ``ids`` ``[b, s]`` (only its shape is read off the first stage)."""
        import torch
        import torch.distributed as tdist
        from transformers.masking_utils import create_causal_mask

        b, s = ids.shape
        past = cache.get_seq_length(self.start)
        position_ids = torch.arange(past, past + s, device=self.device).unsqueeze(0)
        m = self.hf.model
        if self.first:
            hidden = m.embed_tokens(ids)
        else:
            hidden = torch.empty((b, s, self.h), dtype=self.dtype, device=self.device)
            tdist.recv(hidden, self.peer(self.stage - 1))
        mask = create_causal_mask(config=self.hf.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                                  position_ids=position_ids, layer_idx=self.start)
        rotary = m.rotary_emb(hidden, position_ids=position_ids)
        for layer in m.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary,
                           use_cache=True, **{self.cache_kw: cache})
        if not self.last:
            tdist.send(hidden.contiguous(), self.peer(self.stage + 1))
            return None
        logits = self.hf.lm_head(m.norm(hidden)[:, -1:, :])   # LmHeadLinearAllreduce when t > 1
        return logits[:, -1, :].argmax(dim=-1)

    def hand_back(self, tok, b: int):
        """The token of the forward just run, from the last stage to the first (every TP rank to its peer); returns
        it on the first stage. Nothing to do with one stage."""
        import torch
        import torch.distributed as tdist

        if self.layout.p == 1:
            return tok
        if self.last:
            tdist.send(tok.view(b, 1).to(torch.int64).contiguous(), self.peer(0))
            return None
        if self.first:
            buf = torch.empty((b, 1), dtype=torch.int64, device=self.device)
            tdist.recv(buf, self.peer(self.layout.p - 1))
            return buf.view(b)
        return None


def _groups(dis: Disaggregation) -> dict:
    """Every stage's TP group of both sides, made by every rank in one order (``new_group`` is collective)."""
    import torch.distributed as tdist

    out = {}
    for side, lay, base in (("prefill", dis.prefill, 0), ("decode", dis.decode, dis.prefill.ranks)):
        if lay.t > 1:
            for stage in range(lay.p):
                out[(side, stage)] = tdist.new_group([base + stage * lay.t + i for i in range(lay.t)])
    return out


def _handoff_send(st: SideStage, dis: Disaggregation, cache, model, tok) -> None:
    """The prefill rank's part of the hand-off (module docs)."""
    import torch
    import torch.distributed as tdist

    from llmcomm.derive.disagg import head_ranges, layer_stages

    decode_stages = layer_stages(model.L, dis.decode.p)
    for layer in range(st.start, st.stop):
        keys, vals = cache.layers[layer].keys, cache.layers[layer].values    # [b, my heads, S, d]
        mine = keys.shape[1]
        lo_i = st.tp_rank * mine
        dst_stage = decode_stages[layer]
        for j, (lo_j, hi_j) in enumerate(head_ranges(model.kv_heads, dis.decode.t)):
            lo, hi = max(lo_i, lo_j), min(lo_i + mine, hi_j)
            if lo < hi:
                kv = torch.stack([keys[:, lo - lo_i:hi - lo_i], vals[:, lo - lo_i:hi - lo_i]]).contiguous()
                tdist.send(kv, dis.prefill.ranks + dst_stage * dis.decode.t + j)
    if st.last and st.tp_rank == 0:
        for j in range(dis.decode.t):
            tdist.send(tok.view(-1, 1).to(torch.int64).contiguous(), dis.prefill.ranks + j)


def _handoff_recv(st: SideStage, dis: Disaggregation, cache, model, w):
    """The decode rank's part of the hand-off: its layers' K and V into ``cache``; returns the first token on the
    first stage (None elsewhere)."""
    import torch
    import torch.distributed as tdist

    from llmcomm.derive.disagg import head_ranges, layer_stages

    prefill_stages = layer_stages(model.L, dis.prefill.p)
    heads = model.kv_heads // dis.decode.t
    lo_j = st.tp_rank * heads
    pre = head_ranges(model.kv_heads, dis.prefill.t)
    for layer in range(st.start, st.stop):
        src_stage = prefill_stages[layer]
        parts = []
        for i, (lo_i, hi_i) in enumerate(pre):
            lo, hi = max(lo_i, lo_j), min(hi_i, lo_j + heads)
            if lo < hi:
                buf = torch.empty((2, w.b, hi - lo, w.S, model.head_dim), dtype=st.dtype, device=st.device)
                tdist.recv(buf, src_stage * dis.prefill.t + i)
                parts.append(buf)
        kv = torch.cat(parts, dim=2)                           # the re-layout: head slices side by side
        cache.update(kv[0], kv[1], layer)
    if not st.first:
        return None
    tok = torch.empty((w.b, 1), dtype=torch.int64, device=st.device)
    tdist.recv(tok, (dis.prefill.p - 1) * dis.prefill.t)
    return tok.view(w.b)


def run(ctx: RankContext):
    """The disaggregated experiment on this rank: yields each configuration's rank-specific result."""
    import torch
    from transformers import DynamicCache

    from llmcomm.measure.runs.common import build_model, prompt_ids, reference_generations

    model = ctx.model
    dis = disaggregation_of(ctx.options).validate(model)
    if dis.ranks != ctx.world_size:
        raise SpecError(f"{dis.label} needs {dis.ranks} ranks, but {ctx.world_size} were launched")
    if dis.kv_dtype not in (None, ctx.dtype):
        raise SpecError(f"a measured hand-off moves the KV cache in the model dtype {ctx.dtype}, not "
                        f"{dis.kv_dtype}")
    hf = build_model(model, ctx.dtype, ctx.device, seed=ctx.seed)
    prompts = [prompt_ids(w, model.V, seed=ctx.seed, device=ctx.device) for w in ctx.workloads]
    references = reference_generations(hf, prompts, ctx.workloads, on=ctx.rank == 0 and ctx.reference)
    with ctx.setup_capture() as cap, cap.phase("setup"):
        groups = _groups(dis)
        st = SideStage(ctx, hf, dis, groups)
    config = hf.config
    import llmcomm.derive.disagg  # noqa: F401  (the hand-off's head ranges: imported now, not inside the timing)
    for i, w in ctx.sweep():
        # Both sides start each configuration together (outside the capture: not a message of the run), so the
        # hand-off's time is the transfer's, not the decode side finishing the configuration before.
        torch.distributed.barrier()
        with torch.no_grad(), ctx.capture() as cap:
            phase = ctx.phase_hook(cap)
            cache = DynamicCache(config=config)
            timings, tokens = {}, None
            if st.side == "prefill":
                with phase("prefill"):
                    timings["prefill_start"] = time.time()
                    tok = st.forward(prompts[i], cache)
                    timings["prefill_end"] = time.time()
                    st.hand_back(tok, w.b)
                with phase("kv_transfer"):
                    _handoff_send(st, dis, cache, model, tok)
                ctx.beat()
            else:
                with phase("kv_transfer"):
                    tok = _handoff_recv(st, dis, cache, model, w)
                    timings["handoff_end"] = time.time()
                out = [tok] if tok is not None else []
                steps = []
                with phase("decode"):
                    for _ in range(w.G - 1):
                        s0 = time.time()
                        ids = tok.view(w.b, 1) if tok is not None else torch.zeros((w.b, 1), dtype=torch.int64)
                        nxt = st.forward(ids, cache)
                        tok = st.hand_back(nxt, w.b)
                        steps.append(time.time() - s0)
                        if tok is not None:
                            out.append(tok)
                        ctx.beat()
                timings["decode_steps_s"] = steps
                if st.first:
                    tokens = torch.stack(out, dim=1).tolist()
        yield {"tokens": tokens, "reference_tokens": references[i].tokens if references[i] else None,
               "timings": {"tpot_s": sum(timings.get("decode_steps_s", [])) / max(1, w.G - 1), **timings},
               "disaggregation": {"side": st.side, "stage": st.stage, "tp_rank": st.tp_rank,
                                  "layers": [st.start, st.stop]}}


if __name__ == "__main__":
    sys.exit(rank_main(run, entry="llmcomm.measure.runs.disagg"))
