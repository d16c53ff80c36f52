"""Measure: run a model on a layout as real DeepSpeed ranks and get back what they communicated.

:func:`measure` is the measurement half of the predict ⇄ measure loop, :func:`measure_many` the same for a sweep::

    res = measure(load_model("tiny-llama"), Layout(t=2), Workload(b=1, S=8, G=4))
    res.rows        # [{"phase", "op", "group_size", "calls", "bytes", …}, ...]  (llmcomm.measure.capture.aggregate)
    many = measure_many(model, Layout(t=2), [Workload(1, 8, 4), Workload(4, 128, 4)])   # one launch, two results

A sweep is one launch: the ranks build and shard the model once and generate each configuration in turn
(``runs/tp.py``), writing ``rank{r}.c{i}.json`` as each is done; configuration i is assembled as soon as every rank
has it, so a sweep that fails part-way has delivered what it finished. The configurations of one launch share the
model, the layout and the launch options of their :class:`~llmcomm.deployment.Deployment` (the expert layout); each
may have its own routing and stage-to-stage mode (:meth:`~llmcomm.deployment.Deployment.config_options`).
:func:`measure_sweep` is the command line's ``measure``: one launch per dtype, a results folder with ``--resume``.

The concerns live apart: :mod:`llmcomm.measure.supervise` starts and watches the ranks (DeepSpeed's launcher, the
per-rank supervisor, the start-up and progress watchdogs, shm cleanup), :mod:`llmcomm.measure.diagnose` says which
rank failed and how, :mod:`llmcomm.measure.results` assembles and checks each configuration and keeps the results
folder, :mod:`llmcomm.measure.cache` keeps results for reuse inside a test session. Every rank entry — the
microbenchmark's and the overhead benchmark's too — follows the contract of :mod:`llmcomm.measure.runs.rankio`.

Why the reference generation runs on rank 0 (before it shards its model) and not in this process: it uses exactly
the weights the ranks use (built once, same seed), and this process stays free of torch — it is started from the CLI
and from tests, and on a small machine another 400 MB process competing with the ranks would only slow them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llmcomm.deployment import Deployment, config_header
from llmcomm.measure.cache import RunCache
from llmcomm.measure.results import MeasureResult, ResultsFolder, assemble
from llmcomm.measure.supervise import (PROGRESS_TIMEOUT_S, STARTUP_TIMEOUT_S, RunError, has_cuda, launch_ranks,
                                       read_hostfile)
from llmcomm.spec import Layout, ModelSpec, SpecError, Workload

__all__ = ["RunError", "MeasureResult", "measure", "measure_many", "measure_sweep", "check_run", "rank_spec",
           "entry_for", "progress", "progress_enabled", "BACKENDS"]

#: backends a measurement may ask for (None: DeepSpeed's default — shm all-reduce on CPU, NCCL on CUDA)
BACKENDS = (None, "gloo", "nccl")


class _Progress:
    """Configurations done / total with the current one (tqdm on stderr), or nothing: see :func:`progress`."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, leave=False, file=sys.stderr)

    def update(self, label: str = "") -> None:
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _NoProgress:
    def update(self, label: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def progress_enabled() -> bool:
    """Progress bars are on, except under CI (``$CI`` set) or with ``LLMCOMM_PROGRESS=0`` (the Makefile sets it
    while it executes the chapters and while nbval re-runs them: a bar would be saved into, or compared with, the
    committed outputs)."""
    return not os.environ.get("CI") and os.environ.get("LLMCOMM_PROGRESS", "1") != "0"


def progress(total: int, desc: str = "configurations", initial: int = 0, enabled: bool | None = None):
    """A progress bar over ``total`` configurations (``.update(label)`` after each, ``.close()``), or a do-nothing
    stand-in when :func:`progress_enabled` says no, ``enabled`` is False, or there is only one configuration."""
    on = progress_enabled() if enabled is None else enabled
    return _Progress(total, desc, initial) if on and total > 1 else _NoProgress()


def entry_for(layout: Layout) -> str:
    """The rank entry module of a layout: pipeline runs (p > 1: TP×PP hybrids and EP×PP included) use
    ``runs/pipeline.py``, expert parallelism on one stage ``runs/ep.py``, the rest ``runs/tp.py``."""
    if layout.p > 1:
        return "llmcomm.measure.runs.pipeline"
    return "llmcomm.measure.runs.ep" if layout.e > 1 else "llmcomm.measure.runs.tp"


def _deployments(deployment, n: int) -> list[Deployment]:
    if deployment is None:
        return [Deployment()] * n
    if isinstance(deployment, Deployment):
        return [deployment] * n
    out = list(deployment)
    if len(out) != n or not all(isinstance(d, Deployment) for d in out):
        raise SpecError(f"one Deployment per workload: {n} workloads, {len(out)} deployments")
    return out


def check_run(model: ModelSpec, layout: Layout, workloads: Sequence[Workload], deployments: Sequence[Deployment],
              backend: str | None = None) -> list[Deployment]:
    """Everything a measurement refuses, checked before any rank starts (one :class:`SpecError`): the layout and
    workloads on this model, one dtype per launch, the deployments (resolved; a launch's ``tp-experts``
    configurations last: sharding cannot be undone), what the rank-side adapters do not adapt, the backend.
    Returns the resolved deployments."""
    if not workloads:
        raise SpecError("no workload to measure")
    layout.validate(model)
    for w in workloads:
        w.validate(model)
        if layout.e > 1:
            from llmcomm.derive.moe import rank_batch

            rank_batch(w.b, layout.e)           # data-parallel attention: every EP rank runs b/e sequences
    dtypes = sorted({w.dtype for w in workloads})
    if len(dtypes) > 1:
        raise SpecError(f"one launch builds the model in one dtype; got {', '.join(dtypes)} (one launch per dtype)")
    resolved = [d.resolve(model, layout) for d in deployments]
    if any(d.framework != "deepspeed" for d in resolved):
        raise SpecError("measurements run DeepSpeed-Inference; vllm is predicted only")
    sharded = [d.experts == "tp-experts" for d in resolved]
    if True in sharded and not all(sharded[sharded.index(True):]):
        raise SpecError("a launch shards the experts once and for good: its tp-experts configurations come last")
    if layout.e > 1:                            # what measure/moe_adapter.py adapts (it refuses the rest too)
        moe = model.moe
        if moe.shared_ffn or not moe.norm_topk or moe.top_k < 2:
            raise SpecError(f"expert parallelism of {model.name} is not adapted: DeepSpeed's MoE layer "
                            + ("would drop its shared expert" if moe.shared_ffn else
                               "renormalises the top-k weights (norm_topk_prob=False here)" if not moe.norm_topk else
                               "weights top-1 routes by the softmax probability, the HF model by 1"))
    if any(sharded):
        if model.moe.shared_ffn:
            raise SpecError(f"sharded experts need a mixture of experts without a shared expert; {model.name} has "
                            f"one (not adapted)")
        if layout.t < 2 or layout.p > 1:
            raise SpecError(f"sharded experts are measured with TP alone (t > 1, p = e = 1), not t={layout.t}, "
                            f"p={layout.p}, e={layout.e}")
        if model.moe.expert_ffn % layout.t:
            raise SpecError(f"t={layout.t} does not divide the expert width F_ex={model.moe.expert_ffn}")
    if layout.p > 1 and layout.t > 1 and any(d.p2p == "partitioned" for d in resolved) and model.h % layout.t:
        raise SpecError(f"partitioned p2p needs t={layout.t} to divide h={model.h}; use p2p 'full'")
    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r} is not one of gloo, nccl (or None for DeepSpeed's default)")
    if backend == "nccl" and not has_cuda():
        raise SpecError("backend 'nccl' needs CUDA GPUs; none found (use gloo or the default on CPU)")
    return resolved


def measure(model: ModelSpec, layout: Layout, workload: Workload, **kw) -> MeasureResult:
    """Run ``model`` with ``layout`` on ``workload`` as t·p real DeepSpeed ranks and return what they communicated:
    :func:`measure_many` with one workload (same options)."""
    return measure_many(model, layout, [workload], **kw)[0]


def _cache_for(env, out_dir, hostfile) -> RunCache | None:
    """The run cache, unless this run must really start (see :mod:`llmcomm.measure.cache`)."""
    if env or out_dir is not None or hostfile is not None or any(k.startswith("LLMCOMM_TEST_") for k in os.environ):
        return None
    return RunCache.from_env()


def measure_many(model: ModelSpec, layout: Layout, workloads: Sequence[Workload], *,
                 deployment: Deployment | Sequence[Deployment] | None = None,
                 progress_timeout_s: float = PROGRESS_TIMEOUT_S, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 out_dir: str | Path | None = None, backend: str | None = None, env: Mapping[str, str] | None = None,
                 seed: int = 0, sync: bool = False, entry: str | None = None, check_tokens: bool = True,
                 hostfile: str | Path | None = None, options: Mapping[str, Any] | None = None,
                 on_result: Callable[[int, MeasureResult], None] | None = None) -> list[MeasureResult]:
    """Run ``model`` with ``layout`` on every workload of ``workloads`` in **one** launch of t·p real DeepSpeed ranks
    (the model built and sharded once, the process group made once) and return one :class:`MeasureResult` per
    workload, in order, each captured on its own (its rows, the launch's setup, its timings, its tokens checked).

    ``deployment``: one :class:`~llmcomm.deployment.Deployment` for all (default: DeepSpeed as it is), or one per
    workload — the configurations share their expert layout and may differ in routing and stage-to-stage mode.
    ``on_result(i, result)`` is called as soon as configuration i is done (before a later one runs to its end), so a
    sweep that fails part-way has delivered what it finished; the :class:`RunError` then names the configuration
    (``.config``, its index) and the rank. All workloads must share one dtype (the model is built in it). Everything
    that can be refused is refused before any rank starts (:func:`check_run`).

    ``backend``: None (DeepSpeed's default: shm all-reduce on CPU, NCCL on CUDA; on CPU a hybrid t×p with t, p > 1
    gets gloo, because the shm all-reduce ignores sub-groups), ``"gloo"`` (every collective through gloo) or
    ``"nccl"``. ``out_dir`` keeps the run folder (spec, per-rank JSON and logs); without it a temporary folder is used
    and removed after a success. ``entry`` overrides the rank module (default :func:`entry_for`). With
    ``check_tokens`` the generated tokens must equal the single-process reference: a mismatch raises
    :class:`RunError` in fp32 and warns in bf16/fp16 (rounding of a different summation order can flip a near-tie
    there). ``hostfile`` (a DeepSpeed hostfile, ``HOST slots=N`` per line, slots summing to t·p) runs the ranks across
    nodes through DeepSpeed's runner; it needs ``out_dir`` on a file system all nodes share (the ranks write their
    results there), the same checkout and environment at the same path on every node, and password-less ssh from
    this node. ``startup_timeout_s`` / ``progress_timeout_s``: the watchdogs of :func:`llmcomm.measure.supervise.launch_ranks`.
    A configuration the run cache holds (:mod:`llmcomm.measure.cache`, inside ``make test``) is not run again.
    ``options``: the rank entry's launch options (``spec["options"]``, e.g. ``{"profile": True}``: one more, untimed
    generation per configuration under ``torch.profiler``, its summary in each rank's record of ``.ranks``).
    """
    workloads = list(workloads)
    deps = check_run(model, layout, workloads, _deployments(deployment, len(workloads)), backend)
    if backend is None and max(layout.t, layout.e) > 1 and layout.p > 1 and not has_cuda():
        backend = "gloo"        # the shm all-reduce ignores sub-groups (book appendix "Dependency facts")
    nranks = layout.ranks
    if hostfile is not None:
        slots = sum(read_hostfile(hostfile).values())
        if slots != nranks:
            raise SpecError(f"hostfile {hostfile} has {slots} slots; t·p = {nranks} ranks need exactly {nranks}")
        if out_dir is None:
            raise SpecError("a multi-node run (hostfile) needs out_dir on a file system every node shares")
    entry = entry or entry_for(layout)
    if importlib.util.find_spec(entry) is None:
        raise SpecError(f"rank entry module {entry!r} does not exist")

    cache = _cache_for(env, out_dir, hostfile)
    keys = [RunCache.key({"model": model.name, "hf_config": dict(model.hf_config) or _hf_dict(model),
                          "layout": [layout.t, layout.p, layout.e], "config": d.config_options(layout),
                          "workload": w.as_dict(), "backend": backend, "seed": seed, "reference": check_tokens,
                          "sync": sync, "entry": entry, **({"options": dict(options)} if options else {})})
            for w, d in zip(workloads, deps)] if cache else [None] * len(workloads)
    results: list[MeasureResult | None] = [cache.get(k) if cache else None for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    handed = 0

    def hand_over() -> None:                     # in order: configuration i only after every one before it
        nonlocal handed
        while handed < len(results) and results[handed] is not None:
            if on_result is not None:
                on_result(handed, results[handed])
            handed += 1

    hand_over()
    if not todo:
        return list(results)
    spec = rank_spec(model, layout, [workloads[i] for i in todo], seed=seed, backend=backend, reference=check_tokens,
                     sync=sync, deployments=[deps[i] for i in todo], options=options)
    tmp = out_dir is None
    out = Path(tempfile.mkdtemp(prefix="llmcomm-run-")) if tmp else Path(out_dir)
    started = datetime.now(timezone.utc)

    def take(j: int, records: list[dict], facts: dict) -> None:
        i = todo[j]
        try:
            res = assemble(records, model, layout, workloads[i], facts, started, entry, backend, check_tokens,
                           sweep={"index": j, "configs": len(todo)}, deployment=deps[i])
        except RunError as e:
            raise RunError(f"configuration {i + 1} of {len(workloads)} ({workloads[i].label}): {e} "
                           f"(run folder: {out})", run_dir=out, config=j) from None
        results[i] = res
        hand_over()

    try:
        _, facts = launch_ranks(entry, spec, nranks, out, progress_timeout_s=progress_timeout_s,
                                startup_timeout_s=startup_timeout_s, env=env, hostfile=hostfile, on_config=take)
    except SpecError:                       # refused before any rank started (e.g. too few GPUs)
        if tmp:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except RunError as e:                   # the configuration index of the launch → of the caller's list
        if e.config is not None:
            e.config = todo[e.config]
        raise
    for i in todo:                          # known once the launch is over: its wall time, the buffers it removed
        results[i].provenance.update(launch_wall_s=facts["launch_wall_s"],
                                     shm_buffers_removed=facts["shm_buffers_removed"])
        if cache:
            cache.put(keys[i], results[i])
    if tmp:
        shutil.rmtree(out, ignore_errors=True)
    return list(results)


def measure_sweep(model: ModelSpec, layout: Layout, workloads: Sequence[Workload], deployment: Deployment, *,
                  out: str | Path | None = None, resume: bool = False, backend: str | None = None,
                  emit: Callable[[dict, str | None], None], **kw) -> int:
    """``llmcomm measure``: every workload measured (one launch per dtype, :func:`measure_many`), each result handed
    to ``emit(obj, stored_path)`` in the order of ``workloads`` — ``obj`` the JSON object the command prints
    (:func:`~llmcomm.deployment.config_header` + ``ops``, ``traffic``, ``tokens``, ``ttft_s``, ``tpot_s``,
    ``e2e_s``, ``provenance``), ``stored_path`` the file it came from when ``resume`` skipped it (else None).
    With ``out`` each result is written to :class:`~llmcomm.measure.results.ResultsFolder` as it finishes (the
    ranks' files in ``ranks-<dtype>/``); ``resume`` skips configurations whose result is already there. A failed
    launch raises :class:`RunError` saying how many configurations finished and where they are. Returns the number
    of configurations skipped."""
    if resume and out is None:
        raise SpecError("--resume needs --out (the folder whose finished configurations are skipped)")
    deployment = check_run(model, layout, list(workloads), [deployment] * len(workloads), backend)[0]
    if out is not None:
        from llmcomm.record import writable_dir

        writable_dir(out, "results folder (--out)")
    folder = ResultsFolder(out, model, layout) if out is not None else None
    heads = [config_header(model, layout, w, deployment) for w in workloads]
    ready: dict[int, tuple[dict, str | None]] = {}
    if resume:
        for i, w in enumerate(workloads):
            obj = folder.stored(w, deployment, heads[i], backend)
            if obj is not None:
                ready[i] = (obj, str(folder.path(w, deployment)))
    skipped, emitted, finished = len(ready), 0, []
    bar = progress(len(workloads), "configurations", initial=skipped, enabled=None if sys.stderr.isatty() else False)

    def emit_ready():
        nonlocal emitted
        while emitted in ready:
            emit(*ready.pop(emitted))
            emitted += 1

    def done(i: int, res: MeasureResult) -> None:
        obj = dict(heads[i], ops=res.rows, traffic=res.traffic, tokens=res.tokens, ttft_s=res.ttft_s,
                   tpot_s=res.tpot_s, e2e_s=res.e2e_s, provenance=res.provenance)
        if folder is not None:
            folder.write(workloads[i], deployment, obj)          # atomic: a file that exists is complete
        ready[i] = (obj, None)
        finished.append(i)
        bar.update(workloads[i].label)
        emit_ready()

    emit_ready()
    try:
        for dtype in dict.fromkeys(w.dtype for w in workloads):          # one launch per dtype
            todo = [i for i, w in enumerate(workloads) if w.dtype == dtype and i not in ready and i >= emitted]
            if todo:
                measure_many(model, layout, [workloads[i] for i in todo], deployment=deployment, backend=backend,
                             out_dir=folder.ranks_dir(dtype) if folder else None,
                             on_result=lambda j, res, todo=todo: done(todo[j], res), **kw)
    except RunError as e:
        kept = f"; their results are in {out}" if out and finished else ""
        raise RunError(f"{e}\n{len(finished)} of {len(workloads) - skipped} configurations to run finished before "
                       f"the failure{kept}", rank=e.rank, run_dir=e.run_dir, config=e.config) from None
    finally:
        bar.close()
    return skipped


def rank_spec(model: ModelSpec, layout: Layout, workload: Workload | Sequence[Workload], *, seed: int = 0,
              backend: str | None = None, reference: bool = True, sync: bool = False, capture: bool = True,
              deployments: Sequence[Deployment] | None = None, options: Mapping[str, Any] | None = None) -> dict:
    """The ``spec.json`` every rank reads (format in :mod:`llmcomm.measure.runs.rankio`); a list of workloads is a
    sweep in one launch (``"workloads"``, each with its configuration's own ``"options"``; ``"workload"`` is the
    first). ``deployments`` (one per workload) give each configuration's options; ``options`` are runner-specific
    launch options (the benchmarks')."""
    workloads = [workload] if isinstance(workload, Workload) else list(workload)
    deps = list(deployments) if deployments is not None else [Deployment()] * len(workloads)
    entries = [dict(w.as_dict(), options=d.config_options(layout)) for w, d in zip(workloads, deps)]
    spec = {"model": {"name": model.name, "hf_config": dict(model.hf_config) or _hf_dict(model)},
            "layout": {"t": layout.t, "p": layout.p, "e": layout.e},
            "workload": workloads[0].as_dict() if workloads else None, "seed": seed, "backend": backend,
            "reference": reference, "sync": sync, "capture": capture, "options": dict(options or {})}
    if not isinstance(workload, Workload):
        spec["workloads"] = entries
    return spec


def _hf_dict(m: ModelSpec) -> dict:
    """HF config keys of a ModelSpec built without one."""
    return {"hidden_size": m.h, "num_hidden_layers": m.L, "num_attention_heads": m.heads,
            "num_key_value_heads": m.kv_heads, "intermediate_size": m.ffn, "vocab_size": m.V,
            "tie_word_embeddings": m.tied, "head_dim": m.head_dim}
