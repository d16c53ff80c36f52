"""α-β fits of microbenchmark results (``llmcomm bench-collectives`` tables).

For each (backend, op, group size n, link level) the fit is a least-squares solution of

    τ = k_α(op, n) · α  +  f(op, n) · m · β

in the op's algorithm form (:mod:`llmcomm.predict.collectives`: ``k_α`` sequential steps, ``f`` the busbw factor), weighted
by 1/time so that every size counts by its relative error (the 4 B points fix α, the 64 MiB points fix β). α and β are
constrained to be ≥ 0. Reported: ``alpha_us`` (per step), ``busbw_GBps`` = 1/β (the asymptotic bus bandwidth),
``beta_ns_per_B``, ``r2`` (on log time) and ``median_rel_err``. A pooled fit over all measured n (``group_size`` =
"any") gives the parameters used for group sizes that were not measured. The ``cpu-local`` preset is written from
these fits by :func:`llmcomm.compare.calibration.calibrate_cpu_local` (``llmcomm calibrate``).
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import bus_factor, canonical_op
from .collectives import latency_steps

__all__ = ["fit_alpha_beta", "fit_table", "ALGORITHM_OF_BACKEND"]

#: algorithm form each backend's α is expressed in: DeepSpeed's shm all-reduce is one-shot (every rank reads every
#: other rank's buffer), gloo and NCCL rings.
ALGORITHM_OF_BACKEND = {"shm": "direct", "gloo": "ring", "nccl": "ring"}


def fit_alpha_beta(op: str, n, size_bytes, seconds, algorithm: str = "ring") -> dict:
    """Fit α (s per step), β (s per busbw byte) of ``τ = k_α·α + f(n)·m·β`` over points that may mix group sizes."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    tau = np.asarray(seconds, dtype=float)
    n, m, tau = np.broadcast_arrays(n, m, tau)
    ka = np.asarray(latency_steps(op, n, algorithm), dtype=float) * np.ones_like(tau)
    fb = np.asarray(bus_factor(op, n), dtype=float) * m
    X = np.stack([ka, fb], axis=1) / tau[:, None]         # relative weighting
    y = np.ones_like(tau)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    alpha, beta = coef
    if alpha < 0 or beta <= 0:                           # constrained: refit the other with one clamped at 0
        cands = []
        a1 = float(np.dot(X[:, 0], y) / np.dot(X[:, 0], X[:, 0])) if np.any(X[:, 0]) else 0.0
        cands.append((max(a1, 0.0), 0.0))
        b1 = float(np.dot(X[:, 1], y) / np.dot(X[:, 1], X[:, 1]))
        cands.append((0.0, max(b1, 0.0)))
        if alpha >= 0 and beta > 0:
            cands.append((alpha, beta))
        alpha, beta = min(cands, key=lambda ab: float(np.sum((X @ np.array(ab) - y) ** 2)))
    pred = ka * alpha + fb * beta
    with np.errstate(divide="ignore"):
        lt, lp = np.log(tau), np.log(np.maximum(pred, 1e-30))
    ss_res = float(np.sum((lt - lp) ** 2))
    ss_tot = float(np.sum((lt - lt.mean()) ** 2)) or 1.0
    return {"alpha_s": float(alpha), "beta_s_per_B": float(beta), "alpha_us": float(alpha) * 1e6,
            "busbw_GBps": (1.0 / beta / 1e9) if beta > 0 else float("inf"), "beta_ns_per_B": float(beta) * 1e9,
            "r2": 1.0 - ss_res / ss_tot, "median_rel_err": float(np.median(np.abs(pred - tau) / tau)),
            "max_rel_err": float(np.max(np.abs(pred - tau) / tau)), "n_points": int(tau.size), "algorithm": algorithm,
            "min_bytes": int(m.min()), "max_bytes": int(m.max())}


def fit_table(df, pooled: bool = True):
    """One fit row per (backend, op, group_size, link) of a bench-collectives table, plus pooled "any" rows."""
    import pandas as pd

    if "link" not in df.columns:
        df = df.assign(link="intra")
    rows = []
    keys = ["backend", "op", "link"]
    for (be, op, link), g in df.groupby(keys):
        alg = ALGORITHM_OF_BACKEND.get(be, "ring")
        for n, gn in g.groupby("group_size"):
            r = fit_alpha_beta(op, n, gn["bytes"], gn["time_s"], alg)
            rows.append({"backend": be, "op": op, "group_size": str(int(n)), "link": link, **r})
        if pooled and g["group_size"].nunique() > 1:
            r = fit_alpha_beta(op, g["group_size"], g["bytes"], g["time_s"], alg)
            rows.append({"backend": be, "op": op, "group_size": "any", "link": link, **r})
    return pd.DataFrame(rows)
