"""The in-run CPU calibration's arithmetic (no ranks started): compute on the critical path from captured calls and
the per-call latency the runs pay (the factors and ``for_layout``: tests/test_cpu_model.py)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from llmcomm.compare import inrun
from llmcomm.predict.hardware import load_hardware
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


def test_in_run_latency_is_the_median_of_the_runs_mean_excess():
    """Three runs of TP2 all-reduces (shm, one latency step): per run the mean of (duration − f·m·β); α = their median —
    a heavy-tailed run (one call waited 5 ms for its peer) moves the mean of its own run only."""
    hw = load_hardware("cpu-local")
    _, beta, _ = hw.coll_params("all_reduce", 2, "intra")
    m = 4096
    band = 1.0 * m * beta                                      # f(2) = 2(n−1)/n = 1
    runs = []
    for extra_us in ((100, 120), (90, 5000), (300, 310)):     # per-call latency beyond the bandwidth term
        events = [_ev(0, "decode", 0.0, band + x * 1e-6, nbytes=m) for x in extra_us]
        runs.append((None, types.SimpleNamespace(events=events)))
    fit = inrun.in_run_latency(runs, hw, Layout(2, 1), "all_reduce", 2)
    assert fit["algorithm"] == "direct" and fit["runs"] == 3
    assert fit["alpha_us"] == pytest.approx(305.0, abs=1e-3)           # means 110, 2545, 305 µs: median 305
    assert fit["busbw_GBps"] == pytest.approx(1.0 / beta / 1e9, rel=1e-3)


def test_calibration_model_differs_from_validated_models():
    from llmcomm.compare.sweeps import configs

    shape = lambda m: (m.h, m.L, m.heads, m.ffn)  # noqa: E731
    assert shape(CAL) not in {shape(load_model(c.model)) for c in configs("latency", "cpu")}
    assert {(t, p) for t, p in inrun.IN_RUN_LAYOUTS} == {(c.t, c.p) for c in configs("latency", "cpu")}
    assert np.all([w[2] > 1 for w in inrun.IN_RUN_WORKLOADS])
