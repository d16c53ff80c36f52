"""Time-model additions: thread-matched CPU compute, sub-group (gloo) all-reduce fits, what-if levers, the
predicted-vs-measured validation machinery (with a fake runner: no ranks started), advice maps."""
import types

import numpy as np
import pandas as pd
import pytest

from llmcomm.compare import calibration
from llmcomm.compare.sweeps import Config, configs
from llmcomm.compare.validate import latency_errors, measured_comm_s, validate_latency
from llmcomm.predict import advise
from llmcomm.predict.hardware import for_ranks, load_hardware, scale_links
from llmcomm.predict.latency import predict_latency, predict_latency_grid
from llmcomm.spec import Layout, SpecError, Workload, cpu_threads_per_rank, load_model

TINY = load_model("tiny-llama")        # h=64, L=4, V=1000


def _d(**over):
    d = {"name": "hand", "memory_gib": 1, "mem_bw_GBps": 1.0, "peak_tflops": {"fp32": 0.001},
         "efficiency": {"flops": 1.0, "mem_bw": 1.0}, "layer_overhead_us": 0, "gpus_per_node": 8,
         "links": {"intra": {"bw_GBps": 1.0, "alpha_us": 10, "algorithm": "ring"},
                   "inter": {"bw_GBps": 0.1, "alpha_us": 100, "algorithm": "ring"}}}
    d.update(over)
    return d


SHM = {"all_reduce": {"any": {"alpha_us": 100, "busbw_GBps": 1.0, "algorithm": "direct", "backend": "shm"}}}
GLOO = {"all_reduce": {"any": {"alpha_us": 1000, "busbw_GBps": 0.5, "algorithm": "ring", "backend": "gloo"}}}


def test_rank_threads():
    assert cpu_threads_per_rank(2, cores=2) == 1
    assert cpu_threads_per_rank(4, cores=2) == 1
    assert cpu_threads_per_rank(2, cores=8) == 4
    assert cpu_threads_per_rank(1, cores=3) == 3


def test_hardware_for_ranks_picks_thread_count():
    by = {"1": {"peak_tflops": {"fp32": 0.01}, "mem_bw_GBps": 5.0, "efficiency": {"flops": 0.5, "mem_bw": 1.0},
                "layer_overhead_us": 7.0},
          "4": {"peak_tflops": {"fp32": 0.04}, "mem_bw_GBps": 9.0, "efficiency": {"flops": 0.25, "mem_bw": 1.0},
                "layer_overhead_us": 3.0}}
    d = load_hardware(_d(compute_by_threads=by))
    hw1 = for_ranks(d, ranks=2, cores=2)            # 1 thread
    assert hw1.flops("fp32") == pytest.approx(0.01e12 * 0.5)
    assert hw1.mem_bw == pytest.approx(5e9) and hw1.layer_overhead_s == pytest.approx(7e-6)
    hw4 = for_ranks(d, ranks=2, cores=8)            # 4 threads
    assert hw4.flops("fp32") == pytest.approx(0.04e12 * 0.25) and hw4.layer_overhead_s == pytest.approx(3e-6)
    hw3 = for_ranks(d, ranks=2, cores=6)            # 3 threads: nearest calibrated (4)
    assert hw3.mem_bw == pytest.approx(9e9)
    plain = load_hardware("h100-sxm")
    assert for_ranks(plain, 4) is plain               # GPU presets unchanged


def test_subgroup_allreduce_uses_gloo_fit_in_hybrids():
    hw = load_hardware(_d(collectives={"intra": SHM, "inter": SHM},
                          subgroup_collectives={"intra": GLOO, "inter": GLOO}))
    # direct: α + 2(n−1)/n·S·β ; ring n=2: 2·α + S·β
    S = 1000.0
    assert hw.collective_time("all_reduce", 2, S) == pytest.approx(100e-6 + S / 1e9)
    assert hw.collective_time("all_reduce", 2, S, subgroup=True) == pytest.approx(2 * 1000e-6 + S / 0.5e9)
    wl = Workload(1, 8, 4, "fp32")
    for lay, per_call in ((Layout(2, 1), None), (Layout(2, 2), None)):
        r = predict_latency(TINY, lay, wl, hw, gpus_per_node=8)
        ar = [m for m in r["breakdown"]["prefill"]["messages"] if m["op"] == "all_reduce"]
        for m in ar:
            nbytes = m["bytes_per_call"]
            want = (2 * 1000e-6 + nbytes / 0.5e9) if lay.p > 1 else (100e-6 + nbytes / 1e9)
            assert m["time_s"] == pytest.approx(m["calls"] * want)
    # the vectorised grid agrees with the scalar form for both
    g = predict_latency_grid(TINY, hw, np.array([2, 2]), np.array([1, 2]), 1, 8, 4, 4, gpus_per_node=8)
    for i, lay in enumerate((Layout(2, 1), Layout(2, 2))):
        assert g["ttft_s"][i] == pytest.approx(predict_latency(TINY, lay, wl, hw, gpus_per_node=8)["ttft_s"])


