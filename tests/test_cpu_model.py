"""The CPU kernel model (issue 17, item 4): a CPU BLAS's two GEMM paths, host time per layer and per forward, fitted to
a machine's microbenchmark, and the in-run factors a layout adds — on synthetic timings whose truth is known."""
from __future__ import annotations

import pandas as pd
import pytest

from llmcomm.compare import cpu_calibration as cc
from llmcomm.compare import inrun
from llmcomm.predict.compute import forward_compute
from llmcomm.predict.hardware import Hardware, for_layout, for_ranks, load_hardware
from llmcomm.predict.kernels import gemm_time
from llmcomm.predict.profiles import load_profile
from llmcomm.spec import Layout, load_model
from support import CPU_TRUTH, synthetic_cpu_timings


def test_one_row_streams_at_the_matrix_vector_rate():
    p = {"flops_per_s": 1e11, "bytes_per_s": 5e9, "gemv_bytes_per_s": 2e10, "t0": 0.0, "norm_order": float("inf")}
    K, N = 1000, 2000
    assert gemm_time(1, N, K, 4, p) == pytest.approx(4 * (K + K * N + N) / 2e10)
    assert gemm_time(2, N, K, 4, p) == pytest.approx(4 * (2 * K + K * N + 2 * N) / 5e9)     # packed: the slower rate
    assert gemm_time(512, N, K, 4, p) == pytest.approx(2 * 512 * K * N / 1e11)              # compute-bound
    q = {k: v for k, v in p.items() if k != "gemv_bytes_per_s"}
    assert gemm_time(1, N, K, 4, q) == pytest.approx(4 * (K + K * N + N) / 5e9)            # a GPU: one rate


def test_fit_recovers_the_machine():
    fit = cc.fit_cpu_kernels(synthetic_cpu_timings())
    truth = CPU_TRUTH["kernels"]["gemm"]
    for k in ("flops_per_s", "bytes_per_s", "gemv_bytes_per_s", "t0"):
        assert fit["kernels"]["gemm"][k] == pytest.approx(truth[k], rel=1e-3), k
    assert fit["kernels"]["gemm"]["norm_order"] == pytest.approx(1.5, rel=1e-2)
    assert fit["kernels"]["memops"]["add"]["bytes_per_s"] == pytest.approx(3e9, rel=1e-2)
    for phase in ("prefill", "decode"):
        for part in ("layer", "forward"):
            assert fit["host_us"][phase][part] == pytest.approx(CPU_TRUTH["host_us"][phase][part], abs=2.0)
    assert fit["layer_overhead_us"] == pytest.approx(350, abs=2.0)
    errs = cc.cpu_kernel_errors(fit, synthetic_cpu_timings())
    assert max(abs(r["predicted_s"] / r["seconds"] - 1) for r in errs) < 5e-3


def _with_entry(entry, in_run=None) -> Hardware:
    preset = dict(load_hardware("cpu-local").raw)
    preset["compute_by_threads"] = {"1": dict(preset["compute_by_threads"]["1"],
                                              **{k: entry[k] for k in ("kernels", "host_us", "layer_overhead_us")})}
    preset["in_run"] = in_run or {}
    return Hardware.from_dict(preset, name="cpu-local")


def test_for_layout_scales_kernel_and_host_times():
    base = _with_entry(CPU_TRUTH, {"t2p2": {"compute": {"kernel_factor": 2.0, "host_factor": 3.0},
                                            "collectives": {"all_reduce": {"2": {"alpha_us": 300.0, "busbw_GBps": 1.0,
                                                                                 "algorithm": "ring"}},
                                                            "send_recv": {"2": {"alpha_us": 90.0, "busbw_GBps": 2.0,
                                                                                "algorithm": "direct"}}}}})
    one, h = for_ranks(base, 4, cores=2), for_layout(base, 2, 2, cores=2)
    g1, g2 = one.kernels(4)["gemm"], h.kernels(4)["gemm"]
    assert g2["gemv_bytes_per_s"] == pytest.approx(g1["gemv_bytes_per_s"] / 2) and g2["t0"] == pytest.approx(8e-6)
    assert gemm_time(3, 700, 300, 4, g2) == pytest.approx(2 * gemm_time(3, 700, 300, 4, g1))
    prof = load_profile("deepspeed-cpu")
    assert prof.layer_overhead_s("prefill", h) == pytest.approx(3 * 420e-6)
    assert prof.forward_overhead_s("decode", h) == pytest.approx(3 * 60e-6)
    assert h.coll_params("all_reduce", 2, "intra", subgroup=True) == (pytest.approx(300e-6), pytest.approx(1e-9),
                                                                       "ring")
    assert h.coll_params("send_recv", 2, "intra")[0] == pytest.approx(90e-6)     # a send is never a sub-group's


def test_in_run_factors_recovered():
    cal = load_model("calib-llama")
    true = _with_entry(CPU_TRUTH, {"t1p2": {"compute": {"kernel_factor": 1.4, "host_factor": 2.5}}})
    hw = for_layout(true, 1, 2, cores=2)
    prof = load_profile("deepspeed-cpu")
    rows = []
    for b, S, G in inrun.IN_RUN_WORKLOADS:
        for phase in ("prefill", "decode"):
            c = float(forward_compute(cal, hw, 1, 2, b, S, G, 4, phase, overhead_s=prof.layer_overhead_s(phase, hw))
                      ["compute_s"]) + prof.forward_overhead_s(phase, hw)
            rows.append({"b": b, "S": S, "G": G, "phase": phase, "compute_s": c})
    fit = inrun.fit_compute(cal, Layout(1, 2), pd.DataFrame(rows), _with_entry(CPU_TRUTH))
    assert fit["kernel_factor"] == pytest.approx(1.4, rel=1e-3) and fit["host_factor"] == pytest.approx(2.5, rel=1e-3)
    assert fit["median_rel_err"] < 1e-4 and fit["points"] == 8
