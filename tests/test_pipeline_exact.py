"""Real DeepSpeed pipeline (p > 1) and hybrid t×p runs on CPU with KV-cache decode: tokens equal the single-process
reference, the last stage's logits equal the reference's, and every measured row equals the closed form of
``src/llmcomm/measure/runs/PIPELINE_PATTERN.md``. Bad layouts end with one clear error. Launched tests are ``slow``."""
from __future__ import annotations

import pytest

from llmcomm.derive.patterns import engine_for
from llmcomm.derive.phases import order as phase_order
from llmcomm.measure.launch import RunError, launch_ranks, measure, rank_spec
from llmcomm.measure.runs.pipeline import check_layout
from llmcomm.spec import Layout, SpecError, Workload, load_model, stage_layers
from llmcomm.compare.sweeps import predicted_like
from support import core, predicted as predicted_rows

RNG_STATE_BYTES = 5056          # CPU generator state that init_inference broadcasts over the world when t > 1
W_TOKEN = 8                     # the token handed back is int64

# (model, t, p, b, S, G, p2p): uneven splits (tied L=5: p=2 → [3, 2], p=4 → [2, 1, 1, 1]), G = 1 (no decode), both
# stage-to-stage modes of the hybrid, tied and untied heads. Four runs keep this file near 3 minutes on 2 idle cores;
# PIPELINE_PATTERN.md lists more configurations measured the same way (p = 3, other b/S/G, bf16).
CASES = [
    ("tiny-llama-tied", 1, 2, 2, 5, 1, "partitioned"),
    ("tiny-llama-tied", 1, 4, 1, 4, 3, "partitioned"),
    ("tiny-llama", 2, 2, 2, 8, 3, "partitioned"),
    ("tiny-llama-tied", 2, 2, 1, 6, 2, "full"),
]


def hand_rows(model, layout: Layout, workload: Workload, p2p: str = "partitioned") -> list[dict]:
    """The closed form of PIPELINE_PATTERN.md, prefill and decode rows (setup apart)."""
    m = load_model(model)
    b, S, G, w = workload.b, workload.S, workload.G, workload.w
    h, L, V, t, p = m.h, m.L, m.V, layout.t, layout.p
    part = p2p == "partitioned" and t > 1
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
    return rows


def predicted(model, layout, workload, p2p):
    """The library's closed forms (llmcomm.derive): the ``deepspeed`` pattern, or ``deepspeed-full`` for the full
    stage-to-stage mode."""
    return predicted_rows(model, layout, workload, engine=engine_for("deepspeed", p2p))


def _key(r):
    return (phase_order(r["phase"]), r["op"], r["group_size"])


def _ids(case):
    return "{}-t{}-p{}-b{}-S{}-G{}-{}".format(*case)


@pytest.fixture(scope="module", params=CASES, ids=_ids)
def run(request):
    model, t, p, b, S, G, p2p = request.param
    layout, workload = Layout(t=t, p=p), Workload(b=b, S=S, G=G)
    return model, layout, workload, p2p, measure(load_model(model), layout, workload, timeout_s=240,
                                                 options={"p2p": p2p})


