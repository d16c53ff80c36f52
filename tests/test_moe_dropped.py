"""Capacity routing's dropped routes: the predicted share (closed form, exact under uniform routing and under the
skewed router) against exact enumeration and Monte Carlo on small cases; the measured count of a router log against
a hand count."""
import math
from itertools import combinations, product
from types import SimpleNamespace

import numpy as np
import pytest

from llmcomm.compare import moe as cm
from llmcomm.deployment import Routing
from llmcomm.derive.moe import DROPPED_FRACTION, capacity, dropped_fraction, dropped_routes, lossless
from llmcomm.notation import symbol
from llmcomm.spec import Layout, SpecError, Workload, load_model


def _enumerate_uniform(T, E, k, C):
    """Exact E[dropped]/(T·k): every token's k-subset, all C(E, k)^T routings equally likely."""
    subsets = list(combinations(range(E), k))
    total = 0
    for choice in product(subsets, repeat=T):
        counts = np.bincount([j for sub in choice for j in sub], minlength=E)
        total += np.maximum(counts - C, 0).sum()
    return total / len(subsets) ** T / (T * k)


@pytest.mark.parametrize("T, E, k, C", [(3, 4, 2, 1), (4, 5, 2, 2), (3, 4, 3, 2), (5, 3, 1, 1), (2, 6, 2, 0)])
def test_uniform_share_equals_exact_enumeration(T, E, k, C):
    assert dropped_fraction(T, E, k, C) == pytest.approx(_enumerate_uniform(T, E, k, C), rel=1e-12, abs=1e-15)


def test_closed_form_in_sympy_is_the_exact_rational():
    from fractions import Fraction

    E, k, C, b, s, e = (symbol(x) for x in ("E", "k", "C", "b", "s", "e"))
    exact = DROPPED_FRACTION.subs({E: 4, k: 2, C: 1, b: 2, s: 3, e: 2}).doit()     # T = b·s/e = 3 tokens per rank
    subsets = list(combinations(range(4), 2))
    total = sum(int(np.maximum(np.bincount([j for sub in ch for j in sub], minlength=4) - 1, 0).sum())
                for ch in product(subsets, repeat=3))
    assert Fraction(int(exact.p), int(exact.q)) == Fraction(total, len(subsets) ** 3 * 3 * 2)


def _enumerate_skew(T, E, k, C, phi):
    """Exact E[dropped]/(T·k) of the skewed router: a token includes the hot expert 0 with probability φ (then k − 1
    of the E − 1 others uniformly), else k of the E − 1 others uniformly."""
    others = range(1, E)
    outcomes = [((0,) + sub, phi / math.comb(E - 1, k - 1)) for sub in combinations(others, k - 1)] + \
               [(sub, (1 - phi) / math.comb(E - 1, k)) for sub in combinations(others, k)]
    total = 0.0
    for choice in product(outcomes, repeat=T):
        prob = math.prod(p for _, p in choice)
        counts = np.bincount([j for sub, _ in choice for j in sub], minlength=E)
        total += prob * np.maximum(counts - C, 0).sum()
    return total / (T * k)


@pytest.mark.parametrize("T, E, k, C, phi", [(3, 4, 2, 1, 0.9), (4, 3, 2, 2, 0.8), (3, 5, 2, 1, 0.3)])
def test_skewed_share_equals_exact_enumeration(T, E, k, C, phi):
    assert dropped_fraction(T, E, k, C, phi) == pytest.approx(_enumerate_skew(T, E, k, C, phi), rel=1e-12)


def test_skewed_share_monte_carlo_at_a_real_load():
    # T = 256 tokens, Mixtral's E = 8, k = 2, DeepSpeed's C = ⌈256/8·2⌉ = 64, a hot expert in 60 % of the tokens
    T, E, k, phi = 256, 8, 2, 0.6
    C = capacity(T, E, k)
    rng = np.random.default_rng(7)
    trials = 4000
    hot = rng.random((trials, T)) < phi
    drops = np.empty(trials)
    for i in range(trials):
        counts = np.zeros(E, dtype=int)
        counts[0] = hot[i].sum()
        n_other = np.where(hot[i], k - 1, k)                       # choices left for the E − 1 cold experts
        for m in (k - 1, k):
            rows = int((n_other == m).sum())
            if rows and m:
                picks = np.argsort(rng.random((rows, E - 1)), axis=1)[:, :m] + 1
                counts += np.bincount(picks.ravel(), minlength=E)
        drops[i] = np.maximum(counts - C, 0).sum() / (T * k)
    want = dropped_fraction(T, E, k, C, phi)
    assert want > 0.1                                                   # the hot expert overflows: 0.6·256 > 64
    assert abs(drops.mean() - want) < 4 * drops.std(ddof=1) / np.sqrt(trials)


