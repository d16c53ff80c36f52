"""The rank-side harness every runner shares (``runs/tp.py``, ``runs/pipeline.py``, ``runs/bench.py``, …): the rank
protocol, distributed init, fault hooks for tests, and the per-rank result files. A runner is a function
``run(ctx)`` plus ``if __name__ == "__main__": sys.exit(rank_main(run, entry="llmcomm.measure.runs.NAME"))``. It either
returns one dict (one result: the microbenchmark, the overhead benchmark) or is a generator that yields one dict per
workload of ``ctx.workloads`` (a sweep in one launch: ``runs/tp.py``, ``runs/pipeline.py``), capturing each
configuration with :meth:`RankContext.capture` after its model setup was captured once with
:meth:`RankContext.setup_capture`.

Rank protocol (what :func:`llmcomm.measure.launch.launch_ranks` starts on each rank through the DeepSpeed launcher;
not a user command)::

    python -m llmcomm.measure.runs.NAME --spec RUN/spec.json --out RUN [--local_rank=N]

``spec.json`` (written once by the launcher)::

    {"model": {"name": str, "hf_config": {...}} | null,   # ModelSpec.from_hf_config(hf_config, name)
     "layout": {"t": int, "p": int} | null,
     "workload": {"b": int, "S": int, "G": int, "dtype": "fp32"|"bf16"|"fp16"} | null,
     "workloads": [{"b", "S", "G", "dtype",                # a sweep: one configuration each, one dtype,
                    "options": {...}}, ...] | absent,        #   each with its own options (routing, p2p mode)
     "seed": int, "backend": null|"gloo"|"nccl", "reference": bool, "sync": bool, "capture": bool,
     "options": {...}}                                       # the launch's: a benchmark's extras; "profile": true
                                                             #   adds a "profile" to each configuration's result
                                                             #   (RankContext.profiled)

Per-rank result ``RUN/rank{r}.json`` (format ``llmcomm.rank/1``; written to a temporary name and renamed, so a file
that exists is complete). A sweep runner writes ``RUN/rank{r}.c{i}.json`` in this format for configuration i as soon
as it is done (``"config": i``; its ``events`` = the setup's, shared by every configuration of the launch, then its
own), and at the end ``RUN/rank{r}.json`` without events and with ``"configs": n``::

    {"format": "llmcomm.rank/1", "entry": "llmcomm.measure.runs.tp",
     "rank": int, "local_rank": int, "world_size": int, "pid": int, "hostname": str, "device": "cpu"|"cuda:N",
     "comm": {"backend": "gloo"|"nccl", "allreduce_path": "shm"|"process_group"},
     "events": [Event.as_dict(), ...],                     # measure.capture.Event: rank, seq, phase, op, api, dtype,
                                                           #   shape, bytes (nccl-tests S), group, peer, async_op,
                                                           #   t_start, t_end (epoch seconds)
     "phase_spans": [{"rank", "phase", "t_start", "t_end"}, ...],
     "tokens": [[int] * G] * b | null,                     # the generated ids as this rank sees them (null on ranks
                                                           #   that never see logits, e.g. non-last pipeline stages)
     "reference_tokens": [[int] * G] * b | null,           # single-process reference (rank 0 only)
     "timings": {"ttft_s", "tpot_s", "e2e_s", "decode_steps_s"},
     "versions": {"python", "torch", "deepspeed", "transformers", "cuda"},
     ...}                                                  # plus whatever else the runner returned

Heartbeat: ``RUN/rank{r}.beat`` is touched at the start of every configuration, phase and forward
(:meth:`RankContext.beat`); the launcher's progress watchdog reads its time (:mod:`llmcomm.measure.supervise`).

On an exception the rank writes ``RUN/rank{r}.error.json`` (``{"rank", "error", "traceback"}``) and exits 1; on
SIGUSR1 it dumps its Python stack to ``RUN/rank{r}.stack`` (the launcher does so on a timeout to tell a hung rank from
ranks blocked in a collective).

Test hooks (environment): ``LLMCOMM_TEST_KILL_RANK=r`` makes rank r fail on entering phase
``LLMCOMM_TEST_KILL_PHASE`` (default ``decode``; in configuration ``LLMCOMM_TEST_KILL_CONFIG`` of a sweep, default the
first that enters it) by ``LLMCOMM_TEST_KILL_MODE``: ``exit`` (``os._exit(3)``, default), ``hang`` (sleeps forever,
outside any collective) or ``in_op_load`` (dies inside torch's JIT load of DeepSpeed's shm op, holding torch's
baton: what an interrupted first run leaves behind; see :mod:`llmcomm.measure.oplock`).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcomm.record import write_json
from llmcomm.spec import ModelSpec, Layout, Workload

__all__ = ["RankContext", "rank_main", "RESULT_FORMAT"]

RESULT_FORMAT = "llmcomm.rank/1"


@dataclass
class RankContext:
    """What a runner needs to know about its rank and its run."""

    rank: int
    local_rank: int
    world_size: int
    model: ModelSpec | None
    layout: Layout | None
    workload: Workload | None           # the first (or only) workload: its dtype is the launch's
    seed: int
    backend: str | None
    reference: bool
    sync: bool
    capture_enabled: bool
    out_dir: Path
    device: Any = None
    dtype: str = "fp32"
    options: dict = field(default_factory=dict)
    workloads: list = field(default_factory=list)    # every configuration of the launch, in order
    config_options: list = field(default_factory=list)   # each configuration's own options (routing, p2p mode)
    config: int | None = None           # the configuration being captured (sweep runners), for the fault hook
    last_capture: Any = None            # the capture made by capture(); rank_main saves its events
    setup_cap: Any = None               # the capture made by setup_capture(): shared by every configuration

    def capture(self, enabled: bool | None = None):
        """A :class:`~llmcomm.measure.capture.Capture` for this rank (a do-nothing stand-in when disabled, as the overhead
        benchmark's baseline is). Its events end up in the rank's result file."""
        from llmcomm.measure.capture import Capture

        on = self.capture_enabled if enabled is None else enabled
        self.last_capture = Capture(rank=self.rank, sync=self.sync) if on else _NoCapture(self.rank)
        return self.last_capture

    def setup_capture(self):
        """The capture of the model setup (phase ``setup``) of a sweep runner: made once per launch, its events open
        every configuration's result (what that configuration's model needed to exist)."""
        cap = self.capture()
        self.setup_cap, self.last_capture = cap, None
        return cap

    def beat(self) -> None:
        """Tell the launcher this rank makes progress (its progress watchdog; module docs)."""
        with open(self.out_dir / f"rank{self.rank}.beat", "w") as f:
            f.write(f"{self.config} {time.time():.3f}")

    def deployment(self, i: int | None = None):
        """The :class:`~llmcomm.deployment.Deployment` of configuration ``i`` (default: the current one): its routing,
        stage-to-stage mode and expert layout."""
        from llmcomm.deployment import Deployment

        i = self.config if i is None else i
        return Deployment.from_options(self.config_options[i] if i is not None and i < len(self.config_options)
                                       else {})

    def phase_hook(self, cap) -> Callable[[str], Any]:
        """``cap.phase`` with a heartbeat on entering each phase, plus the test fault hook (see module docstring)."""
        kill_rank = os.environ.get("LLMCOMM_TEST_KILL_RANK")
        kill = kill_rank is not None and int(kill_rank) == self.rank
        kill_phase = os.environ.get("LLMCOMM_TEST_KILL_PHASE", "decode")
        kill_config = os.environ.get("LLMCOMM_TEST_KILL_CONFIG")
        mode = os.environ.get("LLMCOMM_TEST_KILL_MODE", "exit")

        @contextlib.contextmanager
        def hooked(name):
            with cap.phase(name):
                self.beat()
                if kill and name == kill_phase and (kill_config is None or int(kill_config) == self.config):
                    _test_fault(mode)
                yield

        return hooked

    def profiled(self, forward, hf_model, input_ids, G: int) -> dict:
        """``{"profile": ...}``: one extra generation of the configuration under ``torch.profiler``
        (:func:`llmcomm.measure.opprofile.profile_generation`), run after its timed generation and never instead of
        it, when the launch's options ask for it (``"profile": true``); else ``{}``. Collective (every rank calls it)."""
        if not self.options.get("profile"):
            return {}
        from llmcomm.measure.opprofile import profile_generation

        return {"profile": profile_generation(forward, hf_model, input_ids, G, rank=self.rank, beat=self.beat)}

    def sweep(self):
        """``(i, workload)`` for every configuration of the launch, ``self.config`` set to i meanwhile."""
        for i, w in enumerate(self.workloads):
            self.config = i
            self.beat()
            yield i, w
        self.config = None


