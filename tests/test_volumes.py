"""Closed forms: exact values, structure (sympy), and properties that must hold for every layout and workload."""
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from llmcomm import Layout, Workload, load_model
from llmcomm.derive import evaluate as ev, patterns, volumes as v
from llmcomm.notation import G, L, S, V, b, h, t, w, p as P
from llmcomm.spec import SpecError
from support import predicted


def test_deepspeed_tp_closed_forms():
    vol = v.volumes("deepspeed")
    assert {("prefill", "all_reduce", t), ("decode", "all_reduce", t)} <= set(vol)
    for (phase, op, group), (calls, nbytes) in vol.items():  # TP-only layouts: nothing but the all-reduces
        if op != "all_reduce":
            assert calls.subs({P: 1, t: 4}) == 0 and nbytes.subs({P: 1, t: 4}) == 0
    calls, nbytes = vol[("prefill", "all_reduce", t)]
    assert calls.subs(t, 2) == 2 * L + 1
    assert sp.expand(nbytes.subs(t, 2) - (2 * L * b * S * h * w + b * V * w)) == 0
    calls, nbytes = vol[("decode", "all_reduce", t)]
    assert sp.expand(calls.subs(t, 4) - (G - 1) * (2 * L + 1)) == 0
    assert sp.expand(nbytes.subs(t, 4) - (G - 1) * (2 * L * b * h + b * V) * w) == 0
    assert calls.subs(t, 1) == 0 and nbytes.subs(t, 1) == 0


def test_deepspeed_pipeline_closed_forms():
    vol = v.volumes("deepspeed")
    # pure pipeline (t = 1): p−1 hidden-state sends + 1 token hand-back per forward; no all-reduce, no all-gather
    calls, nbytes = vol[("prefill", "send_recv", 2)]
    assert sp.expand(calls.subs({t: 1, P: 3}) - 3) == 0
    assert sp.expand(nbytes.subs({t: 1, P: 3}) - (2 * b * S * h * w + 8 * b)) == 0
    assert vol[("decode", "all_gather", t)][0].subs({t: 1, P: 3}) == 0
    # hybrid t×p: each TP rank sends 1/t at each boundary, the next stage all-gathers, t token hand-backs
    calls, nbytes = vol[("decode", "send_recv", 2)]
    assert sp.expand(calls.subs({t: 2, P: 2}) - 4 * (G - 1)) == 0
    assert sp.expand(nbytes.subs({t: 2, P: 2}) - (G - 1) * (b * h * w + 16 * b)) == 0
    calls, nbytes = vol[("prefill", "all_gather", t)]
    assert calls.subs({t: 4, P: 3}) == 2 and sp.expand(nbytes.subs({t: 4, P: 3}) - 2 * b * S * h * w) == 0
    # the all-reduces of a hybrid are those of the TP-only run with the same t, whatever the split of layers
    assert vol[("prefill", "all_reduce", t)][1].subs({t: 2, P: 4}) == vol[("prefill", "all_reduce", t)][1].subs(t, 2)


def test_vllm_tp_closed_forms():
    vol = v.volumes("vllm")
    calls, nbytes = vol[("prefill", "all_reduce", t)]
    assert calls.subs(t, 2) == 2 * L + 1  # embedding all-reduce + two per layer
    assert sp.expand(nbytes.subs(t, 2) - (2 * L + 1) * b * S * h * w) == 0
    calls, nbytes = vol[("decode", "gather", t)]
    assert sp.expand(nbytes.subs(t, 2) - (G - 1) * b * V * w) == 0


