"""The time model checked against real runs: measure each configuration, predict it from the calibration alone,
report the errors.

Nothing here is fitted to the runs it checks: the prediction uses the ``cpu-local`` preset (written by
``llmcomm calibrate`` from microbenchmarks, and by ``llmcomm calibrate --in-run`` from runs of another model in the
same layouts, :mod:`llmcomm.compare.inrun`), as calibrated for each configuration's layout
(:func:`llmcomm.predict.hardware.for_layout`).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from functools import partial
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from ..predict.hardware import Hardware, for_layout
from ..predict.latency import METRICS, predict_latency
from ..spec import SpecError, cpu_threads_per_rank
from .sweeps import Config, measure_configs

__all__ = ["latency_errors", "measured_comm_s", "validate_latency", "load_runs", "rerun_spread", "explain",
           "METRICS"]


def latency_errors(df: pd.DataFrame):
    """Signed relative error ``(predicted − measured) / measured`` of each metric of a predicted-vs-measured frame
    (columns ``<metric>_measured``, ``<metric>_predicted``); adds ``err_<metric>`` columns (TPOT only where G > 1)
    and returns ``(frame, summary)``, ``summary`` the median |error| per metric and over all of them."""
    df = df.copy()
    errs = []
    for metric in METRICS:
        meas, pred = df[f"{metric}_measured"].astype(float), df[f"{metric}_predicted"].astype(float)
        err = (pred - meas) / meas
        if metric == "tpot_s" and "G" in df:
            err = err.where(df["G"] > 1)
        df[f"err_{metric[:-2]}"] = err
        errs.append(err.dropna().abs())
    summary = {f"median_abs_err_{metric[:-2]}": float(err.median()) for metric, err in zip(METRICS, errs)}
    summary["median_abs_err"] = float(pd.concat(errs).median())
    return df, summary


def measured_comm_s(res, phase: str, rank: int = 0) -> float:
    """Seconds rank ``rank`` spent inside collectives and sends/receives during ``phase`` of a measurement (from its
    captured events: each call's start and end; waiting for a slower peer included)."""
    return sum(max(float(ev.get("t_end", 0.0)) - float(ev.get("t_start", 0.0)), 0.0)
               for ev in res.events if ev.get("rank") == rank and ev.get("phase") == phase)


def validate_latency(cfgs: Iterable[Config], hw: Hardware, cores: int | None = None, runner: Callable | None = None,
                     progress: bool | None = None, reps: int = 1):
    """Measure each configuration ``reps`` times (real DeepSpeed ranks, one launch per model and layout:
    :func:`llmcomm.compare.sweeps.measure_configs`) and predict it with :func:`~llmcomm.predict.latency.predict_latency`
    on ``hw`` as calibrated for its layout (:func:`~llmcomm.predict.hardware.for_layout`: in-run calibration of
    another model; nothing is fitted to these runs), ``gpus_per_node`` = the cores (one machine).

    Returns one row per configuration: the config, ``<metric>_measured`` (the median over the repetitions) with
    ``<metric>_iqr`` (interquartile range) and ``<metric>_predicted`` for TTFT, TPOT, E2E, the per-phase breakdown
    (predicted compute and comm of one forward; measured time rank 0 spent in communication calls per forward,
    median), the threads per rank and the all-reduce path; then :func:`latency_errors` adds the signed errors."""
    if runner is None:
        from ..measure.launch import measure_many

        # The cpu-local calibration describes this machine's CPUs: validate against CPU runs even on a GPU node.
        runner = partial(measure_many, env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    cores = int(cores or os.cpu_count() or 1)
    cfgs = list(cfgs)
    runs: dict[Config, list] = {}
    # round robin (every configuration once, then again): a slow spell of the machine falls on all of them alike
    for cfg, model, res in measure_configs([cfg for _ in range(reps) for cfg in cfgs], runner, progress):
        runs.setdefault(cfg, []).append((model, res))
    rows = []
    for cfg in dict.fromkeys(cfgs):
        model = runs[cfg][0][0]
        results = [r for _, r in runs[cfg]]
        ranks = cfg.t * cfg.p
        pred = predict_latency(model, cfg.layout, cfg.workload, for_layout(hw, cfg.t, cfg.p, cores),
                               gpus_per_node=cores)
        pre, dec = pred["breakdown"]["prefill"], pred["breakdown"]["decode"]
        row = dict(asdict(cfg), ranks=ranks, threads=cpu_threads_per_rank(ranks, cores), reps=len(results),
                   allreduce=("shm" if cfg.p == 1 else "gloo") if cfg.t > 1 else "-")
        for metric in METRICS:
            vals = np.array([float(getattr(r, metric)) for r in results])
            row[f"{metric}_measured"] = float(np.median(vals))
            row[f"{metric}_iqr"] = float(np.subtract(*np.percentile(vals, [75, 25])))
            row[f"{metric}_predicted"] = float(pred[metric])
        row.update(prefill_compute_pred_s=pre["compute_s"], prefill_comm_pred_s=pre["comm_s"],
                   decode_compute_pred_s=dec["compute_s"], decode_comm_pred_s=dec["comm_s"],
                   prefill_comm_meas_s=float(np.median([measured_comm_s(r, "prefill") for r in results])),
                   decode_comm_meas_s=float(np.median([measured_comm_s(r, "decode") for r in results]))
                   / max(cfg.G - 1, 1))
        rows.append(row)
    return latency_errors(pd.DataFrame(rows))


def validate_time_runs(hw: Hardware, runs: int = 3, reps: int = 5, root=None, command: str | None = None,
                       log=None, calibrate: bool = True) -> list[dict]:
    """``llmcomm validate-time``: ``runs`` independent reruns of the latency sweep (:func:`validate_latency` of the
    ``latency`` configurations, every point ``reps`` times), each written as ``latency_validation_run<k>.csv`` with
    its sidecar (the load average before and after, the summary) under ``<root>/<machine>/`` (default ``data/``).
    ``calibrate`` (default): first calibrate the machine it runs on (:func:`llmcomm.compare.calibration.calibrate_machine`,
    written to the ``cpu-local`` calibration with this machine's provenance) and predict with that; else predict with
    ``hw`` as it is. Returns one summary per rerun, as each is written (``log`` is told too)."""
    from ..predict.hardware import load_hardware
    from ..record import data_dir, load_average, provenance, write_frame, writable_dir
    from .sweeps import configs

    out = writable_dir(data_dir(root=root), "validation output folder")
    if calibrate:
        from .calibration import calibrate_machine

        if hw.name != "cpu-local":
            raise SpecError(f"validate-time calibrates this machine as cpu-local; to validate {hw.name!r} as it is, "
                            "say so (--reuse-calibration)")
        calibrate_machine(command, log=(lambda msg: log({"calibration": msg})) if log else None)
        hw = load_hardware("cpu-local")
    summaries = []
    for run in range(1, runs + 1):
        load_before = load_average()
        df, summary = validate_latency(configs("latency", "cpu"), hw, reps=reps)
        prov = provenance(command or "llmcomm validate-time", run=run, reps=reps, load_avg_before=load_before,
                          load_avg_after=load_average())
        write_frame(out / f"latency_validation_run{run}.csv", df, prov, float_format="%.6g", summary=summary)
        summaries.append(dict(run=run, **summary, load_avg=load_before))
        if log:
            log(summaries[-1])
    return summaries


def load_runs(machine: str = "cpu-local") -> dict:
    """The committed reruns of the validation (``llmcomm validate-time``): ``{k: (frame, {"provenance",
    "summary"})}`` for every ``latency_validation_run<k>``."""
    import re

    from ..record import data_dir, read_sidecar

    out = {}
    for path in sorted(data_dir(machine).glob("latency_validation_run*.csv")):
        run = int(re.search(r"run(\d+)", path.name).group(1))
        out[run] = (pd.read_csv(path), read_sidecar(path))
    return out


def rerun_spread(runs: dict) -> dict:
    """How far the measurements themselves move between reruns (:func:`load_runs`, two or more): per rerun, the
    median over points and metrics (TTFT, TPOT where G > 1, E2E) of |measured / the mean of the other reruns'
    measurements − 1| — the scale below which a model's error cannot be told from the machine's. Returns
    ``{run: spread}``."""
    frames = {run: df.reset_index(drop=True) for run, (df, _) in runs.items()}
    out = {}
    for run, df in frames.items():
        others = [f for j, f in frames.items() if j != run]
        devs = []
        for metric in METRICS:
            rest = pd.concat([f[f"{metric}_measured"] for f in others], axis=1).mean(axis=1)
            keep = (df.G > 1) if metric == "tpot_s" else np.ones(len(df), dtype=bool)
            devs += list((df[f"{metric}_measured"] / rest - 1).abs()[keep])
        out[run] = float(np.median(devs)) if others else float("nan")
    return out


def explain(val: pd.DataFrame) -> str:
    """Prose generated from one validation frame: for each layout, the median signed error of TTFT and TPOT, and
    which half of the model it comes from — rank 0's measured time in communication calls beside the predicted
    communication, the rest beside the predicted compute (for p > 1 a receive also waits for the previous stage, so
    there only the totals compare)."""
    lines = []
    for (t, p), of_layout in val.groupby(["t", "p"]):
        ttft, tpot = of_layout.err_ttft.median(), of_layout.err_tpot.dropna().median()
        parts = [f"**t = {t} × p = {p}** ({len(of_layout)} points): TTFT {ttft:+.0%}, "
                 + (f"TPOT {tpot:+.0%}" if pd.notna(tpot) else "no decode")]
        if p == 1 and t > 1:
            comm = (of_layout.decode_comm_pred_s / of_layout.decode_comm_meas_s).median()
            rest = (of_layout.decode_compute_pred_s
                    / (of_layout.tpot_s_measured - of_layout.decode_comm_meas_s)).median()
            parts.append(f"per decode step the model's communication is {comm:.2f}× and its compute {rest:.2f}× "
                         "what the run spent in and outside its calls")
        elif p > 1:
            parts.append("a stage's receive includes the upstream stage's compute, so only the totals compare")
        lines.append("; ".join(parts) + ".")
    worst = val.assign(worst_err=val[["err_ttft", "err_tpot", "err_e2e"]].abs().max(axis=1)).sort_values(
        "worst_err").iloc[-1]
    lines.append(f"The largest miss is {worst.model} t = {worst.t} × p = {worst.p}, b = {worst.b}, S = {worst.S}, "
                 f"G = {worst.G}: TTFT {worst.err_ttft:+.0%}, TPOT "
                 + (f"{worst.err_tpot:+.0%}" if pd.notna(worst.err_tpot) else "—") + f", E2E {worst.err_e2e:+.0%}.")
    return "\n\n".join(lines)
