"""What one op costs on one device (``llmcomm cost``): the rows of the compute and collective models that
``predict`` sums, one op at a time.

* :func:`compute_costs`: every op of one decoder layer on one TP rank (:func:`llmcomm.predict.kernels.layer_ops`),
  plus the final norm and the lm_head, for a forward of ``tokens`` tokens (the GEMM M dimension); attention only
  with a ``context`` (tokens already cached, each new token attends to them and causally to the new ones). A
  mixture of experts gives the rows of one MoE layer: ``router``, ``expert_gate_up_proj``, ``expert_down_proj``,
  ``expert_act`` (with ``calls``: the experts the tokens touch, an expectation under uniform routing, and ``M``: the
  tokens each computes), the shared expert's when it has one.
* :func:`collective_costs`: one collective of m bytes (nccl-tests size) on n ranks placed g per node, through one
  code path, with the algorithm and protocol the model chooses and its bus bandwidth.
* :func:`cost_report`: what ``llmcomm cost`` prints (``{head…, "ops": rows}``), one or the other.

Keys: ``message_bytes`` is m, the nccl-tests size of one call; ``memory_bytes`` what an op reads and writes in
memory; ``flops`` its floating-point operations; ``seconds`` its time. Nothing is modelled here: the functions
call what the latency model calls.
"""
from __future__ import annotations

import numpy as np

from ..derive.conventions import COLLECTIVES, bus_factor, canonical_op
from ..spec import DTYPE_BYTES, Layout, ModelSpec, SpecError
from .hardware import Hardware
from .compute import expert_layout
from .kernels import gemm_time, layer_ops, memop_time, op_times
from .paths import parse_path

__all__ = ["compute_costs", "collective_costs", "cost_report", "COLLECTIVE_OPS"]

#: the collectives ``cost`` prices (those the time model has a form for: the registry's ``timed`` ops)
COLLECTIVE_OPS = tuple(name for name, coll in COLLECTIVES.items() if coll.timed)


def compute_costs(model: ModelSpec, hw: Hardware, t: int, tokens, context: int | None = None,
                  dtype: str = "bf16", experts: str | None = None) -> list[dict]:
    """Rows ``{"op", "tokens", "seconds", "flops", "memory_bytes"}`` for every op and every token count (one
    sequence of ``tokens`` new tokens; ``context`` cached tokens adds the attention row). A mixture of experts: the
    ops of one MoE layer under the TP expert layout ``experts`` (``autotp``, the default: experts whole on every rank;
    ``tp-experts``: sharded t ways); its expert rows add ``calls``, ``M`` and, for a grouped GEMM, ``groups`` (one call
    of that many experts' problems of M rows each). A dense model has none."""
    Layout(t).validate(model)
    if experts is not None and not model.is_moe:
        raise SpecError(f"expert layout {experts!r} needs a mixture of experts; {model.name} is dense")
    if experts not in (None, "autotp", "tp-experts"):
        raise SpecError(f"cost prices one TP rank: expert layout {experts!r} is not autotp or tp-experts")
    if context is not None and context < 0:
        raise SpecError(f"context={context} must be at least 0 tokens")
    if dtype not in DTYPE_BYTES:
        raise SpecError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    w = DTYPE_BYTES[dtype]
    kern = hw.kernels(w)
    rows = []
    for T in tokens:
        if int(T) < 1:
            raise SpecError(f"tokens={T} must be at least 1")
        ctx = 0 if context is None else int(context)
        ops = layer_ops(model, t, 1, T, ctx, ctx + (T + 1) / 2, w, expert_layout(model, experts, t, 1, 1, T))
        if context is None:
            ops.pop("attention")
        times = op_times(ops, kern, w)
        for name, op in ops.items():
            count = float(op.get("count", 1))
            row = {"op": name, "tokens": int(T), "seconds": float(times[name]),
                   "flops": float(op.get("flops", 0.0)) * count, "memory_bytes": float(op["bytes"]) * count}
            if name.startswith("expert_"):
                row.update(calls=count, M=float(op["M"]) if "M" in op else float(op["bytes"] / op["row_bytes"]),
                           **({"groups": float(op["groups"])} if "groups" in op else {}))
            rows.append(row)
        h, V = model.h, model.V
        rows.append({"op": "final_norm", "tokens": int(T),
                     "seconds": float(memop_time(2 * w * T * h, 2 * w * h, kern["memops"]["rmsnorm"])),
                     "flops": 0.0, "memory_bytes": float(2 * w * T * h)})
        rows.append({"op": "lm_head", "tokens": int(T), "seconds": float(gemm_time(T, V, h / t, w, kern["gemm"])),
                     "flops": float(2 * T * h * V / t), "memory_bytes": float(w * (T * h / t + h * V / t + T * V))})
    return rows


