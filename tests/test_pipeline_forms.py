"""Fast checks of the pipeline/hybrid additions: the full stage-to-stage pattern, symbolic wire bytes, the layout
comparison frame, the two plot functions, and the CLI's --p2p option (no ranks launched)."""
from __future__ import annotations

import json

import matplotlib.figure
import pytest
import sympy as sp

from llmcomm import Layout, SpecError, Workload, load_model
from llmcomm.deployment import Deployment, Routing
from llmcomm.cli import build_parser, main
from llmcomm.derive import volumes as v
from llmcomm.derive.conventions import bus_factor
from llmcomm.notation import G, L, S, b, h, p, t, w
from llmcomm.report import plots, tables
from support import core, predicted


def test_deployment_patterns():
    dense, moe = load_model("tiny-llama"), load_model("tiny-mixtral")
    assert Deployment().pattern(dense) == "deepspeed"
    assert Deployment(p2p="full").pattern(dense) == "deepspeed-full"
    assert Deployment("vllm").pattern(dense) == "vllm"
    assert Deployment.from_flags("tp-experts").pattern(moe) == "tp-experts"
    assert Deployment().pattern(moe) == "deepspeed-moe-autotp"
    assert Deployment("vllm").pattern(moe, Layout(1, 1, 2)) == "deepspeed-ep"      # vLLM: its host profile only
    assert Deployment(routing=Routing("dropless")).pattern(moe, Layout(1, 1, 2)) == "deepspeed-ep-dropless"
    with pytest.raises(SpecError, match="models the DeepSpeed pipeline runner"):
        Deployment("vllm", p2p="full").pattern(dense)
    with pytest.raises(SpecError, match="p2p mode 'ring'"):
        Deployment(p2p="ring")
    with pytest.raises(SpecError, match="needs a mixture of experts"):
        Deployment(experts="autotp").pattern(dense)
    with pytest.raises(SpecError, match="needs an expert-parallel degree"):
        Deployment(experts="ep").pattern(moe)
    # what a rank reads back is what the launcher wrote
    d = Deployment(experts="tp-experts")
    assert Deployment.from_options(d.config_options(Layout(2))) == d
    d = Deployment(routing=Routing("dropless", 1.5, 2), p2p="full")
    assert Deployment.from_options(d.config_options(Layout(1, 2, 2))) == d


def test_full_mode_exact_rows():
    # PIPELINE_PATTERN.md, measured: tiny-llama-tied 2×2 [3, 2], b=1, S=6, G=2, full mode
    assert core(predicted("tiny-llama-tied", Layout(2, 2), Workload(1, 6, 2), "deepspeed-full")) == [
        {"phase": "prefill", "op": "all_reduce", "group_size": 2, "calls": 11, "bytes": 19456},
        {"phase": "prefill", "op": "send_recv", "group_size": 2, "calls": 4, "bytes": 3088},
        {"phase": "decode", "op": "all_reduce", "group_size": 2, "calls": 11, "bytes": 6656},
        {"phase": "decode", "op": "send_recv", "group_size": 2, "calls": 4, "bytes": 528},
    ]


def test_modes_equal_without_tp_and_full_minus_partitioned():
    for lay in (Layout(1, 2), Layout(1, 4), Layout(2, 1)):
        wl = Workload(2, 9, 5, "bf16")
        assert predicted("llama-3.1-8b", lay, wl) == predicted("llama-3.1-8b", lay, wl, "deepspeed-full")
    diff = v.regime(v.total_bytes("deepspeed-full"), "hybrid") - v.regime(v.total_bytes("deepspeed"), "hybrid")
    assert sp.expand(diff - (t - 2) * (p - 1) * b * h * w * (S + G - 1)) == 0


def test_pipeline_totals_closed_forms():
    B = v.total_bytes("deepspeed")
    assert sp.expand(v.regime(B, "PP") - ((p - 1) * b * h * w * (S + G - 1) + 8 * b * G)) == 0
    tp = v.regime(B, "TP")
    assert sp.expand(v.regime(B, "hybrid") - tp - (2 * (p - 1) * b * h * w * (S + G - 1) + 8 * t * b * G)) == 0
    lim = sp.limit(sp.simplify(tp / v.regime(B, "PP")), S, sp.oo)
    assert sp.simplify(lim - 2 * L / (p - 1)) == 0


def test_bus_factor_symbolic_matches_numeric():
    n = sp.Symbol("n", positive=True, integer=True)
    for op in ("all_reduce", "all_gather", "gather", "send_recv", "broadcast", "all_to_all"):
        for k in (2, 4, 8):
            assert float(bus_factor(op, n).subs(n, k)) == pytest.approx(bus_factor(op, k))


