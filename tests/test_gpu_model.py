"""The time model's parts checked by hand: kernel models (GEMM, memory-bound, attention), the fitted-NCCL form and its
cross-node prediction, host profiles, ``llmcomm cost`` and the memory check of ``predict``."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from llmcomm.cli import main
from llmcomm.predict import collectives as C, kernels as K
from llmcomm.predict.compute import forward_compute, layer_cost
from llmcomm.deployment import Deployment
from llmcomm.predict.profiles import load_profile, profile_for
from llmcomm.predict.hardware import load_hardware
from llmcomm.predict.latency import predict_latency
from llmcomm.spec import Layout, SpecError, Workload, load_model

M8B = load_model("llama-3.1-8b")


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------------------- kernels
def test_roofline_gemm_is_the_plain_max():
    p = {"flops_per_s": 1e12, "bytes_per_s": 1e11, "t0": 2e-6}
    # M_g=1: memory-bound: w(M_g·K_g + K_g·N_g + M_g·N_g)/bytes_per_s
    # M_g=4096: compute-bound: 2·M_g·N_g·K_g/flops_per_s
    assert K.gemm_time(1, 4096, 4096, 2, p) == pytest.approx(2e-6 + 2 * (4096 + 4096 * 4096 + 4096) / 1e11)
    assert K.gemm_time(4096, 4096, 4096, 2, p) == pytest.approx(2e-6 + 2 * 4096 ** 3 / 1e12)


def test_tiled_gemm_pads_tiles_and_quantises_waves():
    p = {"flops_per_s": 132e12, "bytes_per_s": 1e18, "t0": 0.0, "norm_order": math.inf, "sm": 132, "tm": 128,
         "tn": 128, "tm_small": 64, "m_small": 64, "splits": [1], "wave_quant": True, "K0": 0.0}
    one_tile = 2 * 128 * 128 * 1024 / 1e12                 # one CTA's tile at flops_per_s/SM = 1 TFLOP/s
    assert K.gemm_time(128, 128 * 132, 1024, 2, p) == pytest.approx(one_tile)       # 132 tiles: one wave
    assert K.gemm_time(129, 128 * 132, 1024, 2, p) == pytest.approx(2 * one_tile)   # 264 tiles: two waves
    assert K.gemm_time(10, 128, 1024, 2, p) == pytest.approx(one_tile / 2)          # M ≤ 64: a 64-row tile


def test_memop_time_stops_falling_with_tokens():
    p = {"t0": 1e-6, "bytes_per_s": 1e12, "b_row": 1e9}
    row = 8192
    big = K.memop_time(1e6 * row, row, p)
    assert big == pytest.approx(1e-6 + 1e6 * row / 1e12, rel=1e-3)                  # bandwidth-bound
    assert K.memop_time(row, row, p) == pytest.approx(1e-6 + row / 1e9, rel=1e-3)   # one row at b_row


def test_layer_ops_shapes_and_flops_match_hand_counts():
    t, b, s, w = 2, 3, 5, 2
    ops = K.layer_ops(M8B, t, b, s, 7, 9.5, w)
    h, d, a, akv, f = M8B.h, M8B.head_dim, M8B.heads, M8B.kv_heads, M8B.ffn
    assert (ops["qkv_proj"]["M"], ops["qkv_proj"]["N"], ops["qkv_proj"]["K"]) == (15, (a + 2 * akv) * d / t, h)
    assert (ops["mlp_down_proj"]["N"], ops["mlp_down_proj"]["K"]) == (h, f / t)
    assert ops["attention"]["flops"] == 4 * 15 * 9.5 * (a / t) * d
    assert ops["attention"]["bytes"] == w * (b * (7 + s) * 2 * (akv / t) * d + 2 * 15 * (a / t) * d)
    assert ops["residual_add"]["count"] == 2 and ops["residual_add"]["row_bytes"] == 3 * w * h
    flops, nbytes = layer_cost(M8B, t, b, s, 7, 9.5, w)
    weights = (2 * h * a * d + 2 * h * akv * d + 3 * h * f) / t
    assert flops == pytest.approx(2 * 15 * weights + 4 * 15 * 9.5 * (a / t) * d)


def test_cpu_forward_is_sum_of_rooflines_plus_overhead():
    hw = load_hardware("cpu-local")
    kern = hw.kernels(4)
    ops = K.layer_ops(M8B, 1, 1, 16, 0, 8.5, 4)
    by_hand = sum(K.op_times(ops, kern, 4).values()) + hw.layer_overhead_s
    got = forward_compute(M8B, hw, 1, 1, 1, 16, 4, 4, "prefill")["layer_s"]
    assert float(got) == pytest.approx(by_hand)
    gpu = forward_compute(M8B, hw, 1, 1, 1, 16, 4, 4, "prefill", host_overlaps=True)["layer_s"]
    assert float(gpu) == pytest.approx(max(by_hand - hw.layer_overhead_s, hw.layer_overhead_s))


def test_fitted_gemm_rate_scales_with_dtype_peak():
    hw = load_hardware("h100-sxm")
    if not hw.raw.get("kernels"):
        pytest.skip("h100-sxm has no fitted kernels yet (llmcomm calibrate --public-gpu)")
    assert hw.kernels(4)["gemm"]["flops_per_s"] == pytest.approx(hw.kernels(2)["gemm"]["flops_per_s"] * 67 / 989)


# ------------------------------------------------------------------------------------------------------ collectives
NC = {"floor_s": 30e-6, "latency_s": 10e-6, "step_s": 2e-6, "bytes_per_s": 200e9, "bw_growth": 0.0,
      "latency_ll_s": 5e-6, "step_ll_s": 1e-6, "ll_efficiency": 0.5}


def test_nccl_model_is_min_of_protocols_above_the_floor():
    n, S = 4, 64 * 2 ** 20
    simple = 10e-6 + 6 * 2e-6 + 1.5 * S / 200e9
    ll = 5e-6 + 6 * 1e-6 + 1.5 * S / 100e9
    assert C.nccl_ring_time("all_reduce", n, S, NC) == pytest.approx(min(simple, ll))
    assert C.nccl_ring_time("all_reduce", n, 4, NC) == pytest.approx(30e-6)                  # the floor
    assert C.nccl_ring_time("all_reduce", n, 4, NC, floor=False) == pytest.approx(5e-6 + 6e-6 + 1.5 * 4 / 100e9)
    s_star = float(C.nccl_allreduce_switch_size(n, NC))
    assert C.nccl_ring_time("all_reduce", n, s_star * 1.01, NC, floor=False) < \
        5e-6 + 6e-6 + 1.5 * s_star * 1.01 / 100e9                                           # Simple wins above S*
    # all_gather derived: n−1 steps, (n−1)/n
    assert C.nccl_ring_time("all_gather", n, S, NC, floor=False) == pytest.approx(
        min(10e-6 + 3 * 2e-6 + 0.75 * S / 200e9, 5e-6 + 3 * 1e-6 + 0.75 * S / 100e9))


def test_cross_node_allreduce_is_limited_by_nics_and_network_steps():
    net = {"step_net_s": 15e-6, "nic_bytes_per_s": 47e9}
    S = 2 ** 30
    t = C.cross_node_allreduce_time(S, 16, 2, NC, net, rails=8, algorithm="ring", floor=False)
    assert t == pytest.approx(10e-6 + 30 * 15e-6 + 2 * 15 / 16 * S / min(200e9, 8 * 47e9))
    assert C.cross_node_allreduce_time(S, 8, 1, NC, net) == C.nccl_ring_time("all_reduce", 8, S, NC)
    with pytest.raises(ValueError, match="evenly"):
        C.cross_node_allreduce_time(S, 12, 5, NC, net)


# -------------------------------------------------------------------------------------------------- host profiles
def test_host_profiles_and_defaults():
    h100, cpu = load_hardware("h100-sxm"), load_hardware("cpu-local")
    assert profile_for(Deployment(), h100).name == "deepspeed-eager"
    assert profile_for(Deployment(p2p="full"), cpu).name == "deepspeed-cpu"
    assert profile_for(Deployment(profile="vllm-v0-custom-ar"), cpu).name == "vllm-v0-custom-ar"
    v = profile_for(Deployment("vllm"), h100)
    assert v.name == "vllm-v0" and v.cuda_graphs("decode") and not v.cuda_graphs("prefill")
    assert not v.launch_floor("decode") and v.launch_floor("prefill") and v.custom_allreduce is None
    assert load_profile("deepspeed-cpu").layer_overhead_s("decode", cpu) == cpu.layer_overhead_s
    with pytest.raises(SpecError, match="framework"):
        load_profile({"name": "x", "framework": "trt", "prefill": {}, "decode": {}})
    with pytest.raises(SpecError, match="unknown host profile"):
        load_profile("no-such-profile")


def test_custom_allreduce_replaces_nccl_below_its_limit():
    h100 = load_hardware("h100-sxm")
    wl = Workload(1, 128, 16, "bf16")
    base = predict_latency(M8B, Layout(4), wl, h100, Deployment("vllm", profile="vllm-v0"))
    fast = predict_latency(M8B, Layout(4), wl, h100, Deployment("vllm", profile="vllm-v0-custom-ar"))
    ar = [m for m in fast["breakdown"]["decode"]["messages"] if m["op"] == "all_reduce"][0]
    m = ar["bytes_per_call"]
    assert m <= 8 * 2 ** 20
    assert ar["time_s"] == pytest.approx(ar["calls"] * (9e-6 + 1.5 * m / 300e9))
    assert fast["tpot_s"] != base["tpot_s"]


# ------------------------------------------------------------------------------------------------------------- CLI
def test_cost_cli_rows_and_errors():
    st, out, _ = _cli(["cost", "--hardware", "h100-sxm", "--model", "llama-3.1-8b", "--tp", "2", "--tokens", "1",
                       "256", "--context", "512", "--json"])
    assert st == 0
    obj = json.loads(out)
    ops = {(r["op"], r["tokens"]) for r in obj["ops"]}
    for op in ("qkv_proj", "attn_out_proj", "mlp_gate_up_proj", "mlp_down_proj", "attention", "lm_head"):
        assert (op, 1) in ops and (op, 256) in ops
    row = next(r for r in obj["ops"] if r["op"] == "mlp_down_proj" and r["tokens"] == 256)
    assert row["flops"] == 2 * 256 * M8B.h * (M8B.ffn / 2)
    st, out, _ = _cli(["cost", "--hardware", "h100-sxm", "--collective", "all_reduce", "--ranks", "8", "--bytes",
                       "64M", "--json"])
    r = json.loads(out)["ops"][0]
    assert st == 0 and set(r) == {"op", "ranks", "gpus_per_node", "message_bytes", "seconds", "algbw_GBps",
                                  "busbw_GBps"}
    assert r["message_bytes"] == 64 << 20
    assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 1.75)
    for bad in (["cost", "--hardware", "h100-sxm"],
                ["cost", "--hardware", "h100-sxm", "--model", "llama-3.1-8b", "--tp", "3", "--tokens", "4"],
                ["cost", "--hardware", "h100-sxm", "--collective", "send_recv", "--ranks", "4", "--bytes", "1K"],
                ["cost", "--hardware", "nope", "--collective", "all_reduce", "--ranks", "2", "--bytes", "1K"]):
        st, out, err = _cli(bad)
        assert st == 2 and out == "" and err.count("\n") == 1, (bad, err)


def test_predict_says_when_a_layout_does_not_fit():
    st, out, err = _cli(["predict", "--model", "llama-3.1-405b", "--tp", "1", "--hardware", "h100-sxm", "--dtype",
                         "bf16", "--json"])
    mem = json.loads(out)["memory"]
    assert st == 0 and mem["fits"] is False and mem["needed_gib_per_rank"] > 700
    assert "does not fit" in err and err.count("\n") == 1
    st, out, err = _cli(["predict", "--model", "llama-3.1-8b", "--tp", "1", "--hardware", "h100-sxm", "--dtype",
                         "bf16", "--json"])
    assert json.loads(out)["memory"]["fits"] is True and err == ""
