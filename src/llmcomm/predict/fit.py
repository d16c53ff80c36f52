"""α-β fits of microbenchmark results (``llmcomm bench-collectives`` tables).

For each (backend, op, group size n, link level) the fit is a least-squares solution of

    τ = steps(op, n) · α  +  f(op, n) · m · β

in the op's algorithm form (:mod:`llmcomm.predict.collectives`: ``steps`` sequential latency steps, ``f`` the busbw
factor), weighted by 1/time so that every size counts by its relative error (the 4 B points fix α, the 64 MiB points
fix β). α and β are constrained to be ≥ 0. Reported: ``alpha_us`` (per step), ``busbw_GBps`` = 1/β (the asymptotic bus
bandwidth), ``beta_ns_per_B``, ``r2`` (on log time) and ``median_rel_err``. A pooled fit over all measured n
(``group_size`` = "any") gives the parameters used for group sizes that were not measured. DeepSpeed's shm all-reduce
(backend ``shm``) takes one path below 1 MiB and another above (:func:`llmcomm.derive.conventions.shm_split`): its
table is cut there and each side fitted on its own (``path`` ``one-shot`` / ``two-phase``, one α per call each), which
the ``shm`` entries of the preset combine (:func:`llmcomm.predict.collectives.shm_time`). The ``cpu-local`` preset is
written from these fits by :func:`llmcomm.compare.calibration.calibrate_cpu_local` (``llmcomm calibrate``).
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import SHM_ONE_SHOT_BELOW, bus_factor, canonical_op, latency_steps

__all__ = ["fit_alpha_beta", "fit_table", "ALGORITHM_OF_BACKEND", "GEMM_VARIANTS", "fit_gemm", "fit_memop",
           "fit_nccl_allreduce", "fit_nccl_sendrecv"]

#: algorithm form each backend's α is expressed in: DeepSpeed's shm all-reduce by size (one step per call on either
#: path), gloo and NCCL rings.
ALGORITHM_OF_BACKEND = {"shm": "shm", "gloo": "ring", "nccl": "ring"}


def fit_alpha_beta(op: str, n, size_bytes, seconds, algorithm: str = "ring") -> dict:
    """Fit α (s per step), β (s per busbw byte) of ``τ = steps·α + f(n)·m·β`` over points that may mix group sizes."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    tau = np.asarray(seconds, dtype=float)
    n, m, tau = np.broadcast_arrays(n, m, tau)
    steps = np.asarray(latency_steps(op, n, algorithm), dtype=float) * np.ones_like(tau)
    fb = np.asarray(bus_factor(op, n), dtype=float) * m
    X = np.stack([steps, fb], axis=1) / tau[:, None]     # relative weighting
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
    pred = steps * alpha + fb * beta
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
    for (be, op, link), grp in df.groupby(keys):
        alg = ALGORITHM_OF_BACKEND.get(be, "ring")
        if alg == "shm" and canonical_op(op) == "all_reduce":
            parts = [("one-shot", grp[grp["bytes"] < SHM_ONE_SHOT_BELOW]),
                     ("two-phase", grp[grp["bytes"] >= SHM_ONE_SHOT_BELOW])]
        else:
            parts = [("", grp)]
        for path, gp in parts:
            if gp.empty:
                continue
            form = "direct" if path else alg             # either shm path: one step per call
            for n, gn in gp.groupby("group_size"):
                r = fit_alpha_beta(op, n, gn["bytes"], gn["time_s"], form)
                rows.append({"backend": be, "op": op, "group_size": str(int(n)), "link": link, **r,
                             "algorithm": alg if path else r["algorithm"], "path": path})
            if pooled and gp["group_size"].nunique() > 1:
                r = fit_alpha_beta(op, gp["group_size"], gp["bytes"], gp["time_s"], form)
                rows.append({"backend": be, "op": op, "group_size": "any", "link": link, **r,
                             "algorithm": alg if path else r["algorithm"], "path": path})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------------