def fault_in_op_load() -> None:
    """Test fault ``in_op_load`` (module docstring), when asked for this rank: die inside torch's JIT load right
    after torch took its baton (the real FileBaton, the real lock file), as a rank killed while loading DeepSpeed's
    op does."""
    kill_rank = os.environ.get("LLMCOMM_TEST_KILL_RANK")
    if kill_rank is None or int(kill_rank) != int(os.environ.get("RANK", "0")) or \
            os.environ.get("LLMCOMM_TEST_KILL_MODE") != "in_op_load":
        return
    from torch.utils.file_baton import FileBaton

    real = FileBaton.try_acquire

    def acquire_then_die(self):
        if real(self):
            os._exit(3)
        return False

    FileBaton.try_acquire = acquire_then_die


def _test_fault(mode: str) -> None:
    if mode == "hang":
        while True:                     # outside any collective: the launcher's stack dump must show it here
            time.sleep(3600)
    os._exit(3)


class _NoCapture:
    """Stand-in with Capture's interface that records nothing."""

    def __init__(self, rank):
        self.rank = rank
        self.events = []
        self.phase_spans = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @contextlib.contextmanager
    def phase(self, name):
        yield self


def _parse(argv: list[str]) -> tuple[Path, Path, int | None]:
    """(spec, out, local_rank) of the rank protocol: ``--spec FILE --out DIR [--local_rank=N | --local_rank N]`` (the
    DeepSpeed launcher appends ``--local_rank``). Not a user command line: a malformed one is a programming error."""
    vals: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        key, eq, val = arg.partition("=")
        if key not in ("--spec", "--out", "--local_rank"):
            raise SystemExit(f"rank protocol: unexpected argument {arg!r} (expected --spec FILE --out DIR)")
        vals[key] = val if eq else next(it)
    local = vals.get("--local_rank")
    return Path(vals["--spec"]), Path(vals["--out"]), (int(local) if local is not None else None)


