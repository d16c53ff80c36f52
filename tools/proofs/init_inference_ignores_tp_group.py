"""PROOF: ``deepspeed.init_inference`` ignores the ``tp_group`` it is given; it shards over the class-wide
``InferenceEngine.inference_mp_group`` (or, when unset, a NEW group over global ranks ``range(tp_size)``).

Run: ``deepspeed --num_gpus 2 --master_port 29613 tools/proofs/init_inference_ignores_tp_group.py`` (CPU, ~15 s).

Why (deepspeed/inference/engine.py, 0.19.8): ``__init__`` sets ``self.mp_group = config.tensor_parallel.tp_group``
and then, because ``tp_size > 1``, ``_create_model_parallel_group`` overwrites it. In a hybrid t×p run the stage
holding global ranks [t, 2t) would be sharded over ranks [0, t) — so hybrid runs must set
``InferenceEngine.inference_mp_group`` to the stage's TP group before ``init_inference`` (claim 2).
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

mine = dist.new_group(ranks=[0, 1])
e1 = deepspeed.init_inference(_tiny.build_reference(), dtype=torch.float32, replace_with_kernel_inject=False,
                              tensor_parallel={"tp_size": 2, "tp_group": mine})
ignored = e1.mp_group is not mine
ranks1 = torch.distributed.get_process_group_ranks(e1.mp_group)

InferenceEngine.inference_mp_group = chosen = dist.new_group(ranks=[0, 1])
e2 = deepspeed.init_inference(_tiny.build_reference(), dtype=torch.float32, replace_with_kernel_inject=False,
                              tensor_parallel={"tp_size": 2})
honoured = e2.mp_group is chosen
sharded = e2.module.model.layers[0].self_attn.q_proj.weight.shape[0] < 64
claims = [
    (ignored, f"tp_group passed to init_inference is not used: the engine shards over a group it made itself, "
              f"ranks {ranks1} = range(tp_size)"),
    (honoured and sharded, "InferenceEngine.inference_mp_group set before init_inference is the group the engine "
                           "uses (and the model is sharded over it)"),
]
_tiny.report(claims, src=0)