@pytest.mark.slow
def test_tokens_and_logits_equal_reference(run):
    model, layout, workload, _, res = run
    assert res.reference_tokens is not None and res.tokens == res.reference_tokens
    assert len(res.tokens) == workload.b and all(len(x) == workload.G for x in res.tokens)
    by_rank = {r["rank"]: r for r in res.ranks}
    # stage 0 got every token back from the last stage; the last stage computed them; middle stages never see them
    for rank, rec in by_rank.items():
        stage = rec["pipeline"]["stage"]
        assert (rec["tokens"] is not None) == (stage in (0, layout.p - 1))
    last0 = by_rank[(layout.p - 1) * layout.t]["pipeline"]
    assert last0["logits_max_abs_diff"] is not None and last0["logits_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_stages_hold_the_stage_layers_split(run):
    model, layout, _, p2p, res = run
    parts = stage_layers(load_model(model).L, layout.p)
    bounds = [sum(parts[:k]) for k in range(layout.p + 1)]
    for rec in res.ranks:
        pl = rec["pipeline"]
        assert rec["rank"] == pl["stage"] * layout.t + pl["tp_rank"]
        assert pl["layers"] == [bounds[pl["stage"]], bounds[pl["stage"] + 1]]
        assert pl["p2p"] == (p2p if layout.t > 1 else "full")
        assert rec["comm"]["allreduce_path"] == "process_group"   # never the shm kernel (it ignores sub-groups)


@pytest.mark.slow
def test_rows_equal_prediction(run):
    model, layout, workload, p2p, res = run
    measured = sorted((r for r in res.rows if r["phase"] != "setup"), key=_key)
    like = predicted_like(load_model(model), layout, workload, res, engine_for("deepspeed", p2p))
    assert measured == sorted(like, key=_key)                  # calls, bytes and traffic, counted alike
    assert core(measured) == sorted(hand_rows(model, layout, workload, p2p), key=_key)


@pytest.mark.slow
def test_setup_is_only_autotp_rng_broadcast(run):
    _, layout, _, _, res = run
    # PipelineModule's groups rendezvous over the TCP store (no collective); no PipelineEngine (no param all-reduce,
    # no warm-up send); AutoTP broadcasts the RNG state over the world once, only when t > 1.
    expect = [{"phase": "setup", "op": "broadcast", "group_size": layout.ranks, "calls": 1,
               "bytes": RNG_STATE_BYTES}] if layout.t > 1 else []
    setup = [r for r in res.rows if r["phase"] == "setup"]
    assert core(setup) == expect
    if setup:     # a broadcast sends m once from every rank but the last of the chain: n − 1 links carry m
        (row,) = setup
        assert (row["sent_bytes_per_rank"], row["link_bytes"], row["inter_node_bytes"]) == (
            RNG_STATE_BYTES, (layout.ranks - 1) * RNG_STATE_BYTES, 0)


@pytest.mark.slow
def test_message_shapes_and_dtypes(run):
    _, layout, workload, p2p, res = run
    sends = [e for e in res.events if e["op"] == "send" and e["phase"] == "decode"]
    tokens = [e for e in sends if e["dtype"] == "int64"]
    acts = [e for e in sends if e["dtype"] == "float32"]
    n = workload.G - 1
    assert len(tokens) == n * layout.t and {tuple(e["shape"]) for e in tokens} <= {(workload.b, 1)}
    assert all(e["peer"] == e["rank"] - (layout.p - 1) * layout.t for e in tokens)   # last stage → stage 0
    assert len(acts) == n * layout.t * (layout.p - 1)


# Fast: the library's closed forms equal the hand formula above on many layouts (both modes), without launching.
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llama-tied", "llama-3.1-8b", "llama-3.1-70b"])
@pytest.mark.parametrize("t,p", [(1, 2), (1, 3), (2, 2), (2, 4), (4, 2), (1, 4)])
@pytest.mark.parametrize("p2p", ["partitioned", "full"])
def test_closed_forms_equal_hand_formula(model, t, p, p2p):
    m = load_model(model)
    layout = Layout(t, p)
    try:
        layout.validate(m)
    except SpecError:
        pytest.skip("layout does not fit this model")
    for workload in (Workload(2, 8, 4), Workload(1, 1, 1, "bf16"), Workload(3, 17, 9, "bf16")):
        assert sorted(core(predicted(model, layout, workload, p2p)), key=_key) == \
            sorted(hand_rows(model, layout, workload, p2p), key=_key)


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("layout,world,msg", [
    (Layout(1, 5), 5, "exceeds the model's L=4 layers"),
    (Layout(1, 3), 2, "needs 3 ranks, but 2 were launched"),
    (Layout(2, 2), 2, "needs 4 ranks, but 2 were launched"),
    (Layout(1, 1), 1, "needs p >= 2"),
    (Layout(3, 2), 6, "does not divide"),
])
def test_check_layout_refuses(layout, world, msg):
    with pytest.raises(SpecError, match=msg):
        check_layout(load_model("tiny-llama"), layout, world)


def test_check_layout_splits_like_stage_layers():
    assert check_layout(load_model("tiny-llama-tied"), Layout(1, 2), 2) == [3, 2]
    assert check_layout(load_model("tiny-llama-tied"), Layout(1, 4), 4) == [2, 1, 1, 1]
    with pytest.raises(SpecError, match="p2p mode"):
        check_layout(load_model("tiny-llama"), Layout(1, 2), 2, p2p="ring")


def test_measure_refuses_a_stage_without_layers_before_launching():
    with pytest.raises(SpecError, match="a stage would hold no layer"):
        measure(load_model("tiny-llama"), Layout(1, 5), Workload(1, 4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("layout,nranks,msg", [
    (Layout(1, 3), 2, "needs 3 ranks, but 2 were launched"),       # t·p ≠ launched ranks
    (Layout(1, 5), 2, "exceeds the model's L=4 layers"),           # p > L: a stage with no layer
])
def test_runner_refuses_bad_layout_with_one_error(tmp_path, layout, nranks, msg):
    spec = rank_spec(load_model("tiny-llama"), layout, Workload(1, 4, 2))
    with pytest.raises(RunError) as err:
        launch_ranks("llmcomm.measure.runs.pipeline", spec, nranks, tmp_path / "run", timeout_s=120)
    text = str(err.value)
    assert "SpecError" in text and msg in text, text
    assert err.value.rank == 0
    assert (tmp_path / "run" / "rank0.error.json").exists()     # the rank's own report (rankio), exit status 1
