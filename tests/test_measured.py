"""Every configuration the book measures, measured once and checked here against the closed forms, byte for byte.

The configurations are the chapters' own lists (:func:`llmcomm.compare.sweeps.configs`, one source): the TP chapter's,
the pipeline chapter's (both stage-to-stage modes), the mixtures-of-experts chapter's, plus the few kinds only the
tests measure (``TEST_KINDS``). :func:`llmcomm.compare.sweeps.measure_configs` runs them with as few launches as there
are (model, layout) pairs — routing, stage-to-stage mode and expert layout change per configuration inside a launch
— and the run cache of the test session (``tests/conftest.py``) hands the same results to the chapters when nbval
re-executes them. Slow: the session's first test here starts every launch (minutes on 2 cores).
"""
from __future__ import annotations

import pytest

from llmcomm import load_model
from llmcomm.compare import moe as cm
from llmcomm.compare.sweeps import CHAPTER_KINDS, configs, measure_configs, predicted_like
from llmcomm.derive.evaluate import rows as predict_rows
from llmcomm.derive.moe import dropless_bounds, expected_max_count
from llmcomm.derive.phases import order as phase_order
from llmcomm.spec import stage_layers
from support import core

pytestmark = pytest.mark.slow

#: what only the tests measure: AutoTP × PP on a mixture of experts (the pattern's pipeline rows with MoE layers)
TEST_KINDS = ("moe-autotp-pp",)
ALL = {kind: configs(kind, "cpu") for kind in (*CHAPTER_KINDS, *TEST_KINDS)}
RNG_STATE_BYTES = 5056          # CPU generator state (mt19937) that init_inference broadcasts from rank 0
W_TOKEN = 8                     # token ids are int64


@pytest.fixture(scope="session")
def measured():
    """config → (ModelSpec, MeasureResult) for every configuration of :data:`ALL`, one launch per (model, layout)."""
    cfgs = list(dict.fromkeys(c for cs in ALL.values() for c in cs))
    return {c: (model, res) for c, model, res in measure_configs(cfgs, progress_timeout_s=240)}


def _ids(c):
    return c.label.replace(" ", "-")


def _cases(*kinds):
    return [c for k in kinds for c in ALL[k]]


def _key(r):
    return phase_order(r["phase"]), r["op"], r["group_size"]


def _own(res):
    return sorted((r for r in res.rows if r["phase"] != "setup"), key=_key)


# ------------------------------------------------------------------------------------------------ every launch
@pytest.mark.parametrize("c", _cases(*ALL), ids=_ids)
def test_tokens_equal_the_single_process_reference(measured, c):
    model, res = measured[c]
    assert res.reference_tokens is not None and res.tokens == res.reference_tokens
    assert len(res.tokens) == c.b and all(len(x) == c.G for x in res.tokens)
    assert res.ttft_s > 0 and (res.tpot_s > 0) == (c.G > 1) and res.e2e_s >= res.ttft_s


def test_one_launch_per_model_and_layout_each_configuration_captured_on_its_own(measured):
    groups: dict = {}
    for c, (_, res) in measured.items():
        groups.setdefault((c.model, c.t, c.p, c.e), []).append(res)
    for key, results in groups.items():
        assert len({r.provenance["master_port"] for r in results}) == 1, key        # one launch
        assert sorted(r.provenance["launch"]["index"] for r in results) == list(range(len(results))), key
    # several configurations share a launch (per-configuration exactness below then also proves that nothing of one
    # configuration leaks into the next: each one's rows are its own closed form, its KV cache starts empty)
    assert max(len(r) for r in groups.values()) >= 5


# ------------------------------------------------------------------------------------------------ TP (AutoTP)
@pytest.mark.parametrize("c", _cases("tp"), ids=_ids)
def test_tp_rows_equal_prediction(measured, c):
    model, res = measured[c]
    # calls and bytes, and the traffic derived from the captured calls under the run's all-reduce algorithm (shm:
    # one-shot below 1 MiB, two-phase above) and placement (one host)
    assert res.traffic["algorithm"] == "shm"
    assert [r for r in res.rows if r["phase"] != "setup"] == predicted_like(model, c.layout, c.workload, res)


@pytest.mark.parametrize("c", _cases("tp"), ids=_ids)
def test_tp_setup_is_one_rng_state_broadcast_on_the_world(measured, c):
    _, res = measured[c]
    n = c.t
    assert [r for r in res.rows if r["phase"] == "setup"] == [
        {"phase": "setup", "op": "broadcast", "group_size": n, "calls": 1, "bytes": RNG_STATE_BYTES,
         "algorithm": "chain", "sent_bytes_per_rank": RNG_STATE_BYTES, "link_bytes": (n - 1) * RNG_STATE_BYTES,
         "inter_node_bytes": 0}]