def test_layouts_frame_exact_and_skips_bad_layouts():
    f = tables.layouts_frame([load_model("tiny-llama")], [Layout(2, 1), Layout(1, 2), Layout(2, 2), Layout(4, 1)],
                             [Workload(2, 8, 4)])
    placed = tables.layouts_frame([load_model("tiny-llama")], [Layout(2, 2)], [Workload(2, 8, 4)], gpus_per_node=2)
    assert placed[placed.phase == "total"].inter_node_bytes.item() == 4128 + 1632   # the hops and hand-backs
    assert sorted(set(f.layout)) == ["1×2", "2×1", "2×2"]          # t=4 does not divide tiny-llama's 2 KV heads
    tot = f[f.phase == "total"].set_index("layout")
    assert tot.loc["2×2", "bytes"] == 4096 + 40768 + 4128 + 1536 + 36288 + 1632      # PIPELINE_PATTERN.md
    assert tot.loc["1×2", "bytes"] == 4112 + 1584
    assert tot.loc["1×2", "kind"] == "PP" and tot.loc["2×1", "kind"] == "TP" and tot.loc["2×2", "kind"] == "hybrid"
    pre = f[(f.layout == "2×2") & (f.phase == "prefill")].iloc[0]
    # ring on t = 2: an all-reduce of m puts 2m on the two links of its ring, an all-gather of m puts (n−1)·m = m,
    # a send its tensor once
    assert pre.link_bytes == 2 * 40768 + 4096 + 4128
    # the busiest rank: a last-stage rank (2 layers' 4 all-reduces of 4096 B and the head's 8000 B, m each on t = 2,
    # half the all-gather of 4096 B, its 8-byte token ids ×2 sequences)
    assert pre.sent_bytes_busiest_rank == 4 * 4096 + 8000 + 2048 + 16


def test_plot_functions_return_figures():
    f = tables.layouts_frame([load_model("tiny-llama")], [Layout(2, 1), Layout(1, 2)],
                             [Workload(1, s_, 4) for s_ in (4, 16)])
    fig = plots.layout_lines(f[f.phase == "total"], x="S", col="model", title="t")
    assert isinstance(fig, matplotlib.figure.Figure)
    fig2 = plots.phase_bars(f[f.phase != "total"], x="layout", col="model")
    assert isinstance(fig2, matplotlib.figure.Figure)


def test_cli_p2p_option_parses():
    ap = build_parser()
    args = ap.parse_args(["measure", "--model", "tiny-llama", "--pp", "2", "--p2p", "full"])
    assert args.p2p == "full"
    assert ap.parse_args(["measure", "--model", "tiny-llama"]).p2p == "partitioned"
    assert ap.parse_args(["predict", "--model", "tiny-llama", "--p2p", "full"]).p2p == "full"
    with pytest.raises(SpecError, match="invalid choice"):
        ap.parse_args(["measure", "--model", "tiny-llama", "--p2p", "ring"])


def test_cli_measure_passes_p2p_option(monkeypatch, capsys):
    import llmcomm.measure.launch

    seen = {}

    class Res:
        rows, traffic, tokens, ttft_s, tpot_s, e2e_s, provenance = [], {}, [[1]], 0.1, 0.0, 0.1, {}

    def fake(model, layout, workloads, on_result=None, **kw):
        seen.update(kw)
        for i, _ in enumerate(workloads):
            on_result(i, Res())
        return [Res() for _ in workloads]

    monkeypatch.setattr(llmcomm.measure.launch, "measure_many", fake)
    assert main(["measure", "--model", "tiny-llama", "--pp", "2", "--p2p", "full", "--json"]) == 0
    assert seen["deployment"].p2p == "full"
    assert json.loads(capsys.readouterr().out)["p2p"] == "full"
    assert main(["measure", "--model", "tiny-llama", "--tp", "2", "--json"]) == 0
    assert seen["deployment"].config_options(Layout(2)) == {} and "p2p" not in json.loads(capsys.readouterr().out)


def test_cli_predict_full_mode(capsys):
    assert main(["predict", "--model", "tiny-llama-tied", "--tp", "2", "--pp", "2", "--batch", "1", "--prompt", "6",
                 "--generate", "2", "--p2p", "full", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["p2p"] == "full" and not any(r["op"] == "all_gather" for r in out["ops"])
    assert main(["predict", "--model", "tiny-llama", "--tp", "2", "--pp", "2", "--engine", "vllm", "--p2p",
                 "full"]) == 2
