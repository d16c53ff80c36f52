"""Traffic — what moves, not the nccl-tests size: per-call flows by hand, the closed forms against the enumerated
calls of concrete layouts (even and uneven stage splits, several placements), and the book's headline limits."""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from llmcomm import Layout, Workload, load_model
from llmcomm.derive import evaluate as ev, traffic as tr, volumes as v
from llmcomm.notation import G, L, S, V, b, g, h, p, t, w
from llmcomm.spec import SpecError


# ------------------------------------------------------------------------------------------------- one call, by hand
def test_ring_all_reduce_flows_and_factors():
    f = tr.flows("all_reduce", (4, 5, 6, 7), 1000)
    assert f == [(4, 5, 1500), (5, 6, 1500), (6, 7, 1500), (7, 4, 1500)]           # 2(n−1)/n·m on each ring link
    assert tr.sent_factor("all_reduce", 4) == 1.5 and tr.link_factor("all_reduce", 4) == 6.0
    assert tr.sent_factor("all_reduce", 4, "direct") == 3.0 and tr.link_factor("all_reduce", 4, "direct") == 12.0


def test_rooted_and_pairwise_ops():
    assert tr.flows("gather", (0, 1, 2, 3), 400, root=0) == [(1, 0, 100), (2, 0, 100), (3, 0, 100)]
    assert tr.flows("scatter", (0, 1), 400, root=1) == [(1, 0, 200)]
    assert tr.flows("broadcast", (0, 1, 2), 8, root=1) == [(1, 2, 8), (2, 0, 8)]
    assert tr.flows("reduce", (0, 1, 2), 8, root=1) == [(2, 0, 8), (0, 1, 8)]
    assert len(tr.flows("all_to_all", (0, 1, 2, 3), 400)) == 12 and tr.flows("all_to_all", (0, 1), 400)[0][2] == 200
    assert tr.flows("send_recv", (3, 9), 12) == [(3, 9, 12)]
    assert tr.flows("all_reduce", (5,), 100) == [] and tr.flows("barrier", (0, 1), 0) == []
    assert tr.flows("all_gather", (0, 1, 2), 9) == [(0, 1, 6), (1, 2, 6), (2, 0, 6)]
    assert isinstance(tr.flows("all_reduce", (0, 1, 2), 10)[0][2], Fraction)        # exact: 40/3, not 13.33…
    with pytest.raises(SpecError, match="traffic algorithm 'tree'"):
        tr.flows("all_reduce", (0, 1), 8, "tree")


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "gather",
                                "scatter", "all_to_all"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("algorithm", ["ring", "direct"])
def test_factors_equal_the_enumerated_flows(op, n, algorithm):
    m = 840
    flows = tr.flows(op, tuple(range(10, 10 + n)), m, algorithm)
    sent: dict[int, Fraction] = {}
    for src, _, nbytes in flows:
        sent[src] = sent.get(src, 0) + nbytes
    assert float(max(sent.values(), default=0)) == pytest.approx(tr.sent_factor(op, n, algorithm) * m)
    assert float(sum(x for *_, x in flows)) == pytest.approx((tr.link_factor(op, n, algorithm) if n > 1 else 0) * m)
    k = sp.Symbol("k", positive=True, integer=True)
    if n > 1:
        assert float(tr.sent_factor(op, k, algorithm).subs(k, n)) == pytest.approx(tr.sent_factor(op, n, algorithm))


# ---------------------------------------------------------------------------- closed forms == enumeration, any layout
settings.register_profile("traffic", max_examples=30, deadline=None)

MODELS = ["llama-3.2-1b", "llama-3.1-8b", "llama-2-13b", "tiny-llama-tied"]
workloads = st.builds(Workload, b=st.integers(1, 8), S=st.integers(1, 2000), G=st.integers(1, 300),
                      dtype=st.sampled_from(["fp32", "bf16"]))


ARGS = (b, S, G, h, L, V, t, p, w)


@lru_cache(maxsize=None)
def _fn(kind: str, engine: str, algorithm: str, phase=None, op=None):
    """A closed form, lambdified once (subs on the Max/ceiling forms is slow)."""
    form = (v.link_bytes if kind == "link" else v.busiest_sent)(engine, phase=phase, op=op, algorithm=algorithm)
    return sp.lambdify(ARGS, form, "math")


def _at(kind, engine, algorithm, model, layout, wl, phase=None, op=None):
    return _fn(kind, engine, algorithm, phase, op)(wl.b, wl.S, wl.G, model.h, model.L, model.V, layout.t, layout.p,
                                                   wl.w)


def _vals(model, layout, wl, gpus_per_node=None):
    vals = {b: wl.b, S: wl.S, G: wl.G, h: model.h, L: model.L, V: model.V, t: layout.t, p: layout.p, w: wl.w}
    if gpus_per_node is not None:
        vals[g] = gpus_per_node
    return vals


@settings(settings.get_profile("traffic"))
@given(st.sampled_from(MODELS), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 3, 4, 5]), workloads,
       st.sampled_from(["deepspeed", "deepspeed-full", "vllm"]), st.sampled_from(["ring", "direct"]))