@pytest.mark.parametrize("c", _cases("tp"), ids=_ids)
def test_tp_events_and_provenance(measured, c):
    _, res = measured[c]
    assert {e["rank"] for e in res.events} == set(range(c.t))
    ar = [e for e in res.events if e["op"] == "all_reduce"]
    assert {e["api"] for e in ar} == {"deepspeed.comm.inference_all_reduce"} and {e["dtype"] for e in ar} == {"float32"}
    assert res.provenance["comm"]["allreduce_path"] == "shm" and res.provenance["versions"]["deepspeed"]


def test_shm_all_reduce_above_one_mib_moves_as_two_phases(measured):
    """t = 4, [16, 384, 64] fp32: each of the 2L prefill all-reduces of the hidden state is 1.5 MiB, above DeepSpeed's
    1 MiB threshold: every rank sends 2(n−1)/n·m = 1.5·m of it (two-phase), not (n−1)·m = 3·m (one-shot); the
    logits all-reduce [16, V] (64 KiB) stays one-shot. By hand, beside the measured row."""
    (c,) = [c for c in ALL["tp"] if c.b * c.S * 64 * 4 >= 2 ** 20]
    model, res = measured[c]
    m_hidden, m_logits = c.b * c.S * model.h * 4, c.b * model.V * 4
    assert m_hidden == 1_572_864 > 2 ** 20 > m_logits == 65_536
    (row,) = [r for r in res.rows if (r["phase"], r["op"]) == ("prefill", "all_reduce")]
    assert row["calls"] == 2 * model.L + 1 and row["bytes"] == 2 * model.L * m_hidden + m_logits
    assert row["algorithm"] == "shm"
    assert row["sent_bytes_per_rank"] == 2 * model.L * m_hidden * 3 // 2 + 3 * m_logits
    assert row["link_bytes"] == 2 * model.L * 6 * m_hidden + 12 * m_logits          # 2(n−1)·m, n(n−1)·m
    one_shot = 2 * model.L * 3 * m_hidden + 3 * m_logits                              # what "direct" would claim
    assert row["sent_bytes_per_rank"] < one_shot


# ------------------------------------------------------------------------------------------------ pipelines
def hand_rows(model, c) -> list[dict]:
    """The closed form of ``src/llmcomm/measure/runs/PIPELINE_PATTERN.md``, prefill and decode rows (setup apart)."""
    m = load_model(model)
    b, S, G, w = c.b, c.S, c.G, c.workload.w
    h, L, V, t, p = m.h, m.L, m.V, c.t, c.p
    part = c.p2p == "partitioned" and t > 1
    rows = []
    for phase, s, n in (("prefill", S, 1), ("decode", 1, G - 1)):
        if n == 0:
            continue
        if part:
            rows.append({"phase": phase, "op": "all_gather", "group_size": t, "calls": n * (p - 1),
                         "bytes": n * (p - 1) * b * s * h * w})
        if t > 1:
            rows.append({"phase": phase, "op": "all_reduce", "group_size": t, "calls": n * (2 * L + 1),
                         "bytes": n * (2 * L * b * s * h + b * V) * w})
        act = (p - 1) * b * s * h * w * (1 if part else t)      # partitioned: t sends of 1/t; full: t whole tensors
        rows.append({"phase": phase, "op": "send_recv", "group_size": 2, "calls": n * t * p,
                     "bytes": n * (act + t * b * W_TOKEN)})
    return sorted(rows, key=_key)


PIPELINES = _cases("pipeline", "pipeline-full")


@pytest.mark.parametrize("c", PIPELINES, ids=_ids)
def test_pipeline_rows_equal_prediction_and_hand_formula(measured, c):
    model, res = measured[c]
    like = predicted_like(model, c.layout, c.workload, res, c.deployment.pattern(model, c.layout))
    assert _own(res) == sorted(like, key=_key)                     # calls, bytes and traffic, counted alike
    assert core(_own(res)) == hand_rows(c.model, c)


