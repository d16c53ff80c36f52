"""CPU calibration where the runs run: what running beside the other ranks costs, measured inside multi-rank
DeepSpeed runs.

Why: the CPU kernel model (:mod:`llmcomm.compare.cpu_calibration`) is fitted in one process on an idle machine, but a
rank of a run shares the memory bandwidth with the other ranks, shares the cores when there are more ranks than cores,
and waits for its peers inside every collective. So the ``cpu-local`` calibration is completed from runs of the same
kind as the validation's (:data:`IN_RUN_LAYOUTS`: the same ranks, threads and backends), on a model of another shape
(``calib-llama``: h = 384, L = 6, 6 heads, FFN 1024 — neither small-llama nor tiny-llama):

* **compute on the critical path** of each measured forward (:func:`path_compute`): for each pipeline stage, its first
  rank's phase time minus the time that rank spent inside captured collectives and sends/receives (receives include
  waiting for the previous stage, so only compute remains), summed over the stages;
* two factors per layout (:func:`fit_compute`): × the kernel times and × the host times of the kernel model, so that
  :func:`llmcomm.predict.compute.forward_compute` reproduces that compute;
* **communication in the run** (:func:`in_run_calls`, :func:`in_run_latency`): every captured call's duration on its
  group's lowest rank (a send on its sender), and per (op, group size) the latency each call pays in the run — its
  mean excess over the microbenchmark's bandwidth term, the median over the runs.

:func:`llmcomm.predict.hardware.for_layout` applies a layout's entry; ``llmcomm calibrate --in-run`` writes them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..predict.compute import forward_compute
from ..predict.hardware import Hardware
from ..spec import Layout, ModelSpec, Workload, cpu_threads_per_rank

__all__ = ["CALIBRATION_MODEL", "IN_RUN_LAYOUTS", "IN_RUN_WORKLOADS", "layout_key", "path_compute", "compute_points",
           "fit_compute", "in_run_calls", "in_run_latency", "calibrate_layout"]

CALIBRATION_MODEL = "calib-llama"
#: the layouts the CPU validation measures: TP (shm all-reduce), PP (gloo sends), the hybrid (gloo sub-groups)
IN_RUN_LAYOUTS = ((2, 1), (1, 2), (2, 2))
#: (b, S, G) of the calibration runs: short and long prompts, batches, enough decode steps for a stable mean
IN_RUN_WORKLOADS = ((1, 32, 8), (1, 128, 8), (4, 64, 6), (2, 256, 4))


def layout_key(t: int, p: int) -> str:
    return f"t{t}p{p}"


def _comm_s(events, rank: int, phase: str) -> float:
    return sum(max(float(ev["t_end"]) - float(ev["t_start"]), 0.0) for ev in events
               if ev["rank"] == rank and ev["phase"] == phase)


def path_compute(res, layout: Layout, phase: str, G: int) -> float:
    """Compute seconds on the critical path of one ``phase`` forward of a measured run (decode: the mean step): for
    each stage its first rank's phase time minus its time in captured calls, summed over the stages."""
    by_rank = {r["rank"]: r for r in res.ranks}
    total = 0.0
    for stage in range(layout.p):
        r = stage * layout.t
        timings = by_rank[r]["timings"]
        if phase == "prefill":
            span, comm = float(timings["ttft_s"]), _comm_s(res.events, r, "prefill")
        else:
            steps = max(G - 1, 1)
            span, comm = float(timings["tpot_s"]), _comm_s(res.events, r, "decode") / steps
        total += max(span - comm, 0.0)
    return total


