"""Engine profiles: what an inference engine adds on the host, per phase, beyond the kernels it launches.

A profile is a JSON file in ``llmcomm/presets/engines`` (or a path / dict of the same form)::

    {"name", "description", "pattern": "deepspeed" | "vllm",      # the message pattern (llmcomm.derive.patterns)
     "prefill": PHASE, "decode": PHASE,
     "custom_allreduce": {"max_bytes", "alpha_us", "busbw_GBps"} | null,   # vLLM's one-shot kernel, when on
     "source": {field: where the number comes from}}

    PHASE = {"cuda_graphs": bool,          # the forward is replayed as a CUDA graph: no per-kernel launch cost,
                                           #   no eager launch floor on collectives
             "layer_overhead_us": float | "calibrated",   # host time per decoder layer ("calibrated": the hardware
                                                           #   preset's measured layer_overhead_us, CPU ranks)
             "forward_overhead_us": float,  # host time per forward outside the layers (scheduling, sampling,
                                            #   input preparation, the graph launch itself)
             "host_overlaps_device": bool}  # the host enqueues while the device runs: max(host, kernels)

:func:`default_profile` picks the profile of an engine on a device: DeepSpeed on a CPU preset → ``deepspeed-cpu``
(overheads measured by ``llmcomm calibrate``), DeepSpeed on a GPU → ``deepspeed-eager`` (AutoTP refuses CUDA graphs
with TP > 1), vLLM → ``vllm-v0`` (as the seed paper ran it: V0 engine, decode in CUDA graphs, custom all-reduce off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..spec import SpecError, preset_names, read_preset_or_file

__all__ = ["EngineProfile", "load_engine", "engine_names", "default_profile", "PHASES"]

PHASES = ("prefill", "decode")


def engine_names() -> list[str]:
    """Names of the engine profiles shipped in ``llmcomm/presets/engines``."""
    return preset_names("engines")


@dataclass(frozen=True)
class EngineProfile:
    name: str
    pattern: str
    phases: Mapping[str, Mapping[str, Any]]
    custom_allreduce: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "custom") -> "EngineProfile":
        if not isinstance(d, Mapping):
            raise SpecError(f"engine profile {name!r} is not a JSON object")
        name = str(d.get("name", name))
        try:
            pattern = str(d["pattern"])
            phases = {ph: dict(d[ph]) for ph in PHASES}
            for ph, v in phases.items():
                lo = v.get("layer_overhead_us", 0.0)
                if lo != "calibrated" and float(lo) < 0 or float(v.get("forward_overhead_us", 0.0)) < 0:
                    raise ValueError(f"{ph}: overheads must be ≥ 0")
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"engine profile {name!r} is malformed: {e}") from None
        if pattern not in ("deepspeed", "vllm"):
            raise SpecError(f"engine profile {name!r}: pattern {pattern!r} is not deepspeed or vllm")
        return cls(name=name, pattern=pattern, phases=phases, custom_allreduce=d.get("custom_allreduce"), raw=dict(d))

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

    def launch_floor(self, phase: str) -> bool:
        """Whether collectives pay the eager launch floor of the fitted NCCL model (not under CUDA graphs)."""
        return not self.cuda_graphs(phase)


def load_engine(profile: "str | Path | Mapping[str, Any] | EngineProfile") -> EngineProfile:
    """An :class:`EngineProfile` from a preset name, a JSON path or a dict."""
    if isinstance(profile, EngineProfile):
        return profile
    if isinstance(profile, Mapping):
        return EngineProfile.from_dict(profile)
    data, name = read_preset_or_file("engines", str(profile), "engine profile")
    return EngineProfile.from_dict(data, name=name)


def default_profile(engine: str, hw) -> EngineProfile:
    """The profile of message pattern ``engine`` (``deepspeed``, ``deepspeed-full``, ``vllm``) on ``hw``."""
    if engine.startswith("vllm"):
        return load_engine("vllm-v0")
    cpu = hw.raw.get("device") == "cpu"
    return load_engine("deepspeed-cpu" if cpu else "deepspeed-eager")
