"""The CPU kernel model of this machine, fitted to :func:`llmcomm.measure.calibrate.time_cpu_kernels`.

Where a CPU rank's time goes (torch profiler over decode steps and prefills of the validated models; the book's
chapter "Time" shows the breakdown): the GEMMs of the linear layers, and a host time per decoder layer that does not
depend on its shape — Python module calls and some forty small ATen ops (norms, rotary, cache update, views), each a
few microseconds — plus a host time per forward outside the layers (embedding, final norm, the argmax, the HF model
and cache bookkeeping). The GEMMs of a CPU BLAS take two paths: one token (M_g = 1) is a matrix-vector product that
streams the weights at one rate, two or more tokens a blocked GEMM that streams them at a lower one (it packs them)
until it becomes compute-bound — on the development machine a decode step of b = 2 costs 1.7× that of b = 1 with the
same weights. So the model (:mod:`llmcomm.predict.kernels`, ``kernels`` section of the calibration) is:

* GEMM: ``t0 + smooth-max_q(w·bytes / rate(M_g), 2·M_g·N_g·K_g / flops_per_s)`` with rate = ``gemv_bytes_per_s``
  when M_g = 1, else ``bytes_per_s`` (:func:`fit_cpu_gemm`: robust least squares on log times of the GEMM grid);
* memory-bound ops and attention: their bytes at ``memops_bytes_per_s`` (the residual of the timed prefills of a
  calibration-shaped layer once GEMMs and host time are taken out: HF's eager norms and rotary make several passes
  over the activations where a fused kernel makes one);
* host time per decoder layer and per forward, per phase (``host_us``: the layers of the tiny shape, whose kernels
  are negligible, less the model's kernel time for them; the 1-layer forward less what the model charges for it).

Nothing here sees a validated model: the GEMM shapes and the layer shapes are generic
(:data:`llmcomm.measure.calibrate.CPU_GEMM_SHAPES`, :data:`~llmcomm.measure.calibrate.CPU_LAYER_SHAPES`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..predict.kernels import gemm_time, layer_ops, op_times
from ..spec import ModelSpec

__all__ = ["fit_cpu_gemm", "fit_cpu_kernels", "cpu_kernel_errors"]


def fit_cpu_gemm(rows) -> dict:
    """GEMM parameters ``{"flops_per_s", "bytes_per_s", "gemv_bytes_per_s", "t0", "norm_order"}`` fitted to timed
    rows ``{"M", "K", "N", "seconds"}`` (fp32), with the median |relative error| in sample (``median_rel_err``)."""
    from scipy.optimize import least_squares

    M_g, K_g, N_g, sec = (np.array([float(r[x]) for r in rows]) for x in ("M", "K", "N", "seconds"))

    def params(theta):
        f, bw, bv, t0, q = np.exp(theta)
        return {"flops_per_s": f, "bytes_per_s": bw, "gemv_bytes_per_s": bv, "t0": t0, "norm_order": q}

    def resid(theta):
        return np.log(gemm_time(M_g, N_g, K_g, 4, params(theta)) / sec)

    x0 = np.log([5e10, 8e9, 1.5e10, 5e-6, 2.0])
    with np.errstate(over="ignore"):                   # the search visits orders q → 0, where the norm is inf
        fit = least_squares(resid, x0, loss="soft_l1", f_scale=0.05)
    out = {name: float(v) for name, v in params(fit.x).items()}
    out["median_rel_err"] = float(np.median(np.abs(np.exp(resid(fit.x)) - 1)))
    return out


def _layer_spec(row: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec(name="timed", h=int(row["h"]), L=int(row["layers"]), heads=int(row["heads"]),
                     kv_heads=int(row["kv_heads"]), ffn=int(row["ffn"]), V=256, tied=False,
                     head_dim=int(row["h"]) // int(row["heads"]))


def _per_layer(forwards, phase: str, shape: tuple, S: int) -> float:
    """Seconds of one decoder layer: half the difference of the 3- and 1-layer forwards."""
    by = {r["layers"]: r["seconds"] for r in forwards
          if r["phase"] == phase and r["S"] == S and (r["h"], r["heads"], r["kv_heads"], r["ffn"]) == shape}
    return max((by[3] - by[1]) / 2.0, 0.0)


def _kernels(gemm: Mapping[str, float], memops_bytes_per_s: float) -> dict:
    mem = {"bytes_per_s": memops_bytes_per_s, "t0": 0.0}
    return {"dtype": "fp32", "gemm": dict(gemm), "memops": {op: mem for op in ("rmsnorm", "rope", "silu_mul", "add", "emb")}}


def _kernel_s(spec: ModelSpec, kernels: Mapping[str, Any], s: float, kv_len: float) -> tuple[float, float]:
    """(seconds of the GEMMs and attention, seconds of the memory-bound ops) of one layer of ``spec`` over ``s``
    tokens, b = 1 (the causal mean context of a prefill, ``kv_len`` + 1 for a decode step)."""
    ctx = (s + 1) / 2 if kv_len == 0 else kv_len + 1
    ops = layer_ops(spec, 1, 1, s, kv_len, ctx, 4)
    times = op_times(ops, kernels, 4)
    gemm_s = sum(float(v) for op, v in times.items() if ops[op]["kind"] in ("gemm", "attention"))
    return gemm_s, sum(float(v) for v in times.values()) - gemm_s


def fit_cpu_kernels(timed: Mapping[str, Any]) -> dict:
    """The calibration entry of one thread count from :func:`llmcomm.measure.calibrate.time_cpu_kernels`:
    ``{"kernels": {"dtype", "gemm", "memops"}, "host_us": {phase: {"layer", "forward"}}, "layer_overhead_us",
    "fit": {...}}`` (``layer_overhead_us``: the decode value, for callers without a phase)."""
    gemm = fit_cpu_gemm(timed["gemm"])
    gemm_params = {name: v for name, v in gemm.items() if name != "median_rel_err"}
    fw = timed["forwards"]
    key = lambda r: (r["h"], r["heads"], r["kv_heads"], r["ffn"])              # noqa: E731
    shapes = sorted({key(r) for r in fw})
    tiny, calib = shapes[0], shapes[-1]
    prompts = sorted({r["S"] for r in fw if r["phase"] == "prefill"})
    dec_S = next(r["S"] for r in fw if r["phase"] == "decode")
    spec_of = {shape: _layer_spec(dict(next(r for r in fw if key(r) == shape), layers=1)) for shape in shapes}
    # host time per layer: the tiny layer (its kernels negligible) less its kernels; the prefill's at the shortest
    # prompt (its memory-bound ops smallest). Memory-bound ops: the residual of the calibration shape's prefill
    # layers. Each depends a little on the other: a few rounds of both.
    memops_bps = gemm_params["bytes_per_s"]
    for _ in range(5):
        kern = _kernels(gemm_params, memops_bps)
        layer_host = {}
        for phase, S, s, kv in (("decode", dec_S, 1, dec_S), ("prefill", prompts[0], prompts[0], 0)):
            layer_host[phase] = max(_per_layer(fw, phase, tiny, S) - sum(_kernel_s(spec_of[tiny], kern, s, kv)), 0.0)
        mem_bytes, resid = [], []
        for S in prompts:
            ops = layer_ops(spec_of[calib], 1, 1, S, 0, (S + 1) / 2, 4)
            gemm_s, _ = _kernel_s(spec_of[calib], kern, S, 0)
            mem_bytes.append(sum(float(op["bytes"]) * op.get("count", 1) for op in ops.values()
                                 if op["kind"] not in ("gemm", "attention")))
            resid.append(_per_layer(fw, "prefill", calib, S) - gemm_s - layer_host["prefill"])
        mem_bytes, resid = np.array(mem_bytes), np.array(resid)
        ok = resid > 0
        memops_bps = float(np.sum(mem_bytes[ok]) / np.sum(resid[ok])) if ok.any() else gemm_params["bytes_per_s"]
    entry = {"kernels": _kernels(gemm_params, memops_bps), "layer_overhead_us": layer_host["decode"] * 1e6,
             "host_us": {ph: {"layer": v * 1e6, "forward": 0.0} for ph, v in layer_host.items()}}
    # host time per forward: the tiny 1-layer forward less what the model charges for it without one
    for phase in ("prefill", "decode"):
        one = next(r for r in fw if r["phase"] == phase and r["layers"] == 1 and key(r) == tiny
                   and r["S"] == (prompts[0] if phase == "prefill" else dec_S))
        entry["host_us"][phase]["forward"] = max(one["seconds"] - _forward_s(entry, one), 0.0) * 1e6
    entry["fit"] = {"gemm_median_rel_err": gemm["median_rel_err"], "gemm_points": len(timed["gemm"]),
                    "memops_residual_s": [float(x) for x in resid], "prompts": prompts}
    return entry


def _hardware(entry: Mapping[str, Any]):
    """The ``cpu-local`` preset with ``entry``'s kernels and host times (one thread count)."""
    from ..predict.hardware import Hardware, load_hardware

    preset = dict(load_hardware("cpu-local").raw)
    preset.pop("compute_by_threads", None)
    preset.pop("in_run", None)
    preset.update({key: entry[key] for key in ("kernels", "layer_overhead_us", "host_us")})
    return Hardware.from_dict(preset, name="cpu-local")


