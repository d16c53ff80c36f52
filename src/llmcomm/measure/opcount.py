"""Count the ATen ops a module's forward dispatches, from a ``torch.profiler`` trace, per labelled sub-module.

What an eager framework costs on the host is paid per op it dispatches from Python (each call crosses the Python
binding, the dispatcher and, on a GPU, the launch of a kernel). :func:`count_ops` runs a function under
``torch.profiler`` (CPU activity) with the forward of each named sub-module wrapped in a ``record_function`` label
(forward pre- and post-hooks), then classifies every ``aten::`` event of the trace by the innermost label around it:

* ``host_ops`` — *top-level* ATen ops: no other ``aten::`` op encloses them (``aten::linear`` counts once, not its
  ``aten::t``/``aten::matmul``/``aten::mm`` inside). One per call from Python into ATen: the unit of a host profile's
  per-op cost (:mod:`llmcomm.predict.profiles`).
* ``launch_ops`` — the top-level ops that do work: outside :data:`METADATA_OPS` (views, strides, allocations, scalar
  reads, no-op casts) or holding an op that is (``aten::to`` that copies). What a host profile charges per op.
* ``kernel_ops`` — the innermost working ops (outside :data:`METADATA_OPS`, no working ATen op inside): a proxy of the
  device kernels the same forward launches on a GPU (an op that works and also calls a working op, e.g.
  ``aten::aminmax`` filling its output first, counts as its inner op only).
* ``collectives`` — the communication calls of the trace (``c10d::`` ops and gloo/NCCL records), counted once each.

Labels nest (a layer, its MoE block, the block's gate, its experts, one expert): an op counts for the innermost label
only, so the sections of one forward add up to the whole. Ops outside every label are counted under ``""``.

The trace is the CPU's: the same Python code on a GPU dispatches the same top-level ops (the code paths that differ by
device are named where the counts are used), but a CPU op that runs its own loop in C++ (CPU ``aten::_grouped_mm``
calls ``aten::mm`` per group) shows as leaf ops a CUDA kernel would not launch — read ``kernel_ops`` with that in mind.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Mapping

__all__ = ["METADATA_OPS", "count_ops"]

#: ATen ops that launch no kernel: views and stride changes, allocations without a fill, scalar reads, no-op casts.
METADATA_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as", "aten::squeeze", "aten::unsqueeze",
    "aten::select", "aten::slice", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::to",
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::numpy_T", "aten::contiguous",
    "aten::view_as", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::set_", "aten::result_type",
})
_PREFIX = "llmcomm::"


def _is_collective(name: str) -> bool:
    return name.startswith(("c10d::", "gloo:", "nccl:")) or name == "record_param_comms"


@contextlib.contextmanager
def _labelled(modules: Mapping[str, object]):
    """Wrap each module's forward in ``record_function("llmcomm::<label>")`` for as long as the context lasts."""
    from torch.autograd.profiler import record_function

    handles = []
    for label, module in modules.items():
        stack = []

        def pre(_m, _args, label=label, stack=stack):
            rf = record_function(_PREFIX + label)
            rf.__enter__()
            stack.append(rf)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _label_of(event) -> str:
    par = event.cpu_parent
    while par is not None:
        if par.name.startswith(_PREFIX):
            return par.name[len(_PREFIX):]
        par = par.cpu_parent
    return ""


def _under_op(event) -> bool:
    """Whether an ATen op or a collective encloses ``event`` (inside its label)."""
    par = event.cpu_parent
    while par is not None and not par.name.startswith(_PREFIX):
        if par.name.startswith("aten::") or _is_collective(par.name):
            return True
        par = par.cpu_parent
    return False


def _inside_collective(event) -> bool:
    par = event.cpu_parent
    while par is not None and not par.name.startswith(_PREFIX):
        if _is_collective(par.name):
            return True
        par = par.cpu_parent
    return False


def _working_child(event) -> bool:
    return any(_does_work(ch) for ch in event.cpu_children if ch.name.startswith("aten::"))


def _does_work(event) -> bool:
    """Whether ``event`` is an ATen op outside :data:`METADATA_OPS` or holds one (launches a kernel)."""
    return event.name not in METADATA_OPS or _working_child(event)


def count_ops(fn: Callable[[], object], modules: Mapping[str, object]) -> dict[str, dict]:
    """Run ``fn()`` once under ``torch.profiler`` with each of ``modules`` (label → ``nn.Module``) labelled; returns
    ``{label: {"host_ops", "launch_ops", "kernel_ops", "collectives", "names"}}`` for every label that ran (and
    ``""`` when ops ran outside every label); ``launch_ops``: the top-level ops that do work (launch at least one
    kernel: a no-op ``aten::to`` or a view does not); ``names``: a Counter of the label's launching top-level ops."""
    from torch.profiler import ProfilerActivity, profile

    with _labelled(modules), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out: dict[str, dict] = {}

    def slot(label):
        return out.setdefault(label, {"host_ops": 0, "launch_ops": 0, "kernel_ops": 0, "collectives": 0,
                                      "names": Counter()})

    for ev in prof.events():
        name = ev.name
        if name.startswith(_PREFIX):
            slot(name[len(_PREFIX):])
        elif name.startswith("c10d::"):           # one dispatcher record per collective call (gloo:/nccl: records
            slot(_label_of(ev))["collectives"] += 1   # of the same call are not counted again)
        elif name.startswith("aten::") and not _inside_collective(ev):
            rec = slot(_label_of(ev))
            if not _under_op(ev):
                rec["host_ops"] += 1
                if _does_work(ev):
                    rec["launch_ops"] += 1
                    rec["names"][name] += 1
            if name not in METADATA_OPS and not _working_child(ev):
                rec["kernel_ops"] += 1
    return out
