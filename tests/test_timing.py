"""The latency model: FLOP and byte counts on a known shape, α-β communication by hand, placement, vectorised ==
scalar."""
import itertools

import numpy as np
import pytest

from llmcomm.deployment import Deployment
from llmcomm.predict.compute import layer_cost
from llmcomm.predict.hardware import load_hardware
from llmcomm.predict.latency import forward_comm, predict_latency, predict_latency_grid
from llmcomm.predict.placement import placement_fractions, placement_reference, pp_inter_fraction, tp_inter_fraction
from llmcomm.spec import Layout, SpecError, Workload, load_model

TINY = load_model("tiny-llama")        # h=64, L=4, heads=4, kv=2, hd=16, ffn=176, V=1000


def _hw(**over):
    d = {"name": "hand", "memory_gib": 1, "mem_bw_GBps": 1.0, "peak_tflops": {"fp32": 0.001, "bf16": 0.002},
         "efficiency": {"flops": 1.0, "mem_bw": 1.0}, "layer_overhead_us": 0, "gpus_per_node": 8,
         "links": {"intra": {"bw_GBps": 1.0, "alpha_us": 10, "algorithm": "ring"},
                   "inter": {"bw_GBps": 0.1, "alpha_us": 100, "algorithm": "ring"}}}
    d.update(over)
    return load_hardware(d)


def test_layer_flops_and_bytes_known_shape():
    # GEMMs on M = b·s = 8 tokens (t = 1): qkv [8,64]x[64,128], out [8,64]x[64,64], gate_up [8,64]x[64,352],
    # down [8,176]x[176,64]: 2·M·(46080 weights); attention 4·M·ctx·a·d with ctx = 4.5
    fl, by = layer_cost(TINY, 1, 1, 8, 0, 4.5, 4)
    assert fl == 2 * 8 * 46080 + 4 * 8 * 4.5 * 4 * 16 == 746496
    # bytes, w = 4: each GEMM reads A and B and writes C; 2 norms (read + write [8,64]), rope on 6 heads of 16,
    # SiLU·mul (reads 2·176, writes 176 per token), 2 residual adds (2 reads + 1 write), attention (K, V of 8 new
    # tokens, 2 KV heads; q read and o written, 4 heads)
    gemms = 4 * ((8 * 64 + 64 * 128 + 8 * 128) + (8 * 64 + 64 * 64 + 8 * 64) + (8 * 64 + 64 * 352 + 8 * 352)
                 + (8 * 176 + 176 * 64 + 8 * 64))
    mem = 8 * (2 * 2 * 4 * 64 + 2 * 4 * 6 * 16 + 3 * 4 * 176 + 2 * 3 * 4 * 64)
    attention = 4 * (8 * 2 * 2 * 16 + 2 * 8 * 4 * 16)
    assert by == gemms + mem + attention == 265216
    fl2, by2 = layer_cost(TINY, 2, 1, 8, 0, 4.5, 4)
    assert fl2 == fl / 2           # everything in a layer's FLOPs is sharded by t
    assert by2 < by


def test_llama70b_flops_are_2_params_per_token():
    m = load_model("llama-3.1-70b")
    fl, _ = layer_cost(m, 1, 1, 1, 0, 0, 2)       # attention term 0 with ctx = 0
    per_layer = (m.params - 2 * m.V * m.h - m.h) / m.L - 2 * m.h
    assert fl == pytest.approx(2 * per_layer, rel=1e-12)


def test_comm_hand_case_tp2():
    hw = _hw()
    b, S, G, w = 1, 16, 4, 4
    # prefill: 2L = 8 all-reduces of b·S·h·w = 4096 B on n=2 (ring: 2α + S·β) + 1 of b·V·w = 4000 B
    ar = lambda nbytes: 2 * 10e-6 + nbytes / 1e9   # noqa: E731
    expect = 8 * ar(4096) + ar(4000)
    got = forward_comm(TINY, hw, 2, 1, b, S, G, w, "prefill", 8)
    assert float(got) == pytest.approx(expect, rel=1e-12)
    # decode: s = 1
    got = forward_comm(TINY, hw, 2, 1, b, S, G, w, "decode", 8)
    assert float(got) == pytest.approx(8 * ar(256) + ar(4000), rel=1e-12)
    # TP group of 2 on nodes of 1 GPU: every all-reduce on the inter link
    got = forward_comm(TINY, hw, 2, 1, b, S, G, w, "prefill", 1)
    ar_inter = lambda nbytes: 2 * 100e-6 + nbytes / 1e8   # noqa: E731
    assert float(got) == pytest.approx(8 * ar_inter(4096) + ar_inter(4000), rel=1e-12)


