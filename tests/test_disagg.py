"""The KV-cache hand-off of a disaggregated layout (llmcomm.derive.disagg): the closed forms against the concrete
plan on every preset and every pair of TP degrees, and hand-derived numbers."""
from __future__ import annotations

import itertools

import pytest
import sympy as sp

from llmcomm.derive import disagg as D
from llmcomm.notation import B, L, S, a_kv, b, d, t_D, t_P, w_kv
from llmcomm.spec import Disaggregation, Layout, SpecError, Workload, load_model, preset_names

FORMS = D.closed_forms()


def _divisors(x: int) -> list[int]:
    return [t for t in range(1, x + 1) if x % t == 0]


def test_closed_forms_are_the_textbook_ones():
    assert sp.simplify(FORMS["kv_bytes"] - 2 * L * a_kv * d * w_kv * b * S) == 0
    assert sp.simplify(FORMS["kv_messages"] - L * (t_P + t_D - D.gcd(t_P, t_D))) == 0
    assert FORMS["token_bytes"] == 8 * b * t_D
    assert D.gcd(t_P, t_P) == t_P and D.gcd(sp.Integer(4), sp.Integer(6)) == 2


@pytest.mark.parametrize("name", preset_names("models"))
def test_plan_matches_closed_forms_on_every_preset(name):
    """Every preset (dense and MoE), every pair of TP degrees dividing a_kv (up to 8), p_P, p_D in {1, 2}: the
    concrete messages sum to the closed forms, exactly."""
    model = load_model(name)
    degrees = [t for t in _divisors(model.kv_heads) if t <= 8 and model.heads % t == 0]
    w = Workload(b=3, S=37, G=2, dtype="bf16")
    for tp, td, pp, pd in itertools.product(degrees, degrees, (1, 2), (1, 2)):
        if max(pp, pd) > model.L:
            continue
        dis = Disaggregation(Layout(tp, pp), Layout(td, pd), block=16)
        got, v = D.handoff_summary(model, dis, w), D.values(model, dis, w)
        for key in ("bytes", "kv_bytes", "token_bytes", "messages", "kv_messages", "sent_bytes_busiest",
                    "received_bytes_busiest", "pieces"):
            assert got[key] == int(FORMS[key].subs(v)), (name, tp, pp, td, pd, key)
        if tp % td == 0 or td % tp == 0:
            assert set(got["message_sizes"]) == {int(FORMS["message_bytes_dividing"].subs(v))}


def test_qwen3_8b_by_hand():
    """Qwen3-8B (L = 36, a_kv = 8, d = 128), bf16: 2·36·8·128·2 = 147,456 bytes per token; a 4,096-token prompt
    = 603,979,776 bytes (576 MiB); prefill t_P = 2 → decode t_D = 4: each prefill rank's 4 heads split in two, 4 pairs
    per layer, 144 messages of 2·4096·2·128·2 = 4 MiB (144 × 4 MiB = 576 MiB), + 4 token messages of 8 bytes."""
    m = load_model("qwen3-8b")
    assert (m.L, m.kv_heads, m.head_dim) == (36, 8, 128)
    w = Workload(b=1, S=4096, G=2, dtype="bf16")
    dis = Disaggregation(Layout(2), Layout(4))
    got = D.handoff_summary(m, dis, w)
    assert got["kv_bytes"] == 147_456 * 4096 == 603_979_776
    assert got["kv_messages"] == 36 * 4 and got["message_sizes"] == {4_194_304: 144}
    assert got["token_bytes"] == 4 * 8 and got["messages"] == 148
    assert got["sent_bytes_busiest"] == 603_979_776 // 2 and got["received_bytes_busiest"] == 603_979_776 // 4
    split = D.rank_split(m, dis, w)
    kv = [r for r in split if r["kind"] == "kv"]
    assert [(r["src"], r["dst"], r["heads"]) for r in kv] == [(0, 2, [[0, 2]]), (0, 3, [[2, 4]]), (1, 4, [[4, 6]]),
                                                            (1, 5, [[6, 8]])]
    assert all(r["layers"] == [0, 35] and r["messages"] == 36 for r in kv)
    # fp8 KV halves the bytes, not the messages
    fp8 = D.handoff_summary(m, Disaggregation(Layout(2), Layout(4), kv_dtype="fp8"), w)
    assert fp8["kv_bytes"] == 603_979_776 // 2 and fp8["kv_messages"] == 144


