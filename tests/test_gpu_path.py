"""The CUDA path, exercised without a GPU: ``torch.cuda`` and the node's GPU list are mocked. Device and backend choice,
the launcher's command and environment, one rank per GPU, hostfiles, machine labels; and the prepared single-GPU
script (tools/gpu/single_gpu.py) in its CPU dry-run mode."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from llmcomm import record
from llmcomm.measure import launch, supervise
from llmcomm.measure.supervise import launcher_cmd, read_hostfile
from llmcomm.measure.runs import common, rankio
from llmcomm.spec import Layout, SpecError, Workload, load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reports 8 GPUs; DS_ACCELERATOR unset (as on a GPU node)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


# ------------------------------------------------------------------------------------------------ device choice
def test_pick_device_cuda_one_gpu_per_local_rank(fake_cuda):
    assert common.pick_device("bf16", 0) == torch.device("cuda:0")
    assert common.pick_device("fp16", 7) == torch.device("cuda:7")
    with pytest.raises(SpecError, match="local rank 8 has no GPU of its own: 8 visible"):
        common.pick_device("bf16", 8)


def test_pick_device_ds_accelerator_cpu_keeps_model_on_cpu(fake_cuda, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert common.pick_device("fp32", 3) == torch.device("cpu")
    with pytest.raises(SpecError, match="fp16 needs a GPU"):
        common.pick_device("fp16", 0)


def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert common.pick_device("bf16", 5) == torch.device("cpu")


def test_versions_reports_cuda_only_with_a_gpu(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert common.versions()["cuda"] == "13.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.versions()["cuda"] is None


def test_synchronize_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    common.synchronize(torch.device("cpu"))
    common.synchronize(torch.device("cuda:2"))
    assert calls == [torch.device("cuda:2")]


# ------------------------------------------------------------------------------------------------ backend choice
def _ctx(device, backend, dtype="bf16"):
    return types.SimpleNamespace(device=device, backend=backend, dtype=dtype)


def _fake_deepspeed(monkeypatch, backend_name):
    seen = {}
    cdb = types.SimpleNamespace(shm_vector_kernel_level=2)
    ds = types.ModuleType("deepspeed")
    ds.init_distributed = lambda dist_backend=None, verbose=True: seen.setdefault("dist_backend", dist_backend)
    # the op load under the lock (llmcomm.measure.oplock) comes first, outside init_distributed's rendezvous
    from llmcomm.measure import oplock

    monkeypatch.setattr(oplock, "preload_shm_op", lambda: seen.setdefault("preloaded_before_init",
                                                                          "dist_backend" not in seen))
    dscomm = types.ModuleType("deepspeed.comm")
    dscomm.comm = types.SimpleNamespace(cdb=cdb)
    ds.comm = dscomm
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setitem(sys.modules, "deepspeed.comm", dscomm)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: backend_name)
    return seen, cdb


def test_init_distributed_cuda_sets_device_then_default_backend(monkeypatch):
    seen, cdb = _fake_deepspeed(monkeypatch, "nccl")
    comm = rankio._init_distributed(_ctx(torch.device("cuda:3"), None))
    assert seen == {"set_device": torch.device("cuda:3"), "dist_backend": None,    # None: DeepSpeed picks NCCL
                    "preloaded_before_init": True}
    assert comm == {"backend": "nccl", "allreduce_path": "process_group"}
    assert cdb.shm_vector_kernel_level == 2                                       # untouched on the NCCL path


def test_init_distributed_gloo_forced_only_when_asked(monkeypatch):
    seen, cdb = _fake_deepspeed(monkeypatch, "gloo")
    comm = rankio._init_distributed(_ctx(torch.device("cpu"), "gloo", "fp32"))
    assert seen == {"dist_backend": "gloo", "preloaded_before_init": True}        # no set_device on CPU
    assert cdb.shm_vector_kernel_level == 0
    assert comm == {"backend": "gloo", "allreduce_path": "process_group"}


# ------------------------------------------------------------------------------------------------ launcher side
def test_default_env_gpu_node_leaves_ds_accelerator_unset(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(supervise, "has_cuda", lambda: True)
    env = supervise.default_env(8)
    assert "DS_ACCELERATOR" not in env
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 8))
    monkeypatch.setattr(supervise, "has_cuda", lambda: False)
    assert supervise.default_env(2)["DS_ACCELERATOR"] == "cpu"
    assert supervise.default_env(2, {"DS_ACCELERATOR": "cuda"})["DS_ACCELERATOR"] == "cuda"   # the caller wins


def test_gpu_ids_honour_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(supervise, "has_cuda", lambda: True)
    assert supervise.gpu_ids({"CUDA_VISIBLE_DEVICES": "4,5, 6"}) == ["4", "5", "6"]
    assert supervise.gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert supervise.gpu_ids({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    monkeypatch.setattr(supervise, "has_cuda", lambda: False)
    assert supervise.gpu_ids({}) == []


def _world_info(cmd):
    arg = next(a for a in cmd if a.startswith("--world_info="))
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


def test_launcher_cmd_one_node():
    cmd = launcher_cmd("llmcomm.measure.runs.tp", Path("R/spec.json"), Path("R"), 4, 29500,
                       local_ids=["2", "3", "5", "7"])
    assert cmd[1:5] == ["-u", "-m", "deepspeed.launcher.launch", cmd[4]]
    assert _world_info(cmd) == {"localhost": ["2", "3", "5", "7"]}
    assert cmd[5:] == ["--master_addr=127.0.0.1", "--master_port=29500", "--module", "llmcomm.measure.supervise",
                       "--entry", "llmcomm.measure.runs.tp", "--spec", "R/spec.json", "--out", "R"]
    assert _world_info(launcher_cmd("e", Path("s"), Path("o"), 2, 1)) == {"localhost": [0, 1]}


def test_launcher_cmd_hostfile_uses_the_runner(tmp_path):
    cmd = launcher_cmd("llmcomm.measure.runs.tp", Path("R/spec.json"), Path("R"), 16, 29501, hostfile="hosts")
    assert cmd[1:] == ["-u", "-m", "deepspeed.launcher.runner", "--hostfile", "hosts", "--master_port=29501",
                       "--module", "llmcomm.measure.supervise", "--entry", "llmcomm.measure.runs.tp", "--spec",
                       "R/spec.json", "--out", "R"]


def test_read_hostfile(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("# two nodes\nnode1 slots=8\n\nnode2 slots=8  # second\n")
    assert read_hostfile(h) == {"node1": 8, "node2": 8}
    h.write_text("node1 8\n")
    with pytest.raises(SpecError, match="bad line 'node1 8'"):
        read_hostfile(h)
    with pytest.raises(SpecError, match="names no host"):
        h.write_text("# nothing\n")
        read_hostfile(h)


def test_measure_hostfile_checks_slots_and_shared_out(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("node1 slots=8\nnode2 slots=8\n")
    with pytest.raises(SpecError, match="has 16 slots; t·p = 8 ranks need exactly 8"):
        launch.measure(load_model("llama-3.1-8b"), Layout(8), Workload(1, 8, 2, "bf16"), hostfile=h,
                       out_dir=tmp_path)
    with pytest.raises(SpecError, match="needs out_dir on a file system every node shares"):
        launch.measure(load_model("llama-3.1-8b"), Layout(8, 2), Workload(1, 8, 2, "bf16"), hostfile=h)


def test_launch_refuses_more_ranks_than_gpus(monkeypatch, tmp_path):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(supervise, "has_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SpecError, match="2 ranks need 2 GPUs .* this node shows 1"):
        supervise.launch_ranks("llmcomm.measure.runs.tp", {}, 2, tmp_path, progress_timeout_s=5)
    assert not list(tmp_path.glob("rank*"))                 # nothing was started


def test_machine_id_from_fake_gpu_names(monkeypatch):
    monkeypatch.delenv("LLMCOMM_MACHINE", raising=False)
    monkeypatch.setattr(record, "_gpus", lambda: ["NVIDIA H100 80GB HBM3"])
    assert record.machine_id() == "h100-80gb-hbm3-x1"
    monkeypatch.setattr(record, "_gpus", lambda: ["NVIDIA H200"] * 8)
    assert record.machine_id() == "h200-x8"
    monkeypatch.setattr(record, "_gpus", lambda: [])
    assert record.machine_id() == "cpu-local"


# ------------------------------------------------------------------------------------------------ tools/gpu
def _isolate_env(monkeypatch):
    """The script sets variables for its own process; under pytest they must not outlive the test (later tests and
    the notebooks nbval runs inherit this process's environment)."""
    import os

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" /
                                                                                       "torch_extensions")))