def test_comm_pipeline_send_per_boundary():
    hw = _hw()
    # t=1, p=4 on nodes of 2: 3 boundaries, sends [b,S,h] = 4096 B; boundary 1|2 crosses nodes
    got = forward_comm(TINY, hw, 1, 4, 1, 16, 4, 4, "prefill", 2)
    intra, inter = 10e-6 + 4096 / 1e9, 100e-6 + 4096 / 1e8
    token = 100e-6 + 8 / 1e8  # the greedy token (int64 [1, 1]) handed back from stage 3 (node 1) to stage 0 (node 0)
    assert float(got) == pytest.approx(2 * intra + inter + token, rel=1e-12)
    one_node = forward_comm(TINY, hw, 1, 4, 1, 16, 4, 4, "prefill", 4)
    assert float(one_node) == pytest.approx(3 * intra + 10e-6 + 8 / 1e9, rel=1e-12)
    assert float(forward_comm(TINY, hw, 1, 1, 1, 16, 4, 4, "prefill", 2)) == 0.0


def test_predict_latency_hand_case():
    from llmcomm.predict.kernels import layer_ops

    hw = _hw()              # no fitted kernels: every op is max(flops/F, bytes/B), F = B = 1e9
    r = predict_latency(TINY, Layout(2, 1), Workload(1, 16, 4, "fp32"), hw, Deployment(profile="deepspeed-cpu"),
                        gpus_per_node=8)
    pre = r["breakdown"]["prefill"]
    ops = layer_ops(TINY, 2, 1, 16, 0, 8.5, 4)
    t_layer = sum(max(op.get("flops", 0.0), op["bytes"]) / 1e9 * op.get("count", 1) for op in ops.values())
    emb = 2 * 16 * 64 * 4 / 1e9
    head = 2 * 64 * 4 / 1e9 + max(2 * 64 * 1000 / 2, 4 * (64 / 2 + 64 * 1000 / 2 + 1000)) / 1e9
    assert pre["compute_s"] == pytest.approx(4 * t_layer + emb + head, rel=1e-12)
    assert r["ttft_s"] == pytest.approx(pre["compute_s"] + pre["comm_s"])
    assert r["e2e_s"] == pytest.approx(r["ttft_s"] + 3 * r["tpot_s"])
    assert {m["op"] for m in pre["messages"]} == {"all_reduce"}
    # the same hardware under a GPU host profile: the host (350 µs per layer) runs ahead of the kernels: max, not sum
    gpu = predict_latency(TINY, Layout(2, 1), Workload(1, 16, 4, "fp32"), hw, Deployment(profile="deepspeed-eager"),
                          gpus_per_node=8)["breakdown"]["prefill"]
    assert gpu["compute_s"] == pytest.approx(4 * max(t_layer, 350e-6) + emb + max(head, 350e-6), rel=1e-12)


def test_placement_closed_forms_match_enumeration():
    L = 80
    combos = list(itertools.product([1, 2, 3, 4, 6, 8, 16], [1, 2, 3, 5, 8, 16], [1, 2, 4, 6, 8]))
    for t, p, g in combos:
        f_tp, f_pp = placement_reference(L, t, p, g)
        assert float(tp_inter_fraction(L, t, p, g)) == pytest.approx(f_tp), (t, p, g)
        assert float(pp_inter_fraction(L, t, p, g)) == pytest.approx(f_pp), (t, p, g)
    t, p, g = (np.array(c) for c in zip(*combos))
    f_tp, f_pp = placement_fractions(L, t, p, g)
    ref = np.array([placement_reference(L, *c) for c in combos])
    np.testing.assert_allclose(f_tp, ref[:, 0])
    np.testing.assert_allclose(f_pp, ref[:, 1])
    # hand case: t=1, p=16 on nodes of 8 → one boundary of 15 crosses; t=8 on nodes of 4 → every group spans
    assert placement_reference(80, 1, 16, 8) == (0.0, 1 / 15)
    assert placement_reference(80, 8, 2, 4) == (1.0, 1.0)


