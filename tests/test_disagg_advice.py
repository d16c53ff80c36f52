"""Disaggregation advice (llmcomm.predict.disagg_advice): the deployments enumerated, each row composed from the
latency model, the hand-off and the memory count as the module says, bytes crossing nodes exact, when splitting
pays, and bad requests refused in one line."""
from __future__ import annotations

import math

import pytest

from llmcomm.predict import disagg_advice as A
from llmcomm.predict.advise import memory_per_rank
from llmcomm.predict.handoff import handoff_time
from llmcomm.predict.hardware import GiB, load_hardware
from llmcomm.predict.latency import predict_latency_grid
from llmcomm.spec import Disaggregation, Layout, SpecError, Workload, load_model

QWEN = load_model("qwen3-8b")
HW = load_hardware("h800-roce")
S, G, BATCH = 1024, 64, 8


@pytest.fixture(scope="module")
def rows():
    return A.advise_disaggregated(QWEN, 4, HW, gpus_per_node=2, S=S, G=G, b=BATCH)


def test_deployments_are_replicas_of_valid_layouts():
    assert A.deployments(QWEN, 4) == [(1, 1, 4), (1, 2, 2), (2, 1, 2), (1, 4, 1), (2, 2, 1), (4, 1, 1)]
    assert A.deployments(QWEN, 3) == [(1, 1, 3), (1, 3, 1)]           # t = 3 divides neither 32 heads nor 8


def test_every_split_and_co_located_deployment_is_ranked(rows):
    co = [r for r in rows if r["kind"] == "co-located"]
    split = [r for r in rows if r["kind"] == "split"]
    assert len(co) == 6 and len(split) == 1 * 2 + 3 * 3 + 2 * 1       # N_P = 1, 2, 3
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    ok = [r["tpot_s"] for r in rows if r["fits"] and r["keeps_up"]]
    assert ok == sorted(ok)


def _one(t, p, b):
    lat = predict_latency_grid(QWEN, HW, t, p, b, S, G, 2, gpus_per_node=2)
    return float(lat["ttft_s"]), float(lat["tpot_s"])


def test_co_located_rows_pay_the_prefill_stall(rows):
    x = BATCH / G
    for r in (r for r in rows if r["kind"] == "co-located"):
        t, p, reps = r["prefill_tp"], r["prefill_pp"], r["prefill_replicas"]
        prefill, _ = _one(t, p, 1)
        _, step = _one(t, p, math.ceil(BATCH / reps))
        assert r["ttft_s"] == pytest.approx(prefill, rel=1e-12)
        assert r["tpot_s"] == pytest.approx(step + x / reps * prefill, rel=1e-12)
        assert r["e2e_s"] == pytest.approx(r["ttft_s"] + (G - 1) * r["tpot_s"], rel=1e-12)


def test_split_rows_add_the_handoff_and_check_the_prefill_load(rows):
    x = BATCH / G
    for r in (r for r in rows if r["kind"] == "split"):
        prefill, _ = _one(r["prefill_tp"], r["prefill_pp"], 1)
        _, step = _one(r["decode_tp"], r["decode_pp"], math.ceil(BATCH / r["decode_replicas"]))
        assert r["tpot_s"] == pytest.approx(step, rel=1e-12) and r["stall_s"] == 0
        assert r["ttft_s"] == pytest.approx(prefill + r["handoff_s"], rel=1e-12)
        assert r["prefill_load"] == pytest.approx(x * prefill / (r["prefill_replicas"] * step), rel=1e-12)
        assert r["keeps_up"] == (r["prefill_load"] <= 1)


def test_split_across_nodes_moves_every_prompts_kv_over_the_network(rows):
    """TP 2 → TP 2 on 2 + 2 GPUs, 2 per node: the prefill on node 0, the decode on node 1. The hand-offs of the 8
    requests carry 8 · 147,456 · S bytes of KV and 8 · (8 B · 2) of token ids across nodes, and one request's
    hand-off takes the time of its own plan."""
    r = next(r for r in rows if r["kind"] == "split" and (r["prefill_tp"], r["prefill_pp"], r["decode_tp"],
                                                           r["decode_pp"]) == (2, 1, 2, 1))
    assert r["handoff_inter_node_bytes"] == BATCH * (147456 * S + 8 * 2)
    one = handoff_time(QWEN, Disaggregation(Layout(2, 1), Layout(2, 1)), Workload(1, S, G, "bf16"), HW, 2)
    assert r["handoff_s"] == pytest.approx(one["seconds"], rel=1e-12) and one["inter_node_bytes"] > 0
    co = next(r for r in rows if r["kind"] == "co-located" and r["prefill_tp"] == 2 and r["prefill_replicas"] == 2)
    assert co["inter_node_bytes"] == 0                                  # each TP-2 replica on its own node