def _single_gpu():
    spec = importlib.util.spec_from_file_location("single_gpu", ROOT / "tools" / "gpu" / "single_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,t,expect", [
    ("llama-3.1-8b", 8, (4096, 4, 1, 1792, 128)),
    ("llama-3.2-3b", 8, (3072, 3, 1, 1024, 128)),
    ("llama-3.2-3b", 1, (3072, 24, 8, 8192, 128)),
])
def test_shard_config_is_what_one_tp_rank_computes(name, t, expect):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    _, cfg = _single_gpu().shard_config(name, t)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.head_dim) == expect
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    h, H, K, F, hd = expect
    assert tuple(layer.self_attn.q_proj.weight.shape) == (H * hd, h)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (K * hd, h)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (h, H * hd)
    assert tuple(layer.mlp.down_proj.weight.shape) == (h, F)


def test_gpu_plan_shards_divide():
    mod = _single_gpu()
    for name in mod.GPU_PLAN["models"]:
        for t in mod.GPU_PLAN["t"]:
            mod.shard_config(name, t)            # raises if heads, kv_heads or ffn do not divide


def test_single_gpu_dry_run_layers(tmp_path, monkeypatch):
    """The per-layer timing path end to end on the CPU (seconds): files and columns as the book reads them."""
    _isolate_env(monkeypatch)
    mod = _single_gpu()
    monkeypatch.setitem(mod.DRY_PLAN, "t", [2])
    monkeypatch.setitem(mod.DRY_PLAN, "S", [8])
    monkeypatch.setitem(mod.DRY_PLAN, "b", [1])
    assert mod.main(["--dry-run", "--out", str(tmp_path), "--skip-generate"]) == 0
    folder = tmp_path / f"dry-run-{record.machine_id()}"
    df = pd.read_csv(folder / "layer_times.csv")
    assert list(df.columns) == mod.LAYER_COLUMNS
    assert sorted(df.phase) == ["decode", "prefill"]
    assert set(df.kv_len) == {0, 8} and (df.median_s > 0).all() and (df.flops > 0).all()
    side = json.loads((folder / "layer_times.json").read_text())
    assert side["mode"].startswith("dry-run") and side["columns"] == mod.LAYER_COLUMNS
    assert {"torch", "transformers", "deepspeed"} <= set(side["provenance"]["versions"])


