"""Host ops of one MoE layer forward, counted from a torch.profiler trace of the real layers (CPU): DeepSpeed's MoE
layer as the project builds it (``llmcomm.measure.moe_adapter.adapt``; e = 1 and e = 2, capacity and dropless
routing), the HF sparse block the TP schemes run (experts_implementation 'grouped_mm', the transformers default; the
'eager' loop for contrast; every expert sharded over 2 ranks), and a dense Llama MLP — tiny Mixtral (top-2) and tiny
Qwen3-MoE (top-4), prefill and decode. Writes ``data/cpu-local/moe_layer_ops.csv`` (+ sidecar with provenance).

    python benchmarks/moe_layer_ops.py            # relaunches itself on 2 CPU ranks (DeepSpeed launcher), ~1 min

Counts, not timings: they do not depend on the machine's load (they do on the torch, transformers and DeepSpeed
versions, which the provenance records). ``llmcomm.measure.moe_adapter.layer_op_rows`` makes the rows;
``llmcomm.compare.moe.host_op_model`` reads them into the host profiles' ``moe_layer`` field.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("tiny-llama", "tiny-mixtral", "tiny-qwen3-moe")
COMMAND = "python benchmarks/moe_layer_ops.py"


def _relaunch() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return subprocess.call([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                            str(port), __file__], env=env, cwd=REPO)


def main() -> int:
    import pandas as pd
    import torch

    os.environ.pop("LOCAL_SIZE", None)                 # no shm buffer: gloo for the sharded block's all-reduce
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dist.comm.cdb.shm_vector_kernel_level = 0
    torch.set_num_threads(1)
    from llmcomm.measure.moe_adapter import layer_op_rows
    from llmcomm.record import provenance, write_frame

    rows = []
    for preset in PRESETS:
        for e in ((1,) if preset == "tiny-llama" else (1, 2)):
            rows += [r for r in layer_op_rows(preset, e)
                     if e == 1 or r["implementation"] == "deepspeed-moe"]     # the HF blocks once
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    if dist.get_rank() == 0:
        key = ["host_ops", "launch_ops", "kernel_ops", "collectives"]
        same = all([[r[k] for k in key] for r in other] == [[r[k] for k in key] for r in rows] for other in everyone)
        write_frame(REPO / "data" / "cpu-local" / "moe_layer_ops.csv", pd.DataFrame(rows), provenance(COMMAND),
                    ranks=dist.get_world_size(), ranks_agree=bool(same),
                    note="counts of rank 0; ranks_agree: every rank counted the same")
        print(f"wrote data/cpu-local/moe_layer_ops.csv: {len(rows)} rows, ranks agree: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main() if "RANK" in os.environ else _relaunch())