def test_exact_bytes_llama31_8b():
    # t=2, bf16, b=1, S=128, G=2: prefill = (2·32·128·4096 + 128256)·2, decode = (2·32·4096 + 128256)·2
    # ring on t = 2: each rank sends 2(t−1)/t·m = m per call, both links carry 2m; placed 8 per node: nothing crosses
    rows = predicted("llama-3.1-8b", Layout(2), Workload(1, 128, 2, "bf16"))
    assert rows == [
        {"phase": "prefill", "op": "all_reduce", "group_size": 2, "calls": 65, "bytes": 67365376, "algorithm": "ring",
         "sent_bytes_per_rank": 67365376, "link_bytes": 134730752},
        {"phase": "decode", "op": "all_reduce", "group_size": 2, "calls": 65, "bytes": 780800, "algorithm": "ring",
         "sent_bytes_per_rank": 780800, "link_bytes": 1561600},
    ]
    # t = 4 on nodes of 2 GPUs: the ring crosses nodes twice: 2 of its 4 links, 1.5·m each per call
    four = ev.rows(load_model("llama-3.1-8b"), Layout(4), Workload(1, 128, 2, "bf16"), gpus_per_node=2)
    assert [(r["sent_bytes_per_rank"], r["link_bytes"], r["inter_node_bytes"]) for r in four] == [
        (67365376 * 3 // 2, 67365376 * 6, 67365376 * 3), (780800 * 3 // 2, 780800 * 6, 780800 * 3)]


def test_no_communication_on_one_rank():
    for name in patterns.PATTERNS:
        assert predicted("llama-3.1-8b", Layout(1, 1), Workload(2, 64, 8), name) == []


def test_unknown_pattern():
    with pytest.raises(SpecError, match="unknown message pattern 'megatron'"):
        predicted("tiny-llama", Layout(2), Workload(), "megatron")


def test_engines_differ_by_embedding_all_reduce_and_head():
    # vLLM − DeepSpeed (prefill): one more all-reduce of [b, S, h] (vocab-parallel embedding); the logits move as a
    # gather of b·V·w instead of an all-reduce of b·V·w, so the head's bytes are equal by nccl-tests' convention.
    diff = sp.simplify(v.total_bytes("vllm", "prefill") - v.total_bytes("deepspeed", "prefill"))
    assert sp.expand(diff.subs({t: 2, P: 1})) == b * S * h * w


def test_crossover_solved():
    # Where does DeepSpeed's prefill all-reduce of activations equal the logits all-reduce? 2·L·S·h = V.
    sol = v.solve_crossover(2 * L * b * S * h * w, b * V * w, S, L=16, h=2048, V=128256)
    assert sol == [sp.Rational(128256, 2 * 16 * 2048)]


settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")

workloads = st.builds(Workload, b=st.integers(1, 64), S=st.integers(1, 3000), G=st.integers(1, 1000),
                      dtype=st.sampled_from(["fp32", "bf16", "fp16"]))
models = st.sampled_from(["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-2-13b"])
layouts = st.builds(Layout, t=st.sampled_from([1, 2, 4, 8]), p=st.sampled_from([1, 2, 4]))


@given(models, layouts, workloads, st.sampled_from(sorted(patterns.PATTERNS)))
def test_rows_equal_sum_of_forward_messages(model, layout, workload, engine):
    """Lambdified closed forms == the pattern's messages substituted one forward at a time (two independent paths)."""
    rows = predicted(model, layout, workload, engine)
    expect = {}
    for phase, forwards in (("prefill", 1), ("decode", workload.G - 1)):
        for m in ev.forward_messages(load_model(model), layout, workload, phase, engine):
            key = (phase, m["op"], m["group_size"])
            c, nb = expect.get(key, (0, 0))
            expect[key] = (c + forwards * m["calls"], nb + forwards * m["calls"] * m["bytes_per_call"])
    got = {(r["phase"], r["op"], r["group_size"]): (r["calls"], r["bytes"]) for r in rows}
    assert got == {k: val for k, val in expect.items() if val[0]}


@given(models, st.sampled_from([2, 4, 8]), workloads)
def test_deepspeed_tp_bytes_independent_of_t_and_linear_in_b_w(model, tdeg, workload):
    rows = predicted(model, Layout(tdeg), workload)
    ref = predicted(model, Layout(2), workload)
    assert [r["bytes"] for r in rows] == [r["bytes"] for r in ref]
    double_b = predicted(model, Layout(tdeg), Workload(2 * workload.b, workload.S, workload.G, workload.dtype))
    assert [2 * r["bytes"] for r in rows] == [r["bytes"] for r in double_b]
    m = load_model(model)
    per_decode = (2 * m.L * workload.b * m.h + workload.b * m.V) * workload.w
    dec = [r for r in rows if r["phase"] == "decode"]
    assert sum(r["bytes"] for r in dec) == (workload.G - 1) * per_decode


def test_grid_matches_rows():
    tt = np.array([1, 2, 4, 8])[:, None]
    SS = np.array([1, 17, 1024])[None, :]
    g = ev.phase_bytes("deepspeed", load_model("llama-3.1-8b"), tt, 1, 3, SS, 9, 2)
    for i, tv in enumerate([1, 2, 4, 8]):
        for j, sv in enumerate([1, 17, 1024]):
            rows = predicted("llama-3.1-8b", Layout(tv), Workload(3, sv, 9, "bf16"))
            assert g["total"][i, j] == sum(r["bytes"] for r in rows)


def test_readable_totals_are_the_derived_branches():
    B = v.total_bytes("deepspeed")
    assert sp.expand(v.regime(B, "TP") - v.B_TP) == 0
    assert sp.expand(v.regime(B, "PP") - v.B_PP) == 0
    assert sp.expand(v.regime(B, "hybrid") - v.B_hybrid) == 0
    assert v.regime(B, "single") == 0
    assert t not in v.B_TP.free_symbols and P not in v.B_TP.free_symbols and L not in v.B_PP.free_symbols
    with pytest.raises(ValueError, match="unknown regime 'ring'"):
        v.regime(B, "ring")


def test_regime_substitutes_the_degrees_it_fixes():
    calls, _ = v.volumes("deepspeed")[("prefill", "send_recv", 2)]
    assert v.regime(calls, "PP") == P                      # t = 1: p−1 hops + 1 hand-back
    assert sp.expand(v.regime(calls, "hybrid") - t * P) == 0
    assert v.regime(calls, "TP") == 0


def test_lighter_condition_vllm_against_deepspeed_tp():
    """When vLLM's TP pattern moves fewer bytes than DeepSpeed's: derived from the closed forms, equal to the forms
    worked by hand (busiest rank: DS sends 2(t−1)/t of its 2L activations and of the logits per forward, vLLM
    2(t−1)/t of 2L+1 activations and a 1/t logits shard; links: the all-reduce ring carries 2(t−1)·m, the gather
    (t−1)/t·m)."""
    busiest = v.lighter_condition("busiest")
    assert isinstance(busiest, sp.StrictGreaterThan)
    assert sp.expand(busiest.lhs - (2 * t - 3) * G * V) == 0
    assert sp.expand(busiest.rhs - 2 * (t - 1) * (S + G - 1) * h) == 0
    at8 = busiest.subs(t, 8)
    assert sp.expand(at8.lhs - 13 * G * V) == 0 and sp.expand(at8.rhs - 14 * (S + G - 1) * h) == 0
    links = v.lighter_condition("links")
    assert sp.expand(links.lhs - (2 * t - 1) * G * V) == 0 and sp.expand(links.rhs - 2 * t * (S + G - 1) * h) == 0
    assert v.lighter_condition("sizes") == sp.false           # one more all-reduce, the same logits size
    swapped = v.lighter_condition("busiest", lighter="deepspeed", heavier="vllm")
    assert isinstance(swapped, sp.StrictLessThan) and sp.expand(swapped.lhs - busiest.lhs) == 0
    with pytest.raises(ValueError, match="metric"):
        v.lighter_condition("flops")


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"])
@pytest.mark.parametrize("tp,S_,G_", [(8, 1024, 128), (2, 128, 128), (4, 2048, 16), (8, 16, 512)])
def test_lighter_condition_agrees_with_counted_traffic(name, tp, S_, G_):
    """The derived condition against the traffic counted call by call (evaluate.traffic_totals): it holds exactly when
    vLLM's busiest rank sends fewer bytes (and all links carry fewer)."""
    m = load_model(name)
    wl = Workload(1, S_, G_, "bf16")
    counted = {pat: ev.traffic_totals(m, Layout(tp), wl, pat) for pat in ("vllm", "deepspeed")}
    vals = {t: tp, S: S_, G: G_, h: m.h, V: m.V}
    for metric, key in (("busiest", "sent_bytes_busiest_rank"), ("links", "link_bytes")):
        assert bool(v.lighter_condition(metric).subs(vals)) == (counted["vllm"][key] < counted["deepspeed"][key])


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 2), (2, 4)])
def test_hop_traffic_matches_the_counted_calls(tp, pp):
    """One boundary's traffic read from the pattern (volumes.hop_traffic), times the p−1 boundaries of one prefill,
    equals the hop traffic counted call by call from the generation's calls (report.tables.hop_traffic), in both
    stage-to-stage modes; full mode puts all of it on the stage links, partitioned mode 1/t of it."""
    from llmcomm.notation import s
    from llmcomm.report.tables import hop_traffic

    m8 = load_model("llama-3.1-8b")
    counted = hop_traffic(m8, Layout(tp, pp), Workload(1, 1024, 1, "bf16"), gpus_per_node=tp).set_index("mode")
    vals = {b: 1, s: 1024, h: m8.h, w: 2, t: tp, P: pp}
    for mode, pattern in (("partitioned", "deepspeed"), ("full", "deepspeed-full")):
        hop = {k: int(x.subs(vals)) * (pp - 1) for k, x in v.hop_traffic(pattern).items()}
        assert hop["stage link"] + hop["TP group's links"] == counted.loc[mode, "all links"]
        assert hop["stage link"] == counted.loc[mode, "across nodes"]      # one stage per node: the hops cross
        assert hop["into each receiving rank"] == 1024 * m8.h * 2 * (pp - 1)
    assert sp.expand(v.hop_traffic("vllm")["stage link"] - 2 * v.hop_traffic("deepspeed")["stage link"]) == 0
