"""Layout advice for mixtures of experts: candidates over (scheme, t, p, e), memory per GPU against hand counts and
the model's parameter count, rows consistent with predict_latency and traffic_totals, the CLI and its refusals."""
import json

import pytest

from llmcomm.cli import main
from llmcomm.derive.evaluate import traffic_totals
from llmcomm.deployment import Deployment, Routing
from llmcomm.predict.advise import advise_report
from llmcomm.predict.hardware import GiB, load_hardware
from llmcomm.predict.latency import predict_latency
from llmcomm.predict.moe_advice import advise_moe, candidate_moe_layouts, moe_memory_per_rank
from llmcomm.spec import Layout, SpecError, Workload, load_model

MIX = load_model("mixtral-8x7b")       # h 4096, 32 heads of 128, 8 KV heads, E 8, k 2, F_ex 14336, L 32, V 32000
QW3 = load_model("qwen3-30b-a3b")      # 4 KV heads: t ≤ 4
H100 = load_hardware("h100-sxm")


def test_candidates_schemes_and_reasons():
    cands, why = candidate_moe_layouts(MIX, 8, 8)
    assert cands == [("autotp", 1, 8, 1), ("autotp", 2, 4, 1), ("autotp", 4, 2, 1), ("autotp", 8, 1, 1),
                     ("tp-experts", 2, 4, 1), ("tp-experts", 4, 2, 1), ("tp-experts", 8, 1, 1),
                     ("ep", 1, 4, 2), ("ep", 1, 2, 4), ("ep", 1, 1, 8)]
    assert why == []
    cands, why = candidate_moe_layouts(QW3, 8, 1)
    assert {c[1] for c in cands} == {1, 2, 4} and not any(c[0] == "ep" for c in cands)
    assert why == [f"ep: e={e} does not divide the batch b=1 (each EP rank runs b/e whole sequences)" for e in (2, 4, 8)]
    assert candidate_moe_layouts(QW3, 8, 2)[0][-1] == ("ep", 1, 4, 2)
    cands, why = candidate_moe_layouts(load_model("tiny-mixtral"), 8, 8)      # 2 KV heads, 2 layers
    assert cands == [("ep", 1, 2, 4), ("ep", 1, 1, 8)]
    assert why == ["no t×p layout: t must divide the 4 heads and 2 KV heads, p ≤ 2 layers",
                   "ep: e=2 leaves p=4 stages for 2 layers"]
    assert candidate_moe_layouts(MIX, 3, 6)[1] == ["ep: e=3 does not divide the 8 experts"]
    with pytest.raises(SpecError, match="dense"):
        candidate_moe_layouts(load_model("llama-3.1-8b"), 8, 8)
    assert Deployment(experts="ep", routing=Routing("dropless")).pattern(MIX, Layout(1, 1, 2)) == \
        "deepspeed-ep-dropless"
    assert Deployment(experts="autotp").pattern(MIX) == "deepspeed-moe-autotp"


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-30b-a3b", "tiny-mixtral"])
def test_one_rank_holds_every_parameter(model):
    m = load_model(model)
    mem = moe_memory_per_rank(m, "autotp", 1, 1, 1, 1, 16, 4, 2)
    assert mem["weights"] == 2 * m.params


def test_mixtral_weights_by_hand():
    h, hd, E, F, L, V = 4096, 128, 8, 14336, 32, 32000
    attn = 2 * h * 32 * hd + 2 * h * 8 * hd
    expert = 3 * h * F
    # AutoTP t = 8: attention 1/8, router and every expert whole; embedding whole, head 1/8
    got = moe_memory_per_rank(MIX, "autotp", 8, 1, 1, 8, 1024, 128, 2)["weights"]
    assert got == 2 * (L * (attn / 8 + 2 * h + E * h + E * expert) + V * h + V * h / 8 + h)
    # sharded experts: the same with E·expert/8
    got = moe_memory_per_rank(MIX, "tp-experts", 8, 1, 1, 8, 1024, 128, 2)["weights"]
    assert got == 2 * (L * (attn / 8 + 2 * h + E * h + E * expert / 8) + V * h + V * h / 8 + h)
    # EP e = 8: attention, embedding and head whole, one expert per rank
    got = moe_memory_per_rank(MIX, "ep", 1, 1, 8, 8, 1024, 128, 2)["weights"]
    assert got == 2 * MIX.params - 2 * L * 7 * expert
    # p = 2: the first stage (16 layers + embedding) equals the last (16 layers + head + norm) but for the norm
    two = moe_memory_per_rank(MIX, "autotp", 1, 2, 1, 1, 1024, 128, 2)["weights"]
    assert two == 2 * (16 * (attn + 2 * h + E * h + E * expert) + V * h + h)


