"""PROOF: what DeepSpeed-Inference's AutoTP does to an HF Llama model, and what one forward sends.

Run: ``deepspeed --num_gpus 2 --master_port 29615 tools/proofs/autotp_pattern.py`` (CPU, gloo, ~15 s).

Claims (DeepSpeed 0.19.8, transformers 5.24; read from ``module_inject/auto_tp.py`` and ``layers.py``, shown here):
``o_proj`` and ``down_proj`` become ``LinearAllreduce`` and ``lm_head`` ``LmHeadLinearAllreduce`` (row-parallel: an
all-reduce of the activation, and of the logits over the whole vocabulary); q/k/v/gate/up are column-parallel with no
communication; the embedding stays whole; ``init_inference`` broadcasts the CPU RNG state (5056 bytes) once; one
forward over [b, s] tokens keeping the last position's logits makes 2L all-reduces of [b, s, h] and one of [b, 1, V],
and nothing else; a tied head is cloned, so the tied model communicates the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from llmcomm.measure.capture import Capture  # noqa: E402

claims = []
for preset in ("tiny-llama", "tiny-llama-tied"):
    model = _tiny.build_reference(preset)
    L, h, V = model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size
    with Capture() as setup:
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                          replace_with_kernel_inject=False)
    m = engine.module
    kinds = {name: type(mod).__name__ for name, mod in m.named_modules()}
    layer0 = m.model.layers[0]
    b, s = 2, 7
    ids = _tiny.prompt(b, s, V)
    with Capture() as cap, torch.no_grad():
        engine(input_ids=ids, logits_to_keep=1)
    ar = [e for e in cap.events if e.op == "all_reduce"]
    shapes = sorted({tuple(e.shape) for e in ar})
    if dist.get_rank() == 0:
        claims += [
            (type(layer0.self_attn.o_proj).__name__ == "LinearAllreduce"
             and type(layer0.mlp.down_proj).__name__ == "LinearAllreduce",
             f"{preset}: o_proj and down_proj are {type(layer0.self_attn.o_proj).__name__}"),
            (kinds.get("lm_head") == "LmHeadLinearAllreduce", f"{preset}: lm_head is {kinds.get('lm_head')}"),
            (type(layer0.self_attn.q_proj).__name__ == "LinearLayer" and kinds.get("model.embed_tokens") == "Embedding",
             f"{preset}: q_proj is {type(layer0.self_attn.q_proj).__name__}, the embedding stays "
             f"{kinds.get('model.embed_tokens')}"),
            ([(e.op, e.bytes) for e in setup.events] == [("broadcast", 5056)],
             f"{preset}: init_inference made {[(e.op, e.bytes) for e in setup.events]} (the CPU RNG state)"),
            (len(ar) == 2 * L + 1 and len(cap.events) == 2 * L + 1 and shapes == sorted({(b, s, h), (b, 1, V)}),
             f"{preset}: one forward of [{b}, {s}] made {len(cap.events)} calls, {len(ar)} all-reduces of shapes "
             f"{shapes} = 2L+1 = {2 * L + 1} with L = {L}"),
        ]
_tiny.report(claims, src=0)
