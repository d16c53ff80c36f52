"""Host ops of a MoE layer: the profiler's counting by hand on a small module, the host profiles' ``moe_layer``
counts against the committed trace counts, and the per-layer host time they give, by hand."""
import json
from pathlib import Path

import pandas as pd
import pytest

from llmcomm.compare.moe import host_op_model
from llmcomm.deployment import Deployment, Routing
from llmcomm.predict.hardware import load_hardware
from llmcomm.predict.latency import predict_latency
from llmcomm.predict.profiles import HostProfile, load_profile
from llmcomm.spec import Layout, SpecError, Workload, load_model

ROOT = Path(__file__).resolve().parents[1]
OPS_CSV = ROOT / "data" / "cpu-local" / "moe_layer_ops.csv"
MIX, QW3 = load_model("mixtral-8x7b"), load_model("qwen3-30b-a3b")
H100 = load_hardware("h100-sxm")


def test_count_ops_by_hand():
    import torch
    from torch import nn

    from llmcomm.measure.opcount import count_ops

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            y = self.lin(x)                   # linear (t + matmul → mm): 1 host op, launches; 1 kernel (mm)
            y = y.view(2, 2)                  # view: a host op, no launch
            y = y.to(torch.float32)           # a no-op cast: a host op, no launch
            return torch.relu(y) + 1          # relu, add: 2 host ops, 2 launches, 2 kernels

    blk = Block()
    with torch.no_grad():
        got = count_ops(lambda: torch.sin(blk(torch.ones(1, 4))), {"block": blk, "lin": blk.lin})
    assert (got["lin"]["host_ops"], got["lin"]["launch_ops"], got["lin"]["kernel_ops"]) == (1, 1, 1)
    assert (got["block"]["host_ops"], got["block"]["launch_ops"], got["block"]["kernel_ops"]) == (4, 2, 2)
    assert dict(got["block"]["names"]) == {"aten::relu": 1, "aten::add": 1}
    assert got[""]["launch_ops"] >= 2                                 # ones() and sin() outside every label
    assert all(v["collectives"] == 0 for v in got.values())


def test_profiles_hold_the_counts_of_the_committed_trace():
    ops = host_op_model(pd.read_csv(OPS_CSV))
    # what the trace shows, read by hand from the CSV: a dense Llama layer 31 + its MLP 5 (3 linear, silu, mul);
    # HF's block: router 5 (linear, softmax, topk, sum, div_) + grouped experts 16; DeepSpeed's expert body 4
    assert (ops["dense_layer"], ops["dense_mlp"], ops["hf_block"], ops["deepspeed_per_local_expert"]) == (36, 5, 21, 4)
    for name in ("deepspeed-eager", "deepspeed-cpu"):
        raw = json.loads((ROOT / "src/llmcomm/presets/profiles" / f"{name}.json").read_text())
        assert raw["moe_layer"]["ops"] == ops, name
    side = json.loads(OPS_CSV.with_suffix(".json").read_text())
    assert side["ranks_agree"] is True and side["provenance"]["command"] == "python benchmarks/moe_layer_ops.py"


def test_moe_layer_host_time_by_hand():
    eager = load_profile("deepspeed-eager")
    us = 1e-6
    ep8 = eager.moe_layer_overhead_s("decode", H100, MIX, "ep", 8, Routing())
    assert ep8 == pytest.approx((350 + (74 + 4 * 8 / 8 - 5) * 7) * us)           # 861 µs: gate + 1 local expert
    q_ep8 = eager.moe_layer_overhead_s("prefill", H100, QW3, "ep", 8, Routing("dropless"))
    assert q_ep8 == pytest.approx((350 + (56 + 4 * 128 / 8 - 5) * 7) * us)       # 16 local experts in the loop
    for scheme in ("autotp", "tp-experts"):
        assert eager.moe_layer_overhead_s("decode", H100, QW3, scheme) == pytest.approx((350 + (21 - 5) * 7) * us)
    assert eager.moe_layer_overhead_s("decode", H100, load_model("llama-3.1-8b"), None) == 350 * us
    vllm = load_profile("vllm-v0")                                                 # no moe_layer: the dense layer's
    assert vllm.moe_layer_overhead_s("prefill", H100, MIX, "ep", 8, Routing()) == vllm.layer_overhead_s("prefill",
                                                                                                        H100)
    cpu_hw = load_hardware("cpu-local")
    cpu = load_profile("deepspeed-cpu")
    base = cpu.layer_overhead_s("decode", cpu_hw)
    tiny = load_model("tiny-mixtral")
    assert cpu.moe_layer_overhead_s("decode", cpu_hw, tiny, "ep", 2, Routing()) == pytest.approx(
        base + (74 + 4 * 4 - 5) * base / 36)


def test_ep_decode_pays_the_moe_layer_host_time():
    # decode on H100 under the eager profile: every layer costs max(host, kernels); Mixtral EP e = 8, b = 8: one
    # token per rank, the 861 µs of host work per MoE layer exceed its kernels
    r = predict_latency(MIX, Layout(e=8), Workload(8, 1024, 128, "bf16"), H100)
    host = 32 * 861e-6 + 350e-6                                                    # 32 MoE layers + the head's
    assert host < r["breakdown"]["decode"]["compute_s"] < host + 5e-6             # + the embedding gather's kernel
    before = 32 * 350e-6 + 350e-6                                                  # the dense layer's host time
    assert r["breakdown"]["decode"]["compute_s"] > before + 32 * 500e-6


def test_malformed_moe_layer_is_one_error():
    raw = json.loads((ROOT / "src/llmcomm/presets/profiles/deepspeed-eager.json").read_text())
    del raw["moe_layer"]["ops"]["hf_block"]
    with pytest.raises(SpecError, match="moe_layer is malformed"):
        HostProfile.from_dict(raw)
    raw = json.loads((ROOT / "src/llmcomm/presets/profiles/deepspeed-eager.json").read_text())
    raw["moe_layer"]["host_per_op_us"] = -1
    with pytest.raises(SpecError, match="moe_layer is malformed"):
        HostProfile.from_dict(raw)
    with pytest.raises(SpecError, match="top-1 gating"):
        load_profile("deepspeed-eager").moe_layer_overhead_s("decode", H100, load_model(
            {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 1,
             "vocab_size": 128}), "ep", 2, Routing())
