"""DeepSpeed's MoE layer in place of a Hugging Face Mixtral (or Qwen3-MoE) sparse block: expert parallelism for the
measurements.

transformers 5.24's ``MixtralSparseMoeBlock`` keeps every expert in two fused parameters (``experts.gate_up_proj``
[E, 2F, h], gate rows first, and ``experts.down_proj`` [E, h, F]) and routes with ``gate`` (a top-k router over
``softmax(x Wᵀ)``, weights renormalised over the k chosen). DeepSpeed-Inference has no expert parallelism for it:
AutoTP shards attention only, and DeepSpeed 0.19.8's AutoEP works only through ``deepspeed.initialize`` and fails on
transformers 5.24 (book appendix *Dependency facts*). This module is the one thin adaptation the project makes
(:func:`adapt`): each layer's block becomes a ``deepspeed.moe.layer.MoE`` with ``ep_size = e`` whose experts are this
rank's E/e experts, copied from the fused tensors — global expert j lives on EP rank ``j // (E/e)``, the order in
which ``all_to_all_single`` splits DeepSpeed's [E, C, h] dispatch buffer — and whose gate is the HF router's weight.

Settings that make DeepSpeed's layer compute Mixtral's function (each measured; book appendix):

* ``top2_2nd_expert_sampling=False`` — its default adds Gumbel noise to the second choice, in eval too;
* ``noisy_gate_policy=None``, ``use_rts=False`` — no randomness in which tokens survive an over-full expert;
* ``set_deepspeed_parallelism()`` called by hand — ``deepspeed.initialize`` would, ``init_inference`` does not; without
  it the all-to-alls run on the world group;
* ``drop_tokens=False`` (dropless: capacity C = the largest per-expert count over the EP group, one all-reduce MAX
  first) equals HF Mixtral; capacity mode (``drop_tokens=True``, C = max(⌈T·k·c_f/E⌉, C_min) per rank) drops routes
  beyond C and then equals the same adapted model run in one process on the rank's share (the reference the runs
  compare with), not HF Mixtral;
* k = 1 is refused: DeepSpeed weights the single expert by its softmax probability where Mixtral uses 1;
* Qwen3-MoE's block has the same fused tensors and router (``Qwen3MoeTopKRouter``); with ``norm_topk_prob=True`` (both
  published Qwen3-MoE models) its top-k weights are renormalised as DeepSpeed's ``top2gating``/``topkgating`` do,
  so the same adaptation holds; ``norm_topk_prob=False`` and Qwen2-MoE's shared expert are refused (DeepSpeed's
  layer would renormalise, or drop the shared expert).

:class:`RoutingLog` records, for every MoE forward, the per-expert route counts of this rank's tokens (before any
drop) and the capacity C DeepSpeed used: the inputs of the closed forms (:mod:`llmcomm.derive.moe`).

Sharded experts (``tp-experts``, the serving engines' TP layout): DeepSpeed has no path that shards HF's fused expert
tensors, so :func:`shard_experts` is the second thin step, taken after AutoTP: TP rank r keeps rows
``[r·F/t, (r+1)·F/t)`` of each expert's gate and of its up projection (``gate_up_proj[:, :F]`` and ``[:, F:]``) and
the same columns of ``down_proj`` — a column- then row-parallel FFN, as AutoTP shards a dense MLP — so the block's
output is a partial sum, all-reduced over the TP group with DeepSpeed's ``inference_all_reduce`` (what AutoTP's
``LinearAllreduce`` calls). The router stays whole: every rank routes the same tokens the same way. HF's experts
(``experts_implementation="grouped_mm"``, the default: one grouped GEMM per projection, ``chunk(2)`` of the fused
product between; proof ``tools/proofs/experts_grouped_mm.py``) run the sharded tensors unchanged.

:func:`layer_op_rows` counts, from a profiler trace (:mod:`llmcomm.measure.opcount`), the ATen ops one forward of
each of these blocks dispatches (``benchmarks/moe_layer_ops.py`` stores them): the host profiles' MoE layer cost.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExpertFFN", "DeepSpeedMoEBlock", "adapt", "set_routing", "RoutingLog", "ShardedExpertsBlock",
           "shard_experts", "IMPLEMENTATIONS", "layer_op_rows"]


class ExpertFFN(nn.Module):
    """One Mixtral expert: ``down(act(gate(x)) · up(x))`` with gate and up fused as in HF (weight [2F, h])."""

    def __init__(self, h: int, F: int, act):
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * F, bias=False)
        self.down = nn.Linear(F, h, bias=False)
        self.act = act

    def forward(self, x):                     # DeepSpeed feeds [e, 1, C, h]; padding rows are zeros and stay zeros
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class DeepSpeedMoEBlock(nn.Module):
    """``deepspeed.moe.layer.MoE`` holding this EP rank's experts of an HF sparse block (see the module docs)."""

    def __init__(self, hf_block, ep_size: int, dropless: bool, capacity_factor: float, min_capacity: int):
        super().__init__()
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        ex = hf_block.experts
        E, h, F = ex.num_experts, ex.hidden_dim, ex.intermediate_dim
        k = hf_block.gate.top_k
        if k < 2:
            raise ValueError("top-1 routing is not adapted: DeepSpeed weights by the softmax probability, Mixtral by 1")
        if hasattr(hf_block, "shared_expert"):
            raise ValueError("a shared expert (Qwen2-MoE) is not adapted: DeepSpeed's MoE layer would drop it")
        if not getattr(hf_block.gate, "norm_topk_prob", True):
            raise ValueError("norm_topk_prob=False is not adapted: DeepSpeed renormalises the top-k weights")
        self.moe = MoE(hidden_size=h, expert=ExpertFFN(h, F, ex.act_fn), num_experts=E, ep_size=ep_size, k=k,
                       capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                       min_capacity=min_capacity, noisy_gate_policy=None, drop_tokens=not dropless, use_rts=False,
                       top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        ep_rank = groups._get_expert_parallel_rank(self.moe.expert_group_name)
        local = self.moe.num_local_experts
        self.experts_here = [ep_rank * local + j for j in range(local)]
        self.moe = self.moe.to(hf_block.gate.weight.dtype)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(hf_block.gate.weight)
            for j, e in enumerate(self.experts_here):
                mod = self.moe.deepspeed_moe.experts.deepspeed_experts[j]
                mod.gate_up.weight.copy_(ex.gate_up_proj[e])
                mod.down.weight.copy_(ex.down_proj[e])

    def forward(self, hidden_states):
        out, _aux_loss, _counts = self.moe(hidden_states)
        return out


def adapt(hf_model, ep_size: int, *, dropless: bool, capacity_factor: float = 1.0, min_capacity: int = 4):
    """Replace every sparse block of ``hf_model`` (in place) by a :class:`DeepSpeedMoEBlock`; returns the model.
    Collective: every rank must call it with the same arguments, in the same order (it creates the EP groups)."""
    for layer in hf_model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = DeepSpeedMoEBlock(layer.mlp, ep_size, dropless, capacity_factor, min_capacity)
    return hf_model.eval()


def set_routing(hf_model, *, dropless: bool, capacity_factor: float = 1.0, min_capacity: int = 4):
    """Route every adapted MoE layer of ``hf_model`` this way from the next forward on: DeepSpeed's ``TopKGate``
    reads ``drop_tokens``, ``eval_capacity_factor`` and ``min_capacity`` at every forward, so one launch measures
    several routings (proof ``tools/proofs/per_config_options.py``: the same outputs and all-to-all sizes as a layer
    built with that routing). Local: no collective."""
    for layer in hf_model.model.layers:
        if isinstance(layer.mlp, DeepSpeedMoEBlock):
            gate = layer.mlp.moe.deepspeed_moe.gate
            gate.drop_tokens = not dropless
            gate.capacity_factor = gate.eval_capacity_factor = capacity_factor
            gate.min_capacity = min_capacity
    return hf_model


class RoutingLog:
    """Per MoE layer of every forward of ``model`` (adapted by :func:`adapt`), in call order: ``{"forward",
    "layer", "tokens", "counts", "capacity", "kept"}`` — the forward's index since the last :meth:`take`, the
    decoder layer (its index in the whole model: ``first_layer`` is that of ``model``'s first, a pipeline stage's),
    the rank's tokens T, its routes per expert before any drop (DeepSpeed's ``exp_counts``), the capacity C of the
    dispatch buffer [E, C, h] (dropless: after the EP group's all-reduce MAX) and the routes DeepSpeed kept (its
    route indices that are not −1: T·k − kept were dropped)."""

    def __init__(self, model, first_layer: int = 0):
        self.records: list[dict] = []
        self._handles = []
        layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepSpeedMoEBlock)]
        self._per_forward = len(layers)
        for i in layers:
            gate = model.model.layers[i].mlp.moe.deepspeed_moe.gate
            self._handles.append(gate.register_forward_hook(self._hook(first_layer + i)))

    def _hook(self, layer: int):
        def record(_module, inputs, output):
            # the gate's sparse routes: (l_aux, C, E, indices, locations, gates, exp_counts); indices [k, T] hold
            # −1 for every route the capacity limit evicted
            self.records.append({"forward": len(self.records) // self._per_forward, "layer": layer,
                                 "tokens": int(inputs[0].shape[0]), "capacity": int(output[1]),
                                 "counts": [int(c) for c in output[-1].tolist()],
                                 "kept": int((output[3] >= 0).sum())})
        return record

    def take(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    def close(self):
        for h in self._handles:
            h.remove()


class ShardedExpertsBlock(nn.Module):
    """An HF Mixtral sparse block with every expert sharded ``t`` ways (see the module docs): HF's own forward on the
    rank's shards, then the all-reduce of the partial sum over ``group``."""

    def __init__(self, hf_block, rank: int, t: int, group):
        super().__init__()
        if hasattr(hf_block, "shared_expert"):
            raise ValueError("sharding a shared expert (Qwen2-MoE) is not adapted: only Mixtral-style blocks")
        ex = hf_block.experts
        F = ex.intermediate_dim
        if F % t:
            raise ValueError(f"t={t} does not divide the expert width F_ex={F}")
        f = F // t
        lo, hi = rank * f, (rank + 1) * f
        with torch.no_grad():
            gate_up = torch.cat([ex.gate_up_proj[:, lo:hi], ex.gate_up_proj[:, F + lo:F + hi]], dim=1)
            down = ex.down_proj[:, :, lo:hi]
        ex.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=False)
        ex.down_proj = nn.Parameter(down.contiguous(), requires_grad=False)
        ex.intermediate_dim = f
        self.block, self.group = hf_block, group

    def forward(self, hidden_states):
        import deepspeed.comm as dist

        out = self.block(hidden_states)
        dist.inference_all_reduce(out, group=self.group)
        return out


