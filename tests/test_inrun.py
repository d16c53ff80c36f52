"""The in-run CPU calibration's arithmetic (no ranks started): compute on the critical path from captured calls, the
fit of the compute rate and per-layer overhead, and the preset entry that ``for_layout`` applies."""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest

from llmcomm.compare import inrun
from llmcomm.predict.compute import forward_compute
from llmcomm.predict.hardware import for_layout, load_hardware
from llmcomm.spec import Layout, load_model

CAL = load_model("calib-llama")


def _ev(rank, phase, t0, t1, op="all_reduce", group=(0, 1), nbytes=64, peer=None):
    return {"rank": rank, "phase": phase, "t_start": t0, "t_end": t1, "op": op, "group": list(group),
            "bytes": nbytes, "peer": peer}


def test_path_compute_sums_stages_minus_their_calls():
    # p = 2, t = 1: stage 0 (rank 0) prefill 10 ms with 1 ms in calls; stage 1 (rank 1) 10 ms with 6 ms waiting
    ranks = [{"rank": 0, "timings": {"ttft_s": 0.010, "tpot_s": 0.004}},
             {"rank": 1, "timings": {"ttft_s": 0.010, "tpot_s": 0.004}}]
    events = [_ev(0, "prefill", 0.0, 0.001, "send", (0, 1), peer=1), _ev(1, "prefill", 0.0, 0.006, "recv", (0, 1)),
              _ev(0, "decode", 0.0, 0.002, "send", (0, 1), peer=1), _ev(1, "decode", 0.0, 0.006, "recv", (0, 1))]
    res = types.SimpleNamespace(ranks=ranks, events=events)
    assert inrun.path_compute(res, Layout(1, 2), "prefill", 4) == pytest.approx(0.009 + 0.004)
    # decode: per step = tpot − calls / (G − 1): (4 − 2/3) + (4 − 6/3) ms
    assert inrun.path_compute(res, Layout(1, 2), "decode", 4) == pytest.approx(0.004 - 0.002 / 3 + 0.004 - 0.002)


def test_fit_compute_recovers_rate_and_overhead():
    hw = load_hardware("cpu-local")
    true = inrun._with_compute(hw, 30e9, 250e-6, 12e9)
    rows = []
    for b, S, G in inrun.IN_RUN_WORKLOADS:
        for phase in ("prefill", "decode"):
            c = float(forward_compute(CAL, true, 2, 1, b, S, G, 4, phase)["compute_s"])
            rows.append({"b": b, "S": S, "G": G, "phase": phase, "compute_s": c})
    fit = inrun.fit_compute(CAL, Layout(2, 1), pd.DataFrame(rows), hw)
    assert fit["flops_per_s"] == pytest.approx(30e9, rel=1e-3)
    assert fit["overhead_us"] == pytest.approx(250, rel=1e-3)
    assert fit["mem_bw_GBps"] == pytest.approx(12, rel=1e-2)
    assert fit["median_rel_err"] < 1e-4 and fit["points"] == 8


def test_for_layout_applies_the_layout_entry():
    hw = load_hardware("cpu-local")
    d = dict(hw.raw)
    d["in_run"] = {"t2p2": {"compute": {"flops_per_s": 20e9, "overhead_us": 400.0, "mem_bw_GBps": 10.0},
                            "collectives": {"all_reduce": {"2": {"alpha_us": 300.0, "busbw_GBps": 1.0,
                                                                 "algorithm": "ring"}}}}}
    base = load_hardware(d)
    h = for_layout(base, 2, 2)
    assert h.flops("fp32") == pytest.approx(20e9) and h.layer_overhead_s == pytest.approx(400e-6)
    assert h.bandwidth() == pytest.approx(10e9)
    alpha, beta, alg = h.coll_params("all_reduce", 2, "intra", subgroup=True)
    assert (alpha, beta, alg) == (pytest.approx(300e-6), pytest.approx(1e-9), "ring")
    assert for_layout(base, 2, 1).raw.get("calibrated_layout") is None       # no entry: the thread calibration


def test_calibration_model_differs_from_validated_models():
    from llmcomm.compare.sweeps import configs

    shape = lambda m: (m.h, m.L, m.heads, m.ffn)  # noqa: E731
    assert shape(CAL) not in {shape(load_model(c.model)) for c in configs("latency", "cpu")}
    assert {(t, p) for t, p in inrun.IN_RUN_LAYOUTS} == {(c.t, c.p) for c in configs("latency", "cpu")}
    assert np.all([w[2] > 1 for w in inrun.IN_RUN_WORKLOADS])