def test_kv_per_rank_follows_the_batch_share_and_kv_heads():
    kv_tp = moe_memory_per_rank(MIX, "tp-experts", 4, 2, 1, 8, 1000, 24, 2)["kv"]
    assert kv_tp == 16 * 2 * 8 * 1024 * 2 * (8 / 4) * 128            # 16 layers, b 8, 2 KV heads of 128
    kv_ep = moe_memory_per_rank(MIX, "ep", 1, 1, 8, 8, 1000, 24, 2)["kv"]
    assert kv_ep == 32 * 2 * 1 * 1024 * 2 * 8 * 128                  # 32 layers, b/e = 1 sequence, 8 KV heads


def test_advise_moe_rows_agree_with_predict_and_traffic():
    rows, why = advise_moe(MIX, 8, None, H100, 1024, 128, 8, routing_asked=True)     # capacity routing, as asked
    assert why == [] and len(rows) == 10
    fit = [r for r in rows if r["fits"]]
    assert [r["e2e_s"] for r in fit] == sorted(r["e2e_s"] for r in fit)
    assert not any(r["fits"] for r in rows if (r["scheme"], r["tp"]) == ("autotp", 8))   # 85 GiB > 71.7 usable
    assert rows[-1]["scheme"] == "autotp" and rows[-1]["tp"] == 8
    wl = Workload(8, 1024, 128, "bf16")
    for r in rows:
        layout = Layout(r["tp"], r["pp"], r["ep"])
        assert r["routing"] == ("capacity" if r["scheme"] == "ep" else None)
        lat = predict_latency(MIX, layout, wl, H100, Deployment(experts=r["scheme"]))
        assert r["ttft_s"] == pytest.approx(lat["ttft_s"], rel=1e-12)
        assert r["tpot_s"] == pytest.approx(lat["tpot_s"], rel=1e-12)
        tt = traffic_totals(MIX, layout, wl, r["pattern"], "ring", 8, Routing())
        assert r["sent_bytes_busiest_rank"] == tt["sent_bytes_busiest_rank"] and r["bytes"] == tt["bytes"]
        assert r["memory_gib"] * GiB == pytest.approx(
            moe_memory_per_rank(MIX, r["scheme"], r["tp"], r["pp"], r["ep"], 8, 1024, 128, 2)["total"])
    assert sum(r["pareto"] for r in rows) >= 1 and all(r["fits"] for r in rows if r["pareto"])


def test_advise_moe_dropless_and_objectives():
    cap, _ = advise_moe(QW3, 8, None, H100, 1024, 128, 8, routing_asked=True)
    drop, _ = advise_moe(QW3, 8, None, H100, 1024, 128, 8, deployment=Deployment(routing=Routing("dropless")),
                         routing_asked=True)
    ep_cap = next(r for r in cap if r["scheme"] == "ep")
    ep_drop = next(r for r in drop if r["scheme"] == "ep")
    assert ep_drop["pattern"] == "deepspeed-ep-dropless"
    # decode: capacity routing pads every expert to C_min = 4 rows; dropless sends the expected busiest load
    assert ep_drop["sent_bytes_busiest_rank"] < ep_cap["sent_bytes_busiest_rank"]
    by_bytes, _ = advise_moe(QW3, 8, None, H100, 1024, 128, 8, objective="sent_bytes_busiest_rank")
    fit = [r for r in by_bytes if r["fits"]]
    assert [r["sent_bytes_busiest_rank"] for r in fit] == sorted(r["sent_bytes_busiest_rank"] for r in fit)


