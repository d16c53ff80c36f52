"""CPU calibration where the runs run: compute and communication costs measured inside multi-rank DeepSpeed runs.

Why: a single-process calibration (one rank, an idle second core) predicts a TP2 rank's half of a decode step
faster than the whole step runs as two ranks — the ranks share the cores, their communication threads poll, and the
calibration never sees that. So the ``cpu-local`` preset is calibrated from runs of the same kind as the validation's
(:data:`IN_RUN_LAYOUTS`: the same ranks, threads and backends), on a model of another shape (``calib-llama``: h = 384,
L = 6, 6 heads, FFN 1024 — neither small-llama nor tiny-llama):

* **compute on the critical path** of each measured forward (:func:`path_compute`): for each pipeline stage, its first
  rank's phase time minus the time that rank spent inside captured collectives and sends/receives (receives include
  waiting for the previous stage, so only compute remains), summed over the stages;
* the per-layout roofline (FLOP rate, memory bandwidth, per-layer overhead o; started from the microbenchmarks'
  rates) fitted so that
  :func:`llmcomm.predict.compute.forward_compute` reproduces those compute times (:func:`fit_compute`);
* **communication in the run** (:func:`in_run_calls`): every captured call's duration on its group's lowest rank,
  per (op, group size), beside what the microbenchmark fit predicts for its size; all-reduces are refitted from the
  run (α-β, :func:`llmcomm.predict.fit.fit_alpha_beta`), sends/receives are kept from the microbenchmark and flagged
  when the two disagree (a receive's duration in a run includes the upstream stage's compute).

:func:`llmcomm.predict.hardware.for_layout` applies a layout's entry; ``llmcomm calibrate --in-run`` writes them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..predict.compute import forward_compute
from ..predict.fit import fit_alpha_beta
from ..predict.hardware import Hardware
from ..spec import Layout, ModelSpec, Workload, cpu_threads_per_rank

__all__ = ["CALIBRATION_MODEL", "IN_RUN_LAYOUTS", "IN_RUN_WORKLOADS", "layout_key", "path_compute", "compute_points",
           "fit_compute", "in_run_calls", "calibrate_layout"]

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


def calibrate_layout(layout: Layout, hw: Hardware, reps: int = 3, runner=None, cores: int | None = None) -> dict:
    """Run the calibration model on ``layout`` (every :data:`IN_RUN_WORKLOADS` ``reps`` times, one launch) and return
    the preset entry ``{"compute": fit_compute(...), "collectives": {op: {n: FIT}}, "calls": summary, "threads"}``."""
    from ..measure.launch import measure_many
    from ..spec import load_model

    model = load_model(CALIBRATION_MODEL)
    workloads = [Workload(b, S, G) for b, S, G in IN_RUN_WORKLOADS for _ in range(reps)]
    runner = runner or (lambda *args, **kwargs: measure_many(*args, env={"DS_ACCELERATOR": "cpu",
                                                                         "CUDA_VISIBLE_DEVICES": ""}, **kwargs))
    results = list(zip(workloads, runner(model, layout, workloads)))
    points = compute_points(results, layout)
    compute = fit_compute(model, layout, points, hw)
    calls = in_run_calls(results, hw, layout)
    collectives, summary = {}, []
    for (op, n), of_n in calls.groupby(["op", "n"]):
        ratio = float(np.median(of_n.seconds / of_n.fit_s))
        row = {"op": op, "n": int(n), "calls": int(len(of_n)), "median_in_run_us": float(of_n.seconds.median() * 1e6),
               "median_fit_us": float(of_n.fit_s.median() * 1e6), "in_run_over_fit": ratio}
        if op == "all_reduce":
            # DeepSpeed's shm all-reduce (TP alone): one step per call, as its one-shot path is fitted (every
            # in-run call of the calibration model is below its 1 MiB threshold); gloo (hybrids): a ring
            shm = layout.p == 1 and hw.collectives.get("intra", {}).get("all_reduce", {}).get(str(n), {}).get(
                "backend") == "shm"
            ab = fit_alpha_beta(op, n, of_n.message_bytes.to_numpy(dtype=float), of_n.seconds.to_numpy(dtype=float),
                                "direct" if shm else "ring")
            collectives.setdefault(op, {})[str(int(n))] = {
                "alpha_us": round(ab["alpha_us"], 3), "busbw_GBps": round(ab["busbw_GBps"], 4),
                "algorithm": ab["algorithm"], "source": "in-run: captured call durations of the calibration runs"}
            row["refit"] = True
        else:
            row["refit"] = False
            row["flag"] = "in-run calls differ from the microbenchmark by more than 2x" if not 0.5 < ratio < 2 else ""
        summary.append(row)
    return {"compute": compute, "collectives": collectives, "calls": summary, "model": CALIBRATION_MODEL,
            "workloads": [list(x) for x in IN_RUN_WORKLOADS], "reps": reps,
            "threads": cpu_threads_per_rank(layout.ranks, cores)}
