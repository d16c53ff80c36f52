"""Advice ranks only lossless MoE layouts unless capacity routing is asked for, and says so; the dropped-route share
it shows is the closed form's (:func:`llmcomm.derive.moe.generation_dropped`)."""
import json

import pytest

from llmcomm.cli import main
from llmcomm.deployment import Deployment, Routing
from llmcomm.derive.moe import capacity, dropped_fraction, generation_dropped
from llmcomm.predict.advise import advise_report
from llmcomm.predict.hardware import load_hardware
from llmcomm.predict.moe_advice import advise_moe
from llmcomm.report.text import render_advice
from llmcomm.spec import load_model

MIX = load_model("mixtral-8x7b")
H100 = load_hardware("h100-sxm")


def test_generation_dropped_by_hand():
    # e = 8, b = 8, S = 1024: prefill T = 1024 per rank, C = ⌈1024/8·2⌉ = 256; decode T = 1, C = C_min = 4 ≥ 1
    d = generation_dropped(Routing(), 8, 2, 8, 1024, 128, 8)
    assert d["prefill"] == dropped_fraction(1024, 8, 2, 256) and d["decode"] == 0.0 and d["lossless"] is False
    assert d["generation"] == pytest.approx(d["prefill"] * 1024 / (1024 + 127))          # routes weighted: T·k each
    assert generation_dropped(Routing("dropless"), 8, 2, 8, 1024, 128, 8) == \
        {"prefill": 0.0, "decode": 0.0, "generation": 0.0, "lossless": True}
    # γ = E/k = 4: C = T, nothing can be dropped
    assert capacity(1024, 8, 2, 4.0) == 1024 and generation_dropped(Routing(capacity_factor=4.0), 8, 2, 8, 1024,
                                                                     128, 8)["lossless"] is True


def test_default_advice_is_lossless_and_names_the_lossy_routing():
    rows, why = advise_moe(MIX, 8, None, H100, 1024, 128, 8)
    assert all(r["lossless"] for r in rows)
    ep = [r for r in rows if r["scheme"] == "ep"]
    assert {r["routing"] for r in ep} == {"dropless"} and {r["pattern"] for r in ep} == {"deepspeed-ep-dropless"}
    assert {r["ep"] for r in ep} == {2, 4, 8}
    line, = [x for x in why if x.startswith("ep under capacity routing")]
    for e in (2, 4, 8):
        share = generation_dropped(Routing(), 8, 2, 8, 1024, 128, e)["prefill"]
        assert f"e={e} ({100 * share:.2g} % of the prefill's routes)" in line
    assert "--moe-routing capacity" in line


def test_capacity_that_provably_drops_nothing_is_ranked_beside_dropless():
    dep = Deployment(routing=Routing(capacity_factor=4.0))               # C = ⌈T·4·2/8⌉ = T in both phases
    rows, why = advise_moe(MIX, 8, None, H100, 1024, 128, 8, deployment=dep)
    ep = sorted((r["ep"], r["routing"]) for r in rows if r["scheme"] == "ep")
    assert ep == [(2, "capacity"), (2, "dropless"), (4, "capacity"), (4, "dropless"), (8, "capacity"),
                  (8, "dropless")]
    assert not any(x.startswith("ep under capacity routing") for x in why)
    assert all(r["lossless"] and r["dropped_route_fraction"]["generation"] == 0 for r in rows)


def test_asked_capacity_ranks_lossy_rows_and_shows_their_drop():
    rep = advise_report(MIX, 8, None, H100, 1024, 128, 8, routing_asked=True)
    ep = [r for r in rep["layouts"] if r["scheme"] == "ep"]
    assert {r["routing"] for r in ep} == {"capacity"} and not any(r["lossless"] for r in ep)
    for r in ep:
        assert r["dropped_route_fraction"] == {k: v for k, v in generation_dropped(
            Routing(), 8, 2, 8, 1024, 128, r["ep"]).items() if k != "lossless"}
    text = render_advice(rep)
    assert "moe_routing=capacity" in text and "capacity routing as asked (γ=1, C_min=4)" in text
    e8 = next(ln for ln in text.splitlines() if ln.split()[:2] == ["ep", "capacity"] and ln.split()[5] == "8")
    assert e8.split()[-1] == f"{100 * generation_dropped(Routing(), 8, 2, 8, 1024, 128, 8)['generation']:.3g}"


def test_cli_default_is_lossless_and_flag_asks(capsys):
    assert main(["advise", "--model", "mixtral-8x7b", "--gpus", "8", "--batch", "8"]) == 0
    text = capsys.readouterr().out
    assert "moe_routing=lossless" in text and "routing: lossless layouts only" in text
    rows = [ln.split() for ln in text.splitlines()[2:] if ln.split()[:1] in (["ep"], ["autotp"], ["tp-experts"])]
    assert len(rows) == 10 and {x[1] for x in rows if x[0] == "ep"} == {"dropless"}    # no capacity-routed row
    # dropless EP's bytes are an expectation (a float): printed as whole bytes like the exact counts
    ep8 = next(x for x in rows if x[0] == "ep" and x[5] == "8")
    want = advise_report(MIX, 8, None, H100, 1024, 128, 8)["layouts"]
    want = next(r for r in want if r["scheme"] == "ep" and r["ep"] == 8)["sent_bytes_busiest_rank"]
    assert want != int(want) and ep8[9] == f"{want:,.0f}"
    assert main(["advise", "--model", "mixtral-8x7b", "--gpus", "8", "--batch", "8", "--moe-routing", "capacity",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"]["asked"] is True and out["routing"]["lossless_only"] is False
    assert {r["routing"] for r in out["layouts"] if r["scheme"] == "ep"} == {"capacity"}
    assert main(["advise", "--model", "mixtral-8x7b", "--gpus", "8", "--batch", "8", "--moe-routing", "dropless",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"]["asked"] is True and {r["routing"] for r in out["layouts"] if r["scheme"] == "ep"} == \
        {"dropless"}
