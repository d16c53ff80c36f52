"""Measure a disaggregated layout: one launch of N_P + N_D real DeepSpeed ranks, a prefill group and a decode group
(:mod:`llmcomm.measure.runs.disagg`), every message captured — the hand-off's in phase ``kv_transfer``.

    res = measure_disaggregated(load_model("tiny-llama"), Disaggregation(Layout(1), Layout(2)), [Workload(2, 8, 4)])
    res[0].rows      # prefill rows of the prefill side, the kv_transfer send_recv row, decode rows of the decode side

The configurations of a launch share the model and the two layouts; one dtype per launch (the model is built in
it); the KV cache moves in that dtype (a measured fp8 hand-off would change the tokens). The launch runs on gloo on
CPU (TP sub-groups: the shm all-reduce ignores them). Timings: TTFT = the decode side's end of the hand-off − the
prefill's start, the hand-off alone = its end − the prefill's end (wall clock of one host; across hosts their clock
offset would enter, so a multi-node run reports them as measured with that caveat in its provenance).
"""
from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from llmcomm.deployment import Deployment
from llmcomm.measure.cache import RunCache
from llmcomm.measure.launch import _cache_for, check_run, rank_spec
from llmcomm.measure.results import MeasureResult, assemble
from llmcomm.measure.supervise import PROGRESS_TIMEOUT_S, STARTUP_TIMEOUT_S, RunError, has_cuda, launch_ranks
from llmcomm.spec import Disaggregation, ModelSpec, SpecError, Workload

__all__ = ["ENTRY", "measure_disaggregated", "check_disaggregated_run", "measure_report"]

ENTRY = "llmcomm.measure.runs.disagg"


def check_disaggregated_run(model: ModelSpec, dis: Disaggregation, workloads: Sequence[Workload],
                            backend: str | None = None) -> str:
    """Everything refused before a rank starts (one :class:`SpecError`); returns the backend the launch uses."""
    from llmcomm.derive.disagg import check_disaggregation

    check_disaggregation(model, dis)
    if model.is_moe:
        raise SpecError(f"a measured disaggregated run is dense only; {model.name} is a mixture of experts "
                        f"(its hand-off is predicted: the KV cache is the attention's, the same formulas)")
    for side in (dis.prefill, dis.decode):
        check_run(model, side, workloads, [Deployment()] * len(workloads), backend)
    if dis.kv_dtype not in (None, *{w.dtype for w in workloads}):
        raise SpecError(f"a measured hand-off moves the KV cache in the model dtype "
                        f"({', '.join(sorted({w.dtype for w in workloads}))}), not {dis.kv_dtype}")
    if backend is None:
        backend = "nccl" if has_cuda() else "gloo"           # sub-groups: no shm all-reduce on CPU
    if backend != "gloo" and not has_cuda():
        raise SpecError(f"backend {backend!r} on CPU: a disaggregated run needs gloo (TP sub-groups)")
    return backend