def shard_experts(hf_model, group):
    """Shard every sparse block of ``hf_model`` (already through AutoTP) over the TP ``group`` (in place); returns
    the model. Every TP rank calls it."""
    import torch.distributed as tdist

    t, rank = tdist.get_world_size(group), tdist.get_rank(group)
    for layer in hf_model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = ShardedExpertsBlock(layer.mlp, rank, t, group)
    return hf_model


#: the MoE block implementations :func:`layer_op_rows` counts (the ``implementation`` column of its rows)
IMPLEMENTATIONS = {
    "hf-grouped_mm": "the HF sparse block as transformers 5.24 builds it (experts_implementation 'grouped_mm', its "
                     "default): the TP schemes' block, experts whole (autotp)",
    "hf-eager": "the same block with experts_implementation='eager' (a Python loop over the experts hit)",
    "hf-sharded": "the HF block with every expert sharded over the world's t ranks, then its all-reduce "
                  "(ShardedExpertsBlock: tp-experts)",
    "deepspeed-moe": "DeepSpeed's MoE layer as adapt() builds it (ep_size = e), under the row's routing",
    "dense-mlp": "the dense MLP of a Llama decoder layer (what a dense layer's host overhead was counted with)",
}


def layer_op_rows(preset: str, e: int, b: int = 2, S: int = 16, seed: int = 0) -> list[dict]:
    """Profiler op counts (:func:`llmcomm.measure.opcount.count_ops`) of the first MoE decoder layer of ``preset``
    (a dense preset: its first layer) in one prefill forward (``b`` sequences of ``S`` tokens, a fresh cache) and
    one decode forward (one token each) of the whole model, per section of the layer: ``layer`` (attention, norms,
    residuals: the layer outside its MLP), ``block`` (the MLP block outside its router and experts: DeepSpeed's
    dispatch, all-to-alls and combine, HF's token sort and gather), ``gate`` (the router), ``experts`` (the experts
    module outside its first expert), ``expert`` (DeepSpeed's first local expert). One row per (implementation,
    routing, phase, section) with ``host_ops``, ``launch_ops``, ``kernel_ops``, ``collectives``.

    Collective when the world has more than one rank: every rank calls it with the same arguments (``e`` = the EP
    degree of DeepSpeed's layer, which divides the world; the sharded HF block uses the whole world as its TP group;
    with one rank it is skipped)."""
    import copy

    import deepspeed.comm as dist

    from llmcomm.spec import load_model
    from .opcount import count_ops
    from .runs.common import build_model, cache_kwarg, generate

    spec = load_model(preset)
    world = dist.get_world_size() if dist.is_initialized() else 1
    base = build_model(spec, "fp32", "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, spec.V, (b, S), generator=g)
    li = next((i for i, layer in enumerate(base.model.layers) if hasattr(layer.mlp, "experts")), 0)
    variants = []                                            # (implementation, routing, model, labelled modules)

    def sections(model, extra=()):
        layer = model.model.layers[li]
        mods = {"layer": layer, "block": layer.mlp}
        for name, path in extra:
            mods[name] = path(layer.mlp)
        return mods

    if not spec.is_moe:
        variants.append(("dense-mlp", "-", base, sections(base)))
    else:
        hf_parts = (("gate", lambda m: m.gate), ("experts", lambda m: m.experts))
        variants.append(("hf-grouped_mm", "-", base, sections(base, hf_parts)))
        eager = copy.deepcopy(base)
        eager.set_experts_implementation("eager")
        variants.append(("hf-eager", "-", eager, sections(eager, hf_parts)))
        if world > 1:
            sharded = shard_experts(copy.deepcopy(base), None)
            variants.append(("hf-sharded", "-", sharded, sections(sharded, (("gate", lambda m: m.block.gate),
                                                                            ("experts", lambda m: m.block.experts)))))
        ds_parts = (("gate", lambda m: m.moe.deepspeed_moe.gate), ("experts", lambda m: m.moe.deepspeed_moe.experts),
                    ("expert", lambda m: m.moe.deepspeed_moe.experts.deepspeed_experts[0]))
        ds = adapt(copy.deepcopy(base), e, dropless=False)
        for routing in ("capacity", "dropless"):
            variants.append(("deepspeed-moe", routing, ds, sections(ds, ds_parts)))
    rows = []
    for impl, routing, model, mods in variants:
        if impl == "deepspeed-moe":
            set_routing(model, dropless=routing == "dropless")
        phases = {}

        def run(model=model, phases=phases):
            # one prefill and one decode step, each profiled on its own (the cache carries over)
            from transformers import DynamicCache

            kw = {cache_kwarg(model): DynamicCache(config=model.config)}
            with torch.no_grad():
                phases["prefill"] = count_ops(lambda: model(input_ids=ids, use_cache=True, **kw), mods)
                phases["decode"] = count_ops(lambda: model(input_ids=ids[:, :1], use_cache=True, **kw), mods)

        generate(model, model, ids, 2)                       # warm-up: first-call paths out of the counts
        run()
        moe = spec.moe
        for phase, counts in phases.items():
            for section in ("layer", "block", "gate", "experts", "expert"):
                if section not in counts:
                    continue
                c = counts[section]
                rows.append({"model": preset, "implementation": impl, "routing": routing,
                             "t": world if impl == "hf-sharded" else 1, "e": e if impl == "deepspeed-moe" else 1,
                             "E": moe.experts if moe else 0, "k": moe.top_k if moe else 0,
                             "local_experts": (moe.experts // e if impl == "deepspeed-moe" else moe.experts)
                             if moe else 0, "phase": phase, "b": b, "s": S if phase == "prefill" else 1,
                             "section": section, "host_ops": c["host_ops"], "launch_ops": c["launch_ops"],
                             "kernel_ops": c["kernel_ops"], "collectives": c["collectives"],
                             "launch_op_names": " ".join(f"{n.removeprefix('aten::')}:{x}"
                                                         for n, x in sorted(c["names"].items()))})
    return rows
