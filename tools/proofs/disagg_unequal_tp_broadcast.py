"""PROOF: two TP groups of different degrees in one world — a prefill side with t = 1 (rank 0) and a decode side
with t = 2 (ranks 1, 2) — cannot both run ``deepspeed.init_inference`` as it is: with ``tp_size > 1`` it broadcasts
the RNG state over the WORLD from rank 0 (``dist.broadcast(_rng_state, 0)``, no group), and with ``tp_size = 1`` it
makes no collective call at all. The decode side's broadcast then waits for a rank that never joins: a hang.

Run: ``deepspeed --num_gpus 3 --master_port 29617 tools/proofs/disagg_unequal_tp_broadcast.py`` (CPU, ~15 s).

Why (deepspeed/inference/engine.py, 0.19.8, ``InferenceEngine.__init__``): ``if config.tensor_parallel.tp_size > 1:
_rng_state = …get_rng_state(); dist.broadcast(_rng_state, 0)``. The thin step llmcomm adds
(:mod:`llmcomm.measure.runs.disagg`): a side with t = 1 joins that broadcast itself with a tensor of the same size
when the other side has t > 1 (claim 3: everything completes, the t = 2 side is sharded over its own group, and every
rank holds rank 0's RNG state, as a uniform TP launch leaves it). Recording, not hanging: the calls each rank's
``init_inference`` makes are recorded by wrapping ``torch.distributed.broadcast``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.inference.engine import InferenceEngine  # noqa: E402

rank = dist.get_rank()
calls = []
_orig = torch.distributed.broadcast


def recording(tensor, src=None, group=None, *args, **kwargs):
    ranks = torch.distributed.get_process_group_ranks(group) if group is not None else \
        list(range(torch.distributed.get_world_size()))
    calls.append((src, tuple(ranks), tensor.numel() * tensor.element_size()))
    return _orig(tensor, src, group, *args, **kwargs)


torch.distributed.broadcast = recording
decode_group = dist.new_group(ranks=[1, 2])                  # new_group is collective: every rank makes it
torch.manual_seed(100 + rank)                                # every rank a different RNG state before the setup
model = _tiny.build_reference()
if rank == 0:                                                # prefill side, t = 1: init_inference as it is ...
    engine = deepspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=False,
                                      tensor_parallel={"tp_size": 1})
    own_calls = list(calls)
    state = torch.get_rng_state()                            # ... then the thin step: join the world broadcast
    dist.broadcast(state, 0)
    torch.set_rng_state(state)
else:                                                        # decode side, t = 2 over its own group
    InferenceEngine.inference_mp_group = decode_group
    engine = deepspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=False,
                                      tensor_parallel={"tp_size": 2})
    own_calls = list(calls)
torch.distributed.broadcast = _orig

# gather the evidence on rank 1: each rank's init_inference calls, its RNG state, its q_proj rows
rows = engine.module.model.layers[0].self_attn.q_proj.weight.shape[0]
evidence = [None] * 3
torch.distributed.all_gather_object(evidence, {"calls": own_calls, "rng": torch.get_rng_state().sum().item(),
                                               "rows": rows})
full = _tiny.build_reference().model.layers[0].self_attn.q_proj.weight.shape[0]
claims = [
    (evidence[1]["calls"] == evidence[2]["calls"] == [(0, (0, 1, 2), 5056)],
     f"init_inference with tp_size=2 on ranks 1, 2 (their own group set first) broadcasts over the WORLD from rank "
     f"0: {evidence[1]['calls']} (src, ranks, bytes)"),
    (evidence[0]["calls"] == [],
     "init_inference with tp_size=1 on rank 0 makes no collective call: without a step of its own rank 0 never joins "
     "that broadcast, and ranks 1, 2 wait for ever"),
    (evidence[0]["rows"] == full and evidence[1]["rows"] == evidence[2]["rows"] == full // 2
     and len({e["rng"] for e in evidence}) == 1,
     f"with rank 0 joining the broadcast itself, every init_inference completes: rank 0 keeps q_proj whole "
     f"({evidence[0]['rows']} rows), ranks 1, 2 hold half each ({evidence[1]['rows']}), and all three hold rank 0's "
     f"RNG state"),
]
_tiny.report(claims, src=1)