def measure_disaggregated(model: ModelSpec, dis: Disaggregation, workloads: Sequence[Workload], *,
                          out_dir: str | Path | None = None, backend: str | None = None, seed: int = 0,
                          check_tokens: bool = True, env=None,
                          progress_timeout_s: float = PROGRESS_TIMEOUT_S,
                          startup_timeout_s: float = STARTUP_TIMEOUT_S) -> list[MeasureResult]:
    """One launch of ``dis`` on ``model``, one :class:`MeasureResult` per workload (rows of every phase, the tokens
    checked against the single-process reference, ``ttft_s`` including the hand-off, ``tpot_s`` of the decode side;
    the hand-off's own time in ``provenance["handoff_s"]``)."""
    workloads = list(workloads)
    if not workloads:
        raise SpecError("no workload to measure")
    backend = check_disaggregated_run(model, dis, workloads, backend)
    options = {"disaggregation": {"prefill": {"t": dis.prefill.t, "p": dis.prefill.p},
                                  "decode": {"t": dis.decode.t, "p": dis.decode.p}, "kv_dtype": dis.kv_dtype}}
    cache = _cache_for(env, out_dir, None)
    keys = [RunCache.key({"model": model.name, "hf_config": dict(model.hf_config), "workload": w.as_dict(),
                          "backend": backend, "seed": seed, "reference": check_tokens, "entry": ENTRY, **options})
            for w in workloads] if cache else [None] * len(workloads)
    results: list[MeasureResult | None] = [cache.get(k) if cache else None for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return list(results)
    spec = rank_spec(model, dis.decode, [workloads[i] for i in todo], seed=seed, backend=backend,
                     reference=check_tokens, options=options)
    tmp = out_dir is None
    out = Path(tempfile.mkdtemp(prefix="llmcomm-disagg-")) if tmp else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)

    def take(j: int, records: list[dict], facts: dict) -> None:
        i = todo[j]
        try:
            res = assemble(records, model, dis.decode, workloads[i], facts, started, ENTRY, backend, check_tokens,
                           sweep={"index": j, "configs": len(todo)})
        except RunError as e:
            raise RunError(f"configuration {i + 1} of {len(workloads)} ({workloads[i].label}): {e} "
                           f"(run folder: {out})", run_dir=out, config=i) from None
        results[i] = _timed(res, records, dis)

    _, facts = launch_ranks(ENTRY, spec, dis.ranks, out, progress_timeout_s=progress_timeout_s,
                            startup_timeout_s=startup_timeout_s, env=env, on_config=take)
    for i in todo:
        results[i].provenance.update(launch_wall_s=facts["launch_wall_s"])
        if cache:
            cache.put(keys[i], results[i])
    if tmp:
        shutil.rmtree(out, ignore_errors=True)
    return list(results)


def _timed(res: MeasureResult, records: list[dict], dis: Disaggregation) -> MeasureResult:
    """TTFT, TPOT and the hand-off's time from the ranks' wall-clock stamps (module docs); the layouts in the
    provenance."""
    t = [r.get("timings", {}) for r in records]
    start = min(x["prefill_start"] for x in t if "prefill_start" in x)
    prefill_end = max(x["prefill_end"] for x in t if "prefill_end" in x)
    handoff_end = max(x["handoff_end"] for x in t if "handoff_end" in x)
    tpot = max(x.get("tpot_s", 0.0) for x in t if "handoff_end" in x)
    steps = max((x.get("decode_steps_s", []) for x in t if "handoff_end" in x), key=sum)
    res.ttft_s, res.tpot_s = handoff_end - start, tpot
    res.e2e_s = res.ttft_s + sum(steps)
    res.provenance.update(prefill_s=prefill_end - start, handoff_s=handoff_end - prefill_end,
                          disaggregation={"prefill": {"t": dis.prefill.t, "p": dis.prefill.p},
                                          "decode": {"t": dis.decode.t, "p": dis.decode.p},
                                          "ranks": f"prefill 0..{dis.prefill.ranks - 1}, decode "
                                                   f"{dis.prefill.ranks}..{dis.ranks - 1}"},
                          timing_clock="time.time() of each rank: comparable between ranks of one host only")
    res.provenance.pop("layout", None)
    return res


def measure_report(model: ModelSpec, dis: Disaggregation, workloads: Sequence[Workload], out: str | Path | None = None,
                   backend: str | None = "auto", timeout_s: float = PROGRESS_TIMEOUT_S,
                   startup_timeout_s: float = STARTUP_TIMEOUT_S) -> list[dict]:
    """``measure --disaggregate``: one dict per workload in the ``predict --disaggregate`` schema (the header of
    :func:`llmcomm.deployment.disaggregated_header`, ``ops`` as measured, ``traffic``, tokens, timings, provenance
    with the hand-off's time); with ``out`` the ranks' files of the launch stay there, and each result is written next
    to them (``result.c<i>.json``, atomically) as the launch ends."""
    from llmcomm.deployment import disaggregated_header
    from llmcomm.record import write_json

    results = measure_disaggregated(model, dis, workloads, out_dir=out, backend=None if backend == "auto" else backend,
                                    progress_timeout_s=timeout_s, startup_timeout_s=startup_timeout_s)
    objs = []
    for i, (w, res) in enumerate(zip(workloads, results)):
        objs.append(dict(disaggregated_header(model, dis, w), **res.as_dict(), handoff_s=res.provenance["handoff_s"]))
        if out is not None:
            write_json(Path(out) / f"result.c{i}.json", objs[-1])
    return objs