def compute_points(results, layout: Layout) -> pd.DataFrame:
    """One row per (workload, phase): ``b, S, G, phase, compute_s`` — the median over the repetitions of the
    workload (a 2-core machine's runs vary by 2× from one repetition to the next) — and ``iqr_s``, ``reps``
    (decode only when G > 1)."""
    rows = []
    for wl, res in results:
        for phase in ("prefill", "decode"):
            if phase == "decode" and wl.G < 2:
                continue
            rows.append({"b": wl.b, "S": wl.S, "G": wl.G, "phase": phase,
                         "compute_s": path_compute(res, layout, phase, wl.G)})
    raw = pd.DataFrame(rows)
    by = raw.groupby(["b", "S", "G", "phase"], sort=False).compute_s
    return pd.DataFrame({"compute_s": by.median(), "iqr_s": by.quantile(0.75) - by.quantile(0.25),
                         "reps": by.size()}).reset_index()


def fit_compute(model: ModelSpec, layout: Layout, points: pd.DataFrame, hw: Hardware, w: int = 4) -> dict:
    """The two factors with which :func:`llmcomm.predict.compute.forward_compute` on ``hw`` — this machine's kernel
    model and host times at the thread count of the layout's ranks (:func:`llmcomm.predict.hardware.for_ranks`) —
    reproduces the measured critical-path compute of ``points``: ``kernel_factor`` (× every kernel time: memory
    bandwidth shared with the other ranks, cores time-shared when there are more ranks than cores) and
    ``host_factor`` (× the host times per layer and per forward). Robust fit on log times; returns
    ``{"kernel_factor", "host_factor", "median_rel_err", "points"}``."""
    from scipy.optimize import least_squares

    from ..predict.hardware import for_layout
    from ..predict.profiles import load_profile

    prof = load_profile("deepspeed-cpu")

    def predict(theta):
        kf, hf = np.exp(theta)
        preset = dict(hw.raw, in_run={layout_key(layout.t, layout.p): {"compute": {"kernel_factor": kf,
                                                                                     "host_factor": hf}}})
        hwx = for_layout(Hardware.from_dict(preset, name=hw.name), layout.t, layout.p)
        return np.array([float(forward_compute(model, hwx, layout.t, layout.p, r.b, r.S, r.G, w, r.phase,
                                               overhead_s=prof.layer_overhead_s(r.phase, hwx))["compute_s"])
                         + prof.forward_overhead_s(r.phase, hwx) for r in points.itertuples()])

    meas = points.compute_s.to_numpy(dtype=float)
    fit = least_squares(lambda th: np.log(predict(th) / meas), np.zeros(2), loss="soft_l1", f_scale=0.05)
    err = predict(fit.x) / meas - 1
    kf, hf = (float(x) for x in np.exp(fit.x))
    return {"kernel_factor": kf, "host_factor": hf, "median_rel_err": float(np.median(np.abs(err))),
            "points": int(len(meas))}


def in_run_calls(results, hw: Hardware, layout: Layout) -> pd.DataFrame:
    """Every captured call of the prefill and decode phases (on its group's lowest rank; a send on its sender):
    ``op, n, message_bytes`` (m), ``seconds`` and ``fit_s``, what the preset's microbenchmark fit predicts for it."""
    rows = []
    sub = layout.p > 1
    for _, res in results:
        for ev in res.events:
            if ev["phase"] not in ("prefill", "decode") or ev["op"] == "recv":
                continue
            group = ev["group"] if ev["op"] != "send" else [ev["rank"], ev["peer"]]
            if ev["op"] != "send" and ev["rank"] != min(group):
                continue
            op = "send_recv" if ev["op"] == "send" else ev["op"]
            n = len(group)
            m = float(ev["bytes"])
            fit_s = float(hw.collective_time(op, n, m, "intra", subgroup=sub and op != "send_recv"))
            rows.append({"op": op, "n": n, "message_bytes": int(m), "phase": ev["phase"],
                         "seconds": max(float(ev["t_end"]) - float(ev["t_start"]), 1e-9), "fit_s": fit_s})
    return pd.DataFrame(rows)