def test_unequal_degrees_that_do_not_divide():
    """a_kv = 6 split 2 ways and 3 ways: cuts at 3 and at 2, 4 → pieces [0,2) [2,3) [3,4) [4,6): 4 = 2 + 3 − 1
    pairs, sizes of 2, 1, 1, 2 heads."""
    m = load_model({"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 6,
                    "intermediate_size": 64, "vocab_size": 50})
    w = Workload(b=1, S=5, G=2, dtype="fp32")
    msgs = [x for x in D.handoff_messages(m, Disaggregation(Layout(2), Layout(3)), w) if x.kind == "kv"]
    assert [(x.src, x.dst, x.lo, x.hi) for x in msgs if x.layer == 0] == [(0, 2, 0, 2), (0, 3, 2, 3), (1, 3, 3, 4),
                                                                            (1, 4, 4, 6)]
    per_head = 2 * 1 * 5 * 16 * 4
    assert [x.nbytes for x in msgs if x.layer == 1] == [2 * per_head, per_head, per_head, 2 * per_head]


def test_pipeline_sides_route_by_layer():
    """Prefill p_P = 2 over L = 4 (layers 0–1 on stage 0 = rank 0, 2–3 on stage 1 = rank 1) → decode t_D = 2
    (ranks 2, 3): rank 0 sends layers 0–1 to both decode ranks, rank 1 layers 2–3; the token from rank 1."""
    m = load_model("tiny-llama")
    w = Workload(b=2, S=8, G=3, dtype="fp32")
    split = D.rank_split(m, Disaggregation(Layout(1, 2), Layout(2, 1)), w)
    L_ = m.L
    half = L_ // 2
    kv = {(r["src"], r["dst"]): r["layers"] for r in split if r["kind"] == "kv"}
    assert kv == {(0, 2): [0, half - 1], (0, 3): [0, half - 1], (1, 2): [half, L_ - 1], (1, 3): [half, L_ - 1]}
    assert [(r["src"], r["dst"]) for r in split if r["kind"] == "token"] == [(1, 2), (1, 3)]


def test_pieces_paged():
    m = load_model("qwen3-8b")
    w = Workload(b=2, S=100, G=2, dtype="bf16")
    same = Disaggregation(Layout(2), Layout(2), block=16)
    assert D.pieces(m, same, w) == 36 * 2 * (2 * 2 * 7)                # ⌈100/16⌉ = 7 blocks, K and V, 2 requests
    assert D.pieces(m, same, w, block_layout="NHD") == D.pieces(m, same, w)
    other = Disaggregation(Layout(2), Layout(4), block=16)
    assert D.pieces(m, other, w, block_layout="NHD") == 16 * D.pieces(m, other, w)
    v = D.values(m, other, w)
    assert D.pieces(m, other, w, block_layout="NHD") == int(FORMS["pieces_nhd"].subs(v))
    assert D.pieces(m, Disaggregation(Layout(2), Layout(2)), w) == 36 * 2    # unpaged: one piece per message
    with pytest.raises(SpecError, match="HND or NHD"):
        D.pieces(m, same, w, block_layout="XYZ")


@pytest.mark.parametrize("kw, msg", [
    ({"prefill": Layout(3), "decode": Layout(1)}, "prefill side: t=3 does not divide"),
    ({"prefill": Layout(1), "decode": Layout(16)}, "decode side: t=16 does not divide"),
    ({"prefill": Layout(1), "decode": Layout(1, 99)}, "decode side"),
])
def test_bad_layouts(kw, msg):
    with pytest.raises(SpecError, match=msg):
        D.check_disaggregation(load_model("qwen3-8b"), Disaggregation(**kw))


def test_bad_specs():
    with pytest.raises(SpecError, match="more than the 4 given"):
        D.check_disaggregation(load_model("qwen3-8b"), Disaggregation(Layout(2), Layout(4)), ranks=4)
    with pytest.raises(SpecError, match="KV dtype 'int3'"):
        Disaggregation(Layout(1), Layout(1), kv_dtype="int3")
    with pytest.raises(SpecError, match="block size 0"):
        Disaggregation(Layout(1), Layout(1), block=0)
    with pytest.raises(SpecError, match="expert parallelism on the decode side"):
        Disaggregation(Layout(1), Layout(1, 1, 2))


