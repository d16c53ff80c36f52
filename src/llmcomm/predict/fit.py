"""α-β fits of microbenchmark results (``llmcomm bench-collectives`` tables).

For each (backend, op, group size n, link level) the fit is a least-squares solution of

    τ = steps(op, n) · α  +  f(op, n) · m · β

in the op's algorithm form (:mod:`llmcomm.predict.collectives`: ``steps`` sequential latency steps, ``f`` the busbw
factor — for the one-shot ``direct`` form the bytes one rank sends, (n−1) for an all-reduce:
:func:`llmcomm.predict.collectives.bytes_factor`), weighted by 1/time so that every size counts by its relative error (the 4 B points fix α, the 64 MiB points
fix β). α and β are constrained to be ≥ 0. Reported: ``alpha_us`` (per step), ``busbw_GBps`` = 1/β (the asymptotic bus
bandwidth), ``beta_ns_per_B``, ``r2`` (on log time) and ``median_rel_err``. A pooled fit over all measured n
(``group_size`` = "any") gives the parameters used for group sizes that were not measured. DeepSpeed's shm all-reduce
(backend ``shm``) takes one path below 1 MiB and another above (:func:`llmcomm.derive.conventions.shm_split`): its
table is cut there and each side fitted on its own (``path`` ``one-shot`` / ``two-phase``, one α per call each), which
the ``shm`` entries of the preset combine (:func:`llmcomm.predict.collectives.shm_time`). The ``cpu-local`` preset is
written from these fits by :func:`llmcomm.compare.calibration.calibrate_cpu_local` (``llmcomm calibrate``).

The GPU models are fitted here too (public kernel times, :mod:`llmcomm.compare.vidur` and
:mod:`llmcomm.compare.nccl_data`): GEMMs and memory-bound kernels (:func:`fit_gemm`, :func:`fit_memop`), NCCL's tuning
structure (:func:`fit_nccl`), send/recv (:func:`fit_nccl_sendrecv`) and the custom all-reduce kernels
(:func:`fit_custom_allreduce`).
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import SHM_ONE_SHOT_BELOW, bus_factor, canonical_op, latency_steps
from .collectives import bytes_factor

__all__ = ["fit_alpha_beta", "fit_table", "ALGORITHM_OF_BACKEND", "GEMM_VARIANTS", "fit_gemm", "fit_memop",
           "fit_nccl", "nccl_predict", "fit_nccl_sendrecv", "fit_custom_allreduce"]

#: algorithm form each backend's α is expressed in: DeepSpeed's shm all-reduce by size (one step per call on either
#: path), gloo and NCCL rings.
ALGORITHM_OF_BACKEND = {"shm": "shm", "gloo": "ring", "nccl": "ring"}


def fit_alpha_beta(op: str, n, size_bytes, seconds, algorithm: str = "ring") -> dict:
    """Fit α (s per step), β of ``τ = steps·α + bytes_factor·m·β`` over points that may mix group sizes: β per busbw
    byte for ring and tree, per byte one rank sends for ``direct`` (:func:`llmcomm.predict.collectives.bytes_factor`;
    ``busbw_GBps`` = 1/β is then that per-rank bandwidth, equal to the busbw at n = 2)."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    m = np.asarray(size_bytes, dtype=float)
    tau = np.asarray(seconds, dtype=float)
    n, m, tau = np.broadcast_arrays(n, m, tau)
    steps = np.asarray(latency_steps(op, n, algorithm), dtype=float) * np.ones_like(tau)
    fb = np.asarray(bytes_factor(op, n, algorithm), dtype=float) * m
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


def _robust_fit(residuals, starts, max_nfev: int = 400) -> tuple[np.ndarray, float]:
    """Best of scipy ``least_squares`` (soft-L1 on the residuals) from each start: (θ, cost)."""
    from scipy.optimize import least_squares

    best = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for x0 in starts:
            try:
                r = least_squares(residuals, np.asarray(x0, dtype=float), loss="soft_l1", f_scale=_LOSS_SCALE,
                                  max_nfev=max_nfev, x_scale="jac")
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