def in_run_latency(results, hw: Hardware, layout: Layout, op: str, n: int) -> dict:
    """The per-call latency α of ``op`` on ``n`` ranks as the runs pay it, with the microbenchmark's bandwidth β:
    for each run, the mean over its calls of (duration − f(n)·m·β) per latency step; α = the median over the runs.

    Why the mean within a run and the median across runs: a call's duration in a run includes waiting for the slowest
    rank of its group (their compute drifts apart between calls, and with more ranks than cores one may not be
    running), so durations have a heavy tail, and what a forward pays is their sum — the mean; the validation compares
    medians over runs, so the calibration takes the median of the runs' means. Returns ``{"alpha_us", "busbw_GBps",
    "algorithm", "runs", "source"}``."""
    from ..derive.conventions import bus_factor, latency_steps

    sub = layout.p > 1 and op != "send_recv"
    _, beta, _ = hw.coll_params(op, n, "intra", subgroup=sub)
    shm = op == "all_reduce" and not sub and (hw._fit(op, n, "intra", False) or {}).get("algorithm") == "shm"
    algorithm = "direct" if shm else ("ring" if op != "send_recv" else "direct")
    steps = float(latency_steps(op, n, algorithm))
    f = float(bus_factor(op, n))
    means = []
    for wl, res in results:
        calls = in_run_calls([(wl, res)], hw, layout)
        calls = calls[(calls.op == op) & (calls.n == n)] if len(calls) else calls
        if len(calls):
            excess = calls.seconds.to_numpy(dtype=float) - f * calls.message_bytes.to_numpy(dtype=float) * beta
            means.append(float(np.mean(excess)) / steps)
    return {"alpha_us": round(max(float(np.median(means)), 0.0) * 1e6, 3), "busbw_GBps": round(1.0 / beta / 1e9, 4),
            "algorithm": algorithm, "runs": len(means),
            "source": "in-run: per-call latency of the calibration runs (median over runs of the mean excess over "
                      "the microbenchmark's bandwidth term)"}


def calibrate_layout(layout: Layout, hw: Hardware, reps: int = 3, runner=None, cores: int | None = None) -> dict:
    """Run the calibration model on ``layout`` (every :data:`IN_RUN_WORKLOADS` ``reps`` times, round robin, one
    launch) and return the preset entry ``{"compute": fit_compute(...), "collectives": {op: {n: FIT}}, "calls":
    summary, "threads"}``: every op the runs call is refitted (:func:`in_run_latency`)."""
    from ..measure.launch import measure_many
    from ..spec import load_model

    model = load_model(CALIBRATION_MODEL)
    workloads = [Workload(b, S, G) for _ in range(reps) for b, S, G in IN_RUN_WORKLOADS]
    runner = runner or (lambda *args, **kwargs: measure_many(*args, env={"DS_ACCELERATOR": "cpu",
                                                                         "CUDA_VISIBLE_DEVICES": ""}, **kwargs))
    results = list(zip(workloads, runner(model, layout, workloads)))
    points = compute_points(results, layout)
    compute = fit_compute(model, layout, points, hw)
    calls = in_run_calls(results, hw, layout)
    collectives, summary = {}, []
    for (op, n), of_n in calls.groupby(["op", "n"]):
        fit = in_run_latency(results, hw, layout, op, int(n))
        collectives.setdefault(op, {})[str(int(n))] = fit
        summary.append({"op": op, "n": int(n), "calls": int(len(of_n)),
                        "median_in_run_us": float(of_n.seconds.median() * 1e6),
                        "mean_in_run_us": float(of_n.seconds.mean() * 1e6),
                        "median_fit_us": float(of_n.fit_s.median() * 1e6),
                        "in_run_over_fit": float(np.median(of_n.seconds / of_n.fit_s)), "alpha_us": fit["alpha_us"]})
    return {"compute": compute, "collectives": collectives, "calls": summary, "model": CALIBRATION_MODEL,
            "workloads": [list(x) for x in IN_RUN_WORKLOADS], "reps": reps,
            "threads": cpu_threads_per_rank(layout.ranks, cores)}