def test_placement_puts_the_decode_side_on_its_own_nodes():
    from llmcomm.derive.traffic import summary

    dis = Disaggregation(Layout(2), Layout(4))
    node = D.node_of(dis, 8)
    assert [node(r) for r in range(6)] == [0, 0, 1, 1, 1, 1]
    assert [D.node_of(dis, 8, separate=False)(r) for r in range(6)] == [0] * 6
    m, w = load_model("qwen3-8b"), Workload(b=1, S=128, G=2, dtype="bf16")
    calls = D.handoff_calls(m, dis, w)
    total = D.handoff_summary(m, dis, w)["bytes"]
    assert summary(calls, node)["inter_node_bytes"] == total           # every byte crosses to the decode node
    assert summary(calls, D.node_of(dis, 8, separate=False))["inter_node_bytes"] == 0
    assert summary(calls, D.node_of(dis, 2, separate=False))["inter_node_bytes"] == total


def test_cli_predict_disaggregate_json(capsys):
    import json

    from llmcomm.cli import main

    assert main(["predict", "--model", "qwen3-8b", "--disaggregate", "--prefill-tp", "2", "--decode-tp", "4",
                 "--prompt", "4096", "--generate", "3", "--dtype", "bf16", "--kv-dtype", "fp8",
                 "--gpus-per-node", "8", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert (obj["prefill_tp"], obj["decode_tp"], obj["kv_dtype"]) == (2, 4, "fp8")
    (kv,) = [r for r in obj["ops"] if r["phase"] == "kv_transfer"]
    assert kv["op"] == "send_recv" and kv["calls"] == 36 * 4 + 4
    assert kv["bytes"] == 147_456 // 2 * 4096 + 4 * 8                  # fp8 KV: half of bf16's bytes per token
    assert kv["inter_node_bytes"] == kv["bytes"]                       # the decode side on a node of its own
    assert [r["phase"] for r in obj["ops"]] == ["prefill", "kv_transfer", "decode"]
    assert obj["handoff"]["kv_messages"] == 144 and len(obj["handoff"]["per_rank"]) == 4 + 4


@pytest.mark.parametrize("argv, msg", [
    (["--disaggregate", "--decode-tp", "3"], "decode side: t=3 does not divide"),
    (["--prefill-tp", "2"], "--prefill-tp needs --disaggregate"),
    (["--disaggregate", "--tp", "2"], "not --tp"),
    (["--disaggregate", "--prefill-pp", "9"], "prefill side"),
    (["--disaggregate", "--kv-dtype", "int4"], "invalid choice"),
    (["--disaggregate", "--prefill-tp", "2", "--decode-tp", "2", "--gpus", "3"], "4 ranks, more than the 3 GPUs"),
    (["--gpus", "3"], "--gpus needs --disaggregate"),
])
def test_cli_bad_combinations_exit_2(argv, msg, capsys):
    from llmcomm.cli import main

    assert main(["predict", "--model", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cli_advise_disaggregate(capsys):
    import json

    from llmcomm.cli import main

    assert main(["advise", "--model", "qwen3-8b", "--gpus", "8", "--hardware", "h800-roce", "--disaggregate",
                 "--prompt", "2048", "--generate", "256", "--batch", "32", "--objective", "tpot", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    kinds = {r["kind"] for r in rep["rows"]}
    assert kinds == {"co-located", "split"} and rep["verdict"]["prefills_per_step"] == 32 / 256
    assert all(r["prefill_gpus"] + r["decode_gpus"] == 8 for r in rep["rows"] if r["kind"] == "split")
    ranked = [r for r in rep["rows"] if r["fits"] and r.get("keeps_up", True)]
    assert [r["tpot_s"] for r in ranked] == sorted(r["tpot_s"] for r in ranked)
    assert main(["advise", "--model", "qwen3-8b", "--gpus", "8", "--disaggregate", "--objective", "link_bytes"]) == 2
    assert "objective 'link_bytes' is not one of" in capsys.readouterr().err