def test_scale_links_divides_beta_only():
    hw = load_hardware(_d(collectives={"intra": SHM, "inter": SHM}))
    fast = scale_links(hw, 2.0)
    S = 1e6
    assert fast.collective_time("all_reduce", 2, S) == pytest.approx(100e-6 + S / 2e9)
    assert fast.collective_time("send_recv", 2, S) == pytest.approx(10e-6 + S / 2e9)          # link: α + S·β
    inter = scale_links(hw, 4.0, levels=("inter",))
    assert inter.collective_time("send_recv", 2, S, "inter") == pytest.approx(100e-6 + S / 0.4e9)
    assert inter.collective_time("send_recv", 2, S, "intra") == pytest.approx(10e-6 + S / 1e9)
    with pytest.raises(SpecError):
        scale_links(hw, 0)


def test_comm_width_and_overlap_levers():
    hw = load_hardware(_d(links={"intra": {"bw_GBps": 1.0, "alpha_us": 0, "algorithm": "ring"}}))
    args = (TINY, hw, 2, 1, 1, 8, 4)
    base = predict_latency_grid(*args, w=2, gpus_per_node=8)
    narrow = predict_latency_grid(*args, w=2, gpus_per_node=8, comm_w=1)
    assert float(narrow["prefill_comm_s"]) == pytest.approx(float(base["prefill_comm_s"]) / 2)   # α = 0
    assert float(narrow["prefill_compute_s"]) == float(base["prefill_compute_s"])
    ov = predict_latency_grid(*args, w=2, gpus_per_node=8, overlap=True)
    assert float(ov["ttft_s"]) == max(float(base["prefill_compute_s"]), float(base["prefill_comm_s"]))
    assert float(ov["e2e_s"]) == pytest.approx(float(ov["ttft_s"]) + 3 * float(ov["tpot_s"]))
    one = predict_latency(TINY, Layout(2, 1), Workload(1, 8, 4, "bf16"), hw, gpus_per_node=8, overlap=True)
    assert one["ttft_s"] == pytest.approx(float(ov["ttft_s"]))


def test_latency_errors_hand_case():
    df = pd.DataFrame({"G": [4, 1], "ttft_s_measured": [1.0, 2.0], "ttft_s_predicted": [1.1, 1.0],
                       "tpot_s_measured": [0.5, 0.0], "tpot_s_predicted": [0.4, 0.3],
                       "e2e_s_measured": [2.0, 2.0], "e2e_s_predicted": [2.0, 3.0]})
    out, s = latency_errors(df)
    assert out["err_ttft"].tolist() == pytest.approx([0.1, -0.5])
    assert out["err_tpot"].iloc[0] == pytest.approx(-0.2) and pd.isna(out["err_tpot"].iloc[1])   # G = 1: no TPOT
    assert out["err_e2e"].tolist() == pytest.approx([0.0, 0.5])
    assert s["median_abs_err_ttft"] == pytest.approx(0.3)
    assert s["median_abs_err"] == pytest.approx(0.2)            # median of 0.1, 0.5, 0.2, 0.0, 0.5


def test_measured_comm_and_validate_with_fake_runner():
    ev = [{"rank": 0, "phase": "prefill", "t_start": 1.0, "t_end": 1.25},
          {"rank": 0, "phase": "decode", "t_start": 2.0, "t_end": 2.5},
          {"rank": 1, "phase": "decode", "t_start": 2.0, "t_end": 9.0}]
    res = types.SimpleNamespace(ttft_s=0.5, tpot_s=0.25, e2e_s=1.25, events=ev)
    assert measured_comm_s(res, "prefill") == 0.25
    assert measured_comm_s(res, "decode", rank=1) == 7.0
    cfg = Config("tiny-llama", 2, 1, 1, 8, 4)
    hw = load_hardware(_d(collectives={"intra": SHM, "inter": SHM}))
    df, s = validate_latency([cfg], hw, cores=2, runner=lambda m, l, ws, **kw: [res] * len(ws), progress=False)
    pred = predict_latency(TINY, cfg.layout, cfg.workload, hw, gpus_per_node=2)
    row = df.iloc[0]
    assert row["ttft_s_predicted"] == pytest.approx(pred["ttft_s"]) and row["ttft_s_measured"] == 0.5
    assert row["err_ttft"] == pytest.approx((pred["ttft_s"] - 0.5) / 0.5)
    assert row["decode_comm_meas_s"] == pytest.approx(0.5 / 3) and row["threads"] == 1 and row["allreduce"] == "shm"
    assert set(s) == {"median_abs_err", "median_abs_err_ttft", "median_abs_err_tpot", "median_abs_err_e2e"}


