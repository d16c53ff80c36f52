"""Host profiles: what a framework adds on the host, per phase, beyond the kernels it launches.

A profile is a JSON file in ``llmcomm/presets/profiles`` (or a path / dict of the same form)::

    {"name", "description", "framework": "deepspeed" | "vllm",    # whose host behaviour (llmcomm.deployment)
     "prefill": PHASE, "decode": PHASE,
     "collectives": {"prefill": PATH, "decode": PATH},   # the code path each phase's collectives take
     "custom_allreduce": {"max_bytes", "alpha_us", "link_GBps"} | null,   # a custom kernel's numbers for hardware
                                                                          #   without a fit of its path
     "moe_layer": MOE | absent,              # host ops of a MoE layer (below); absent: priced as a dense layer
     "source": {field: where the number comes from}}

    PHASE = {"cuda_graphs": bool,          # the forward is replayed as a CUDA graph: no per-kernel launch cost,
                                           #   no eager launch floor on collectives
             "layer_overhead_us": float | "calibrated",   # host time per decoder layer ("calibrated": the hardware
                                                           #   preset's measured layer_overhead_us, CPU ranks)
             "forward_overhead_us": float | "calibrated",  # host time per forward outside the layers (scheduling,
                                            #   sampling,
                                            #   input preparation, the graph launch itself)
             "host_overlaps_device": bool}  # the host enqueues while the device runs: max(host, kernels)

    PATH = "nccl-eager" | "nccl-graph" | "deepspeed-eager" | "vllm-custom-graph[:version]" | … | "host"

A phase's path (:mod:`llmcomm.predict.paths`) says how its collectives are issued — eagerly from Python (they pay the
eager floor), replayed in a CUDA graph, or through a custom all-reduce kernel — and so which fitted floor and kernel
model price them (:meth:`llmcomm.predict.hardware.Hardware.collective_time`). Without ``collectives`` a phase takes
``nccl-graph`` under CUDA graphs and ``nccl-eager`` otherwise.

    MOE = {"host_per_op_us": float | "calibrated",   # host time per launching op ("calibrated": the layer overhead
                                                     #   over the dense layer's launching ops)
           "ops": {"dense_layer", "dense_mlp",       # launching ATen ops of a dense decoder layer and of its MLP
                   "hf_block",                       # the HF sparse block (grouped_mm): autotp and tp-experts
                   "deepspeed": {"top2" | "topk": {"capacity", "dropless"}},  # DeepSpeed's MoE layer without experts
                   "deepspeed_per_local_expert"}}    # + this many per local expert (its Python loop)

A MoE decoder layer costs the dense layer's host overhead with its MLP's ops replaced by the MoE block's
(:meth:`HostProfile.moe_layer_overhead_s`); the counts come from torch.profiler traces of the real layers
(``data/cpu-local/moe_layer_ops.csv``, ``benchmarks/moe_layer_ops.py``; read by :func:`llmcomm.compare.moe.host_op_model`).

:func:`profile_for` picks the profile of a deployment on a device: its ``profile`` when it names one, else DeepSpeed on
a CPU preset → ``deepspeed-cpu``
(overheads measured by ``llmcomm calibrate``), DeepSpeed on a GPU → ``deepspeed-eager`` (AutoTP refuses CUDA graphs
with TP > 1), vLLM → ``vllm-v0`` (as the seed paper ran it: V0 engine, decode in CUDA graphs, custom all-reduce off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..deployment import FRAMEWORKS, Deployment
from ..spec import SpecError, resolve
from .paths import parse_path, path_for

__all__ = ["HostProfile", "load_profile", "profile_for", "PHASES"]

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class HostProfile:
    name: str
    framework: str
    phases: Mapping[str, Mapping[str, Any]]
    custom_allreduce: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], name: str = "custom") -> "HostProfile":
        if not isinstance(raw, Mapping):
            raise SpecError(f"host profile {name!r} is not a JSON object")
        name = str(raw.get("name", name))
        try:
            framework = str(raw["framework"])
            phases = {ph: dict(raw[ph]) for ph in PHASES}
            for ph, v in phases.items():
                lo = v.get("layer_overhead_us", 0.0)
                fo = v.get("forward_overhead_us", 0.0)
                if lo != "calibrated" and float(lo) < 0 or fo != "calibrated" and float(fo) < 0:
                    raise ValueError(f"{ph}: overheads must be ≥ 0")
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"host profile {name!r} is malformed: {e}") from None
        if framework not in FRAMEWORKS:
            raise SpecError(f"host profile {name!r}: framework {framework!r} is not one of {', '.join(FRAMEWORKS)}")
        if raw.get("moe_layer") is not None:
            _check_moe_layer(raw["moe_layer"], name)
        for ph, path in (raw.get("collectives") or {}).items():
            if ph in PHASES:
                parse_path(path)
        return cls(name=name, framework=framework, phases=phases, custom_allreduce=raw.get("custom_allreduce"),
                   raw=dict(raw))

    def cuda_graphs(self, phase: str) -> bool:
        return bool(self.phases[phase].get("cuda_graphs", False))

    def layer_overhead_s(self, phase: str, hw) -> float:
        """Host seconds per decoder layer in ``phase`` (``"calibrated"``: the hardware's measured value — its
        ``host_us`` of the phase when it has one, :mod:`llmcomm.compare.cpu_calibration` — else its
        ``layer_overhead_us``)."""
        v = self.phases[phase].get("layer_overhead_us", 0.0)
        if v != "calibrated":
            return float(v) * 1e-6
        host = (hw.raw.get("host_us") or {}).get(phase)
        return float(host["layer"]) * 1e-6 if host else hw.layer_overhead_s

    def host_overlaps(self, phase: str) -> bool:
        """Whether the host enqueues ahead of the device (GPU engines): a layer costs max(host, kernels)."""
        return bool(self.phases[phase].get("host_overlaps_device", False))

    def moe_layer_overhead_s(self, phase: str, hw, model, experts: str | None, ep_size: int = 1,
                             routing=None) -> float:
        """Host seconds per MoE decoder layer in ``phase`` under the expert layout ``experts``: the dense layer's
        (:meth:`layer_overhead_s`) plus (ops of the MoE block − ops of the dense MLP) × the per-op host time — the HF
        sparse block for the TP schemes, DeepSpeed's MoE layer (its routing's gate, then ``deepspeed_per_local_expert``
        ops for each of the E/e experts of its loop, e = ``ep_size``) for ``ep``. A profile without ``moe_layer``, a
        phase without host overhead (CUDA graphs) or a dense model: the dense layer's."""
        base = self.layer_overhead_s(phase, hw)
        spec = self.raw.get("moe_layer")
        if not spec or experts is None or base == 0:
            return base
        ops = spec["ops"]
        if experts == "ep":
            top_k = model.moe.top_k
            if top_k < 2:
                raise SpecError(f"host profile {self.name!r}: DeepSpeed's top-1 gating is not counted (k={top_k})")
            gate = ops["deepspeed"]["top2" if top_k == 2 else "topk"][(routing.mode if routing else "capacity")]
            block = gate + ops["deepspeed_per_local_expert"] * model.E / int(ep_size)
        else:
            block = ops["hf_block"]
        per_op = spec["host_per_op_us"]
        per_op_s = base / ops["dense_layer"] if per_op == "calibrated" else float(per_op) * 1e-6
        return base + (block - ops["dense_mlp"]) * per_op_s

    def forward_overhead_s(self, phase: str, hw=None) -> float:
        """Host seconds per forward outside the layers in ``phase`` (the hardware's calibrated
        ``forward_overhead_us`` for ``"calibrated"``)."""
        v = self.phases[phase].get("forward_overhead_us", 0.0)
        if v == "calibrated":
            host = ((hw.raw if hw is not None else {}).get("host_us") or {}).get(phase) or {}
            return float(host.get("forward", 0.0)) * 1e-6
        return float(v) * 1e-6

    def collective_path(self, phase: str) -> str:
        """The code path of ``phase``'s collectives (:mod:`llmcomm.predict.paths`): the profile's ``collectives``
        entry, else ``nccl-graph`` under CUDA graphs and ``nccl-eager`` without."""
        return str((self.raw.get("collectives") or {}).get(phase) or path_for(not self.cuda_graphs(phase)))

    def launch_floor(self, phase: str) -> bool:
        """Whether ``phase``'s collectives are launched eagerly (and pay their path's eager floor)."""
        return parse_path(self.collective_path(phase))[0].eager