@pytest.mark.slow
def test_single_gpu_dry_run_generate(tmp_path, monkeypatch):
    """The measure path (DeepSpeed launcher, init_inference tp_size=1, capture) in dry-run mode (~25 s)."""
    _isolate_env(monkeypatch)
    mod = _single_gpu()
    assert mod.main(["--dry-run", "--out", str(tmp_path), "--skip-layers"]) == 0
    folder = tmp_path / f"dry-run-{record.machine_id()}"
    gen = pd.read_csv(folder / "generate.csv")
    assert list(gen.columns) == mod.GENERATE_COLUMNS and len(gen) == 1
    assert bool(gen.tokens_match[0]) and gen.ttft_s[0] > 0 and gen.tpot_s[0] > 0
    assert list(pd.read_csv(folder / "generate_ops.csv").columns) == mod.OPS_COLUMNS
    assert not (tmp_path / "work").exists()


def test_single_gpu_leaves_the_data_root_alone(tmp_path, monkeypatch):
    """Its files go under --out, and the process's data root (what the chapters read) is unchanged."""
    import os

    _isolate_env(monkeypatch)
    mod = _single_gpu()
    monkeypatch.setitem(mod.DRY_PLAN, "t", [1])
    monkeypatch.setitem(mod.DRY_PLAN, "S", [8])
    monkeypatch.setitem(mod.DRY_PLAN, "b", [1])
    before = os.environ.get("LLMCOMM_DATA")
    assert mod.main(["--dry-run", "--out", str(tmp_path), "--skip-generate"]) == 0
    assert os.environ.get("LLMCOMM_DATA") == before
    assert record.data_dir("cpu-local") == ROOT / "data" / "cpu-local" or before is not None
