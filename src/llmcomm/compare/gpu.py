"""GPU measurements (``tools/gpu``'s files under ``data/<gpu-machine>/``) beside the time model's predictions.

A GPU number is shown only when a file with provenance holds it; without one, the chapter shows predictions and says
so. The machine folder names the GPU (:func:`llmcomm.record.machine_id`); :func:`preset_for_machine` maps it to the
hardware preset whose figures the predictions use — the one place that mapping lives.
"""
from __future__ import annotations

import pandas as pd

from ..predict.compute import forward_compute
from ..predict.hardware import Hardware, load_hardware
from ..predict.latency import predict_latency
from ..predict.profiles import load_profile
from ..record import data_dir, load_frame
from ..spec import Layout, ModelSpec, Workload

__all__ = ["gpu_machines", "preset_for_machine", "predicted_layers", "layer_comparison", "predicted_generation",
           "generation_comparison", "SHAPES"]

#: what tools/gpu/single_gpu.py times: (t, b, S) for each model
SHAPES = [(t, b, S) for t in (1, 2, 4, 8) for b in (1, 8) for S in (128, 512, 2048)]


def gpu_machines(name: str = "layer_times") -> list[str]:
    """Machine folders under ``data/`` holding ``<name>.csv`` from a GPU (not ``cpu-local``, not a dry run)."""
    root = data_dir("x").parent
    return sorted(path.parent.name for path in root.glob(f"*/{name}.csv")
                  if path.parent.name != "cpu-local" and not path.parent.name.startswith("dry-run"))


def preset_for_machine(machine: str) -> Hardware:
    """The hardware preset of a GPU machine folder: ``h200-…`` → h200, any other H100 → h100-sxm."""
    return load_hardware("h200" if machine.startswith("h200") else "h100-sxm")


def predicted_layers(hw: Hardware, models: list[ModelSpec], shapes=SHAPES, profile: str = "deepspeed-eager"
                     ) -> pd.DataFrame:
    """Predicted seconds of one decoder layer on one rank for each (model, t, b, S) and phase (decode: one token
    with S cached, i.e. G = 2 in the phase convention): ``kernels_us``, the device time of its kernels alone, and
    ``predicted_us``, the layer as an eager framework runs it (host ``profile``: the slower of the kernels and the
    host's launching, :func:`llmcomm.predict.compute.forward_compute`)."""
    prof = load_profile(profile)
    rows = []
    for model in models:
        for t, b, S in shapes:
            for phase in ("prefill", "decode"):
                kern = forward_compute(model, hw, t, 1, b, S, 2, 2, phase, overhead_s=0.0, host_overlaps=True)
                eager = forward_compute(model, hw, t, 1, b, S, 2, 2, phase,
                                        overhead_s=prof.layer_overhead_s(phase, hw),
                                        host_overlaps=prof.host_overlaps(phase))
                rows.append({"hardware": hw.name, "model": model.name, "t": t, "b": b, "S": S, "phase": phase,
                             "kernels_us": float(kern["layer_s"]) * 1e6, "predicted_us": float(eager["layer_s"]) * 1e6,
                             "compute_bound": bool(eager["compute_bound"])})
    return pd.DataFrame(rows)


def layer_comparison(models: list[ModelSpec]) -> pd.DataFrame | None:
    """Every GPU machine's measured layer times beside the predictions for its preset, with the signed error
    (predicted − measured) / measured in %; None when no GPU measurement exists."""
    parts = []
    for machine in gpu_machines():
        df, _ = load_frame("layer_times", machine)
        pred = predicted_layers(preset_for_machine(machine), models)
        both = df[["model", "t", "b", "S", "phase", "median_s"]].merge(pred, on=["model", "t", "b", "S", "phase"])
        both["machine"] = machine
        both["measured_us"] = both.median_s * 1e6
        both["error_%"] = 100 * (both.predicted_us - both.measured_us) / both.measured_us
        parts.append(both[["machine", "hardware", "model", "t", "b", "S", "phase", "measured_us", "predicted_us",
                        "error_%"]])
    return pd.concat(parts, ignore_index=True) if parts else None


def predicted_generation(model: ModelSpec, hws: list[Hardware], workloads: list[Workload]) -> pd.DataFrame:
    """Predicted single-GPU TTFT and TPOT (ms) of ``model`` for each hardware and workload."""
    rows = []
    for hw in hws:
        for wl in workloads:
            r = predict_latency(model, Layout(1, 1), wl, hw)
            rows.append({"hardware": hw.name, "b": wl.b, "S": wl.S, "G": wl.G, "predicted_ttft_ms": r["ttft_s"] * 1e3,
                         "predicted_tpot_ms": r["tpot_s"] * 1e3})
    return pd.DataFrame(rows)


def generation_comparison(model: ModelSpec, workloads: list[Workload]) -> pd.DataFrame | None:
    """Measured single-GPU generations (``generate``) beside the predictions for the machine's preset; None when
    no GPU generation has been measured."""
    parts = []
    for machine in gpu_machines("generate"):
        measured, _ = load_frame("generate", machine)
        hw = preset_for_machine(machine)
        both = measured.merge(predicted_generation(model, [hw], workloads), on=["b", "S", "G"])
        both["machine"] = machine
        both["measured_ttft_ms"], both["measured_tpot_ms"] = both.ttft_s * 1e3, both.tpot_s * 1e3
        both["ttft_error_%"] = 100 * (both.predicted_ttft_ms - both.measured_ttft_ms) / both.measured_ttft_ms
        both["tpot_error_%"] = 100 * (both.predicted_tpot_ms - both.measured_tpot_ms) / both.measured_tpot_ms
        parts.append(both[["machine", "b", "S", "G", "measured_ttft_ms", "predicted_ttft_ms", "ttft_error_%",
                        "measured_tpot_ms", "predicted_tpot_ms", "tpot_error_%"]])
    return pd.concat(parts, ignore_index=True).round(3) if parts else None