# Kernel and NCCL models (llmcomm.predict.kernels, llmcomm.predict.collectives) fitted to measured kernel times.
# Every fit minimises Σ ρ(log(predicted/measured)) with scipy's soft-L1 loss ρ at a 5 % scale: errors count
# relatively, and a single odd kernel choice (a cuBLAS heuristic, an NCCL launch straggler) does not drag the
# physical parameters. Positive parameters are fitted in log space, from several starting points (the GEMM model is
# piecewise in M_g; a local minimum is likely from one start).
# ------------------------------------------------------------------------------------------------------------------
#: structural variants of the GEMM model tried per device; the one with the lowest training loss is kept (chosen
#: inside each validation fold, like the continuous parameters)
GEMM_VARIANTS = {
    "tile128x128_wave_alt64x64": dict(tm=128, tn=128, wave_quant=True, alt_tiles=[(64, 64, 0.8)]),
    "tile128x128_nowave_alt64x64": dict(tm=128, tn=128, wave_quant=False, alt_tiles=[(64, 64, 0.8)]),
    "tile128x128_wave_alt64x128": dict(tm=128, tn=128, wave_quant=True, alt_tiles=[(64, 128, 0.8)]),
    "tile128x128_nowave_alt64x128": dict(tm=128, tn=128, wave_quant=False, alt_tiles=[(64, 128, 0.8)]),
    "tile128x256_wave_alt64x64": dict(tm=128, tn=256, wave_quant=True, alt_tiles=[(64, 64, 0.8)]),
    "tile128x256_nowave_alt64x64": dict(tm=128, tn=256, wave_quant=False, alt_tiles=[(64, 64, 0.8)]),
}
_LOSS_SCALE = 0.05


def _robust_fit(residuals, starts) -> tuple[np.ndarray, float]:
    """Best of scipy ``least_squares`` (soft-L1 on the residuals) from each start: (θ, cost)."""
    from scipy.optimize import least_squares

    best = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for x0 in starts:
            try:
                r = least_squares(residuals, np.asarray(x0, dtype=float), loss="soft_l1", f_scale=_LOSS_SCALE,
                                  max_nfev=400, x_scale="jac")
            except ValueError:                   # a start whose residuals are not finite
                continue
            if best is None or r.cost < best.cost:
                best = r
    if best is None:
        raise ValueError("no starting point gave finite residuals")
    return best.x, float(best.cost)


def _log_residuals(model, measured):
    measured = np.asarray(measured, dtype=float)

    def res(theta):
        r = np.log(model(theta) / measured)
        return np.where(np.isfinite(r), r, 10.0)
    return res


def _gemm_params(theta, base):
    params = dict(base)
    params.update(flops_per_s=float(np.exp(theta[0])), bytes_per_s=float(np.exp(theta[1])),
                  t0=float(np.exp(theta[2])), norm_order=float(1.0 + np.exp(np.clip(theta[3], -10, 5))),
                  K0=float(np.exp(np.clip(theta[4], -20, 10))))
    if len(theta) > 5:
        eff = float(1.0 / (1.0 + np.exp(-theta[5])))
        params["alt_tiles"] = [[tm, tn, eff] for tm, tn, _ in base["alt_tiles"]]
    return params


def fit_gemm(M_g, N_g, K_g, seconds, sm: int, w: int = 2, variants=None) -> dict:
    """Fit the GEMM model (flops_per_s, bytes_per_s, t0, norm_order, K0, the alternative tile's efficiency) of a
    device with ``sm`` SMs to kernel times of GEMMs [M_g, K_g]×[K_g, N_g], for every structural variant; returns
    the best variant's parameters (``"variant"`` names it)."""
    from .kernels import DEFAULT_SPLITS, gemm_time

    M_g, N_g, K_g, seconds = (np.asarray(x, dtype=float) for x in (M_g, N_g, K_g, seconds))
    best = None
    for name, v in (variants or GEMM_VARIANTS).items():
        base = dict(sm=sm, tm_small=64, m_small=64, kmin=128, splits=list(DEFAULT_SPLITS), **v)
        res = _log_residuals(lambda th, base=base: gemm_time(M_g, N_g, K_g, w, _gemm_params(th, base)), seconds)
        starts = [np.r_[np.log(x0), 1.4] for x0 in ((700e12, 2e12, 4e-6, 1.0, 64.0),
                                                     (300e12, 1.5e12, 4e-6, 3.0, 256.0),
                                                     (900e12, 3e12, 3e-6, 0.5, 16.0))]
        theta, cost = _robust_fit(res, starts)
        if best is None or cost < best[1]:
            best = (_gemm_params(theta, base), cost, name)
    params, _, name = best
    return dict(params, variant=name)