def _forward_s(entry: Mapping[str, Any], row: Mapping[str, Any]) -> float:
    """What the latency model charges for one timed forward ``row`` (b = 1) with ``entry``: its compute and the
    host time per forward (:func:`llmcomm.predict.compute.forward_compute`, the deepspeed-cpu profile)."""
    from ..predict.compute import forward_compute

    spec = _layer_spec(row)
    S, G = (row["S"], 1) if row["phase"] == "prefill" else (row["S"], 2)       # decode, G = 2: ell = S cached
    hw = _hardware(entry)
    from ..predict.profiles import load_profile

    prof = load_profile("deepspeed-cpu")
    return float(forward_compute(spec, hw, 1, 1, 1, S, G, 4, row["phase"],
                                 overhead_s=prof.layer_overhead_s(row["phase"], hw))["compute_s"]) + \
        prof.forward_overhead_s(row["phase"], hw)


def cpu_kernel_errors(entry: Mapping[str, Any], timed: Mapping[str, Any]) -> list[dict]:
    """Every timed forward of ``timed`` beside what the fitted ``entry`` predicts for it (one HF forward of b = 1,
    as the latency model charges it): ``{"h", "layers", "phase", "S", "seconds", "predicted_s"}``."""
    return [{"h": r["h"], "layers": r["layers"], "phase": r["phase"], "S": r["S"], "seconds": r["seconds"],
             "predicted_s": _forward_s(entry, r)} for r in timed["forwards"]]