def _check_moe_layer(spec, name: str) -> None:
    """One :class:`SpecError` line when a profile's ``moe_layer`` field is not of the module docs' form."""
    try:
        ops = spec["ops"]
        per_op = spec["host_per_op_us"]
        counts = [ops[x] for x in ("dense_layer", "dense_mlp", "hf_block", "deepspeed_per_local_expert")]
        counts += [ops["deepspeed"][path][mode] for path in ("top2", "topk") for mode in ("capacity", "dropless")]
        if per_op != "calibrated" and float(per_op) < 0 or any(float(x) < 0 for x in counts) or ops["dense_layer"] <= 0:
            raise ValueError("counts and host_per_op_us must be ≥ 0, dense_layer > 0")
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"host profile {name!r}: moe_layer is malformed: {e}") from None


def load_profile(profile: "str | Path | Mapping[str, Any] | HostProfile") -> HostProfile:
    """A :class:`HostProfile` from a preset name, a JSON path or a dict."""
    return resolve("profiles", profile, HostProfile, "host profile")


def profile_for(deployment: Deployment | None, hw) -> HostProfile:
    """The host profile of ``deployment`` on ``hw``: the one it names, else its framework's default — vLLM →
    ``vllm-v0`` (as the seed paper ran it), DeepSpeed → ``deepspeed-cpu`` on a CPU preset, ``deepspeed-eager`` on a
    GPU (AutoTP refuses CUDA graphs with TP > 1)."""
    dep = deployment or Deployment()
    if dep.profile is not None:
        return load_profile(dep.profile)
    if dep.framework == "vllm":
        return load_profile("vllm-v0")
    return load_profile("deepspeed-cpu" if hw.raw.get("device") == "cpu" else "deepspeed-eager")
