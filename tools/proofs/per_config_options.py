"""PROOF: what one launch may change from one configuration to the next (DeepSpeed 0.19.8, transformers 5.24).

Run: ``deepspeed --num_gpus 2 --master_port 29618 tools/proofs/per_config_options.py`` (CPU, gloo, ~20 s).

Claims:
1. DeepSpeed's MoE gate (``TopKGate``) reads ``drop_tokens``, ``eval_capacity_factor`` and ``min_capacity`` at every
   forward: a tiny Mixtral adapted with expert parallelism (``ep_size = 2``, ``llmcomm.measure.moe_adapter.adapt``)
   under capacity routing, switched to dropless routing (``llmcomm.measure.moe_adapter.set_routing``), computes the
   same logits and sends all-to-alls of the same sizes as one adapted dropless from the start — and switched back,
   the same as capacity routing from the start. So routing may change per configuration inside one EP launch.
2. Sharding every expert after AutoTP (``llmcomm.measure.moe_adapter.shard_experts``) sends nothing (no collective
   while it runs) and the sharded model computes the unsharded model's logits: AutoTP's configurations and the
   sharded experts' configurations may share one launch, the sharded ones last (sharding is not undone).
3. The pipeline runner's stage-to-stage mode is its own sends (``deepspeed.runtime.pipe.p2p`` and
   ``PartitionedTensor``), chosen per forward (``llmcomm.measure.runs.pipeline.Stage.set_p2p``): nothing of DeepSpeed
   keeps state between two forwards there — measured per configuration by ``tests/test_measured.py`` (a 2×2 launch
   running a partitioned configuration, then a full one, each equal to its closed form and its reference tokens).
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from llmcomm.measure.capture import Capture  # noqa: E402
from llmcomm.measure.moe_adapter import adapt, set_routing, shard_experts  # noqa: E402
from llmcomm.measure.runs.common import build_model  # noqa: E402
from llmcomm.spec import load_model  # noqa: E402

claims = []
spec = load_model("tiny-mixtral")
hf = build_model(spec, "fp32", "cpu", seed=_tiny.SEED)
ids = _tiny.prompt(2, 9, spec.V, seed=11 + dist.get_rank())            # each EP rank its own sequences


def forward(model):
    """Logits and the all-to-all sizes of one forward."""
    with Capture() as cap, torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, [e.bytes for e in cap.events if e.op == "all_to_all"]


capacity = dict(dropless=False, capacity_factor=1.0, min_capacity=4)
dropless = dict(dropless=True, capacity_factor=1.0, min_capacity=4)
switched = adapt(copy.deepcopy(hf), 2, **capacity)
cap_first, cap_sizes = forward(switched)
set_routing(switched, **dropless)
sw_logits, sw_sizes = forward(switched)
drop_logits, drop_sizes = forward(adapt(copy.deepcopy(hf), 2, **dropless))
set_routing(switched, **capacity)
back_logits, back_sizes = forward(switched)
claims += [
    (torch.equal(sw_logits, drop_logits) and sw_sizes == drop_sizes and sw_sizes != cap_sizes,
     f"capacity routing switched to dropless = dropless from the start: logits equal, all-to-all sizes "
     f"{sw_sizes[:2]} = {drop_sizes[:2]} (capacity routing sent {cap_sizes[:2]})"),
    (torch.equal(back_logits, cap_first) and back_sizes == cap_sizes,
     f"and switched back = capacity routing from the start: logits equal, sizes {back_sizes[:2]}"),
]

dense = build_model(spec, "fp32", "cpu", seed=_tiny.SEED)
ids = _tiny.prompt(2, 9, spec.V, seed=11)                              # TP: every rank the same sequences
with torch.no_grad():
    want = dense(input_ids=ids).logits
engine = deepspeed.init_inference(dense, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                  replace_with_kernel_inject=False)
with torch.no_grad():
    autotp = engine.module(input_ids=ids).logits
with Capture() as cap:
    shard_experts(engine.module, engine.mp_group)
with torch.no_grad():
    sharded = engine.module(input_ids=ids).logits
err_a, err_s = float((autotp - want).abs().max()), float((sharded - want).abs().max())
claims += [
    (cap.events == [], f"sharding every expert after AutoTP made {len(cap.events)} collective calls"),
    (err_a < 1e-5 and err_s < 1e-5, f"AutoTP's logits (max |diff| {err_a:.1g}) and then the sharded experts' (max "
                                    f"|diff| {err_s:.1g}) equal the unsharded model's"),
]
_tiny.report(claims if dist.get_rank() == 0 else [], src=0)
