"""PROOF: changing the input shape between ``eval_batch`` calls without ``dynamic_shape=True`` silently returns wrong
logits; with it (and ``engine.total_loss = None`` before each call) they are right.

Run: ``deepspeed --num_gpus 2 --master_port 29611 tools/proofs/shape_trap.py`` (CPU, 2 stages, ~10 s).

Why: ``PipelineEngine`` sends a 256×int32 shape message only before its *first* activation send
(``first_output_send``) and the receiving stage allocates ``pipe_recv_buf`` once (``pipe_recv_buf is None``); later
activations of another shape are received into the stale buffer. A *smaller* tensor (a decode step [b, 1, h] after a
[b, S, h] prefill) fits: gloo copies it into the front of the old buffer, the next stage computes on [b, S, h] of
mostly stale data, and no error is raised. A *larger* one aborts the receiving process (gloo ``EnforceNotMet``:
"Received data size doesn't match expected size", SIGABRT, not catchable) — seen while writing this proof, not
re-run here because it kills the rank.
Each call is checked on the last stage against the single-process model (logits of the last position): prefill-like
[b, S], then decode-like [b, 1] and shorter [b, S-3] inputs; with ``dynamic_shape=True`` also a longer [b, S+2].
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed.comm as dist  # noqa: E402

b, S = 2, 8
model = _tiny.build_reference("tiny-llama")
ids = _tiny.prompt(b, S + 2, model.config.vocab_size)
inputs = {"[b,S]": ids[:, :S], "[b,1]": ids[:, S:S + 1], "[b,S-3]": ids[:, 3:S], "[b,S+2]": ids}
with torch.no_grad():
    ref = {k: model(v).logits for k, v in inputs.items()}


def run(dynamic: bool, names) -> dict:
    engine, _ = _tiny.pipe_engine(model, num_stages=2, micro_batch=b, dynamic_shape=dynamic)
    out = {}
    for k in names:
        logits = _tiny.eval_logits(engine, inputs[k])
        if engine.is_last_stage():
            out[k] = (list(logits.shape), round((logits[:, -1] - ref[k][:, -1]).abs().max().item(), 6))
    return out


static = run(False, ["[b,S]", "[b,1]", "[b,S-3]"])   # a growing shape would abort the rank (see above)
dynamic = run(True, list(inputs))
claims = None
if dist.get_rank() == dist.get_world_size() - 1:
    def wrong(r):
        return r[1] > 1e-3

    claims = [
        (static["[b,S]"][1] < 1e-5, f"first call with the shape the buffers were sized for is right: "
                                    f"{static['[b,S]']}"),
        (wrong(static["[b,1]"]) and wrong(static["[b,S-3]"]),
         f"without dynamic_shape, later calls with smaller inputs return wrong logits and raise nothing: "
         f"[b,1] -> (logits shape, max|diff|) {static['[b,1]']} (a decode step after a prefill), "
         f"[b,S-3] -> {static['[b,S-3]']}"),
        (all(r[1] < 1e-5 for r in dynamic.values()),
         f"with dynamic_shape=True (+ total_loss=None per call) every shape is right: {dynamic}"),
    ]
_tiny.report(claims, src=dist.get_world_size() - 1)