def test_link_and_busiest_rank_closed_forms_equal_enumeration(name, tdeg, pdeg, wl, engine, algorithm):
    model = load_model(name)
    layout = Layout(tdeg, pdeg)
    try:
        layout.validate(model)
        wl.validate(model)
    except SpecError:
        return
    tot = ev.traffic_totals(model, layout, wl, engine, algorithm)
    exact = dict(rel=1e-12, abs=1e-9)
    assert _at("link", engine, algorithm, model, layout, wl) == pytest.approx(tot["link_bytes"], **exact)
    assert _at("busiest", engine, algorithm, model, layout, wl) == pytest.approx(tot["sent_bytes_busiest_rank"],
                                                                                  **exact)
    for row in ev.rows(model, layout, wl, engine, algorithm):         # per row: the row's busiest and its links
        sel = dict(phase=row["phase"], op=row["op"])
        assert _at("link", engine, algorithm, model, layout, wl, **sel) == pytest.approx(row["link_bytes"], **exact)
        assert _at("busiest", engine, algorithm, model, layout, wl, **sel) == pytest.approx(
            row["sent_bytes_per_rank"], **exact)


@pytest.mark.parametrize("engine", ["deepspeed", "deepspeed-full", "vllm"])
@pytest.mark.parametrize("tdeg,pdeg,gpn", [(8, 1, 4), (8, 2, 8), (4, 4, 8), (2, 8, 4), (1, 16, 8), (8, 2, 2),
                                           (4, 2, 8), (1, 4, 8), (2, 2, 1), (1, 2, 1), (4, 1, 2)])
def test_inter_node_closed_form_equals_enumeration(engine, tdeg, pdeg, gpn):
    model, wl = load_model("llama-3.1-70b"), Workload(2, 100, 7, "bf16")
    layout = Layout(tdeg, pdeg)
    tot = ev.traffic_totals(model, layout, wl, engine, gpus_per_node=gpn)
    assert v.inter_node_bytes(engine).subs(_vals(model, layout, wl, gpn)) == tot["inter_node_bytes"]


# ------------------------------------------------------------------------------------------------- the book's claims
def test_tp_over_pp_consistent_ratios_llama31_8b():
    """Busiest rank ≈ 4L(N−1)/N times more under TP, all links ≈ 4L times more (S = 1024, G = 128, bf16)."""
    m8 = load_model("llama-3.1-8b")
    wl = Workload(1, 1024, 128, "bf16")
    got = {}
    for N in (4, 8):
        tp = ev.traffic_totals(m8, Layout(N, 1), wl)
        pp = ev.traffic_totals(m8, Layout(1, N), wl)
        got[N] = (tp["sent_bytes_busiest_rank"] / pp["sent_bytes_busiest_rank"], tp["link_bytes"] / pp["link_bytes"])
    assert got[4][0] == pytest.approx(101.2, abs=0.1) and got[8][0] == pytest.approx(118.1, abs=0.1)
    assert got[4][1] == pytest.approx(134.96, abs=0.01) and got[8][1] == pytest.approx(134.96, abs=0.01)
    # TP: every rank is alike; PP: for long prompts the stages that send a hop are the busiest (the last stage
    # sends only the token ids)
    Bt = v.regime(v.class_sent("deepspeed", "single"), "TP")
    Bp = v.regime(v.class_sent("deepspeed", "first"), "PP")
    N = sp.Symbol("N", positive=True, integer=True)
    lim = sp.limit(sp.simplify(Bt.subs(t, N) / Bp.subs(p, N)), S, sp.oo)
    assert sp.simplify(lim - 4 * L * (N - 1) / N) == 0
    link = v.link_bytes("deepspeed")
    lim_link = sp.limit(sp.simplify(v.regime(link, "TP").subs(t, N) / v.regime(link, "PP").subs(p, N)), S, sp.oo)
    assert sp.simplify(lim_link - 4 * L) == 0


def test_partitioned_and_full_hops_move_the_same_but_not_across_nodes():
    """Per boundary both modes move t·m in all and m into each receiving rank; partitioning moves (t−1)/t of it off
    the stage-to-stage link (t = 4, p = 2, one stage per node)."""
    model, wl = load_model("llama-3.1-8b"), Workload(1, 64, 1, "bf16")          # prefill only
    lay = Layout(4, 2)
    part = ev.rows(model, lay, wl, "deepspeed", gpus_per_node=4)
    full = ev.rows(model, lay, wl, "deepspeed-full", gpus_per_node=4)
    m = 64 * model.h * 2

    def hop(rows):
        sr = next(r for r in rows if r["op"] == "send_recv")
        ag = next((r for r in rows if r["op"] == "all_gather"), {"link_bytes": 0, "inter_node_bytes": 0})
        token = 4 * 8                                               # the hand-back: t int64 ids, across nodes too
        return sr["link_bytes"] - token + ag["link_bytes"], sr["inter_node_bytes"] - token

    assert hop(part) == (4 * m, m) and hop(full) == (4 * m, 4 * m)