def test_one_co_located_engine_crosses_nodes_as_advise_counts_it(rows):
    """The TP-4 engine on 2 nodes of 2: its bytes crossing nodes are what llmcomm.predict.advise counts."""
    from llmcomm.derive.evaluate import traffic_totals

    co = next(r for r in rows if r["kind"] == "co-located" and r["prefill_tp"] == 4)
    want = traffic_totals(QWEN, Layout(4, 1), Workload(BATCH, S, G, "bf16"), "deepspeed", "ring", 2)
    assert co["inter_node_bytes"] == want["inter_node_bytes"] > 0


def test_memory_counts_each_side_whole_weights():
    """A 70B model in bf16 (~129 GiB of weights) on 2 x 80 GB: co-located TP 2 fits, a 1 + 1 split cannot (each side
    would hold every weight on one GPU)."""
    big = load_model("llama-2-70b")
    got = A.advise_disaggregated(big, 2, HW, gpus_per_node=8, S=512, G=16, b=1)
    split = [r for r in got if r["kind"] == "split"]
    assert split and not any(r["fits"] for r in split)
    assert got[0]["kind"] == "co-located" and got[0]["fits"] and got[0]["prefill_tp"] == 2
    mem = memory_per_rank(big, 1, 1, 1, 512, 16, 2)
    assert split[0]["memory_gib_decode"] == pytest.approx(
        float(mem["weights"] + mem["kv"] + memory_per_rank(big, 1, 1, 1, 1, 0, 2)["act"]) / GiB, rel=1e-12)


def test_fp8_kv_halves_the_kv_memory():
    base = A.advise_disaggregated(QWEN, 2, HW, S=4096, G=64, b=16)
    fp8 = A.advise_disaggregated(QWEN, 2, HW, S=4096, G=64, b=16, kv_dtype="fp8")
    pick = lambda rs: next(r for r in rs if r["kind"] == "split")  # noqa: E731
    kv = float(memory_per_rank(QWEN, 1, 1, 16, 4096, 64, 2)["kv"]) / GiB
    assert pick(base)["memory_gib_decode"] - pick(fp8)["memory_gib_decode"] == pytest.approx(kv / 2, rel=1e-9)


def test_when_splitting_pays(rows):
    verdict = A.when_splitting_pays(rows)
    co = [r for r in rows if r["kind"] == "co-located" and r["fits"]]
    best = next(r for r in rows if A._name(r) == verdict["best_split"])
    lo = max([c["prefill_replicas"] * (best["tpot_s"] - c["decode_step_s"]) / c["prefill_s"] for c in co] + [0.0])
    assert verdict["window"] == pytest.approx([lo, best["prefill_replicas"] * best["tpot_s"] / best["prefill_s"]])
    # at the window's edges the split's TPOT equals the best co-located one's under that load
    at_lo = min(c["decode_step_s"] + lo / c["prefill_replicas"] * c["prefill_s"] for c in co)
    assert at_lo == pytest.approx(best["tpot_s"], rel=1e-9) or lo == 0
    none = A.when_splitting_pays(A.advise_disaggregated(QWEN, 4, HW, gpus_per_node=2, S=S, G=G, b=BATCH,
                                                        prefills_per_step=0.0))
    assert none["pays_now"] is False and "\n" not in none["statement"]
    flood = A.advise_disaggregated(QWEN, 4, HW, gpus_per_node=2, S=S, G=G, b=BATCH, prefills_per_step=100.0)
    assert not any(r["keeps_up"] for r in flood if r["kind"] == "split")   # no prefill side sustains 100 per step
    assert A.when_splitting_pays(flood)["pays_now"] is False
    busy = A.when_splitting_pays(A.advise_disaggregated(QWEN, 4, HW, gpus_per_node=2, S=S, G=G, b=BATCH,
                                                        prefills_per_step=0.6))
    lo, hi = busy["window"]
    assert busy["pays_now"] == (lo < 0.6 <= hi)


@pytest.mark.parametrize("kwargs, msg", [
    ({"objective": "speed"}, "objective 'speed' is not one of"),
    ({"gpus": 1}, "gpus=1 leaves no split"),
    ({"prefills_per_step": -1}, "prefills_per_step=-1"),
    ({"kv_dtype": "int3"}, "KV dtype 'int3'"),
    ({"gpus_per_node": 0}, "gpus_per_node=0"),
])
def test_bad_requests_are_one_line(kwargs, msg):
    args = dict(model=QWEN, gpus=4, hw=HW) | kwargs
    with pytest.raises(SpecError, match=msg) as err:
        A.advise_disaggregated(**args)
    assert "\n" not in str(err.value)