def fit_memop(nbytes, row_bytes, seconds) -> dict:
    """Fit t0, bytes_per_s, b_row of :func:`llmcomm.predict.kernels.memop_time` to kernel times of one kernel
    kind."""
    from .kernels import memop_time

    nbytes, row_bytes = np.asarray(nbytes, dtype=float), np.asarray(row_bytes, dtype=float)

    def params(th):
        return dict(t0=float(np.exp(th[0])), bytes_per_s=float(np.exp(th[1])),
                    b_row=float(np.exp(min(th[2], np.log(1e15)))))

    theta, _ = _robust_fit(_log_residuals(lambda th: memop_time(nbytes, row_bytes, params(th)), seconds),
                           [np.log([3e-6, 1e12, 1e10]), np.log([1e-6, 2e12, 3e9])])
    return params(theta)


def _allreduce_params(theta, with_ll: bool, bw_growth: bool) -> dict:
    """θ = log[floor_s, latency_ll_s, step_ll_s, bw_ll, Δlatency, Δstep, Δbw], bw_growth: the Simple branch is the
    LL branch plus positive latency and bandwidth increments, so the branches cannot swap roles."""
    floor, lat_ll, step_ll, bw_ll, dlat, dstep, dbw = np.exp(np.clip(theta[:7], -60, 60))
    params = dict(floor_s=float(floor), bw_growth=float(theta[7]) if bw_growth else 0.0)
    if with_ll:
        params.update(latency_s=float(lat_ll + dlat), step_s=float(step_ll + dstep), bytes_per_s=float(bw_ll + dbw),
                      latency_ll_s=float(lat_ll), step_ll_s=float(step_ll), ll_efficiency=float(bw_ll / (bw_ll + dbw)))
    else:
        params.update(latency_s=float(lat_ll), step_s=float(step_ll), bytes_per_s=float(bw_ll))
    return params


def fit_nccl_allreduce(size_bytes, n, seconds, with_ll: bool = True, bw_growth: bool = True) -> dict:
    """Fit the NCCL all-reduce model (:func:`llmcomm.predict.collectives.nccl_ring_time`) to kernel times of one
    system; rows may mix group sizes (that separates the per-step latency from the fixed one and fixes the bandwidth
    growth with n, ``bw_growth``; ``bw_growth=False`` holds it at 0)."""
    from .collectives import nccl_ring_time

    m, n = np.asarray(size_bytes, dtype=float), np.asarray(n, dtype=float)
    res = _log_residuals(lambda th: nccl_ring_time("all_reduce", n, m, _allreduce_params(th, with_ll, bw_growth)),
                         seconds)
    starts = [np.r_[np.log(x0[:7]), x0[7]] for x0 in (
        (40e-6, 15e-6, 1e-6, 100e9, 20e-6, 3e-6, 100e9, 0.2), (40e-6, 10e-6, 0.5e-6, 50e9, 30e-6, 5e-6, 150e9, 0.2),
        (30e-6, 20e-6, 2e-6, 200e9, 10e-6, 1e-6, 100e9, 0.1), (50e-6, 5e-6, 1e-6, 20e9, 5e-6, 1e-6, 10e9, 0.0))]
    theta, _ = _robust_fit(res, starts)
    return _allreduce_params(theta, with_ll, bw_growth)


def fit_nccl_sendrecv(size_bytes, seconds, chunk: int = 2 ** 20) -> dict:
    """Fit floor_s, latency_s, bytes_per_s, chunk_s of :func:`llmcomm.predict.collectives.nccl_sendrecv_time`
    (chunk_bytes fixed at ``chunk`` = 1 MiB)."""
    from .collectives import nccl_sendrecv_time

    m = np.asarray(size_bytes, dtype=float)

    def params(th):
        return dict(floor_s=float(np.exp(th[0])), latency_s=float(np.exp(th[1])), bytes_per_s=float(np.exp(th[2])),
                    chunk_s=float(np.exp(th[3])), chunk_bytes=float(chunk))

    theta, _ = _robust_fit(_log_residuals(lambda th: nccl_sendrecv_time(m, params(th)), seconds),
                           [np.log(x0) for x0 in ((10e-6, 8e-6, 200e9, 1e-6), (20e-6, 20e-6, 30e9, 0.1e-6),
                                                  (5e-6, 5e-6, 300e9, 2e-6), (15e-6, 25e-6, 5e9, 1e-6))])
    return params(theta)
