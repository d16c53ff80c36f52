"""Host profiles: what a framework adds on the host, per phase, beyond the kernels it launches.

A profile is a JSON file in ``llmcomm/presets/profiles`` (or a path / dict of the same form)::

    {"name", "description", "framework": "deepspeed" | "vllm",    # whose host behaviour (llmcomm.deployment)
     "prefill": PHASE, "decode": PHASE,
     "collectives": {"prefill": PATH, "decode": PATH},   # the code path each phase's collectives take
     "custom_allreduce": {"max_bytes", "alpha_us", "link_GBps"} | null,   # a custom kernel's numbers for hardware
                                                                          #   without a fit of its path
     "source": {field: where the number comes from}}

    PHASE = {"cuda_graphs": bool,          # the forward is replayed as a CUDA graph: no per-kernel launch cost,
                                           #   no eager launch floor on collectives
             "layer_overhead_us": float | "calibrated",   # host time per decoder layer ("calibrated": the hardware
                                                           #   preset's measured layer_overhead_us, CPU ranks)
             "forward_overhead_us": float,  # host time per forward outside the layers (scheduling, sampling,
                                            #   input preparation, the graph launch itself)
             "host_overlaps_device": bool}  # the host enqueues while the device runs: max(host, kernels)

    PATH = "nccl-eager" | "nccl-graph" | "deepspeed-eager" | "vllm-custom-graph[:version]" | … | "host"

A phase's path (:mod:`llmcomm.predict.paths`) says how its collectives are issued — eagerly from Python (they pay the
eager floor), replayed in a CUDA graph, or through a custom all-reduce kernel — and so which fitted floor and kernel
model price them (:meth:`llmcomm.predict.hardware.Hardware.collective_time`). Without ``collectives`` a phase takes
``nccl-graph`` under CUDA graphs and ``nccl-eager`` otherwise.

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
                if lo != "calibrated" and float(lo) < 0 or float(v.get("forward_overhead_us", 0.0)) < 0:
                    raise ValueError(f"{ph}: overheads must be ≥ 0")
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"host profile {name!r} is malformed: {e}") from None
        if framework not in FRAMEWORKS:
            raise SpecError(f"host profile {name!r}: framework {framework!r} is not one of {', '.join(FRAMEWORKS)}")
        for ph, path in (raw.get("collectives") or {}).items():
            if ph in PHASES:
                parse_path(path)
        return cls(name=name, framework=framework, phases=phases, custom_allreduce=raw.get("custom_allreduce"),
                   raw=dict(raw))

    def cuda_graphs(self, phase: str) -> bool:
        return bool(self.phases[phase].get("cuda_graphs", False))

    def layer_overhead_s(self, phase: str, hw) -> float:
        """Host seconds per decoder layer in ``phase`` (the hardware's calibrated value for ``"calibrated"``)."""
        v = self.phases[phase].get("layer_overhead_us", 0.0)
        return hw.layer_overhead_s if v == "calibrated" else float(v) * 1e-6

    def host_overlaps(self, phase: str) -> bool:
        """Whether the host enqueues ahead of the device (GPU engines): a layer costs max(host, kernels)."""
        return bool(self.phases[phase].get("host_overlaps_device", False))

    def forward_overhead_s(self, phase: str) -> float:
        return float(self.phases[phase].get("forward_overhead_us", 0.0)) * 1e-6

    def collective_path(self, phase: str) -> str:
        """The code path of ``phase``'s collectives (:mod:`llmcomm.predict.paths`): the profile's ``collectives``
        entry, else ``nccl-graph`` under CUDA graphs and ``nccl-eager`` without."""
        return str((self.raw.get("collectives") or {}).get(phase) or path_for(not self.cuda_graphs(phase)))

    def launch_floor(self, phase: str) -> bool:
        """Whether ``phase``'s collectives are launched eagerly (and pay their path's eager floor)."""
        return parse_path(self.collective_path(phase))[0].eager


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