# NCCL's tuning structure (llmcomm.predict.collectives.nccl_time) fitted to kernel times of one system. θ (log space):
# LL latency, LL hop, LL inefficiency; LL128 latency above LL's, LL128 hop, LL128 inefficiency; Simple latency above
# LL128's, Simple hop; Simple's ring bus bandwidth per (table, n) present; NVLS latency and bandwidth; the floor.
# The base latencies are ordered LL ≤ LL128 ≤ Simple and the efficiencies are logistic (0, 1), so the branches
# cannot swap roles between folds.
def _nccl_layout(ops, n, with_nvls: bool, with_floor: bool) -> list[tuple]:
    """The parameters θ holds, in order: ``("bw", table, n)`` for each bandwidth, then ``("nvls",)``, ``("floor",)``."""
    ops, n = np.asarray(ops), np.asarray(n, dtype=float)
    slots = []
    for table in ("all_reduce", "all_gather"):
        of = (ops == "all_reduce") if table == "all_reduce" else (ops != "all_reduce")
        slots += [("bw", table, int(x)) for x in sorted(set(n[of].tolist()))]
    return slots + ([("nvls",)] if with_nvls else []) + ([("floor",)] if with_floor else [])


def _nccl_params(theta, slots) -> dict:
    th = np.clip(np.asarray(theta, dtype=float), -60, 60)
    ex = np.exp(th)
    lat_ll, lat_128, lat_simple = ex[0], ex[0] + ex[3], ex[0] + ex[3] + ex[6]
    params = {"protocols": {
        "LL": {"latency_s": float(lat_ll), "hop_s": float(ex[1]), "efficiency": float(1 / (1 + ex[2]))},
        "LL128": {"latency_s": float(lat_128), "hop_s": float(ex[4]), "efficiency": float(1 / (1 + ex[5]))},
        "Simple": {"latency_s": float(lat_simple), "hop_s": float(ex[7]), "efficiency": 1.0}},
        "ring_bytes_per_s": {}}
    i = 8
    for slot in slots:
        if slot[0] == "bw":
            params["ring_bytes_per_s"].setdefault(slot[1], {})[str(slot[2])] = float(ex[i])
            i += 1
        elif slot[0] == "nvls":
            params["nvls"] = {"latency_s": float(ex[i]), "bytes_per_s": float(ex[i + 1])}
            i += 2
        else:
            params["floor_s"] = float(ex[i])
            i += 1
    return params


def nccl_predict(ops, n, size_bytes, params, nvls=True):
    """Seconds of rows that may mix ops under the NCCL model ``params`` (one node; its ``floor_s`` when it has one):
    :func:`llmcomm.predict.collectives.nccl_time` op by op."""
    from .collectives import nccl_time

    ops = np.asarray(ops)
    n, m, nvls = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(size_bytes, dtype=float),
                                     np.asarray(nvls, dtype=bool))
    out = np.empty(n.shape)
    for op in np.unique(ops):
        at = ops == op
        out[at] = nccl_time(str(op), n[at], m[at], params, nvls=nvls[at], floor_s=params.get("floor_s", 0.0))
    return out


def _nccl_starts(ops, n, m, tau, slots) -> list[np.ndarray]:
    """Starting points from the data: each bandwidth at the best busbw measured for its (table, n) (or a multiple),
    latencies in µs or as fractions of the fastest call; six spreads of the latency split and the protocol
    efficiencies (the model is piecewise: a fold's minimum is often local)."""
    ops, n, m, tau = np.asarray(ops), np.asarray(n, dtype=float), np.asarray(m, dtype=float), np.asarray(tau)
    f = np.array([bus_factor(str(o), x) for o, x in zip(ops, n)])
    fast = float(np.min(tau))
    starts = []
    for lat, hop, ll_ineff, d128, hop128, ineff128, dsimple, hop_simple, bw_scale in (
            (0.5, 0.05, 1.0, 0.3, 0.1, 0.1, 0.5, 0.5, 1.1), (0.3, 0.1, 2.0, 0.8, 0.15, 0.2, 1.0, 1.0, 1.3),
            (0.7, 0.02, 0.5, 0.1, 0.05, 0.05, 2.0, 0.2, 1.0),
            (5e-6, 0.5e-6, 1.0, 2e-6, 1e-6, 0.1, 3e-6, 2e-6, 1.0), (3e-6, 1e-6, 2.0, 4e-6, 1.5e-6, 0.2, 5e-6, 3e-6, 0.7),
            (8e-6, 0.3e-6, 0.5, 1e-6, 0.5e-6, 0.05, 10e-6, 1e-6, 1.2)):
        unit = 1.0 if lat < 1e-3 else fast              # the last three in seconds, the first three × the fastest
        x0 = [lat * unit, hop * unit, ll_ineff, d128 * unit, hop128 * unit, ineff128, dsimple * unit,
              hop_simple * unit]
        for slot in slots:
            if slot[0] == "bw":
                of = ((ops == "all_reduce") == (slot[1] == "all_reduce")) & (n == slot[2])
                x0.append(bw_scale * float(np.max(f[of] * m[of] / tau[of])))
            elif slot[0] == "nvls":
                x0 += [2 * fast, float(np.max(m / tau))]
            else:
                x0.append(1.5 * fast)
        starts.append(np.log(x0))
    return starts


