"""What ``llmcomm predict`` answers, as data: one dict per configuration, the same JSON the command prints.

:func:`predict_report` is the library's answer; the command line only renders it (``--json``: the dict;
otherwise :func:`llmcomm.report.text.render_rows`), and a chapter calls the same function. The dict is the
``predict``/``measure`` JSON contract: the configuration (:func:`llmcomm.deployment.config_header`), ``ops`` (the
predicted rows, :func:`llmcomm.derive.evaluate.rows`), ``traffic`` (the whole generation), ``moe`` (what a mixture
of experts' rows rest on: :func:`llmcomm.derive.moe.moe_summary` and its pattern), and with a hardware preset
``latency`` (:func:`llmcomm.predict.latency.predict_latency`) and ``memory`` (per rank: needed, usable, fits).
"""
from __future__ import annotations

from typing import Sequence

from ..deployment import Deployment, config_header, disaggregated_header
from ..derive.evaluate import rows as predict_rows, traffic_totals
from ..derive.moe import moe_summary
from ..spec import Layout, ModelSpec, SpecError, Workload
from .hardware import GiB, Hardware

__all__ = ["predict_report", "memory_needed", "disaggregated_report"]


def memory_needed(model: ModelSpec, layout: Layout, workload: Workload, deployment: Deployment) -> float:
    """Bytes per rank of the fullest stage (:func:`llmcomm.predict.advise.memory_per_rank`; a mixture of experts by
    its expert layout, :func:`llmcomm.predict.moe_advice.moe_memory_per_rank`)."""
    wl = workload
    if model.is_moe:
        from .moe_advice import moe_memory_per_rank

        dep = deployment.resolve(model, layout)
        return float(moe_memory_per_rank(model, dep.experts, layout.t, layout.p, layout.e, wl.b, wl.S, wl.G,
                                         wl.w)["total"])
    from .advise import memory_per_rank

    return float(memory_per_rank(model, layout.t, layout.p, wl.b, wl.S, wl.G, wl.w)["total"])


def predict_report(model: ModelSpec, layout: Layout, workloads: Sequence[Workload], deployment: Deployment | None = None,
                   hardware: Hardware | None = None, gpus_per_node: int | None = None,
                   algorithm: str = "ring") -> list[dict]:
    """One dict per workload (see the module docs). ``algorithm``: how all-reduces move bytes, for the traffic
    fields (:mod:`llmcomm.derive.traffic`); ``gpus_per_node`` places the ranks (adds ``inter_node_bytes``; the
    latency takes the hardware preset's when it is None). A host profile needs ``hardware`` (it changes the latency,
    not the bytes)."""
    deployment = (deployment or Deployment()).resolve(model, layout.validate(model))
    if deployment.profile is not None and hardware is None:
        raise SpecError("a host profile (--host-profile) needs a hardware preset (it changes the latency, not the "
                        "bytes)")
    pattern = deployment.pattern(model, layout)
    out = []
    for workload in workloads:
        workload.validate(model)
        obj = dict(config_header(model, layout, workload, deployment),
                   ops=predict_rows(model, layout, workload, pattern, algorithm, gpus_per_node, deployment.routing),
                   traffic=traffic_totals(model, layout, workload, pattern, algorithm, gpus_per_node,
                                          deployment.routing))
        summary = moe_summary(model, layout, workload, deployment.routing)
        if summary is not None:
            obj["moe"] = dict(summary, pattern=pattern, experts=deployment.experts)
        if hardware is not None:
            from .latency import predict_latency

            obj["latency"] = predict_latency(model, layout, workload, hardware, deployment, gpus_per_node)
            need = memory_needed(model, layout, workload, deployment)
            obj["memory"] = {"fits": need <= hardware.usable_memory_bytes, "needed_gib_per_rank": need / GiB,
                             "usable_gib_per_rank": hardware.usable_memory_bytes / GiB}
        out.append(obj)
    return out


def disaggregated_report(model: ModelSpec, dis, workloads: Sequence[Workload], hardware: Hardware | None = None,
                         gpus_per_node: int | None = None, algorithm: str = "ring") -> list[dict]:
    """``predict --disaggregate``: one dict per workload — the header (both layouts, ``kv_dtype``), ``ops`` (the
    prefill side's prefill rows, the hand-off's ``kv_transfer`` ``send_recv`` row, the decode side's decode rows:
    :func:`llmcomm.derive.disagg.disaggregated_calls`), ``traffic``, ``handoff`` (its summary and ``per_rank`` split:
    :func:`~llmcomm.derive.disagg.handoff_summary`, :func:`~llmcomm.derive.disagg.rank_split`) and, with a hardware
    preset, ``latency`` (TTFT including the hand-off: :func:`llmcomm.predict.handoff.disaggregated_latency`).
    ``gpus_per_node`` places each side on nodes of its own (:func:`llmcomm.derive.disagg.node_of`). A dense model runs
    DeepSpeed's pattern with whole-tensor stage sends (what the measured runs do); a mixture of experts AutoTP's."""
    from ..derive.disagg import check_disaggregation, disaggregated_calls, handoff_summary, node_of, rank_split
    from ..derive.traffic import rows_of_calls, summary

    check_disaggregation(model, dis)
    pattern = Deployment(p2p="full").pattern(model, dis.prefill)
    node = node_of(dis, gpus_per_node) if gpus_per_node is not None else None
    out = []
    for workload in workloads:
        workload.validate(model)
        calls = disaggregated_calls(model, dis, workload, pattern)
        obj = dict(disaggregated_header(model, dis, workload), ops=rows_of_calls(calls, node, algorithm),
                   traffic=summary(calls, node, algorithm),
                   handoff=dict(handoff_summary(model, dis, workload), per_rank=rank_split(model, dis, workload)))
        if hardware is not None:
            from .handoff import disaggregated_latency

            lat = disaggregated_latency(model, dis, workload, hardware, gpus_per_node)
            where = ("hardware", "gpus_per_node", "host_profile")          # as predict_latency names them
            obj["latency"] = dict(lat, **{key: lat["prefill"][key] for key in where})
        out.append(obj)
    return out