def test_uniform_is_the_skew_at_k_over_e_and_edges():
    assert dropped_fraction(100, 8, 2, 20, phi=2 / 8) == pytest.approx(dropped_fraction(100, 8, 2, 20), rel=1e-12)
    assert dropped_fraction(10, 8, 2, 10) == 0.0                       # C ≥ T: an expert gets ≤ T routes
    assert dropped_fraction(4, 8, 2, 0) == pytest.approx(1.0, rel=1e-12)      # no slot: every route dropped
    for bad in (0.0, 1.5):
        with pytest.raises(SpecError, match="skew"):
            dropped_fraction(10, 8, 2, 3, bad)
    with pytest.raises(SpecError, match="T ≥ 1"):
        dropped_fraction(0, 8, 2, 3)
    assert lossless(Routing(), 4, 8, 2) and not lossless(Routing(), 5, 8, 2)   # C = C_min = 4 against T
    assert lossless(Routing("dropless"), 10 ** 6, 8, 2)


def _fake_ep_run():
    """A tiny EP run by hand: 2 ranks, tiny Mixtral (E = 8, k = 2, h = 64), one MoE layer forward per rank, prefill
    only, capacity routing with C = 4 — rank 0 routed 7 tokens, rank 1 also 7."""
    counts = {0: [6, 1, 0, 2, 1, 1, 2, 1], 1: [3, 3, 5, 0, 0, 1, 2, 0]}      # sum = 7·2 = 14 each
    ranks = [{"rank": r, "routing": [{"forward": 0, "layer": 0, "tokens": 7, "capacity": 4, "counts": c,
                                      "kept": 14 - sum(max(x - 4, 0) for x in c)}]} for r, c in counts.items()]
    m = 8 * 4 * 64 * 4
    events = [{"rank": r, "op": "all_to_all", "phase": "prefill", "bytes": m, "splits": [m // 2, m // 2]}
              for r in (0, 1) for _ in range(2)]
    return SimpleNamespace(ranks=ranks, events=events)


def test_measured_drops_of_a_router_log_by_hand():
    model = load_model("tiny-mixtral")
    res = _fake_ep_run()
    # hand count: rank 0 drops 6 − 4 = 2 (expert 0); rank 1 drops 5 − 4 = 1 (expert 2): 3 of 28 routes
    assert dropped_routes([6, 1, 0, 2, 1, 1, 2, 1], 4) == 2
    assert dropped_routes([[6, 1, 0, 2, 1, 1, 2, 1], [3, 3, 5, 0, 0, 1, 2, 0]], 4) == 3
    ex = cm.a2a_exactness(res, model, Layout(e=2), Workload(2, 7, 1), Routing())
    assert ex.equal.all() and list(ex.call) == ["dispatch", "combine"]
    assert (ex.routes == 28).all() and (ex.dropped_routes == 3).all() and (ex.dropped_routes_deepspeed == 3).all()
    assert (ex.dropped_fraction_predicted == dropped_fraction(7, 8, 2, 4)).all()
    tot = cm.phase_totals(ex).set_index("phase").loc["prefill"]
    assert tot.routes == 28 and tot.dropped_routes == 3 and tot.dropped_fraction_measured == 3 / 28
    assert tot.dropped_fraction_predicted == pytest.approx(dropped_fraction(7, 8, 2, 4), rel=1e-12)
    # the same log under dropless routing: C is the largest count, nothing is beyond it
    for rec in res.ranks:
        rec["routing"][0].update(capacity=6, kept=14)
    m = 8 * 6 * 64 * 4
    for ev in res.events:
        ev["bytes"] = m
    ex = cm.a2a_exactness(res, model, Layout(e=2), Workload(2, 7, 1), Routing("dropless"))
    assert ex.equal.all() and (ex.dropped_routes == 0).all() and (ex.dropped_fraction_predicted == 0).all()


def test_dropped_frame_rows():
    mix = load_model("mixtral-8x7b")
    f = cm.dropped_frame(mix, 8, [Workload(8, 1024, 128, "bf16")], phis=(0.5,))
    assert f.router.tolist() == ["uniform", "skew 0.5"]
    uni, hot = f.iloc[0], f.iloc[1]
    assert uni["dropped prefill"] == dropped_fraction(1024, 8, 2, 256)
    assert hot["dropped prefill"] == dropped_fraction(1024, 8, 2, 256, 0.5) > uni["dropped prefill"]
    assert uni["dropped decode"] == 0.0 and not uni.lossless
