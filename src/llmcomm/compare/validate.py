"""The time model checked against real runs: measure each configuration, predict it from the calibration alone,
report the errors.

Nothing here is fitted to the runs it checks: the prediction uses the ``cpu-local`` preset (written by
``llmcomm calibrate`` from microbenchmarks and timed layers, :mod:`llmcomm.compare.calibration`) at the thread count
each rank runs with (:func:`llmcomm.predict.hardware.for_ranks`).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from functools import partial
from typing import Callable, Iterable

import pandas as pd

from ..predict.hardware import Hardware, for_ranks
from ..predict.latency import METRICS, predict_latency
from ..spec import cpu_threads_per_rank
from .sweeps import Config, measure_configs

__all__ = ["latency_errors", "measured_comm_s", "validate_latency", "METRICS"]


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
    summary = {f"median_abs_err_{metric[:-2]}": float(e.median()) for metric, e in zip(METRICS, errs)}
    summary["median_abs_err"] = float(pd.concat(errs).median())
    return df, summary


def measured_comm_s(res, phase: str, rank: int = 0) -> float:
    """Seconds rank ``rank`` spent inside collectives and sends/receives during ``phase`` of a measurement (from its
    captured events: each call's start and end; waiting for a slower peer included)."""
    return sum(max(float(e.get("t_end", 0.0)) - float(e.get("t_start", 0.0)), 0.0)
               for e in res.events if e.get("rank") == rank and e.get("phase") == phase)


def validate_latency(cfgs: Iterable[Config], hw: Hardware, cores: int | None = None, runner: Callable | None = None,
                     progress: bool | None = None):
    """Measure each configuration (real DeepSpeed ranks, one launch per model and layout:
    :func:`llmcomm.compare.sweeps.measure_configs`) and predict it
    with :func:`~llmcomm.predict.latency.predict_latency` on ``hw`` at the rank's thread count (the calibration only —
    nothing is fitted to these runs), ``gpus_per_node`` = the cores (one machine).

    Returns one row per configuration: the config, ``<metric>_measured`` / ``<metric>_predicted`` for TTFT, TPOT,
    E2E, the per-phase breakdown (predicted compute and comm of one forward; measured time rank 0 spent in
    communication calls per forward), the threads per rank and the all-reduce path; then :func:`latency_errors`
    adds the signed errors."""
    if runner is None:
        from ..measure.launch import measure_many

        # The cpu-local calibration describes this machine's CPUs: validate against CPU runs even on a GPU node.
        runner = partial(measure_many, env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    cores = int(cores or os.cpu_count() or 1)
    rows = []
    for c, model, res in measure_configs(cfgs, runner, progress):
        ranks = c.t * c.p
        pred = predict_latency(model, c.layout, c.workload, for_ranks(hw, ranks, cores), gpus_per_node=cores)
        pre, dec = pred["breakdown"]["prefill"], pred["breakdown"]["decode"]
        row = dict(asdict(c), ranks=ranks, threads=cpu_threads_per_rank(ranks, cores),
                   allreduce=("shm" if c.p == 1 else "gloo") if c.t > 1 else "-")
        for metric in METRICS:
            row[f"{metric}_measured"] = float(getattr(res, metric))
            row[f"{metric}_predicted"] = float(pred[metric])
        row.update(prefill_compute_pred_s=pre["compute_s"], prefill_comm_pred_s=pre["comm_s"],
                   decode_compute_pred_s=dec["compute_s"], decode_comm_pred_s=dec["comm_s"],
                   prefill_comm_meas_s=measured_comm_s(res, "prefill"),
                   decode_comm_meas_s=measured_comm_s(res, "decode") / max(c.G - 1, 1))
        rows.append(row)
    return latency_errors(pd.DataFrame(rows))
