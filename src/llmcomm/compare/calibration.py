"""The ``cpu-local`` hardware preset: written from this machine's own measurements.

Collectives: the α-β fits (:mod:`llmcomm.predict.fit`) of a ``llmcomm bench-collectives`` table — all_reduce from
DeepSpeed's shm kernel (one-shot form), the other ops and the all-reduces of sub-groups from gloo (ring form).
Compute: :func:`llmcomm.measure.calibrate.time_compute` at every thread count the measured runs use, then the roofline
efficiency ``e_f`` and per-layer overhead ``o`` fitted so that :func:`llmcomm.predict.compute.layer_cost` reproduces
the measured prefill and decode layer times: ``τ = o + max(flops/(peak·e_f), bytes/bw)``.

``llmcomm calibrate`` (what ``make data`` runs after the microbenchmark) calls :func:`calibrate_cpu_local`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..measure.calibrate import time_compute
from ..predict.compute import layer_cost
from ..predict.fit import fit_table
from ..record import atomic_write_text, provenance
from ..spec import ModelSpec, cpu_threads_per_rank

__all__ = ["calibrate_cpu_local", "fit_roofline", "default_threads", "subgroup_fits"]


def _entry(r, backend: str) -> dict:
    return {"alpha_us": round(r["alpha_us"], 3), "busbw_GBps": round(r["busbw_GBps"], 4),
            "algorithm": r["algorithm"], "backend": backend, "r2": round(r["r2"], 4),
            "median_rel_err": round(r["median_rel_err"], 4)}


def default_threads(cores: int | None = None, ranks=(2, 4)) -> list[int]:
    """Thread counts the CPU runs use (:func:`llmcomm.spec.cpu_threads_per_rank`) for 2- and 4-rank runs."""
    return sorted({cpu_threads_per_rank(r, cores) for r in ranks})


def subgroup_fits(coll: dict, fits) -> dict:
    """The fits a TP sub-group of a hybrid uses on CPU: DeepSpeed's shm all-reduce ignores sub-groups, so there the
    all-reduce goes through gloo (ring form). ``{op: {n: FIT}}``; empty when the table has no gloo all_reduce."""
    sub = fits[(fits["op"] == "all_reduce") & (fits["backend"] == "gloo")]
    if sub.empty or coll.get("all_reduce", {}).get("any", coll.get("all_reduce", {}).get("2", {})).get(
            "backend") != "shm":
        return {}
    return {"all_reduce": {r["group_size"]: _entry(r, "gloo") for _, r in sub.iterrows()}}


def fit_roofline(timed: dict) -> tuple[float, float]:
    """(e_f, o): the flops efficiency and per-layer overhead with which the roofline reproduces both measured layer
    times of :func:`~llmcomm.measure.calibrate.time_compute` (a fixed point of the two equations)."""
    shape = timed["shape"]
    S, h, heads = shape["S"], shape["h"], shape["heads"]
    spec = ModelSpec(name="calibration", h=h, L=1, heads=heads, kv_heads=shape["kv_heads"], ffn=shape["ffn"], V=256,
                     tied=False, head_dim=h // heads)
    peak, bw = timed["peak_flops_fp32"], timed["mem_bw_Bps"]
    flops_pre, _ = (float(x) for x in layer_cost(spec, 1, 1, S, 0, (S + 1) / 2, 4))
    flops_dec, bytes_dec = (float(x) for x in layer_cost(spec, 1, 1, 1, S + 3, S + 4, 4))
    e_f, overhead = 1.0, 0.0
    for _ in range(50):
        overhead = max(0.0, timed["layer_decode_s"] - max(flops_dec / (peak * e_f), bytes_dec / bw))
        e_f = min(1.5, max(1e-3, flops_pre / (peak * max(timed["layer_prefill_s"] - overhead, 1e-9))))
    return e_f, overhead


def calibrate_cpu_local(csv_path, out_path=None, compute: bool = True, threads=None, existing=None,
                        command: str | None = None) -> dict:
    """Build the ``cpu-local`` preset from a bench-collectives CSV and, with ``compute``, from
    :func:`~llmcomm.measure.calibrate.time_compute` at every thread count in ``threads`` (default
    :func:`default_threads`), kept in ``compute_by_threads``; the top-level compute numbers are those of the first
    count. Writes JSON to ``out_path`` (atomically) when given."""
    import pandas as pd

    threads = default_threads() if threads is None else [int(x) for x in ([threads] if isinstance(threads, int)
                                                                          else threads)]
    df = pd.read_csv(csv_path)
    fits = fit_table(df)
    prev = json.loads(Path(existing).read_text()) if existing and Path(existing).exists() else {}
    coll: dict = {}
    src_backend = {"all_reduce": "shm" if (df["backend"] == "shm").any() else "gloo"}
    for op in sorted(set(fits["op"])):
        be = src_backend.get(op, "gloo")
        sub = fits[(fits["op"] == op) & (fits["backend"] == be)]
        if not sub.empty:
            coll[op] = {r["group_size"]: _entry(r, be) for _, r in sub.iterrows()}
    gl = fits[(fits["backend"] == "gloo") & (fits["op"] == "all_reduce")]
    gl_any = gl[gl["group_size"] == "any"]
    gl_row = (gl_any if not gl_any.empty else gl).iloc[0] if not gl.empty else None
    # everything on one machine: the inter-node "link" is a stand-in (the same loopback / shared memory)
    link = {"name": "loopback TCP (gloo ring) on this machine",
            "bw_GBps": round(gl_row["busbw_GBps"], 4) if gl_row is not None else 1.0, "efficiency": 1.0,
            "alpha_us": round(gl_row["alpha_us"], 3) if gl_row is not None else 100.0, "algorithm": "ring"}
    sub_coll = subgroup_fits(coll, fits)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    preset = {
        "name": "cpu-local",
        "device": "cpu",
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
            "collectives": f"alpha-beta fits of {csv_path} (llmcomm.predict.fit; all_reduce = DeepSpeed shm "
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
        by = {}
        for th in threads:
            timed = time_compute(threads=th)
            e_f, overhead = fit_roofline(timed)
            calib = dict(timed, eff_flops=e_f, layer_overhead_s=overhead)
            entry = {"mem_bw_GBps": round(timed["mem_bw_Bps"] / 1e9, 3),
                     "peak_tflops": {"fp32": round(timed["peak_flops_fp32"] / 1e12, 5)},
                     "efficiency": {"flops": round(e_f, 4), "mem_bw": 1.0},
                     "layer_overhead_us": round(overhead * 1e6, 2), "calibration": calib}
            if timed.get("peak_flops_bf16"):
                entry["peak_tflops"]["bf16"] = round(timed["peak_flops_bf16"] / 1e12, 5)
                entry["peak_tflops"]["fp16"] = entry["peak_tflops"]["bf16"]
            by[str(th)] = entry
        top = by[str(threads[0])]
        preset.update({x: top[x] for x in ("mem_bw_GBps", "peak_tflops", "efficiency", "layer_overhead_us")})
        preset["compute_calibration"] = top["calibration"]
        preset["compute_by_threads"] = by
        preset["source"].update({
            "compute_by_threads": "time_compute at each thread count the measured runs use (OMP_NUM_THREADS = "
                                  "cores // ranks); llmcomm.predict.hardware.for_ranks picks one per run",
            "peak_tflops": f"measured: best of torch.mm 1024^3 with {threads[0]} thread(s) "
                           "(llmcomm.measure.calibrate.time_compute)",
            "mem_bw_GBps": "measured: 64 MiB tensor copy (read + write bytes)",
            "efficiency": "fitted so that the roofline reproduces the measured per-layer prefill time (h=512, S=128)",
            "layer_overhead_us": "fitted from the measured per-layer decode time (Python/ATen dispatch per layer)"})
    prov = provenance(command or "llmcomm calibrate", collectives_csv=str(csv_path))
    bench = Path(csv_path).with_name("collectives.json")
    if bench.exists():
        b = json.loads(bench.read_text())
        prov["bench"] = {x: b.get(x) for x in ("cpu", "cpu_model", "date", "command", "wall_s", "git") if x in b}
    preset["calibration"] = prov
    if out_path:
        atomic_write_text(out_path, json.dumps(preset, indent=1) + "\n")
    return preset