def collective_costs(hw: Hardware, op: str, ranks: int, sizes, gpus_per_node: int | None = None,
                     path: str = "nccl-eager") -> list[dict]:
    """Rows ``{"op", "ranks", "gpus_per_node", "message_bytes", "seconds", "algbw_GBps", "busbw_GBps", "algorithm",
    "protocol", "path"}`` of ``op`` on ``ranks`` ranks placed ``gpus_per_node`` per node (default: as many as fit on
    one node of ``hw``), for each size (nccl-tests convention), through code path ``path``
    (:mod:`llmcomm.predict.paths`: ``nccl-eager`` pays the eager floor, ``nccl-graph`` not, a custom path its own
    kernel): the (algorithm, protocol) NCCL's model chooses (a custom kernel's shot; on hardware without an NCCL model
    the α-β form's algorithm, protocol ``-``, path ``host``)."""
    op = canonical_op(op)
    if op not in COLLECTIVE_OPS:
        raise SpecError(f"collective {op!r} is not one of {', '.join(COLLECTIVE_OPS)}")
    parse_path(path)
    ranks = int(ranks)
    if ranks < 2 or (op == "send_recv" and ranks != 2):
        raise SpecError(f"{op} needs {'exactly 2' if op == 'send_recv' else 'at least 2'} ranks, got {ranks}")
    g = min(ranks, hw.gpus_per_node) if gpus_per_node is None else int(gpus_per_node)
    if g < 1:
        raise SpecError(f"gpus_per_node={g} must be at least 1")
    level = "intra" if ranks <= g else "inter"
    if any(int(m) < 1 for m in sizes):
        raise SpecError(f"message size m={min(int(m) for m in sizes)} must be at least 1 byte")
    choice = hw.collective_choice(op, ranks, np.asarray([float(m) for m in sizes]), level, g=g, path=path)
    rows = []
    for i, m in enumerate(sizes):
        sec = float(np.asarray(choice["seconds"]).reshape(-1)[i])
        alg = float(m) / sec
        rows.append({"op": op, "ranks": ranks, "gpus_per_node": g, "message_bytes": int(m), "seconds": sec,
                     "algbw_GBps": alg / 1e9, "busbw_GBps": alg * float(bus_factor(op, ranks)) / 1e9,
                     "algorithm": str(np.asarray(choice["algorithm"]).reshape(-1)[i]),
                     "protocol": str(np.asarray(choice["protocol"]).reshape(-1)[i]), "path": choice["path"]})
    return rows


def cost_report(hw: Hardware, *, model: ModelSpec | None = None, t: int = 1, tokens=None, context: int | None = None,
                dtype: str = "bf16", experts: str | None = None, collective: str | None = None,
                ranks: int | None = None, sizes=None, gpus_per_node: int | None = None,
                path: str = "nccl-eager") -> dict:
    """What ``llmcomm cost`` prints: ``{head…, "ops": rows}`` — a layer's ops (``model``, ``t``, ``tokens``:
    :func:`compute_costs`) or one collective (``collective``, ``ranks``, ``sizes``, code path ``path``:
    :func:`collective_costs`)."""
    if (model is None) == (collective is None):
        raise SpecError("cost: give either a model (with tp and tokens) or a collective (with ranks and sizes)")
    if model is not None:
        if not tokens:
            raise SpecError("cost of a model needs tokens N [N ...] (the GEMM M dimension: tokens in one forward)")
        rows = compute_costs(model, hw, t, tokens, context, dtype, experts)
        head = {"hardware": hw.name, "model": model.name, "tp": t, "dtype": dtype, "context": context}
        if model.is_moe:
            head["experts"] = experts or "autotp"
        return dict(head, ops=rows)
    if ranks is None or not sizes:
        raise SpecError("cost of a collective needs ranks n and sizes m [m ...]")
    rows = collective_costs(hw, collective, ranks, sizes, gpus_per_node, path)
    return {"hardware": hw.name, "collective": canonical_op(collective), "ranks": ranks,
            "gpus_per_node": rows[0]["gpus_per_node"], "path": rows[0]["path"], "ops": rows}