def _init_distributed(ctx: RankContext) -> dict:
    """Initialise deepspeed.comm; returns ``{"backend", "allreduce_path"}``."""
    import torch
    import deepspeed
    import deepspeed.comm as dist

    from llmcomm.measure.oplock import preload_shm_op

    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    preload_shm_op()                    # the JIT load init_distributed would do, under a lock: llmcomm.measure.oplock
    deepspeed.init_distributed(dist_backend=ctx.backend, verbose=False)
    cdb = dist.comm.cdb
    if ctx.backend == "gloo":
        # TorchBackend.inference_all_reduce takes the shm kernel whenever it is loaded and the CPU's vector level
        # allows; level 0 sends it to torch.distributed.all_reduce on the process group instead.
        cdb.shm_vector_kernel_level = 0
    use_shm = (ctx.device.type == "cpu" and hasattr(torch.ops, "deepspeed")
               and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
               and getattr(cdb, "shm_vector_kernel_level", 0) >= (1 if ctx.dtype == "fp32" else 2))
    return {"backend": torch.distributed.get_backend(), "allreduce_path": "shm" if use_shm else "process_group"}


def _captured(cap) -> dict:
    return {"events": [e.as_dict() for e in cap.events] if cap is not None else [],
            "phase_spans": cap.phase_spans if cap is not None else []}


def rank_main(run: Callable[[RankContext], Any], entry: str, argv=None) -> int:
    """Run ``run`` on this rank and write its result file(s); returns the process exit status."""
    spec_path, out, local_arg = _parse(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    # Dump the stack on SIGUSR1 even while blocked in C (a collective): the launcher's hang diagnosis.
    stack_file = open(out / f"rank{rank}.stack", "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        spec = json.loads(spec_path.read_text())
        if spec.get("backend") == "gloo":
            # Without LOCAL_SIZE the shm kernel never maps its 66 MiB /dev/shm buffer (it is not used under gloo).
            os.environ.pop("LOCAL_SIZE", None)
        from llmcomm.measure.runs.common import pick_device, versions

        entries = spec.get("workloads") or ([spec["workload"]] if spec.get("workload") else [])
        workloads = [Workload(**{k: v for k, v in w.items() if k != "options"}) for w in entries]
        workload = workloads[0] if workloads else None
        model = ModelSpec.from_hf_config(spec["model"]["hf_config"], name=spec["model"]["name"]) \
            if spec.get("model") else None
        options = dict(spec.get("options") or {})
        local_rank = int(os.environ.get("LOCAL_RANK", local_arg or 0))
        dtype = workload.dtype if workload else options.get("dtype", "fp32")
        ctx = RankContext(rank=rank, local_rank=local_rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                          model=model, layout=Layout(**spec["layout"]) if spec.get("layout") else None,
                          workload=workload, workloads=workloads, seed=int(spec.get("seed", 0)),
                          config_options=[dict(w.get("options") or {}) for w in entries],
                          backend=spec.get("backend"), reference=bool(spec.get("reference", True)),
                          sync=bool(spec.get("sync", False)), capture_enabled=bool(spec.get("capture", True)),
                          out_dir=out, options=options, dtype=dtype, device=pick_device(dtype, local_rank))
        comm = _init_distributed(ctx)
        base = {"format": RESULT_FORMAT, "entry": entry, "rank": rank, "local_rank": local_rank,
                "world_size": ctx.world_size, "pid": os.getpid(), "hostname": socket.gethostname(),
                "device": str(ctx.device), "comm": comm, "events": [], "phase_spans": [],
                "tokens": None, "reference_tokens": None, "timings": {}, "versions": versions()}
        result = run(ctx)
        if isinstance(result, dict):                # one result
            write_json(out / f"rank{rank}.json", {**base, **_captured(ctx.last_capture), **result})
        else:                                       # a sweep: one file per configuration, as each is done
            n = 0
            for n, res in enumerate(result, start=1):
                setup, own = _captured(ctx.setup_cap), _captured(ctx.last_capture)
                write_json(out / f"rank{rank}.c{n - 1}.json",
                           {**base, "config": n - 1, "events": setup["events"] + own["events"],
                            "phase_spans": setup["phase_spans"] + own["phase_spans"], **res})
            write_json(out / f"rank{rank}.json", {**base, "configs": n})
        _shutdown()
        return 0
    except BaseException as e:                    # noqa: BLE001 - every failure must leave a readable report
        write_json(out / f"rank{rank}.error.json",
                   {"rank": rank, "config": getattr(locals().get("ctx"), "config", None),
                    "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1


def _shutdown() -> None:
    try:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:                             # pragma: no cover - best effort at exit
        pass
