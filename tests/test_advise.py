"""Layout advice: memory feasibility edge cases, Pareto front, ranking, JSON shape, the CLI subcommand."""
import json

import numpy as np
import pytest

from llmcomm.cli import main
from llmcomm.derive.evaluate import phase_bytes, rows as predict_rows
from llmcomm.predict.advise import advise, advise_report, candidate_layouts, memory_per_rank, pareto_front
from llmcomm.predict.hardware import GiB, load_hardware
from llmcomm.spec import Layout, SpecError, Workload, load_model

H100, A100 = load_hardware("h100-sxm"), load_hardware("a100-sxm-80gb")


def test_70b_bf16_does_not_fit_one_h100_but_fits_eight():
    m = load_model("llama-3.1-70b")
    h100 = load_hardware("h100-sxm")
    one = memory_per_rank(m, 1, 1, 1, 1024, 128, 2)
    assert one["weights"] > 130 * GiB and one["total"] > h100.usable_memory_bytes
    with pytest.raises(SpecError, match="no layout of llama-3.1-70b"):
        advise(m, gpus=1, gpus_per_node=8, hw=H100, S=1024, G=128, b=1)
    rows = advise(m, gpus=8, gpus_per_node=8, hw=H100, S=1024, G=128, b=1)
    assert all(r["fits"] for r in rows)
    tp8 = next(r for r in rows if r["tp"] == 8)
    # sharded layers and head + the replicated embedding (AutoTP keeps embed_tokens whole on every rank)
    norms = (2 * m.L + 1) * m.h                                 # RMSNorm weights: replicated too
    expect = ((m.params - m.V * m.h - norms) / 8 + m.V * m.h + norms) * 2 / GiB
    assert tp8["weights_gib"] == pytest.approx(expect, rel=1e-12) and 18 < expect < 18.3
    assert tp8["memory_gib"] < h100.usable_memory_bytes / GiB


def test_405b_on_four_a100_raises_one_clear_message():
    with pytest.raises(SpecError) as e:
        advise(load_model("llama-3.1-405b"), gpus=4, gpus_per_node=8, hw=A100, S=1024, G=128, b=1)
    msg = str(e.value)
    assert "\n" not in msg and "no layout of llama-3.1-405b" in msg and "GiB" in msg


def test_no_valid_layout_raises():
    with pytest.raises(SpecError, match="no layout"):
        advise(load_model("tiny-llama"), gpus=7, gpus_per_node=None, hw=H100, S=16, G=4)   # 7 ∤ 4 heads, 7 > L


def test_memory_edges():
    import dataclasses

    m = load_model("tiny-llama-tied")
    u = dataclasses.replace(m, tied=False)
    one = memory_per_rank(m, 1, 1, 1, 16, 4, 4)
    untied = memory_per_rank(u, 1, 1, 1, 16, 4, 4)
    # tied, one rank: the head is the embedding (one copy) → exactly V·h·w less than untied
    assert untied["weights"] - one["weights"] == pytest.approx(m.V * m.h * 4)
    # exact weights of an unsharded untied model = params·w
    assert untied["weights"] == pytest.approx(u.params * 4)
    assert one["weights"] == pytest.approx(m.params * 4)
    # KV: b·(S+G)·2·kv·hd·w per layer, all L layers on one rank
    assert untied["kv"] == pytest.approx(m.L * 1 * 20 * 2 * m.kv_heads * m.head_dim * 4)
    # pipeline: the fullest stage holds fewer layers → less memory per rank
    assert memory_per_rank(m, 1, 2, 1, 16, 4, 4)["total"] < one["total"]


def test_pareto_front_hand_example():
    lat = [1.0, 2.0, 3.0, 4.0, 2.0, 5.0]
    nb = [5.0, 3.0, 4.0, 1.0, 3.0, 1.0]
    # (3,4) dominated by (2,3); (5,1) dominated by (4,1); equal points (2,3) both stay
    np.testing.assert_array_equal(pareto_front(lat, nb), [True, True, False, True, True, False])
    # an ineligible point neither dominates nor is on the front
    np.testing.assert_array_equal(pareto_front(lat, nb, [True, False, True, True, False, True]),
                                  [True, False, True, True, False, False])