def test_advise_moe_refusals():
    with pytest.raises(SpecError, match="no layout of mixtral-8x22b .* fits 1 x h100-sxm"):
        advise_moe(load_model("mixtral-8x22b"), 1, None, H100, 1024, 128, 1)
    with pytest.raises(SpecError, match="objective"):
        advise_moe(MIX, 8, None, H100, objective="speed")
    with pytest.raises(SpecError, match="leave the deployment's expert layout unset"):
        advise_moe(MIX, 8, None, H100, deployment=Deployment(experts="tp-experts"))
    with pytest.raises(SpecError, match="p2p mode 'full' is not modelled for a mixture of experts"):
        advise_moe(MIX, 8, None, H100, deployment=Deployment(p2p="full"))


def test_report_and_cli(capsys):
    rep = advise_report(MIX, 8, None, H100, 1024, 128, 8)
    assert rep["routing"] == {"mode": "capacity", "capacity_factor": 1.0, "min_capacity": 4, "asked": False,
                              "lossless_only": True}
    assert {r["routing"] for r in rep["layouts"] if r["scheme"] == "ep"} == {"dropless"}
    # ranked by the objective (E2E): the first layout is the fastest that fits (which scheme wins is the time
    # model's answer, with every collective, all-to-all included, paying its code path's floor)
    assert rep["layouts"][0]["e2e_s"] == min(r["e2e_s"] for r in rep["layouts"] if r["fits"])
    assert {r["scheme"] for r in rep["layouts"]} == {"autotp", "tp-experts", "ep"}
    assert main(["advise", "--model", "qwen3-30b-a3b", "--gpus", "8", "--batch", "8", "--moe-routing", "dropless",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"]["mode"] == "dropless" and {r["scheme"] for r in out["layouts"]} == \
        {"autotp", "tp-experts", "ep"}
    assert main(["advise", "--model", "mixtral-8x7b", "--gpus", "3", "--batch", "8"]) == 0
    text = capsys.readouterr().out
    assert "not a candidate: ep: e=3 does not divide the 8 experts" in text and "autotp" in text
    assert main(["advise", "--model", "mixtral-8x22b", "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fits 1 x h100-sxm" in err[0]


def test_predict_checks_moe_memory(capsys):
    assert main(["predict", "--model", "mixtral-8x7b", "--tp", "8", "--batch", "4", "--prompt", "1024",
                 "--generate", "128", "--dtype", "bf16", "--hardware", "h100-sxm", "--json"]) == 0
    cap = capsys.readouterr()
    mem = json.loads(cap.out)["memory"]
    assert mem["fits"] is False and mem["needed_gib_per_rank"] > 80
    assert "does not fit" in cap.err
    assert main(["predict", "--model", "mixtral-8x7b", "--ep", "8", "--batch", "8", "--prompt", "1024",
                 "--generate", "128", "--dtype", "bf16", "--hardware", "h100-sxm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["fits"] is True


def test_moe_winner_robustness_bounds_and_verdict():
    # the full-overlap bound max(H, K + C) never exceeds the no-overlap charge Σ max(o, k) + C; with no error band
    # the no-overlap winner is advise_moe's first row; a tie lists every winner and contender
    from llmcomm.predict.advise import host_overlap_bounds
    from llmcomm.predict.moe_advice import advise_moe, moe_layout_name, moe_winner_robustness

    model, hw = load_model("qwen3-30b-a3b"), load_hardware("h100-sxm")
    rows, _ = advise_moe(model, 8, 8, hw, 1024, 128, 8, include_infeasible=False)
    for r in rows:
        dep = Deployment("deepspeed", experts=r["scheme"],
                         routing=Routing(r["routing"]) if r["routing"] else Routing())
        bounds = host_overlap_bounds(model, hw, r["tp"], r["pp"], 8, 1024, 128, 2, 8, dep, e=r["ep"])
        assert float(bounds["none"]["e2e_s"]) == pytest.approx(r["e2e_s"], rel=1e-12)
        assert float(bounds["full"]["e2e_s"]) <= float(bounds["none"]["e2e_s"]) * (1 + 1e-12)
    exact = moe_winner_robustness(model, 8, 8, hw, 1024, 128, 8, rel_err=0.0)
    assert exact["winners_none"] == [moe_layout_name(rows[0])] and exact["contenders"] == []
    wide = moe_winner_robustness(model, 8, 8, hw, 1024, 128, 8, rel_err=0.111)
    assert set(wide["tied"]) == set(wide["winners_none"]) | set(wide["winners_full"]) | set(wide["contenders"])
    assert (wide["verdict"] == "holds") == (len(wide["tied"]) == 1)
