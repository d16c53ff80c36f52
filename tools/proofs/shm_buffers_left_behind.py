"""PROOF: DeepSpeed's CPU shared-memory all-reduce leaves its /dev/shm buffer behind when the ranks exit.

Run: ``deepspeed --num_gpus 2 --master_port 29616 tools/proofs/shm_buffers_left_behind.py`` (CPU, ~10 s), then
look in /dev/shm: ``tools/proofs/run_all.py`` does (its after-check), prints the claim, and removes the files.

Each rank maps a 66 MiB ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` at ``init_distributed`` when
``LOCAL_SIZE`` is set (the launcher sets it) and never unlinks it. llmcomm removes its own runs' buffers
(``llmcomm.measure.launch.launch_ranks``).
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init(shm=True)
import deepspeed.comm as dist  # noqa: E402

x = torch.ones(1024)
dist.inference_all_reduce(x)
port = os.environ.get("MASTER_PORT", "")
mine = sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"))
sizes = [os.path.getsize(f) for f in mine]
claims = [(len(mine) == dist.get_world_size() and x[0].item() == dist.get_world_size(),
           f"while running: {len(mine)} buffers of {sorted(set(sizes))} bytes for port {port}; the all-reduce gave "
           f"{x[0].item()}")]
dist.barrier()
_tiny.report(claims, src=0)
