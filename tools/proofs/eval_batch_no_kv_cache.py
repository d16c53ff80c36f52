"""PROOF: DeepSpeed's ``PipelineEngine.eval_batch`` keeps no KV cache; every call is a full forward of what it is given.

Run: ``deepspeed --num_gpus 2 tools/proofs/eval_batch_no_kv_cache.py`` (CPU, 2 ranks = 2 stages, ~10 s).

Claims, checked on the last stage against the single-process HF model with its KV cache:
1. ``eval_batch`` over the whole sequence (prompt + generated so far) gives the reference next-token logits — so greedy
   decoding through it is correct only by recomputing the whole prefix each step (b·(S+k) tokens per step k);
2. feeding only the newest token (what a KV-cache decode step sends) gives different logits: no state survives a call;
3. neither ``eval_batch`` nor ``PipelineModule.forward`` has any cache/past argument;
4. each call costs one world barrier and (with dynamic shapes) a 256×int32 shape message before each activation.
"""
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed.comm as dist  # noqa: E402

b, S, G = 2, 8, 4
model = _tiny.build_reference("tiny-llama")
ids = _tiny.prompt(b, S, model.config.vocab_size)
with torch.no_grad():
    ref = model.generate(ids, max_new_tokens=G, do_sample=False, min_new_tokens=G)  # HF greedy with KV cache
    ref_logits = [model(ref[:, : S + k]).logits[:, -1] for k in range(G)]        # next-token logits at step k

# count the messages of each eval_batch call by wrapping deepspeed.comm (the layer the engine calls)
counts = {"barrier": 0, "send": 0, "send_bytes": 0}
_barrier, _send = dist.barrier, dist.send


def barrier(*a, **k):
    counts["barrier"] += 1
    return _barrier(*a, **k)


def send(tensor, *a, **k):
    counts["send"] += 1
    counts["send_bytes"] += tensor.numel() * tensor.element_size()
    return _send(tensor, *a, **k)


dist.barrier, dist.send = barrier, send

engine, layers = _tiny.pipe_engine(model, num_stages=2, micro_batch=b, dynamic_shape=True)
last = engine.is_last_stage()
mine = [m for i, m in enumerate(layers) if engine.module._local_start <= i < engine.module._local_stop
        and isinstance(m, _tiny.DecoderPipe)]

full_diff, stateless_diff, tokens_seen, per_call = [], [], [], []
for k in range(G):
    before = dict(counts)
    n0 = sum(mine[0].calls_tokens) if mine else 0
    logits = _tiny.eval_logits(engine, ref[:, : S + k])          # the whole prefix again
    per_call.append({key: counts[key] - before[key] for key in counts})
    if mine:
        tokens_seen.append(sum(mine[0].calls_tokens) - n0)
    if last:
        full_diff.append((logits[:, -1] - ref_logits[k]).abs().max().item())
    if k > 0:
        logits1 = _tiny.eval_logits(engine, ref[:, S + k - 1: S + k])  # only the newest token, as a decode would
        if last:
            stateless_diff.append((logits1[:, -1] - ref_logits[k]).abs().max().item())

claims = None
if last:
    params = set(inspect.signature(engine.eval_batch).parameters) | \
        set(inspect.signature(type(engine.module).forward).parameters)
    cacheish = sorted(p for p in params if any(w in p.lower() for w in ("cache", "past", "kv")))
    meta_send = 256 * 4
    claims = [
        (max(full_diff) < 1e-5,
         f"eval_batch over the whole prefix matches the KV-cache reference at every step "
         f"(max |diff| {max(full_diff):.2e}); each step k re-runs b*(S+k) tokens: this stage saw {tokens_seen}"),
        (min(stateless_diff) > 1e-2,
         f"eval_batch given only the newest token (a KV-cache decode step) is wrong: min over steps of "
         f"max |diff| = {min(stateless_diff):.3f} -> no KV cache survives between calls"),
        (not cacheish, f"no cache/past argument in eval_batch or PipelineModule.forward (found {cacheish})"),
        (all(c["barrier"] == 1 for c in per_call),
         f"each eval_batch call issues one world barrier (barriers per call {[c['barrier'] for c in per_call]})"),
    ]
else:  # the first stage sends: meta (256 int32 = 1024 B, every call under dynamic_shape) + activation [b, s, h]
    h = model.config.hidden_size
    expect = [1024 + b * (S + k) * h * 4 for k in range(G)]
    print(f"rank {dist.get_rank()}: bytes sent per full-prefix call {[c['send_bytes'] for c in per_call]} "
          f"(expected 1024 + b*(S+k)*h*4 = {expect})", flush=True)
_tiny.report(claims, src=dist.get_world_size() - 1)
