"""Code paths a collective takes, and the floor each one pays.

The same all-reduce costs a different time depending on how a framework issues it. A host profile
(:mod:`llmcomm.predict.profiles`) names the path of each phase's collectives, with a source; the hardware's
calibration holds each path's fitted numbers (:meth:`llmcomm.predict.hardware.Hardware.collective_time`). The paths:

==========================  ==========================================================================================
path                        what a call costs
==========================  ==========================================================================================
``nccl-graph``              NCCL's kernel replayed in a CUDA graph: the kernel time of the NCCL model, no host work
                            per call (its floor is the kernel's own small-message time, fitted to nccl-tests sweeps
                            whose small-message times are kernel-bound: they grow with n as NCCL's hops do)
``nccl-eager``              NCCL launched eagerly from PyTorch (``torch.distributed``, vLLM's PyNccl outside graphs):
                            ``max(floor_s, kernel)``, ``floor_s`` fitted to eager back-to-back launches (Vidur: the
                            kernel waits for the other ranks' launches)
``deepspeed-eager``         DeepSpeed's ``inference_all_reduce`` on GPUs calls ``torch.distributed.all_reduce``
                            (deepspeed/comm/torch.py): the ``nccl-eager`` floor (DeepSpeed's own Python wrapper is not
                            measured and not added)
``vllm-custom-graph``       vLLM's custom all-reduce in a CUDA graph for sizes below its limit, NCCL in the graph above
``vllm-custom-eager``       the same kernel launched eagerly (a copy into its registered buffer, host-bound small calls)
``sglang-custom-graph``     SGLang's custom all-reduce in a graph (and ``-eager``)
``trtllm-graph``            TensorRT-LLM's all-reduce (strategy AUTO) in a graph
``host``                    no NCCL (CPU ranks: the α-β fits of the hardware preset)
==========================  ==========================================================================================

A path may name the version of the framework whose measurements price it: ``"vllm-custom-graph:0.14.0"``. Every
collective pays its path's floor — all-to-all and send/recv included (a custom path's other collectives go through
NCCL in the same mode). Fitted numbers: :mod:`llmcomm.compare.nccl_data` (custom all-reduce tables) and
:mod:`llmcomm.compare.vidur` (the eager floor).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import SpecError

__all__ = ["CodePath", "PATHS", "parse_path", "path_for"]


@dataclass(frozen=True)
class CodePath:
    """One code path: ``name``; ``eager`` (launched from Python, not replayed in a graph); ``custom`` (the framework
    of a custom all-reduce kernel, else None); ``floor_of``: the path whose eager floor it pays; ``nccl``: whether
    its collectives run through NCCL (False: the hardware's α-β fits)."""

    name: str
    eager: bool
    custom: str | None = None
    floor_of: str | None = None
    nccl: bool = True

    @property
    def nccl_mode(self) -> str:
        """The path NCCL calls of this path take (a custom path's fallback and its other collectives)."""
        return "nccl-eager" if self.eager else "nccl-graph"


PATHS: dict[str, CodePath] = {x.name: x for x in (
    CodePath("nccl-graph", eager=False),
    CodePath("nccl-eager", eager=True, floor_of="nccl-eager"),
    CodePath("deepspeed-eager", eager=True, floor_of="nccl-eager"),
    CodePath("vllm-custom-graph", eager=False, custom="vllm"),
    CodePath("vllm-custom-eager", eager=True, custom="vllm", floor_of="nccl-eager"),
    CodePath("sglang-custom-graph", eager=False, custom="sglang"),
    CodePath("sglang-custom-eager", eager=True, custom="sglang", floor_of="nccl-eager"),
    CodePath("trtllm-graph", eager=False, custom="trtllm"),
    CodePath("host", eager=True, nccl=False),
)}


def parse_path(spec: str) -> tuple[CodePath, str | None]:
    """``"name"`` or ``"name:version"`` → (the path, the version or None); an unknown name is a
    :class:`~llmcomm.spec.SpecError`."""
    name, _, version = str(spec).partition(":")
    if name not in PATHS:
        raise SpecError(f"unknown collective code path {name!r}; known: {', '.join(PATHS)}")
    return PATHS[name], (version or None)


def path_for(floor: bool) -> str:
    """The plain NCCL path of the older ``floor`` switch: eager (pays the floor) or in a CUDA graph."""
    return "nccl-eager" if floor else "nccl-graph"
