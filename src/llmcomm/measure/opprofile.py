"""Where a generation's time goes: one generation under ``torch.profiler`` (CPU activity), split per phase into op
categories, communication and host time.

How a phase is split
--------------------
:func:`profile_generation` runs :func:`llmcomm.measure.runs.common.generate` with a ``record_function`` label around
the prefill and around the decode steps (``llmcomm::phase::<name>``), and with a :class:`~llmcomm.measure.capture.Capture`
that labels every communication call (``llmcomm::comm::<op>``, the call as the application made it: the wait for
a slower peer included — gloo's ``c10d::`` ops only enqueue work and return; the wait is in ``Work.wait``, which the
profiler does not record as an op). :func:`summarize` then walks each phase label's tree of events on the main thread
and adds every event's *self* time (its time minus its children's) to one category: the ``communication`` of the
nearest enclosing communication label or op, else the category of its own name (:data:`CATEGORIES`, first match
wins). The phase label's own self time — Python, the HF and DeepSpeed modules' glue, the greedy loop, everything not
inside an op — is ``host``, and so is the self time of other libraries' ``record_function`` labels (DeepSpeed's
AutoTP layers run through the autograd Functions ``ColumnParallel`` / ``RowParallel``, whose events carry a bare
Python name: their self time is the Python of their ``forward``). The categories therefore add up to the phase's wall time exactly (up to the profiler's
microsecond rounding); the profiler's own cost per op lands in the ops and the host time alike, which is why the
profiled generation is never a timed one.

Categories (:data:`CATEGORIES`, matched in this order on the op name)
--------------------------------------------------------------------------
============== =======================================================================================================
communication  ``c10d::``, ``gloo:``, ``deepspeed::inference_all_reduce``, ``all_reduce``, ``all_gather``,
               ``broadcast``, ``send``, ``recv``, ``reduce_scatter``, ``all_to_all`` (and every op under a
               ``llmcomm::comm::`` label)
host           a bare name without a namespace (``RowParallel``: an autograd Function's Python ``forward``)
attention      ``scaled_dot_product``, ``flash_attention``, ``softmax``
gemm           ``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``, ``linear``, ``mkldnn`` / ``mkl`` matmuls
views_alloc    tensor bookkeeping that moves no data: ``view``, ``reshape``, ``t``, ``transpose``, ``permute``,
               ``expand``, ``slice``, ``select``, ``unsqueeze``, ``squeeze``, ``as_strided``, ``detach``, ``alias``,
               ``empty``, ``resize_``, ``lift_fresh``, ``result_type``, ``item``/``_local_scalar_dense``
elementwise    every other ATen op: norms, rope, silu, mul, add, cat, copy, index, embedding, argmax, … (memory-bound
               on a CPU at these sizes)
other          non-ATen ops not matched above (e.g. another library's custom ops)
host           also: the phase's time outside every op (the phase label's and other labels' self time)
============== =======================================================================================================

``gemm`` calls are counted as the matrix kernels themselves (``aten::mm``, ``aten::addmm``, ``aten::bmm``,
``aten::baddbmm``: :data:`GEMM_KERNELS`): one per linear layer per forward, whatever wrappers (``linear``,
``matmul``) lead there.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from typing import Callable

__all__ = ["CATEGORIES", "GEMM_KERNELS", "PHASE_LABEL", "COMM_LABEL", "category", "summarize", "profile_generation",
           "phase_labels"]

PHASE_LABEL = "llmcomm::phase::"
COMM_LABEL = "llmcomm::comm::"

#: (category, pattern on the op name), first match wins (module docs)
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("communication", re.compile(r"^(c10d::|gloo:|deepspeed::inference_all_reduce|llmcomm::comm::)|all_reduce|"
                                 r"allreduce|all_gather|allgather|broadcast|reduce_scatter|all_to_all|alltoall|"
                                 r"(^|::|_)(send|recv)")),
    ("host", re.compile(r"^[A-Za-z_]\w*$")),     # a bare Python name: an autograd Function's forward (Python)
    ("attention", re.compile(r"scaled_dot_product|flash_attention|softmax")),
    ("gemm", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_mkl\w*|mkldnn\w*(linear|matmul|mm)\w*)$")),
    ("views_alloc", re.compile(r"^aten::(view|_unsafe_view|reshape|t|transpose|permute|expand|slice|select|unsqueeze|"
                               r"squeeze|as_strided|detach|alias|empty|empty_like|empty_strided|resize_|lift_fresh|"
                               r"result_type|item|_local_scalar_dense|split|chunk|narrow|unbind|contiguous|"
                               r"_reshape_alias|expand_as|view_as)$")),
    ("elementwise", re.compile(r"^aten::")),
)

#: the matrix kernels counted as one GEMM call each
GEMM_KERNELS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})

ORDER = ("gemm", "attention", "elementwise", "views_alloc", "communication", "other", "host")


def category(name: str) -> str:
    """The category of an op name (:data:`CATEGORIES`, first match; ``other`` when none matches)."""
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other"


def _walk(ev, inherited: str | None, out: dict, calls: dict, ops: dict) -> None:
    label = getattr(ev, "is_user_annotation", False) and not ev.name.startswith(COMM_LABEL)
    cat = inherited or ("host" if label else category(ev.name))
    self_us = ev.self_cpu_time_total
    out[cat] += self_us
    if ev.name in GEMM_KERNELS and cat == "gemm":
        calls["gemm"] += 1
    if ev.name.startswith(COMM_LABEL):
        calls["communication"] += 1
    op = ops[ev.name]
    op["self_us"] += self_us
    op["count"] += 1
    op["category"] = cat
    for child in ev.cpu_children:
        _walk(child, inherited or (cat if cat == "communication" else None), out, calls, ops)


def summarize(events, top: int = 15) -> dict:
    """Per phase label found in ``events`` (a profiler's ``events()``): ``{phase: {"wall_s", "forwards"?,
    "seconds": {category: s}, "share": {category: fraction of wall}, "calls": {"gemm", "communication"},
    "top_ops": [{"name", "category", "self_s", "count"}, ...]}}`` — the categories of the module docs, ``host`` the
    label's own self time; a phase entered more than once adds up."""
    phases: dict[str, dict] = {}
    for ev in events:
        if not ev.name.startswith(PHASE_LABEL):
            continue
        name = ev.name[len(PHASE_LABEL):]
        acc = phases.setdefault(name, {"wall_us": 0.0, "cats": defaultdict(float), "calls": defaultdict(int),
                                       "ops": defaultdict(lambda: {"self_us": 0.0, "count": 0, "category": ""})})
        acc["wall_us"] += ev.cpu_time_total
        acc["cats"]["host"] += ev.self_cpu_time_total
        for child in ev.cpu_children:
            _walk(child, None, acc["cats"], acc["calls"], acc["ops"])
    out = {}
    for name, acc in phases.items():
        wall = acc["wall_us"]
        seconds = {c: acc["cats"].get(c, 0.0) * 1e-6 for c in ORDER}
        ranked = sorted(acc["ops"].items(), key=lambda kv: -kv[1]["self_us"])[:top]
        out[name] = {"wall_s": wall * 1e-6, "seconds": seconds,
                     "share": {c: (s / (wall * 1e-6) if wall else 0.0) for c, s in seconds.items()},
                     "calls": {"gemm": acc["calls"]["gemm"], "communication": acc["calls"]["communication"]},
                     "top_ops": [{"name": k, "category": v["category"], "self_s": v["self_us"] * 1e-6,
                                  "count": v["count"]} for k, v in ranked]}
    return out


