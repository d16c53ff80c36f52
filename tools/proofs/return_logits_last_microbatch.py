"""PROOF: ``eval_batch(..., return_logits=True)`` returns the logits of the LAST micro-batch only.

Run: ``deepspeed --num_gpus 2 --master_port 29612 tools/proofs/return_logits_last_microbatch.py`` (CPU, ~10 s).

Why: ``_exec_forward_pass`` does ``self.outputs = outputs`` for every micro-batch on the last stage (overwriting), and
``eval_batch`` returns ``self.outputs``. With m micro-batches of b sequences, (m−1)·b sequences' logits are lost; a
generation loop through ``eval_batch`` must use one micro-batch per call (no pipelining across sequences) or
collect the outputs itself.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed.comm as dist  # noqa: E402

b, S, m = 2, 6, 3
model = _tiny.build_reference("tiny-llama")
ids = _tiny.prompt(b * m, S, model.config.vocab_size)
micro = [ids[i * b:(i + 1) * b] for i in range(m)]
with torch.no_grad():
    ref = [model(x).logits for x in micro]

engine, _ = _tiny.pipe_engine(model, num_stages=2, micro_batch=b, micro_batches=m)
engine.total_loss = None
_, logits = engine.eval_batch(iter([(x, x) for x in micro]), return_logits=True, compute_loss=False,
                              reduce_output=None)
claims = None
if engine.is_last_stage():
    diffs = [(logits - r).abs().max().item() for r in ref]
    claims = [(list(logits.shape) == [b, S, model.config.vocab_size] and diffs[-1] < 1e-5
               and min(diffs[:-1]) > 1e-2,
               f"{m} micro-batches of b={b} in, logits of shape {list(logits.shape)} out: max|diff| vs each "
               f"micro-batch's reference = {[round(d, 4) for d in diffs]} -> only the last micro-batch is returned")]
_tiny.report(claims, src=dist.get_world_size() - 1)