def test_tp_group_spanning_nodes_pays_inter_link():
    m = load_model("llama-3.1-70b")
    wl = Workload(1, 1024, 16, "bf16")
    h100 = load_hardware("h100-sxm")
    one_node = predict_latency(m, Layout(8, 1), wl, h100, gpus_per_node=8)
    two_nodes = predict_latency(m, Layout(8, 1), wl, h100, gpus_per_node=4)
    assert two_nodes["breakdown"]["prefill"]["compute_s"] == one_node["breakdown"]["prefill"]["compute_s"]
    # every layer all-reduce of the spanning group is charged the cross-node NCCL time (g = 4: two nodes), the
    # one-node group the NVSwitch time; the cross-node call is the slower
    for res, level, g in ((one_node, "intra", 8), (two_nodes, "inter", 4)):
        ar = max((x for x in res["breakdown"]["prefill"]["messages"] if x["op"] == "all_reduce"),
                 key=lambda x: x["calls"])
        assert ar["calls"] == 2 * m.L and ar["bytes_per_call"] == 1024 * m.h * 2
        assert ar["inter_fraction"] == (1.0 if level == "inter" else 0.0)
        expect = float(h100.collective_time("all_reduce", 8, ar["bytes_per_call"], level, g=g))
        assert ar["time_s"] == pytest.approx(ar["calls"] * expect, rel=1e-12)
    assert two_nodes["breakdown"]["prefill"]["comm_s"] > one_node["breakdown"]["prefill"]["comm_s"]


def test_vectorised_equals_scalar():
    m = load_model("llama-3.1-8b")                  # heads 32, kv 8, L 32
    rng = np.random.default_rng(1)
    pts = [(int(t), int(p), int(b), int(S), int(G)) for t, p, b, S, G in
           zip(rng.choice([1, 2, 4, 8], 40), rng.choice([1, 2, 3, 4, 8], 40), rng.integers(1, 17, 40),
               rng.integers(1, 4096, 40), rng.integers(1, 512, 40))]
    t, p, b, S, G = (np.array(c) for c in zip(*pts))
    for name, g in (("h100-sxm", 8), ("a100-sxm-80gb", 2), ("h200", 3)):
        hw = load_hardware(name)
        grid = predict_latency_grid(m, hw, t, p, b, S, G, 2, gpus_per_node=g)
        for i, (ti, pi, bi, Si, Gi) in enumerate(pts):
            one = predict_latency(m, Layout(ti, pi), Workload(bi, Si, Gi, "bf16"), hw, gpus_per_node=g)
            for k in ("ttft_s", "tpot_s", "e2e_s"):
                assert grid[k][i] == pytest.approx(one[k], rel=1e-12), (k, pts[i], hw)


def test_more_tp_is_faster_compute_and_validation():
    m = load_model("llama-3.1-70b")
    wl = Workload(1, 2048, 32, "bf16")
    h100 = load_hardware("h100-sxm")
    r1 = predict_latency(m, Layout(2, 1), wl, h100, Deployment("vllm"))
    r8 = predict_latency(m, Layout(8, 1), wl, h100, Deployment("vllm"))
    assert r8["breakdown"]["prefill"]["compute_s"] < r1["breakdown"]["prefill"]["compute_s"]
    assert r8["breakdown"]["decode"]["comm_s"] > 0 and r1["tpot_s"] > r8["tpot_s"]     # CUDA-graph decode
    # eager DeepSpeed decode is host-bound: 350 µs per layer on the host, at any t (the kernels take less)
    for t in (2, 8):
        eager = predict_latency(m, Layout(t, 1), wl, h100, Deployment())["breakdown"]["decode"]
        assert eager["layer_s"] == pytest.approx(350e-6)
    with pytest.raises(SpecError):
        predict_latency(m, Layout(3, 1), wl, h100)       # 3 does not divide 64 heads
    with pytest.raises(SpecError):
        load_hardware("no-such-gpu")


def test_cpu_local_preset_predicts_tiny_model():
    r = predict_latency(TINY, Layout(2, 1), Workload(1, 16, 4, "fp32"), load_hardware("cpu-local"))
    assert 0 < r["ttft_s"] < 10 and 0 < r["tpot_s"] < 10
