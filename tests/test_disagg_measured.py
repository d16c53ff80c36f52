"""Disaggregated runs (llmcomm.measure.runs.disagg): a prefill group and a decode group of real DeepSpeed ranks in one
launch, each with its own TP (and PP) degree, the KV cache handed over by point-to-point messages. Every message is
captured: predicted == measured, 0 bytes off, message by message; the tokens equal the single-process reference.
Slow: one launch per configuration (the chapter re-uses them through the session's run cache)."""
from __future__ import annotations

import pytest

from llmcomm.compare import disaggregated as cd
from llmcomm.derive import disagg as D
from llmcomm.measure.supervise import RunError
from llmcomm.spec import Disaggregation, Layout, SpecError, Workload, load_model

pytestmark = pytest.mark.slow
RNG_STATE_BYTES = 5056          # CPU generator state init_inference broadcasts from rank 0 (proof autotp_pattern.py)


@pytest.fixture(scope="session")
def measured():
    return cd.measure_all(progress_timeout_s=240)


def test_every_row_predicted_exactly(measured):
    rows = cd.rows_frame(measured)
    gen = rows[rows.phase != "setup"]
    assert set(gen.phase) == {"prefill", "kv_transfer", "decode"}
    assert gen.match.all(), gen[~gen.match]
    kv = gen[gen.phase == "kv_transfer"]
    assert (kv.op == "send_recv").all() and len(kv) == len(measured)


def test_every_message_as_planned_and_tokens_match(measured):
    for label, model, dis, w, res in measured:
        assert res.tokens == res.reference_tokens, label
        assert cd.messages_match(model, dis, w, res), label
    pairs = cd.pairs_frame(measured)
    assert pairs.match.all() and not (pairs.kind == "unplanned").any(), pairs[~pairs.match]


def test_handoff_bytes_by_hand(measured):
    """tiny-llama: L = 4, a_kv = 2, d = 16, fp32. b = 2, S = 8: 2·4·2·16·4·2·8 = 16,384 bytes of KV; unequal TP
    1 → 2: 4·(1 + 2 − 1) = 8 messages of 2·2·8·1·16·4 = 2,048 B, + 2 token messages of 16 B."""
    m = load_model("tiny-llama")
    assert (m.L, m.kv_heads, m.head_dim) == (4, 2, 16)
    (res,) = [r for label, _, _, w, r in measured if label == "unequal TP 1 → 2" and (w.b, w.S) == (2, 8)]
    kv = [r for r in res.rows if r["phase"] == "kv_transfer"]
    assert kv == [dict(kv[0], calls=10, bytes=16_384 + 2 * 16)] and 8 * 2048 == 16_384
    sends = [e for e in res.events if e["phase"] == "kv_transfer" and e["op"] == "send"]
    assert sorted({(e["rank"], e["peer"], e["bytes"]) for e in sends}) == [(0, 1, 16), (0, 1, 2048), (0, 2, 16),
                                                                          (0, 2, 2048)]


def test_setup_is_the_rng_broadcast_once(measured):
    """The thin step: a t = 1 side joins init_inference's world broadcast, so every launch with a TP side shows
    exactly one setup broadcast of the RNG state over the whole world — and a launch without TP none."""
    for label, _, dis, _, res in measured:
        setup = [r for r in res.rows if r["phase"] == "setup"]
        if max(dis.prefill.t, dis.decode.t) == 1:
            assert setup == [], label
            continue
        assert setup == [dict(setup[0], op="broadcast", calls=1, bytes=RNG_STATE_BYTES, group_size=dis.ranks)], label


def test_timings_are_sane(measured):
    for label, *_, res in measured:
        p = res.provenance
        assert 0 < p["prefill_s"] < res.ttft_s and 0 < p["handoff_s"] < res.ttft_s, label
        assert res.ttft_s == pytest.approx(p["prefill_s"] + p["handoff_s"]) and res.tpot_s > 0


def test_a_dead_rank_in_the_handoff_is_one_clear_error():
    from llmcomm.measure.disaggregate import measure_disaggregated

    env = {"LLMCOMM_TEST_KILL_RANK": "2", "LLMCOMM_TEST_KILL_PHASE": "kv_transfer"}
    with pytest.raises(RunError, match="rank 2"):
        measure_disaggregated(load_model("tiny-llama"), Disaggregation(Layout(1), Layout(2)), [Workload(1, 8, 2)],
                              env=env, progress_timeout_s=60)


@pytest.mark.parametrize("dis, msg", [
    (Disaggregation(Layout(1), Layout(2), kv_dtype="fp8"), "not fp8"),
    (Disaggregation(Layout(4), Layout(1)), "prefill side: t=4 does not divide"),
])
def test_refused_before_any_rank_starts(dis, msg):
    from llmcomm.measure.disaggregate import measure_disaggregated

    with pytest.raises(SpecError, match=msg):
        measure_disaggregated(load_model("tiny-llama"), dis, [Workload(1, 8, 2)])
    with pytest.raises(SpecError, match="mixture of experts"):
        measure_disaggregated(load_model("tiny-mixtral"), Disaggregation(Layout(1), Layout(1)), [Workload(1, 8, 2)])


def test_cli_measure_equals_predict(measured, capsys, tmp_path):
    """``measure --disaggregate --json`` prints the rows ``predict --disaggregate --json`` prints (setup apart; gloo's
    ring all-reduce, as predict counts by default), but for where the ranks are: this run put all three on one host,
    while ``predict --gpus-per-node`` puts the decode side on nodes of its own (so all its hand-off crosses nodes)."""
    import json

    from llmcomm.cli import main

    argv = ["--model", "tiny-llama", "--disaggregate", "--decode-tp", "2", "--batch", "2", "--prompt", "8",
            "--generate", "4", "--json"]
    assert main(["measure", *argv, "--out", str(tmp_path / "run")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["predict", *argv, "--gpus-per-node", "3"]) == 0
    want = json.loads(capsys.readouterr().out)
    placed = lambda rows: [{k: v for k, v in r.items() if k != "inter_node_bytes"} for r in rows]  # noqa: E731
    assert placed(r for r in got["ops"] if r["phase"] != "setup") == placed(want["ops"])
    kv = [(g["inter_node_bytes"], p["inter_node_bytes"], p["bytes"]) for g, p in zip(got["ops"][1:], want["ops"])
          if p["phase"] == "kv_transfer"]
    assert kv == [(0, 16_416, 16_416)]
    assert got["tokens"] == got["reference_tokens"] and got["handoff_s"] > 0
    assert json.loads((tmp_path / "run" / "result.c0.json").read_text()) == got
    assert {k: got[k] for k in ("prefill_tp", "decode_tp", "kv_dtype")} == {"prefill_tp": 1, "decode_tp": 2,
                                                                            "kv_dtype": "fp32"}