def test_ranking_candidates_and_json_shape():
    m = load_model("llama-3.1-70b")
    rep = advise_report(m, 16, 8, H100, 2048, 64, 4, "ttft")
    rows = rep["layouts"]
    assert {(r["tp"], r["pp"]) for r in rows} == set(candidate_layouts(m, 16)) == {(1, 16), (2, 8), (4, 4), (8, 2)}
    for r in rows:
        for k in ("tp", "pp", "ttft_s", "tpot_s", "e2e_s", "bytes", "fits", "pareto"):
            assert k in r
        Layout(r["tp"], r["pp"]).validate(m)
    feasible = [r for r in rows if r["fits"]]
    assert [r["ttft_s"] for r in feasible] == sorted(r["ttft_s"] for r in feasible)
    assert rows[0]["pareto"]                                       # the best latency is on the front
    json.dumps(rep)
    by_bytes = advise(m, 16, 8, H100, 2048, 64, 4, "inter_node_bytes")
    assert [r["inter_node_bytes"] for r in by_bytes] == sorted(r["inter_node_bytes"] for r in by_bytes)
    by_busiest = advise(m, 16, 8, H100, 2048, 64, 4, "sent_bytes_busiest_rank")
    assert [(r["tp"], r["pp"]) for r in by_busiest] == [(1, 16), (2, 8), (4, 4), (8, 2)]
    with pytest.raises(SpecError):
        advise(m, 16, 8, H100, 2048, 64, 4, "throughput")


def test_bytes_match_volumes_for_tp():
    m = load_model("llama-3.1-8b")
    for t in (2, 4, 8):
        rows = predict_rows(m, Layout(t, 1), Workload(2, 100, 7, "bf16"))
        assert phase_bytes("deepspeed", m, t, 1, 2, 100, 7, 2)["total"] == pytest.approx(sum(r["bytes"] for r in rows))