def fit_nccl(ops, n, size_bytes, seconds, nvls=True, with_nvls: bool = False, with_floor: bool = False) -> dict:
    """Fit NCCL's tuning structure (:func:`llmcomm.predict.collectives.nccl_time`) to kernel times of one system on
    one node: rows of ``ops`` (may mix all_reduce, all_gather, reduce_scatter), ``n`` ranks, ``size_bytes``;
    ``nvls``: whether each row's dtype allows NVLS. ``with_nvls``: the system has NVLink SHARP (the NVLS branch is
    kept only when it is the fastest for some all-reduce row of the fit, else dropped); ``with_floor``: the times
    were taken from eager launches that wait on each other (fit ``floor_s``). Protocol latencies, hops and
    efficiencies are shared by every op and n; Simple's bus bandwidth is one per (table, n)."""
    ops = np.asarray(ops)
    n, m, tau = (np.asarray(x, dtype=float) for x in (n, size_bytes, seconds))
    nvls = np.broadcast_to(np.asarray(nvls, dtype=bool), n.shape)
    slots = _nccl_layout(ops, n, with_nvls and bool((ops == "all_reduce").any()), with_floor)
    res = _log_residuals(lambda th: nccl_predict(ops, n, m, _nccl_params(th, slots), nvls), tau)
    theta, _ = _robust_fit(res, _nccl_starts(ops, n, m, tau, slots), max_nfev=2000)
    params = _nccl_params(theta, slots)
    if "nvls" in params:
        from .collectives import nccl_time

        ar = ops == "all_reduce"
        _, alg, _ = nccl_time("all_reduce", n[ar], m[ar], params, nvls=nvls[ar], detail=True)
        if not (np.asarray(alg) == "nvls").any():
            return fit_nccl(ops, n, m, tau, nvls, with_nvls=False, with_floor=with_floor)
    return params


def fit_custom_allreduce(n: int, size_bytes, seconds, with_floor: bool = False) -> dict:
    """Fit :func:`llmcomm.predict.collectives.custom_allreduce_time` (one-shot, and two-shot for n > 2; ``floor_s``
    with ``with_floor``: eager launches) to the times of one custom all-reduce on ``n`` ranks, every size the
    kernel took."""
    from .collectives import custom_allreduce_time

    m, tau = np.asarray(size_bytes, dtype=float), np.asarray(seconds, dtype=float)
    two = int(n) > 2

    def params(th):
        ex = np.exp(np.clip(th, -60, 60))
        out = {"one_shot_latency_s": float(ex[0]), "one_shot_bytes_per_s": float(ex[1])}
        i = 2
        if two:
            out.update(two_shot_latency_s=float(ex[0] + ex[2]), two_shot_bytes_per_s=float(ex[3]))
            i = 4
        if with_floor:
            out["floor_s"] = float(ex[i])
        return out

    fast, peak = float(tau.min()), float(np.max(m / tau))
    starts = []
    for lat, bw, dlat, bw2, fl in ((0.8, 1.0, 0.5, 2.0, 1.0), (0.5, 2.0, 1.0, 4.0, 0.9), (0.3, 0.5, 2.0, 1.0, 1.2)):
        x0 = [lat * fast, bw * peak] + ([dlat * fast, bw2 * peak] if two else []) + ([fl * fast] if with_floor else [])
        starts.append(np.log(x0))
    theta, _ = _robust_fit(_log_residuals(lambda th: custom_allreduce_time(n, m, params(th)), tau), starts)
    return params(theta)


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
