"""Mixture-of-experts runs on CPU ranks against the closed forms, byte for byte: expert parallelism through
DeepSpeed's MoE layer (capacity and dropless routing) and AutoTP on a tiny Mixtral. Slow (starts ranks)."""
from pathlib import Path

import pytest

import llmcomm
from llmcomm import load_model
from llmcomm.cli import main
from llmcomm.compare import moe as cm
from llmcomm.derive.evaluate import rows as predict_rows
from llmcomm.derive.moe import Routing, dropless_bounds, expected_max_count
from llmcomm.derive.patterns import engine_for
from llmcomm.measure.launch import RunError, _joined_shares
from llmcomm.spec import Layout, Workload

from support import core, measured

MODEL = "tiny-mixtral"
EP2 = Layout(1, 1, 2)
WORKLOADS = (Workload(4, 7, 3, "fp32"), Workload(2, 5, 2, "fp32"))


def _predicted_of(model, layout, w, routing):
    m = load_model(model)
    return core(predict_rows(m, layout, w, engine_for("deepspeed", "partitioned", m, layout.e, routing.mode),
                             routing=routing))


def _predicted(layout, w, routing):
    return _predicted_of(MODEL, layout, w, routing)


@pytest.mark.slow
def test_ep_capacity_routing_every_row_and_every_call_exact():
    m, routing = load_model(MODEL), Routing("capacity")
    for w, res in zip(WORKLOADS, measured(MODEL, EP2, WORKLOADS, options={"routing": {"mode": "capacity"}})):
        assert res.tokens == res.reference_tokens and len(res.tokens) == w.b        # every sequence, joined in order
        assert [r for r in core(res.rows) if r["phase"] != "setup"] == _predicted(EP2, w, routing)   # routing-free
        ex = cm.a2a_exactness(res, m, EP2, w, routing)
        assert ex.equal.all() and (ex.C_predicted == ex.C_run).all()
        assert len(ex) == 2 * m.L_moe * w.G                                            # dispatch + combine per layer
        assert all(s == [b // 2, b // 2] for s, b in zip(ex.split_measured, ex.bytes_measured))   # equal splits
    # b = 4, S = 7 on 2 ranks: T = 14 tokens per rank in the prefill, C = max(⌈14·2/8⌉, 4) = 4 → m = 8·4·64·4 B
    first = cm.a2a_exactness(measured(MODEL, EP2, WORKLOADS, options={"routing": {"mode": "capacity"}})[0], m, EP2,
                             WORKLOADS[0], routing)
    assert first.bytes_measured.iloc[0] == 8 * 4 * 64 * 4 == 8192


@pytest.mark.slow
def test_ep_dropless_exact_on_the_measured_counts():
    m, routing = load_model(MODEL), Routing("dropless")
    for w, res in zip(WORKLOADS, measured(MODEL, EP2, WORKLOADS, options={"routing": {"mode": "dropless"}})):
        assert res.tokens == res.reference_tokens
        ex = cm.a2a_exactness(res, m, EP2, w, routing)
        assert ex.equal.all() and (ex.C_predicted == ex.C_run).all()
        totals = cm.phase_totals(ex).set_index("phase")
        by = {(r["phase"], r["op"]): r for r in res.rows}
        for phase in totals.index:
            assert by[(phase, "all_to_all")]["bytes"] == totals.loc[phase, "bytes_measured"]
            # the capacity all-reduce MAX: one int64 per MoE layer per forward
            forwards = 1 if phase == "prefill" else w.G - 1
            assert (by[(phase, "all_reduce")]["calls"], by[(phase, "all_reduce")]["bytes"]) == \
                   (m.L_moe * forwards, 8 * m.L_moe * forwards)
        dist = cm.count_distribution(res, m, EP2)
        for _, x in dist.iterrows():
            lo, hi = dropless_bounds(x.tokens_per_rank, m.E, m.moe.top_k)
            assert lo <= x.C_measured <= hi and lo <= x.C_uniform_expected <= hi
            assert x.C_uniform_expected == pytest.approx(expected_max_count(x.tokens_per_rank, m.E, 2, 2)[0])


@pytest.mark.slow
def test_autotp_on_mixtral_shards_attention_only():
    m, lay, w = load_model(MODEL), Layout(2, 1), WORKLOADS[0]
    res = measured(MODEL, lay, [w])[0]
    assert res.tokens == res.reference_tokens
    assert [r for r in core(res.rows) if r["phase"] != "setup"] == _predicted(lay, w, Routing())
    prefill = {r["op"]: r for r in res.rows if r["phase"] == "prefill"}
    assert prefill["all_reduce"]["calls"] == m.L + 1           # o_proj once per layer + the head; experts replicated


def test_joined_shares_in_sequence_order_and_gaps_refused():
    recs = [{"rank": 1, "share": [2, 4], "tokens": [[5], [6]], "reference_tokens": [[5], [6]]},
            {"rank": 0, "share": [0, 2], "tokens": [[1], [2]], "reference_tokens": [[1], [2]]}]
    assert _joined_shares(recs) == ([[1], [2], [5], [6]], [[1], [2], [5], [6]])
    recs[0]["share"] = [3, 5]
    with pytest.raises(RunError, match="sequence 2 was due"):
        _joined_shares(recs)


@pytest.mark.parametrize("argv,msg", [
    (["--model", "tiny-llama", "--tp", "2", "--engine", "tp-experts"], "sharded experts need a mixture of experts"),
    (["--model", MODEL, "--tp", "2", "--pp", "2", "--engine", "tp-experts"], "measured with TP alone"),
    (["--model", MODEL, "--tp", "1", "--engine", "tp-experts"], "measured with TP alone"),
    (["--model", MODEL, "--ep", "2", "--batch", "3"], "e=2 does not divide"),
    (["--model", "tiny-llama", "--ep", "2"], "needs a mixture of experts"),
    (["--model", MODEL, "--ep", "3"], "does not divide the 8 experts"),
    (["--model", MODEL, "--ep", "2", "--capacity-factor", "0"], "capacity-factor"),
])
def test_measure_refuses_bad_moe_input_before_starting_ranks(argv, msg, capsys):
    assert main(["measure", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_pipeline_of_a_mixture_of_experts_matches_its_pattern():
    # the pipeline runner on tiny Mixtral (p = 2, t = 1 and t = 2 with gloo): stage hops, the token hand-back and,
    # with t = 2, AutoTP's one all-reduce per layer — the deepspeed-moe-autotp pattern with its pipeline rows
    w = WORKLOADS[0]
    for lay, backend in ((Layout(1, 2), None), (Layout(2, 2), "gloo")):
        res = measured(MODEL, lay, [w], backend=backend)[0]
        assert res.tokens == res.reference_tokens
        assert [r for r in core(res.rows) if r["phase"] != "setup"] == _predicted(lay, w, Routing()), lay


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_expert_parallelism_in_pipeline_stages_exact(mode):
    # e = 2 EP ranks in each of p = 2 stages (4 ranks; global rank = stage·2 + EP rank): each stage's EP group
    # all-to-alls its own MoE layer, EP rank j hands [b/e, s, h] to EP rank j of the next stage and the last stage
    # hands b/e tokens back. Capacity routing: every row equals the closed form; dropless: every all-to-all equals
    # the closed form on the measured counts of its stage's two ranks.
    m, routing, lay, w = load_model(MODEL), Routing(mode), Layout(1, 2, 2), WORKLOADS[0]
    res = measured(MODEL, lay, [w], options={"routing": {"mode": mode}})[0]
    assert res.tokens == res.reference_tokens and len(res.tokens) == w.b
    ex = cm.a2a_exactness(res, m, lay, w, routing)
    assert ex.equal.all() and (ex.C_predicted == ex.C_run).all()
    assert sorted(set(ex.stage)) == [0, 1] and set(ex[ex.stage == 1].layer) == {1}      # L = 2: one layer a stage
    assert len(ex) == 2 * m.L_moe * w.G
    rows = [r for r in core(res.rows) if r["phase"] != "setup"]
    pred = _predicted(lay, w, routing)
    hops = [r for r in rows if r["op"] == "send_recv"]
    assert hops == [r for r in pred if r["op"] == "send_recv"]
    # prefill hop: [b/e, S, h] fp32 = 2·7·64·4 B from each EP rank, plus b/e int64 tokens handed back each
    assert hops[0]["bytes"] == 2 * (2 * 7 * 64 * 4) + 2 * (2 * 8) == 7200
    if mode == "capacity":
        assert rows == pred
    else:
        a2a = {r["phase"]: r["bytes"] for r in rows if r["op"] == "all_to_all"}
        assert a2a == cm.phase_totals(ex).set_index("phase").bytes_measured.to_dict()
        assert [(r["phase"], r["calls"]) for r in rows if r["op"] == "all_reduce"] == \
            [("prefill", m.L_moe), ("decode", m.L_moe * (w.G - 1))]


@pytest.mark.slow
def test_sharded_experts_measured_exact():
    # every expert's FFN sharded t = 2 ways after AutoTP (measure/moe_adapter.shard_experts): the MoE block ends in
    # an all-reduce of [b, s, h] — two per layer plus the head's, the tp-experts closed form, row for row
    m, lay = load_model(MODEL), Layout(2, 1)
    for w, res in zip(WORKLOADS, measured(MODEL, lay, WORKLOADS, options={"experts": "sharded"})):
        assert res.tokens == res.reference_tokens
        rows = [r for r in core(res.rows) if r["phase"] != "setup"]
        assert rows == core(predict_rows(m, lay, w, "tp-experts"))
        pre = next(r for r in rows if (r["phase"], r["op"]) == ("prefill", "all_reduce"))
        assert pre["calls"] == 2 * m.L + 1 and pre["bytes"] == 4 * (2 * m.L * w.b * w.S * m.h + w.b * m.V)


QWEN = "tiny-qwen3-moe"        # 16 experts, top-4 (DeepSpeed's topkgating), layers 0, 1, 3 MoE, layer 2 dense


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_qwen3_moe_expert_parallelism_alone_and_in_stages_exact(mode):
    m, routing, w = load_model(QWEN), Routing(mode), Workload(4, 5, 3, "fp32")
    for lay in (EP2, Layout(1, 2, 2)):
        res = measured(QWEN, lay, [w], options={"routing": {"mode": mode}})[0]
        assert res.tokens == res.reference_tokens
        ex = cm.a2a_exactness(res, m, lay, w, routing)
        assert ex.equal.all() and (ex.C_predicted == ex.C_run).all()
        assert len(ex) == 2 * m.L_moe * w.G
        if lay.p == 2:        # stage 0: layers 0, 1 (both MoE); stage 1: layer 2 (dense), layer 3 (MoE)
            assert set(ex[ex.stage == 0].layer) == {0, 1} and set(ex[ex.stage == 1].layer) == {3}
        rows = [r for r in core(res.rows) if r["phase"] != "setup"]
        if mode == "capacity":
            assert rows == _predicted_of(QWEN, lay, w, routing)
        else:
            a2a = {r["phase"]: r["bytes"] for r in rows if r["op"] == "all_to_all"}
            assert a2a == cm.phase_totals(ex).set_index("phase").bytes_measured.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("experts,pattern", [("replicated", "deepspeed-moe-autotp"), ("sharded", "tp-experts")])
def test_qwen3_moe_tensor_parallel_exact(experts, pattern):
    # AutoTP: o_proj's all-reduce in every layer, down_proj's in the dense layer 2, the head's; sharded experts add
    # the MoE blocks' all-reduces (two per layer then)
    m, lay, w = load_model(QWEN), Layout(2, 1), Workload(4, 5, 3, "fp32")
    res = measured(QWEN, lay, [w], options={"experts": experts} if experts == "sharded" else None)[0]
    assert res.tokens == res.reference_tokens
    rows = [r for r in core(res.rows) if r["phase"] != "setup"]
    assert rows == core(predict_rows(m, lay, w, pattern))
    pre = next(r for r in rows if (r["phase"], r["op"]) == ("prefill", "all_reduce"))
    assert pre["calls"] == (m.L + (m.L - m.L_moe) if experts == "replicated" else 2 * m.L) + 1


def test_expert_parallelism_refuses_what_the_adapter_does_not_model(tmp_path, capsys):
    import json

    base = json.loads((Path(llmcomm.__file__).parent / "presets/models/tiny-qwen3-moe.json").read_text())
    for extra, msg in (({"norm_topk_prob": False}, "norm_topk_prob=False"), ({"num_experts_per_tok": 1}, "top-1"),
                       ({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 32}, "shared expert")):
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(dict(base, **extra)))
        assert main(["measure", "--model", str(cfg), "--ep", "2", "--batch", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