def test_cli_parses_the_documented_arguments(capsys):
    assert main(["advise", "--model", "llama-3.1-8b", "--gpus", "4", "--gpus-per-node", "2", "--hardware",
                 "a100-sxm-80gb", "--prompt", "512", "--generate", "32", "--batch", "2", "--objective", "tpot",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objective"] == "tpot" and out["gpus_per_node"] == 2 and out["layouts"]


def test_pareto_tolerance_and_the_shared_network_front():
    # equal bytes within 1 %: only the faster layout stays; a real trade-off (5 % fewer bytes) stays too
    np.testing.assert_array_equal(pareto_front([1.0, 4.0], [100.0, 99.96], rel_tol=0.01), [True, False])
    np.testing.assert_array_equal(pareto_front([1.0, 4.0], [100.0, 95.0], rel_tol=0.01), [True, True])
    # Llama-3.1-70B on 2 nodes × 8: every layout puts about the same bytes across nodes (one crossing hop + the
    # hand-back), so the front is the fastest layout alone; 1×16 is much slower for 0.04 % fewer inter-node bytes
    rows = advise(load_model("llama-3.1-70b"), 16, 8, H100, S=1024, G=128, b=8)
    front = [(r["tp"], r["pp"]) for r in rows if r["pareto"]]
    assert front == [(8, 2)]
    by = {(r["tp"], r["pp"]): r for r in rows}
    assert by[(1, 16)]["e2e_s"] / by[(8, 2)]["e2e_s"] > 1.5
    assert by[(1, 16)]["inter_node_bytes"] == pytest.approx(by[(8, 2)]["inter_node_bytes"], rel=1e-3)
    assert by[(8, 2)]["inter_node_hops_per_forward"] == 2 and by[(1, 16)]["inter_node_hops_per_forward"] == 2
    assert by[(8, 2)]["inter_node_collectives_per_forward"] == 0


def test_node_crossings_count_the_hand_back():
    from llmcomm.predict.advise import node_crossings

    m, wl = load_model("llama-3.1-70b"), Workload(1, 1024, 128, "bf16")
    assert node_crossings(m, Layout(4, 2), wl, 4) == (2, 0)            # the hop and the token hand-back
    assert node_crossings(m, Layout(8, 1), wl, 4) == (0, 2 * m.L + 1)  # every all-reduce spans the two nodes
    assert node_crossings(m, Layout(8, 1), wl, 8) == (0, 0)


def test_winner_shares_count_each_cells_winner():
    import pandas as pd

    from llmcomm.report.tables import winner_shares

    maps = pd.DataFrame({"framework": ["e"] * 4 + ["f"] * 2, "model": ["m"] * 6,
                         "best": ["t=8×p=1", "t=8×p=1", "t=1×p=8", "t=4×p=2", "t=2×p=1", "t=1×p=2"]})
    sh = winner_shares(maps)
    assert list(sh.columns) == ["t=8×p=1", "t=4×p=2", "t=2×p=1", "t=1×p=2", "t=1×p=8"]
    assert sh.loc[("e", "m")].tolist() == [0.5, 0.25, 0.0, 0.0, 0.25]
    assert sh.loc[("f", "m")].tolist() == [0.0, 0.0, 0.5, 0.5, 0.0]


def test_host_bound_facts_compare_one_layers_kernels_with_the_profiles_host_time():
    from llmcomm.predict.compute import layer_op_times, phase_context
    from llmcomm.report.tables import host_bound_facts

    m = load_model("llama-3.1-8b")
    for b, S in ((1, 1024), (64, 8192)):
        wl = Workload(b, S, 128, "bf16")
        f = host_bound_facts(m, H100, 8, wl)
        s, ell, c = phase_context("decode", S, 128)
        assert f["kernels_s"] == pytest.approx(sum(layer_op_times(m, H100, 8, b, s, ell, c, 2).values()), rel=1e-12)
        assert f["profile"] == "deepspeed-eager" and f["host_s"] == pytest.approx(350e-6)
        assert f["host_bound"] == (f["host_s"] > f["kernels_s"])
    assert host_bound_facts(m, H100, 8, Workload(1, 1024, 128, "bf16"))["host_bound"]
    # the vLLM profile replays decode in CUDA graphs: no host time per layer, never host-bound
    assert not host_bound_facts(m, H100, 8, Workload(1, 1024, 128, "bf16"), framework="vllm")["host_bound"]


def test_share_text_lists_the_winning_layouts_only():
    import pandas as pd

    from llmcomm.report.tables import share_text, winner_shares

    maps = pd.DataFrame({"framework": ["e"] * 4, "model": ["m"] * 4, "best": ["t=8×p=1", "t=8×p=1", "t=8×p=1", "t=1×p=8"]})
    assert share_text(winner_shares(maps), "e", "m") == "t=8×p=1 75%, t=1×p=8 25%"


def test_equal_within_groups_what_the_front_counts_as_equal():
    from llmcomm.report.plots import equal_within

    x = np.array([150_929_408.0, 150_896_640.0, 150_880_256.0, 150_872_064.0, 3e9, 3.02e9, 3.1e9])
    snapped = equal_within(x, 0.01)
    assert (snapped[:4] == 150_872_064.0).all()                 # 0.04 % apart: one value, the smallest
    assert snapped[4] == snapped[5] == 3e9 and snapped[6] == 3.1e9     # 3.1e9 is 3.3 % above its group's first
    assert (equal_within(x, 0.0) == x).all()


def test_pareto_figure_draws_equal_bytes_at_one_x_on_a_readable_axis():
    """The 70B, 2 × 8 case: every layout moves the same inter-node bytes within 0.04 %; the front's panel draws them
    at one x, on a linear axis from 0 with a few ticks, and says so; the busiest-rank panel (144× span) stays log."""
    import matplotlib.pyplot as plt
    from llmcomm.report import plots

    rows = advise(load_model("llama-3.1-70b"), 16, 8, H100, S=1024, G=128, b=8)
    fig = plots.pareto(rows)
    front_ax, busy_ax = fig.axes
    xs = np.concatenate([c.get_offsets()[:, 0] for c in front_ax.collections])
    assert len(set(xs)) == 1 and xs[0] == min(r["inter_node_bytes"] for r in rows)
    assert front_ax.get_xscale() == "linear" and front_ax.get_xlim()[0] == 0
    ticks = [x for x in front_ax.get_xticks() if front_ax.get_xlim()[0] <= x <= front_ax.get_xlim()[1]]
    assert 2 <= len(ticks) <= 6 and "drawn as one" in front_ax.get_xlabel()
    labels = [t.get_text() for t in front_ax.texts]
    assert sorted(labels) == sorted(f"{r['tp']}×{r['pp']}" for r in rows)
    assert busy_ax.get_xscale() == "log"
    plt.close(fig)


def test_host_overlap_bounds_against_the_profiles_numbers():
    """Full overlap hides collectives in the device's wait for the host: under DeepSpeed's eager profile a
    host-bound Llama-3.1-8B decode step costs exactly the host's time, (L + 1) layers-and-head × 350 µs, whatever the
    layout; under vLLM's CUDA-graph decode (no per-layer host time, 15 µs per replay) the two bounds differ by the
    replay's 15 µs alone."""
    from llmcomm.deployment import Deployment
    from llmcomm.predict.advise import host_overlap_bounds
    from llmcomm.predict.profiles import load_profile

    m8 = load_model("llama-3.1-8b")
    t, p = np.array([8, 4, 2, 1]), np.array([1, 2, 4, 8])
    ds = host_overlap_bounds(m8, H100, t, p, 1, 128, 128, 2, 8, Deployment("deepspeed"))
    host_us = load_profile("deepspeed-eager").phases["decode"]["layer_overhead_us"]
    assert ds["full"]["tpot_s"] == pytest.approx(np.full(4, (m8.L + 1) * host_us * 1e-6), rel=1e-12)
    assert (ds["full"]["e2e_s"] <= ds["none"]["e2e_s"]).all() and (ds["none"]["tpot_s"] > ds["full"]["tpot_s"]).all()
    vl = host_overlap_bounds(m8, H100, t, p, 1, 128, 128, 2, 8, Deployment("vllm"))
    replay_s = load_profile("vllm-v0").phases["decode"]["forward_overhead_us"] * 1e-6
    assert vl["none"]["tpot_s"] - vl["full"]["tpot_s"] == pytest.approx(np.full(4, replay_s), rel=1e-9)


def test_winner_robustness_reports_ties_and_holds():
    from llmcomm.deployment import Deployment
    from llmcomm.predict.advise import robustness_frame, winner_robustness
    from llmcomm.report.tables import robustness_text

    m8 = load_model("llama-3.1-8b")
    ds = winner_robustness(m8, 8, 8, H100, S=128, G=128, b=1, rel_err=0.0, deployment=Deployment("deepspeed"))
    assert ds["winners_none"] == [(1, 8)] and len(ds["winners_full"]) == 4        # host-bound: all four equal
    assert ds["margin_full"] == float("inf") and ds["verdict"] == "tie" and ds["contenders"] == []
    assert ds["tied"][0] == (1, 8) and set(ds["tied"]) == {(8, 1), (4, 2), (2, 4), (1, 8)}
    vl = winner_robustness(load_model("llama-3.1-70b"), 8, 8, H100, S=1024, G=128, b=1, rel_err=0.111,
                           deployment=Deployment("vllm"))
    assert vl["verdict"] == "holds" and vl["tied"] == [(8, 1)] and vl["margin_none"] > 2 * 0.111 / (1 - 0.111)
    near = winner_robustness(m8, 8, 8, H100, S=1024, G=128, b=1, rel_err=0.111, deployment=Deployment("vllm"))
    assert near["winners_none"] == [(8, 1)] and near["contenders"] and near["verdict"] == "tie"
    frame = robustness_frame({"8B": ("llama-3.1-8b", 8, 8, 1024, 1), "70B": ("llama-3.1-70b", 8, 8, 1024, 1)},
                             H100, 0.111, frameworks=("vllm",))
    text = robustness_text(frame, {"vllm": "vLLM V0"})
    assert text.startswith("**1 of 2 winners hold**") and "vLLM V0, llama-3.1-70b on 8 GPUs" in text
    assert "**TIE** between t=8×p=1 and t=4×p=2 — t=4×p=2 within the 11.1% error band" in text


def test_latency_shares_of_a_pure_alpha_beta_ring():
    """On a link priced α + m·β per step (ring all-reduce: 2(n−1)·α + 2(n−1)/n·m·β) the latency part is 2(n−1)·α and
    the half-performance size of the n-way call n·α/β — n times the link's α/β."""
    from llmcomm.predict.hardware import Hardware
    from llmcomm.report.tables import latency_shares

    alpha, bw = 3e-6, 360e9
    hw = Hardware.from_dict({"name": "ring", "memory_gib": 80, "mem_bw_GBps": 3350, "peak_tflops": {"bf16": 989},
                             "links": {"intra": {"bw_GBps": bw / 1e9, "alpha_us": alpha * 1e6, "algorithm": "ring"}}})
    f = latency_shares(hw, {"decode": ("all_reduce", 8, 8192), "prefill": ("all_reduce", 8, 8 << 20)}).set_index(
        "message")
    assert f.loc["prefill", "latency_s"] == pytest.approx(14 * alpha, rel=1e-6)
    assert f.loc["prefill", "half_size"] == pytest.approx(8 * alpha * bw, rel=1e-6)
    tau = 14 * alpha + 1.75 * (8 << 20) / bw
    assert f.loc["prefill", "latency_share"] == pytest.approx(14 * alpha / tau, rel=1e-6)
    assert f.loc["decode", "size / half_size"] == pytest.approx(8192 / (8 * alpha * bw), rel=1e-6)
