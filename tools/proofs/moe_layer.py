"""PROOF: what DeepSpeed 0.19.8 does with a Hugging Face Mixtral (transformers 5.24), and the traps of its MoE layer.

Run: ``deepspeed --num_gpus 2 --master_port 29617 tools/proofs/moe_layer.py`` (CPU, gloo, ~20 s).

Claims:
1. AutoTP (``init_inference``, t = 2) shards the attention but leaves the fused expert tensors
   ``experts.gate_up_proj`` [E, 2F, h] and ``experts.down_proj`` [E, h, F] whole on every rank (bare Parameters, not
   ``nn.Linear``): one forward makes L + 1 all-reduces — ``o_proj`` per layer and the head — not the 2L + 1 of a
   dense model (the ``deepspeed-moe-autotp`` pattern; the experts are replicated t times).
2. ``deepspeed.moe.layer.MoE`` with its default ``top2_2nd_expert_sampling=True`` adds Gumbel noise to the second
   expert's choice in eval too: two identical forwards differ; with ``False`` they are bitwise equal
   (``llmcomm.measure.moe_adapter`` sets it False).
3. Without ``set_deepspeed_parallelism()`` — called by ``deepspeed.initialize``, not by ``init_inference`` or plain
   use — the MoE layer has no expert-parallel group (``ep_group`` is None) and its all-to-alls would run on the world
   group (``llmcomm.measure.moe_adapter`` calls it).
4. With the adapter's settings and dropless routing, DeepSpeed's MoE layer (``ep_size = 1``) computes the HF sparse
   block's function: Mixtral's (top-2: DeepSpeed's ``top2gating``) and Qwen3-MoE's with ``norm_topk_prob=True``
   (top-4: ``topkgating``) — both renormalise the top-k weights.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from transformers import MixtralForCausalLM  # noqa: E402

from llmcomm.measure.capture import Capture  # noqa: E402
from llmcomm.measure.moe_adapter import ExpertFFN  # noqa: E402
from llmcomm.spec import load_model  # noqa: E402

claims = []
torch.manual_seed(_tiny.SEED)
spec = load_model("tiny-mixtral")
model = MixtralForCausalLM(spec.to_hf_config()).eval()
L, h, E, F = spec.L, spec.h, spec.E, spec.moe.expert_ffn
engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                  replace_with_kernel_inject=False)
experts = engine.module.model.layers[0].mlp.experts
ids = _tiny.prompt(2, 7, spec.V)
with Capture() as cap, torch.no_grad():
    engine(input_ids=ids, logits_to_keep=1)
ar = [e for e in cap.events if e.op == "all_reduce"]
claims += [
    (tuple(experts.gate_up_proj.shape) == (E, 2 * F, h) and tuple(experts.down_proj.shape) == (E, h, F)
     and type(engine.module.model.layers[0].self_attn.o_proj).__name__ == "LinearAllreduce",
     f"AutoTP t=2 on Mixtral: o_proj is {type(engine.module.model.layers[0].self_attn.o_proj).__name__}, the fused "
     f"experts stay whole on every rank: gate_up_proj {list(experts.gate_up_proj.shape)}, down_proj "
     f"{list(experts.down_proj.shape)}"),
    (len(ar) == L + 1 and len(cap.events) == L + 1,
     f"one forward made {len(cap.events)} calls, {len(ar)} all-reduces = L + 1 = {L + 1} (dense: 2L + 1 = {2 * L + 1})"),
]

x = torch.randn(1, 16, h)
for sampling in (True, False):
    torch.manual_seed(0)
    layer = MoE(hidden_size=h, expert=ExpertFFN(h, F, torch.nn.SiLU()), num_experts=E, ep_size=1, k=2,
                use_rts=False, top2_2nd_expert_sampling=sampling).eval()
    if sampling:
        claims.append((layer.deepspeed_moe.ep_group is None,
                       f"before set_deepspeed_parallelism() the MoE layer's ep_group is "
                       f"{layer.deepspeed_moe.ep_group!r}"))
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        a, b = layer(x)[0], layer(x)[0]
    same = torch.equal(a, b)
    claims.append((same != sampling,
                   f"top2_2nd_expert_sampling={sampling}: two identical eval forwards are "
                   f"{'bitwise equal' if same else f'different (max |diff| {float((a - b).abs().max()):.3g})'}"))
from llmcomm.measure.moe_adapter import DeepSpeedMoEBlock  # noqa: E402
from llmcomm.measure.runs.common import build_model  # noqa: E402

for preset in ("tiny-mixtral", "tiny-qwen3-moe"):
    hf = build_model(load_model(preset), "fp32", "cpu", seed=_tiny.SEED)
    block = next(layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts"))
    x = torch.randn(2, 9, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = block(x)
        got = DeepSpeedMoEBlock(block, 1, dropless=True, capacity_factor=1.0, min_capacity=4).eval()(x)
    err = float((got - want).abs().max())
    claims.append((err < 1e-5, f"{preset} (top-{block.gate.top_k} of {block.experts.num_experts}): DeepSpeed's MoE "
                               f"layer, dropless, ep_size 1, equals the HF sparse block (max |diff| {err:.2g})"))
_tiny.report(claims if dist.get_rank() == 0 else [], src=0)