def test_latency_sweep_covers_tp_pp_hybrid():
    cfgs = configs("latency", "cpu")
    assert {(c.t, c.p) for c in cfgs} >= {(2, 1), (1, 2), (2, 2)}
    assert all(c.t * c.p <= 4 for c in cfgs) and any(c.model == "small-llama" for c in cfgs)
    for c in cfgs:
        c.layout.validate(load_model(c.model))


def test_fit_default_threads_and_subgroup_fits():
    assert calibration.default_threads(2) == [1]
    assert calibration.default_threads(8) == [2, 4]
    fits = pd.DataFrame([{"backend": "gloo", "op": "all_reduce", "group_size": "2", "alpha_us": 500.0,
                          "busbw_GBps": 1.5, "algorithm": "ring", "r2": 0.9, "median_rel_err": 0.1, "path": ""}])
    coll = {"all_reduce": {"2": {"backend": "shm"}}}
    sub = calibration.subgroup_fits(coll, fits)
    assert sub["all_reduce"]["2"]["alpha_us"] == 500.0 and sub["all_reduce"]["2"]["backend"] == "gloo"
    assert calibration.subgroup_fits({"all_reduce": {"2": {"backend": "gloo"}}}, fits) == {}


def test_advice_map_and_what_if():
    h100, m8, m70 = load_hardware("h100-sxm"), load_model("llama-3.1-8b"), load_model("llama-3.1-70b")
    m = advise.advice_map(m8, 8, h100, 8, S=(128, 1024), b=(1, 4), G=16)
    assert len(m) == 4 and set(m.columns) >= {"b", "S", "best", "e2e_s", "margin"}
    ref = advise.advise(m8, 8, 8, h100, S=1024, G=16, b=4)[0]
    row = m[(m.b == 4) & (m.S == 1024)].iloc[0]
    assert (row.tp, row.pp) == (ref["tp"], ref["pp"]) and row.e2e_s == pytest.approx(ref["e2e_s"])
    wi = advise.what_if(m70, 8, h100, gpus_per_node=4, S=1024, G=16, b=1)
    base = wi[wi.lever == "baseline"].set_index("layout")
    fast = wi[wi.lever == "links ×2"].set_index("layout")
    ov = wi[wi.lever == "overlap comm with compute (bound)"].set_index("layout")
    assert (fast.e2e_s <= base.e2e_s).all() and (ov.e2e_s <= base.e2e_s).all()
    ref = {(r["tp"], r["pp"]): r["e2e_s"] for r in advise.advise(m70, 8, 4, h100, S=1024, G=16)}
    for _, r in base.reset_index().iterrows():
        assert r.e2e_s == pytest.approx(ref[(r.tp, r.pp)])


def test_rerun_spread_by_hand():
    # two points; TPOT counts only where G > 1: run 1 vs run 2 deviate 10 %, 20 % (TTFT), 0 %, 50 % (E2E), 25 % (TPOT
    # of the G > 1 point) -> median of [0.1, 0.2, 0.25, 0, 0.5] = 0.2; run 2 vs run 1: [1/11, 1/6, 0.2, 0, 1/3]
    import pandas as pd
    from llmcomm.compare.validate import rerun_spread

    def frame(ttft, tpot, e2e):
        return pd.DataFrame({"G": [1, 4], "ttft_s_measured": ttft, "tpot_s_measured": tpot, "e2e_s_measured": e2e})
    runs = {1: (frame([1.1, 1.2], [9.0, 1.25], [2.0, 3.0]), {}), 2: (frame([1.0, 1.0], [1.0, 1.0], [2.0, 2.0]), {})}
    spread = rerun_spread(runs)
    assert spread[1] == pytest.approx(0.2)
    assert spread[2] == pytest.approx(1 / 6)
