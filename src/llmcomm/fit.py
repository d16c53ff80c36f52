"""α-β fits of microbenchmark results, and the calibration that writes the ``cpu-local`` hardware preset.

For each (backend, op, group size n, link level) the fit is a least-squares solution of

    time = k_α(op, n) · α  +  f(op, n) · S · β

in the op's algorithm form (:mod:`llmcomm.collectives`: ``k_α`` sequential steps, ``f`` the busbw factor), weighted
by 1/time so that every size counts by its relative error (the 4 B points fix α, the 64 MiB points fix β). α and β are
constrained to be ≥ 0. Reported: ``alpha_us`` (per step), ``busbw_GBps`` = 1/β (the asymptotic bus bandwidth),
``beta_ns_per_B``, ``r2`` (on log time) and ``median_rel_err``. A pooled fit over all measured n (``group_size`` =
"any") gives the parameters used for group sizes that were not measured.

Command (the calibration of this machine; `make data` runs it after the microbenchmark; ~20 s on 2 cores)::

    python -m llmcomm.fit --csv data/cpu-local/collectives.csv --compute \
        --write src/llmcomm/presets/hardware/cpu-local.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .collectives import busbw_factor, canonical_op, latency_steps

__all__ = ["fit_alpha_beta", "fit_table", "ALGORITHM_OF_BACKEND", "calibrate_cpu_local", "default_threads",
           "subgroup_fits", "main"]

#: algorithm form each backend's α is expressed in: DeepSpeed's shm all-reduce is one-shot (every rank reads every
#: other rank's buffer), gloo and NCCL rings.
ALGORITHM_OF_BACKEND = {"shm": "direct", "gloo": "ring", "nccl": "ring"}


def fit_alpha_beta(op: str, n, size_bytes, time_s, algorithm: str = "ring") -> dict:
    """Fit α (s per step), β (s per busbw byte) of ``time = k_α·α + f·S·β`` over points that may mix group sizes."""
    op = canonical_op(op)
    n = np.asarray(n, dtype=float)
    S = np.asarray(size_bytes, dtype=float)
    T = np.asarray(time_s, dtype=float)
    n, S, T = np.broadcast_arrays(n, S, T)
    ka = np.asarray(latency_steps(op, n, algorithm), dtype=float) * np.ones_like(T)
    fb = np.asarray(busbw_factor(op, n), dtype=float) * S
    X = np.stack([ka, fb], axis=1) / T[:, None]         # relative weighting
    y = np.ones_like(T)
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
        lt, lp = np.log(T), np.log(np.maximum(pred, 1e-30))
    ss_res = float(np.sum((lt - lp) ** 2))
    ss_tot = float(np.sum((lt - lt.mean()) ** 2)) or 1.0
    return {"alpha_s": float(alpha), "beta_s_per_B": float(beta), "alpha_us": float(alpha) * 1e6,
            "busbw_GBps": (1.0 / beta / 1e9) if beta > 0 else float("inf"), "beta_ns_per_B": float(beta) * 1e9,
            "r2": 1.0 - ss_res / ss_tot, "median_rel_err": float(np.median(np.abs(pred - T) / T)),
            "max_rel_err": float(np.max(np.abs(pred - T) / T)), "n_points": int(T.size), "algorithm": algorithm,
            "min_bytes": int(S.min()), "max_bytes": int(S.max())}


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


def _entry(r, backend: str) -> dict:
    return {"alpha_us": round(r["alpha_us"], 3), "busbw_GBps": round(r["busbw_GBps"], 4),
            "algorithm": r["algorithm"], "backend": backend, "r2": round(r["r2"], 4),
            "median_rel_err": round(r["median_rel_err"], 4)}


def default_threads(cores: int | None = None, ranks=(2, 4)) -> list[int]:
    """Thread counts the CPU runs use: ``cores // ranks`` (at least 1) for 2- and 4-rank runs (launch.default_env)."""
    cores = int(cores or os.cpu_count() or 1)
    return sorted({max(1, cores // r) for r in ranks})


def subgroup_fits(coll: dict, fits) -> dict:
    """The fits a TP sub-group of a hybrid uses on CPU: DeepSpeed's shm all-reduce ignores sub-groups, so there the
    all-reduce goes through gloo (ring form). ``{op: {n: FIT}}``; empty when the CSV has no gloo all_reduce."""
    sub = fits[(fits["op"] == "all_reduce") & (fits["backend"] == "gloo")]
    if sub.empty or coll.get("all_reduce", {}).get("any", coll.get("all_reduce", {}).get("2", {})).get(
            "backend") != "shm":
        return {}
    return {"all_reduce": {r["group_size"]: _entry(r, "gloo") for _, r in sub.iterrows()}}


def calibrate_cpu_local(csv_path, out_path=None, compute: bool = True, threads=None, existing=None,
                        command: str | None = None) -> dict:
    """Build the ``cpu-local`` preset from a bench-collectives CSV (shm all_reduce, gloo for the other ops and for
    all-reduces on sub-groups) and, with ``compute``, from :func:`llmcomm.timing.calibrate_compute` run at every
    thread count in ``threads`` (default :func:`default_threads`: the ``OMP_NUM_THREADS`` the measured runs use),
    kept in ``compute_by_threads``; the top-level compute numbers are those of the first (2-rank) count. Writes JSON
    to ``out_path`` when given."""
    if threads is None:
        threads = default_threads()
    threads = [int(x) for x in ([threads] if isinstance(threads, int) else threads)]
    import pandas as pd

    df = pd.read_csv(csv_path)
    fits = fit_table(df)
    prev = {}
    if existing and Path(existing).exists():
        prev = json.loads(Path(existing).read_text())
    coll: dict = {}
    src_backend = {"all_reduce": "shm" if (df["backend"] == "shm").any() else "gloo"}
    for op in sorted(set(fits["op"])):
        be = src_backend.get(op, "gloo")
        sub = fits[(fits["op"] == op) & (fits["backend"] == be)]
        if sub.empty:
            continue
        coll[op] = {r["group_size"]: _entry(r, be) for _, r in sub.iterrows()}
    gl = fits[(fits["backend"] == "gloo") & (fits["op"] == "all_reduce")]
    gl_any = gl[gl["group_size"] == "any"]
    gl_row = (gl_any if not gl_any.empty else gl).iloc[0] if not gl.empty else None
    # everything on one machine: the inter-node "link" is a stand-in (the same loopback / shared memory)
    link = {"name": "loopback TCP (gloo ring) on this machine", "bw_GBps": round(gl_row["busbw_GBps"], 4) if gl_row
            is not None else 1.0, "efficiency": 1.0, "alpha_us": round(gl_row["alpha_us"], 3) if gl_row is not None
            else 100.0, "algorithm": "ring"}
    sub_coll = subgroup_fits(coll, fits)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    preset = {
        "name": "cpu-local",
        "description": "this machine, calibrated from its own microbenchmarks (bench-collectives) and a timed "
                       "decoder-layer forward; ranks are processes on one node, one core each",
        "gpus_per_node": os.cpu_count() or 1,
        "memory_gib": round(mem_gib, 2),
        "reserve_fraction": 0.25,
        "mem_bw_GBps": prev.get("mem_bw_GBps", 10.0),
        "peak_tflops": prev.get("peak_tflops", {"fp32": 0.05, "bf16": 0.01}),
        "efficiency": prev.get("efficiency", {"flops": 1.0, "mem_bw": 1.0}),
        "layer_overhead_us": prev.get("layer_overhead_us", 0.0),
        "links": {"intra": link, "inter": dict(link, name="stand-in: the same loopback (one machine, no network)")},
        "collectives": {"intra": coll, "inter": coll},
        "subgroup_collectives": {"intra": sub_coll, "inter": sub_coll} if sub_coll else {},
        "fits": json.loads(fits.to_json(orient="records")),
        "source": {
            "collectives": f"alpha-beta fits of {csv_path} (llmcomm.fit; all_reduce = DeepSpeed shm "
                           "inference_all_reduce, one-shot form; other ops = gloo, ring form)",
            "links": "gloo all_reduce fit (pooled over group sizes); 'inter' is a stand-in: this is one machine",
            "memory_gib": "os.sysconf physical pages of this machine",
            "reserve_fraction": "ASSUMPTION: Python, torch and the OS keep ~25% of RAM",
            "gpus_per_node": "the cores of this machine (one rank per core at most)",
            "subgroup_collectives": "gloo all_reduce fits: DeepSpeed's shm all-reduce ignores sub-groups, so the "
                                    "TP groups of a hybrid all-reduce through gloo",
        },
    }
    if compute:
        from .timing import calibrate_compute

        by = {}
        for th in threads:
            c = calibrate_compute(threads=th)
            e = {"mem_bw_GBps": round(c["mem_bw_Bps"] / 1e9, 3),
                 "peak_tflops": {"fp32": round(c["peak_flops_fp32"] / 1e12, 5)},
                 "efficiency": {"flops": round(c["eff_flops"], 4), "mem_bw": 1.0},
                 "layer_overhead_us": round(c["layer_overhead_s"] * 1e6, 2), "calibration": c}
            if c.get("peak_flops_bf16"):
                e["peak_tflops"]["bf16"] = round(c["peak_flops_bf16"] / 1e12, 5)
                e["peak_tflops"]["fp16"] = e["peak_tflops"]["bf16"]
            by[str(th)] = e
        top = by[str(threads[0])]
        preset.update({k: top[k] for k in ("mem_bw_GBps", "peak_tflops", "efficiency", "layer_overhead_us")})
        preset["compute_calibration"] = top["calibration"]
        preset["compute_by_threads"] = by
        preset["source"].update({
            "compute_by_threads": "calibrate_compute at each thread count the measured runs use (OMP_NUM_THREADS = "
                                  "cores // ranks); llmcomm.timing.hardware_for_ranks picks one per run",
            "peak_tflops": f"measured: best of torch.mm 1024^3 with {threads[0]} thread(s) "
                           "(llmcomm.timing.calibrate_compute)",
            "mem_bw_GBps": "measured: 64 MiB tensor copy (read + write bytes)",
            "efficiency": "fitted so that the roofline reproduces the measured per-layer prefill time (h=512, S=128)",
            "layer_overhead_us": "fitted from the measured per-layer decode time (Python/ATen dispatch per layer)"})
    import deepspeed
    import torch

    preset["calibration"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "command": command or "llmcomm.fit.calibrate_cpu_local",
                             "collectives_csv": str(csv_path), "torch": torch.__version__,
                             "deepspeed": deepspeed.__version__}
    prov = Path(csv_path).with_name("collectives.provenance.json")
    if prov.exists():
        p = json.loads(prov.read_text())
        preset["calibration"]["bench"] = {k: p.get(k) for k in ("cpu_model", "date", "command", "wall_s")}
    if out_path:
        Path(out_path).write_text(json.dumps(preset, indent=1) + "\n")
    return preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmcomm.fit", description="α-β fits of bench-collectives results")
    ap.add_argument("--csv", default="data/cpu-local/collectives.csv")
    ap.add_argument("--write", help="write the cpu-local hardware preset JSON here")
    ap.add_argument("--compute", action="store_true", help="also calibrate compute (matmul, bandwidth, a layer)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch threads of the compute calibration (default: cores // ranks for 2 and 4 ranks)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import pandas as pd

    fits = fit_table(pd.read_csv(args.csv))
    if args.json:
        print(fits.to_json(orient="records"))
    else:
        cols = ["backend", "op", "group_size", "algorithm", "alpha_us", "busbw_GBps", "r2", "median_rel_err",
                "n_points"]
        print(fits[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if args.write:
        calibrate_cpu_local(args.csv, args.write, compute=args.compute, threads=args.threads, existing=args.write,
                            command="python -m llmcomm.fit " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