def phase_labels(inner: Callable[[str], contextlib.AbstractContextManager] | None = None):
    """A ``phase`` callback for :func:`~llmcomm.measure.runs.common.generate`: ``record_function`` labels
    ``llmcomm::phase::<name>`` (inside ``inner(name)`` when given, e.g. a rank's heartbeat hook)."""
    from torch.autograd.profiler import record_function

    @contextlib.contextmanager
    def hook(name):
        with (inner(name) if inner else contextlib.nullcontext()), record_function(PHASE_LABEL + name):
            yield

    return hook


def profile_generation(forward: Callable, hf_model, input_ids, G: int, rank: int | None = None,
                       beat: Callable[[], None] | None = None, top: int = 15) -> dict:
    """One greedy generation of G tokens (:func:`~llmcomm.measure.runs.common.generate`) under ``torch.profiler``
    (CPU activity) with the phase and communication labels of the module docs; returns :func:`summarize` of it plus
    the generation's own timings (``"timings"``, profiler overhead included: not a measurement of the run) and the
    profiling's wall time (``"profile_wall_s"``). Collective: on a distributed run every rank must call it (the
    generation's collectives)."""
    import torch

    from llmcomm.measure.capture import Capture
    from llmcomm.measure.runs.common import generate

    t0 = time.perf_counter()
    with Capture(rank=rank, annotate=True) as cap, \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gen = generate(forward, hf_model, input_ids, G, phase=phase_labels(cap.phase), beat=beat)
    phases = summarize(prof.events(), top=top)
    for name, n in (("prefill", 1), ("decode", G - 1)):
        if name in phases:
            phases[name]["forwards"] = n
    return {"phases": phases, "timings": gen.timings, "profile_wall_s": time.perf_counter() - t0,
            "comm_calls_captured": len(cap.events)}