@pytest.mark.parametrize("c", PIPELINES, ids=_ids)
def test_pipeline_logits_and_stages(measured, c):
    model, res = measured[c]
    parts = stage_layers(model.L, c.p)
    bounds = [sum(parts[:k]) for k in range(c.p + 1)]
    for rec in res.ranks:
        pl = rec["pipeline"]
        assert rec["rank"] == pl["stage"] * c.t + pl["tp_rank"]
        assert pl["layers"] == [bounds[pl["stage"]], bounds[pl["stage"] + 1]]
        assert pl["p2p"] == (c.p2p if c.t > 1 else "full")
        assert rec["comm"]["allreduce_path"] == "process_group"   # never the shm kernel (it ignores sub-groups)
        # stage 0 got every token back from the last stage; the last stage computed them; middle stages never do
        assert (rec["tokens"] is not None) == (pl["stage"] in (0, c.p - 1))
    last0 = next(r for r in res.ranks if r["rank"] == (c.p - 1) * c.t)["pipeline"]
    assert last0["logits_max_abs_diff"] is not None and last0["logits_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("c", PIPELINES, ids=_ids)
def test_pipeline_setup_and_message_shapes(measured, c):
    _, res = measured[c]
    # PipelineModule's groups rendezvous over the TCP store (no collective); AutoTP broadcasts the RNG state over the
    # world once, only when t > 1
    expect = [{"phase": "setup", "op": "broadcast", "group_size": c.t * c.p, "calls": 1,
               "bytes": RNG_STATE_BYTES}] if c.t > 1 else []
    assert core([r for r in res.rows if r["phase"] == "setup"]) == expect
    sends = [e for e in res.events if e["op"] == "send" and e["phase"] == "decode"]
    tokens = [e for e in sends if e["dtype"] == "int64"]
    n = c.G - 1
    assert len(tokens) == n * c.t and {tuple(e["shape"]) for e in tokens} <= {(c.b, 1)}
    assert all(e["peer"] == e["rank"] - (c.p - 1) * c.t for e in tokens)   # last stage → stage 0
    assert len([e for e in sends if e["dtype"] == "float32"]) == n * c.t * (c.p - 1)


def test_p2p_mode_changes_inside_one_launch(measured):
    (full,) = ALL["pipeline-full"]
    part = next(c for c in ALL["pipeline"] if (c.model, c.t, c.p, c.b, c.S, c.G) ==
                (full.model, full.t, full.p, full.b, full.S, full.G))
    (_, a), (_, b) = measured[part], measured[full]
    assert a.provenance["master_port"] == b.provenance["master_port"]
    assert {r["pipeline"]["p2p"] for r in a.ranks} == {"partitioned"} and {r["pipeline"]["p2p"] for r in b.ranks} == \
        {"full"}
    assert {r["op"] for r in a.rows} - {r["op"] for r in b.rows} == {"all_gather"}   # full sends whole tensors


# ------------------------------------------------------------------------------------------------ mixtures of experts
EP = _cases("moe-ep", "moe-ep-pp", "moe-qwen3-ep", "moe-qwen3-ep-pp")


@pytest.mark.parametrize("c", EP, ids=_ids)
def test_every_all_to_all_equals_its_closed_form(measured, c):
    model, res = measured[c]
    routing = c.deployment.routing
    ex = cm.a2a_exactness(res, model, c.layout, c.workload, routing)
    assert ex.equal.all() and (ex.C_predicted == ex.C_run).all()
    assert len(ex) == 2 * model.L_moe * c.G                                   # dispatch + combine per MoE layer
    assert all(s == [b // 2, b // 2] for s, b in zip(ex.split_measured, ex.bytes_measured))   # equal splits
    if c.p == 2:                                              # each stage's EP group: the MoE layers it holds
        first = stage_layers(model.L, 2)[0]
        assert set(ex[ex.stage == 0].layer) == {i for i in model.moe.layers if i < first}
        assert set(ex[ex.stage == 1].layer) == {i for i in model.moe.layers if i >= first}
    rows = core(_own(res))
    if c.routing == "capacity":
        pred = core(predict_rows(model, c.layout, c.workload, c.deployment.pattern(model, c.layout), routing=routing))
        assert rows == sorted(pred, key=_key)
    else:                     # the sizes are the closed form on the measured counts; the capacity all-reduce MAX
        a2a = {r["phase"]: r["bytes"] for r in rows if r["op"] == "all_to_all"}
        assert a2a == cm.phase_totals(ex).set_index("phase").bytes_measured.to_dict()
        assert [(r["phase"], r["calls"], r["bytes"]) for r in rows if r["op"] == "all_reduce"] == \
            [(ph, model.L_moe * n, 8 * model.L_moe * n) for ph, n in (("prefill", 1), ("decode", c.G - 1)) if n]
    # the stage hops and the token hand-back do not depend on the routing: the capacity pattern's rows
    pred = core(predict_rows(model, c.layout, c.workload, "deepspeed-ep"))
    assert [r for r in rows if r["op"] == "send_recv"] == [r for r in sorted(pred, key=_key) if r["op"] == "send_recv"]


def test_ep_capacity_by_hand(measured):
    # tiny Mixtral, b = 4, S = 7 on 2 ranks: T = 14 tokens per rank in the prefill, C = max(⌈14·2/8⌉, 4) = 4 → the
    # first all-to-all is [E, C, h] = 8·4·64 fp32
    c = next(c for c in ALL["moe-ep"] if (c.b, c.S, c.routing) == (4, 7, "capacity"))
    model, res = measured[c]
    ex = cm.a2a_exactness(res, model, c.layout, c.workload, c.deployment.routing)
    assert ex.bytes_measured.iloc[0] == 8 * 4 * 64 * 4 == 8192


@pytest.mark.parametrize("c", EP, ids=_ids)
def test_dropped_routes_measured_equal_a_hand_count_of_the_router_log(measured, c):
    # capacity routing keeps min(κ, C) routes of an expert: the log's Σ (κ − C)⁺ over the EP group is what DeepSpeed
    # itself flagged as evicted (its route indices of −1), layer forward by layer forward; dropless drops nothing
    model, res = measured[c]
    ex = cm.a2a_exactness(res, model, c.layout, c.workload, c.deployment.routing)
    logs = cm.routing_frame(res)
    for _, x in ex[ex.call == "dispatch"].iterrows():
        same = [r for _, r in logs.iterrows() if (r.forward, r.layer) == (x.forward, x.layer)]
        hand = sum(max(int(r[f"kappa{j}"]) - int(r.capacity), 0) for r in same for j in range(model.E))
        assert x.dropped_routes == hand == x.dropped_routes_deepspeed
        assert x.routes == sum(int(r.tokens) for r in same) * model.moe.top_k
    tot = cm.phase_totals(ex)
    if c.routing == "dropless":
        assert (tot.dropped_routes == 0).all() and (tot.dropped_fraction_predicted == 0).all()
    else:
        assert (tot.dropped_fraction_measured == tot.dropped_routes / tot.routes).all()


@pytest.mark.parametrize("c", [c for c in EP if c.routing == "dropless"], ids=_ids)
def test_dropless_capacity_within_its_bounds(measured, c):
    model, res = measured[c]
    for _, x in cm.count_distribution(res, model, c.layout).iterrows():
        lo, hi = dropless_bounds(x.tokens_per_rank, model.E, model.moe.top_k)
        assert lo <= x.C_measured <= hi and lo <= x.C_uniform_expected <= hi
        assert x.C_uniform_expected == pytest.approx(
            expected_max_count(x.tokens_per_rank, model.E, model.moe.top_k, c.e)[0])


def test_routing_changes_inside_one_launch(measured):
    by = {c.routing: measured[c][1] for c in ALL["moe-ep"] if (c.b, c.S, c.G) == (4, 7, 3)}
    assert by["capacity"].provenance["master_port"] == by["dropless"].provenance["master_port"]
    ops = {mode: {r["op"] for r in res.rows if r["phase"] == "prefill"} for mode, res in by.items()}
    assert ops == {"capacity": {"all_to_all"}, "dropless": {"all_to_all", "all_reduce"}}


TP_MOE = _cases("moe-autotp", "moe-tp-experts", "moe-qwen3-tp", "moe-autotp-pp")


@pytest.mark.parametrize("c", TP_MOE, ids=_ids)
def test_moe_tp_rows_equal_the_pattern(measured, c):
    model, res = measured[c]
    pattern = c.deployment.pattern(model, c.layout)
    assert core(_own(res)) == sorted(core(predict_rows(model, c.layout, c.workload, pattern)), key=_key)
    (pre,) = [r for r in core(_own(res)) if (r["phase"], r["op"]) == ("prefill", "all_reduce")]
    if c.experts == "tp-experts":       # every expert sharded: the MoE block ends in an all-reduce, like a dense MLP
        assert pre["calls"] == 2 * model.L + 1
        assert pre["bytes"] == 4 * (2 * model.L * c.b * c.S * model.h + c.b * model.V)
    else:                               # AutoTP as it is: o_proj per layer, down_proj of dense layers, the head
        assert pre["calls"] == model.L + (model.L - model.L_moe) + 1


def test_sharding_the_experts_inside_a_launch_after_autotp(measured):
    a, s = (measured[c][1] for c in ALL["moe-qwen3-tp"])
    assert a.provenance["master_port"] == s.provenance["master_port"]
    assert [r for r in a.rows if r["phase"] == "setup"] == [r for r in s.rows if r["phase"] == "setup"]
