"""PROOF: DeepSpeed's CPU shared-memory all-reduce (``inference_all_reduce``, what AutoTP's ``LinearAllreduce`` calls)
ignores the group: an all-reduce on a TP sub-group sums over the whole world.

Run: ``deepspeed --num_gpus 4 --master_port 29614 tools/proofs/shm_allreduce_ignores_subgroups.py`` (CPU, 4 ranks:
two TP groups [0,1] and [2,3], as in a t=2 × p=2 hybrid; ~10 s; needs 4 ranks — with 2 ranks every group of size 2
is the world, and size-1 groups short-circuit).

Why: ``TorchBackend.inference_all_reduce`` calls ``torch.ops.deepspeed.inference_all_reduce_(tensor)`` — no group
argument — whenever the shm kernel is loaded (LOCAL_SIZE = world size) and the CPU has the vector level. The fix the
pipeline runner uses: ``deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0`` sends it to
``torch.distributed.all_reduce(group=...)`` (gloo), and dropping ``LOCAL_SIZE`` before ``init_distributed`` keeps the
kernel from mapping its /dev/shm buffer at all (llmcomm.measure.runs.rankio does both for backend "gloo").
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init(shm=True)
import deepspeed.comm as dist  # noqa: E402

rank, world = dist.get_rank(), dist.get_world_size()
assert world == 4, "run with --num_gpus 4"
groups = [dist.new_group(ranks=[0, 1]), dist.new_group(ranks=[2, 3])]
mine = groups[rank // 2]
expect = float(sum(r + 1 for r in range(world) if r // 2 == rank // 2))

x = torch.full((8,), float(rank + 1))
dist.inference_all_reduce(x, group=mine)
shm_value = x[0].item()

dist.comm.cdb.shm_vector_kernel_level = 0          # DeepSpeed's own fallback: torch.distributed.all_reduce(group)
y = torch.full((8,), float(rank + 1))
dist.inference_all_reduce(y, group=mine)
gloo_value = y[0].item()

got = torch.tensor([shm_value, gloo_value, expect])
allv = [torch.zeros(3) for _ in range(world)]
dist.all_gather(allv, got)
claims = None
if rank == 0:
    shm_vals = [v[0].item() for v in allv]
    gloo_vals = [v[1].item() for v in allv]
    exp_vals = [v[2].item() for v in allv]
    claims = [
        (shm_vals != exp_vals, f"shm inference_all_reduce on groups [0,1],[2,3]: ranks get {shm_vals}, the "
                               f"per-group sums are {exp_vals} -> the group is ignored (world sum)"),
        (gloo_vals == exp_vals, f"with cdb.shm_vector_kernel_level = 0 the same call goes to gloo with the group: "
                                f"{gloo_vals}"),
    ]
dist.barrier()
if rank == 0:   # the shm kernel maps one 66 MiB buffer per rank; this run made them, so it removes them
    port = os.environ.get("MASTER_PORT", "")
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.unlink(f)
_tiny.report(claims, src=0)
