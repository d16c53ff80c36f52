"""Start the ranks of a measurement with the DeepSpeed launcher, watch them, gather and check their results.

:func:`measure` is the measurement half of the predict ⇄ measure loop, :func:`measure_many` the same for a sweep::

    res = measure(load_model("tiny-llama"), Layout(t=2), Workload(b=1, S=8, G=4))
    res.rows        # [{"phase", "op", "group_size", "calls", "bytes", …}, ...]  (llmcomm.measure.capture.aggregate)
    many = measure_many(model, Layout(t=2), [Workload(1, 8, 4), Workload(4, 128, 4)])   # one launch, two results

A sweep is one launch: the ranks build and shard the model once and generate each configuration in turn
(``runs/tp.py``), writing ``rank{r}.c{i}.json`` as each is done; the launcher assembles configuration i as soon as
every rank has it, so a sweep that fails part-way has delivered what it finished.

How a run goes
--------------
* DeepSpeed's per-node launcher, ``python -m deepspeed.launcher.launch --world_info=<{"localhost": [0..N-1]}>
  --master_addr=127.0.0.1 --master_port=<free> --module llmcomm.measure.launch --entry llmcomm.measure.runs.tp
  --spec RUN/spec.json --out RUN`` — exactly what ``deepspeed --num_gpus N ...`` runs after resolving hosts — in its
  own session (process group). It starts N processes with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*, and ``LOCAL_SIZE=N``,
  which is what enables DeepSpeed's shared-memory all-reduce on CPU. N = t·p; the rank entry is :func:`entry_for`
  (``runs/tp.py`` for p = 1, ``runs/pipeline.py`` otherwise); every entry — the microbenchmark's and the overhead
  benchmark's too — follows the contract of :mod:`llmcomm.measure.runs.rankio`.
* Each rank runs under a tiny supervisor (this module run as ``__main__``): it starts the real rank process with its
  output in ``RUN/rank{r}.log``, records its pid (``rank{r}.pid``) and, when it ends, its exit status
  (``rank{r}.exit.json``). DeepSpeed's launcher only says "a process died" and then kills the rest; the exit files
  tell which rank died first and how.
* The whole session is killed when a rank dies or when ``timeout_s`` passes. On a timeout every rank is first asked
  for its Python stack (SIGUSR1 → faulthandler): a rank outside any collective is the one that hung, ranks inside one
  were waiting for it. Either way :class:`RunError` is raised once, naming the rank, with the tail of its log.
* ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (66 MiB per rank, never removed by DeepSpeed)
  are removed for this run's port, whatever happened. Other runs' buffers (other ports) are left alone.
* On a GPU node (``DS_ACCELERATOR`` not ``cpu``) each rank gets one GPU: the launcher's world_info lists the first N
  visible GPUs (``CUDA_VISIBLE_DEVICES`` when set, else all that ``nvidia-smi -L`` lists), the launcher exports them as
  ``CUDA_VISIBLE_DEVICES`` and rank r computes on ``cuda:{LOCAL_RANK}``; fewer GPUs than ranks is refused up front.
  DeepSpeed picks NCCL; ``LOCAL_SIZE`` (set by the launcher) only matters to the CPU shm all-reduce.
* Several nodes: ``measure(..., hostfile=H, out_dir=SHARED)`` starts DeepSpeed's runner instead
  (:func:`launcher_cmd`).

Why the reference generation runs on rank 0 (before it shards its model) and not in this process: it uses exactly
the weights the ranks use (built once, same seed), and this process stays free of torch — it is started from the CLI
and from tests, and on a small machine a fourth 400 MB process competing with the ranks would only slow them.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llmcomm.measure.oplock import describe_wait
from llmcomm.record import atomic_write_text, provenance as record_provenance, repo_root, write_json
from llmcomm.spec import Layout, ModelSpec, SpecError, Workload, cpu_threads_per_rank

__all__ = ["RunError", "MeasureResult", "measure", "measure_many", "launch_ranks", "progress", "progress_enabled", "rank_spec", "provenance", "entry_for", "default_env",
           "launcher_cmd", "read_hostfile", "SHM_PREFIX", "allreduce_algorithm", "node_of_records"]

SHM_PREFIX = "deepspeed_allreduce_buffer"
BACKENDS = (None, "gloo", "nccl")
# frames that mean "inside a collective" in a faulthandler stack dump
_COMM_MARKERS = ("deepspeed/comm/", "torch/distributed/", "llmcomm/capture.py")


class RunError(RuntimeError):
    """A measurement that did not produce a valid result: a rank died, hung, failed, or produced wrong tokens.

    ``rank`` is the rank at fault (None when unknown), ``run_dir`` the run folder (kept for inspection),
    ``master_port`` the port the run used (its shm buffers are named after it), ``config`` the index of the
    configuration of a sweep that failed (None outside a sweep or before any configuration ran)."""

    def __init__(self, message: str, *, rank: int | None = None, run_dir: Path | None = None,
                 master_port: int | None = None, config: int | None = None):
        super().__init__(message)
        self.rank, self.run_dir, self.master_port, self.config = rank, run_dir, master_port, config


@dataclass
class MeasureResult:
    """What a measurement gives: aggregated rows, tokens, timings (max over ranks, seconds), raw events, provenance."""

    rows: list[dict]
    tokens: list[list[int]]
    reference_tokens: list[list[int]] | None
    ttft_s: float
    tpot_s: float
    e2e_s: float
    events: list[dict]
    provenance: dict
    ranks: list[dict] = field(default_factory=list, repr=False)   # the per-rank records (rankio format)
    traffic: dict = field(default_factory=dict)                   # llmcomm.derive.traffic.summary of the run

    @property
    def tokens_match(self) -> bool | None:
        return None if self.reference_tokens is None else self.tokens == self.reference_tokens

    @property
    def phase_spans(self) -> list[dict]:
        return [s for r in self.ranks for s in r.get("phase_spans", [])]

    def as_dict(self, events: bool = False) -> dict:
        """JSON-ready summary (``{"ops": rows, ...}``, the CLI's output); raw events only when asked."""
        d = {"ops": self.rows, "traffic": self.traffic, "tokens": self.tokens, "reference_tokens": self.reference_tokens,
             "tokens_match": self.tokens_match, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
             "provenance": self.provenance}
        if events:
            d["events"] = self.events
        return d


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


def has_cuda() -> bool:
    """Whether the ranks will see a GPU, without importing torch here (honours CUDA_VISIBLE_DEVICES='' / -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def gpu_ids(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this node lets the ranks use, without importing torch: ``CUDA_VISIBLE_DEVICES`` when set (ids or
    UUIDs, in its order; ``""``/``-1`` = none), else one id per GPU ``nvidia-smi -L`` lists; ``[]`` without a GPU."""
    env = os.environ if env is None else env
    vis = env.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [] if vis.strip() in ("", "-1") else [d.strip() for d in vis.split(",") if d.strip()]
    if not has_cuda():
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    n = sum(1 for ln in out.stdout.splitlines() if ln.startswith("GPU ")) if out.returncode == 0 else 0
    return [str(i) for i in range(n)]


def read_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` of a DeepSpeed hostfile (``node1 slots=8`` per line, ``#`` comments)."""
    hosts: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SpecError(f"hostfile {path}: {e.strerror or e}") from None
    for ln in lines:
        ln = ln.split("#", 1)[0].strip()
        if not ln:
            continue
        parts = ln.split()
        try:
            if len(parts) != 2 or not parts[1].startswith("slots="):
                raise ValueError
            slots = int(parts[1][len("slots="):])
            if slots < 1 or parts[0] in hosts:
                raise ValueError
        except ValueError:
            raise SpecError(f"hostfile {path}: bad line {ln!r} (expected 'HOST slots=N', each host once)") from None
        hosts[parts[0]] = slots
    if not hosts:
        raise SpecError(f"hostfile {path} names no host")
    return hosts


def launcher_cmd(entry: str, spec_path: Path, out: Path, nranks: int, port: int, *,
                 local_ids: list | None = None, hostfile: str | Path | None = None) -> list[str]:
    """The command that starts the ranks.

    One node (default): DeepSpeed's per-node launcher with ``world_info = {"localhost": local_ids}`` (default
    ``0..nranks-1``; on a GPU node the visible GPU ids, which it exports as ``CUDA_VISIBLE_DEVICES``) — exactly what
    ``deepspeed --num_gpus N`` runs after resolving its hosts, minus the runner's own import.
    Several nodes (``hostfile``): DeepSpeed's runner (``deepspeed --hostfile``), which reaches the other nodes over
    password-less ssh (pdsh) and picks the master address from the first host."""
    tail = ["--module", "llmcomm.measure.launch", "--entry", entry, "--spec", str(spec_path), "--out", str(out)]
    if hostfile is not None:
        return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                f"--master_port={port}", *tail]
    ids = list(range(nranks)) if local_ids is None else list(local_ids)[:nranks]
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": ids}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *tail]


def default_env(nranks: int, env: Mapping[str, str] | None = None) -> dict:
    """The ranks' environment: ours, then ``env``, then defaults for what is unset.

    ``DS_ACCELERATOR=cpu`` without CUDA (silences DeepSpeed's detection); ``TORCH_EXTENSIONS_DIR`` in the repository's
    ``.cache/torch_extensions`` (the shm op is JIT-compiled once, ~30 s, and cached there); ``OMP_NUM_THREADS`` =
    cores / ranks so that ranks do not oversubscribe the CPU.
    """
    out = dict(os.environ)
    out.update(env or {})
    if not has_cuda():
        out.setdefault("DS_ACCELERATOR", "cpu")
    root = repo_root()
    cache = root / ".cache" / "torch_extensions" if (root / "pyproject.toml").exists() else \
        Path.home() / ".cache" / "llmcomm" / "torch_extensions"
    out.setdefault("TORCH_EXTENSIONS_DIR", str(cache))
    out.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nranks)))
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.setdefault("TOKENIZERS_PARALLELISM", "false")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove_shm(port: int) -> list[str]:
    """Remove this run's DeepSpeed shm all-reduce buffers (named after uid, master address and port)."""
    removed = []
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return removed
    for p in shm.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"):
        try:
            p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed


def _kill_session(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGKILL the launcher's whole process group (launcher, supervisors, ranks) and wait until it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:       # pragma: no cover - SIGKILL does not fail
        pass
    # The ranks are grandchildren: they die asynchronously. Wait until no live member of the group is left.
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a non-zombie process of process group ``pgid`` exists (Linux /proc; elsewhere: ask the kernel)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":     # fields: state, ppid, pgrp, ...
            return True
    return False


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    keep = [ln for ln in lines if ln.strip()][-n:]
    return "\n".join(keep) if keep else "(empty log)"


def _parse_stack(path: Path) -> list[list[tuple[str, str, str]]]:
    """faulthandler dump → threads, each a list of (file, line, function), most recent call first."""
    threads: list[list[tuple[str, str, str]]] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return threads
    for ln in text.splitlines():
        s = ln.strip()
        if s.startswith(("Thread ", "Current thread ")):
            threads.append([])
        elif s.startswith("File ") and threads:
            # File "/x/y.py", line 12 in func
            try:
                f, rest = s[6:].split('", line ', 1)
                line, func = rest.split(" in ", 1)
            except ValueError:
                continue
            threads[-1].append((f, line, func))
    return threads


def _where(frames) -> str:
    f, line, func = frames[0]
    return f"{Path(f).name}:{line} in {func}"


def _diagnose_hang(out: Path, pending: list[int], env: Mapping[str, str] | None = None) -> tuple[list[int], str]:
    """Ask the pending ranks for their stacks; return (culprit ranks, description). A rank waiting on a JIT-load lock
    is named with the lock file (:func:`llmcomm.measure.oplock.describe_wait`)."""
    pids = {}
    for r in pending:
        try:
            pids[r] = int((out / f"rank{r}.pid").read_text())
        except (FileNotFoundError, ValueError):
            pass
    here = socket.gethostname()
    for r in list(pids):              # a rank on another node (hostfile runs): its pid means nothing here
        host = (out / f"rank{r}.host")
        if host.exists() and host.read_text().strip() != here:
            del pids[r]
    for r, pid in pids.items():
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    outside, inside, unknown, locked = [], [], [], []
    for r in pending:
        threads = _parse_stack(out / f"rank{r}.stack")
        main = next((th for th in threads if any("llmcomm" in f for f, _, _ in th)), threads[0] if threads else [])
        if not main:
            unknown.append((r, "no stack: still starting or not a Python rank"))
            continue
        lock = describe_wait(main, env)
        if lock:
            locked.append((r, lock))
            continue
        comm = [fr for fr in main if any(m in fr[0] for m in _COMM_MARKERS)]
        if comm:
            inside.append((r, _where(comm)))
        else:
            outside.append((r, _where(main)))
    parts = ["; ".join(f"rank {r} {what}" for r, what in locked)] if locked else []
    if locked:
        culprits = [r for r, _ in locked]
    elif outside:
        culprits = [r for r, _ in outside]
        parts.append("; ".join(f"rank {r} hung outside any collective (at {w})" for r, w in outside))
        if inside:
            parts.append("while " + ", ".join(f"rank {r}" for r, _ in inside) + " waited in a collective (at "
                         + inside[0][1] + ")")
    elif inside:
        culprits = [r for r, _ in inside]
        parts.append("ranks " + ", ".join(str(r) for r, _ in inside) + " were all blocked in collectives (at "
                     + inside[0][1] + "): mismatched collectives or a peer that never joined")
    else:
        culprits = [r for r, _ in unknown] or pending
    if unknown:
        parts.append("; ".join(f"rank {r}: {why}" for r, why in unknown))
    if not parts:
        parts.append("every rank had written its result, but the launcher had not exited" if not pending else
                     "no rank reported a stack")
    return culprits, " ".join(parts)


def _failure(out: Path, nranks: int, launcher_rc: int | None) -> tuple[int | None, str]:
    """After a run ended without all results: which rank failed first, and how."""
    errors = {r: _read_json(out / f"rank{r}.error.json") for r in range(nranks)}
    errors = {r: e for r, e in errors.items() if e}
    if errors:
        r = min(errors)
        return r, f"rank {r} failed: {errors[r]['error']}"
    exits = [e for e in (_read_json(out / f"rank{r}.exit.json") for r in range(nranks)) if e and e["returncode"]]
    if exits:
        # the first to go is the culprit; the rest were killed by the launcher afterwards (SIGKILL, later)
        first = min(exits, key=lambda e: (e["returncode"] == -signal.SIGKILL, e["t"]))
        rc = first["returncode"]
        how = f"was killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exited with status {rc}"
        return first["rank"], f"rank {first['rank']} {how} before writing its result"
    return None, f"the DeepSpeed launcher exited with status {launcher_rc} before any rank reported"


class _Configs:
    """The configurations of a sweep launch as the ranks finish them: configuration i is complete when every rank
    wrote ``rank{r}.c{i}.json``; :meth:`collect` hands complete ones to ``on_config(i, records)`` in order, once."""

    def __init__(self, out: Path, nranks: int, n: int, on_config: Callable[[int, list[dict], dict], None] | None,
                 facts: dict):
        self.out, self.nranks, self.n, self.on_config, self.done = out, nranks, n, on_config, 0
        self.facts, self.t0 = facts, time.monotonic()

    def collect(self) -> bool:
        """Hand over what is newly complete; True when something was."""
        before = self.done
        while self.on_config is not None and self.done < self.n:
            recs = [_read_json(self.out / f"rank{r}.c{self.done}.json") for r in range(self.nranks)]
            if not all(recs):
                break
            i, self.done = self.done, self.done + 1        # counted first: a failing on_config is not retried
            self.on_config(i, recs, dict(self.facts, done_after_s=round(time.monotonic() - self.t0, 3)))
        return self.done > before


def launch_ranks(entry: str, spec: Mapping[str, Any], nranks: int, out: Path, *, timeout_s: float,
                 env: Mapping[str, str] | None = None, hostfile: str | Path | None = None,
                 on_poll: Callable[[Path], None] | None = None,
                 on_config: Callable[[int, list[dict], dict], None] | None = None) -> tuple[list[dict], dict]:
    """Start ``nranks`` ranks of ``entry`` with ``spec`` (the rankio spec) and return their result records (sorted by
    rank) and the launch facts (command, port, wall time). Raises :class:`RunError` on any failure or timeout; always
    removes this run's shm buffers and leaves no process behind on this node. With ``hostfile`` the ranks run on
    the nodes it names (:func:`launcher_cmd`); ``out`` must then be on a file system every node shares, and on a
    timeout only this node's processes are stopped and asked for their stacks. ``on_poll(out)`` is called about ten
    times a second while the ranks run (progress bars read the ranks' progress files there).

    A sweep (``spec["workloads"]`` with ``on_config``): ``on_config(i, records, facts)`` is called with the ranks'
    records of configuration i and the launch facts known so far (command, port, ``done_after_s`` since the start) as
    soon as all ranks finished it, in order, also when a later configuration fails (before the
    :class:`RunError`, whose ``config`` then names the configuration that failed). ``timeout_s`` is the time the
    launch may go without finishing a configuration (start-up included in the first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("rank*.*")) + list(out.glob(".rank*")):     # a previous run in the same folder
        stale.unlink()
    spec_path = write_json(out / "spec.json", spec, indent=1)
    port = _free_port()
    full_env = default_env(nranks, env)
    # One node: the GPUs the caller made visible (CUDA_VISIBLE_DEVICES), one rank per GPU; on CPU 0..N-1.
    local_ids = None
    if hostfile is None and full_env.get("DS_ACCELERATOR", "cuda") != "cpu":
        gpus = gpu_ids(full_env)
        if gpus:
            if len(gpus) < nranks:
                raise SpecError(f"{nranks} ranks need {nranks} GPUs (one each; NCCL does not share a GPU); "
                                f"this node shows {len(gpus)}")
            local_ids = gpus[:nranks]
            full_env.pop("CUDA_VISIBLE_DEVICES", None)       # the launcher sets it from world_info
    cmd = launcher_cmd(entry, spec_path, out, nranks, port, local_ids=local_ids, hostfile=hostfile)
    facts = {"command": shlex.join(cmd), "master_port": port, "omp_num_threads": full_env.get("OMP_NUM_THREADS")}
    configs = _Configs(out, nranks, len(spec.get("workloads") or ()), on_config, facts)
    t0 = time.monotonic()
    with open(out / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                cwd=str(out))
    error, ended = None, False
    try:
        deadline = t0 + timeout_s
        while True:
            rc = proc.poll()
            done = [r for r in range(nranks) if (out / f"rank{r}.json").exists()]
            if configs.collect():
                deadline = time.monotonic() + timeout_s       # progress: the watchdog starts again
            if rc is not None:
                break
            died = [e for e in (_read_json(out / f"rank{r}.exit.json") for r in range(nranks))
                    if e and e["returncode"]]
            if died:
                break                               # do not wait for the launcher's 1 s poll to notice
            if on_poll is not None:
                on_poll(out)
            if time.monotonic() > deadline:
                pending = [r for r in range(nranks) if r not in done]
                culprits, what = _diagnose_hang(out, pending, full_env)
                error = (culprits[0] if culprits else None,
                         f"timed out after {timeout_s:g} s without progress: {what}")
                break
            time.sleep(0.1)
        ended = True
    finally:
        _kill_session(proc)
        removed = _remove_shm(port)
        wall = time.monotonic() - t0
    if ended:
        configs.collect()                          # what finished just before the end is kept
    records = [_read_json(out / f"rank{r}.json") for r in range(nranks)]
    if error is None and not all(records):
        error = _failure(out, nranks, proc.returncode)
    if error is not None:
        rank, what = error
        where = ""
        if configs.n and configs.done < configs.n:
            w = spec["workloads"][configs.done]
            where = (f" in configuration {configs.done + 1} of {configs.n} (b={w['b']} S={w['S']} G={w['G']} "
                     f"{w['dtype']}; {configs.done} finished before it)")
        log = out / f"rank{rank}.log" if rank is not None else out / "launcher.log"
        raise RunError(f"{entry} with {nranks} ranks{where}: {what}. All ranks were stopped. Run folder: {out}\n"
                       f"--- last lines of {log.name} ---\n{_tail(log)}", rank=rank, run_dir=out, master_port=port,
                       config=configs.done if configs.n and configs.done < configs.n else None)
    return records, dict(facts, launch_wall_s=wall, shm_buffers_removed=len(removed))


def measure(model: ModelSpec, layout: Layout, workload: Workload, **kw) -> MeasureResult:
    """Run ``model`` with ``layout`` on ``workload`` as t·p real DeepSpeed ranks and return what they communicated:
    :func:`measure_many` with one workload (same options)."""
    return measure_many(model, layout, [workload], **kw)[0]


def measure_many(model: ModelSpec, layout: Layout, workloads: Sequence[Workload], *, timeout_s: float = 300,
                 out_dir: str | Path | None = None, backend: str | None = None, env: Mapping[str, str] | None = None,
                 seed: int = 0, sync: bool = False, entry: str | None = None, check_tokens: bool = True,
                 options: Mapping[str, Any] | None = None, hostfile: str | Path | None = None,
                 on_result: Callable[[int, MeasureResult], None] | None = None) -> list[MeasureResult]:
    """Run ``model`` with ``layout`` on every workload of ``workloads`` in **one** launch of t·p real DeepSpeed ranks
    (the model built and sharded once, the process group made once) and return one :class:`MeasureResult` per
    workload, in order, each captured on its own (its rows, the launch's setup, its timings, its tokens checked).

    ``on_result(i, result)`` is called as soon as configuration i is done (before a later one runs to its end), so a
    sweep that fails part-way has delivered what it finished; the :class:`RunError` then names the configuration
    (``.config``, its index) and the rank. All workloads must share one dtype (the model is built in it).

    ``backend``: None (DeepSpeed's default: shm all-reduce on CPU, NCCL on CUDA; on CPU a hybrid t×p with t, p > 1
    gets gloo, because the shm all-reduce ignores sub-groups), ``"gloo"`` (every collective through gloo) or
    ``"nccl"``. ``out_dir`` keeps the run folder (spec, per-rank JSON and logs); without it a temporary folder is used
    and removed after a success. ``entry`` overrides the rank module (default :func:`entry_for`). With
    ``check_tokens`` the generated tokens must equal the single-process reference: a mismatch raises
    :class:`RunError` in fp32 and warns in bf16/fp16 (rounding of a different summation order can flip a near-tie
    there). ``hostfile`` (a DeepSpeed hostfile, ``HOST slots=N`` per line, slots summing to t·p) runs the ranks across
    nodes through DeepSpeed's runner; it needs ``out_dir`` on a file system all nodes share (the ranks write their
    results there), the same checkout and environment at the same path on every node, and password-less ssh from
    this node. ``timeout_s``: seconds the launch may go without finishing a configuration.
    """
    workloads = list(workloads)
    if not workloads:
        raise SpecError("no workload to measure")
    layout.validate(model)
    for w in workloads:
        w.validate(model)
        if layout.e > 1:
            from llmcomm.derive.moe import rank_batch

            rank_batch(w.b, layout.e)           # data-parallel attention: every EP rank runs b/e sequences
    if layout.e > 1:                            # what measure/moe_adapter.py adapts (it refuses the rest too)
        moe = model.moe
        if moe.shared_ffn or not moe.norm_topk or moe.top_k < 2:
            raise SpecError(f"expert parallelism of {model.name} is not adapted: DeepSpeed's MoE layer "
                            + ("would drop its shared expert" if moe.shared_ffn else
                               "renormalises the top-k weights (norm_topk_prob=False here)" if not moe.norm_topk else
                               "weights top-1 routes by the softmax probability, the HF model by 1"))
    experts = (options or {}).get("experts", "replicated")
    if experts not in ("replicated", "sharded"):
        raise SpecError(f"experts {experts!r} is not one of replicated (AutoTP as it is), sharded (tp-experts)")
    if experts == "sharded":
        if not model.is_moe or model.moe.shared_ffn:
            raise SpecError(f"sharded experts need a mixture of experts without a shared expert; {model.name} is "
                            f"{'dense' if not model.is_moe else 'one with a shared expert (not adapted)'}")
        if layout.t < 2 or layout.p > 1 or layout.e > 1:
            raise SpecError(f"sharded experts are measured with TP alone (t > 1, p = e = 1), not t={layout.t}, "
                            f"p={layout.p}, e={layout.e}")
        if model.moe.expert_ffn % layout.t:
            raise SpecError(f"t={layout.t} does not divide the expert width F_ex={model.moe.expert_ffn}")
    dtypes = sorted({w.dtype for w in workloads})
    if len(dtypes) > 1:
        raise SpecError(f"one launch builds the model in one dtype; got {', '.join(dtypes)} (one launch per dtype)")
    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r} is not one of gloo, nccl (or None for DeepSpeed's default)")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise SpecError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    if backend is None and max(layout.t, layout.e) > 1 and layout.p > 1 and not has_cuda():
        backend = "gloo"        # the shm all-reduce ignores sub-groups (book appendix "Dependency facts")
    if backend == "nccl" and not has_cuda():
        raise SpecError("backend 'nccl' needs CUDA GPUs; none found (use gloo or the default on CPU)")
    nranks = layout.ranks
    if hostfile is not None:
        slots = sum(read_hostfile(hostfile).values())
        if slots != nranks:
            raise SpecError(f"hostfile {hostfile} has {slots} slots; t·p = {nranks} ranks need exactly {nranks}")
        if out_dir is None:
            raise SpecError("a multi-node run (hostfile) needs out_dir on a file system every node shares")
    entry = entry or entry_for(layout)
    if importlib.util.find_spec(entry) is None:
        raise SpecError(f"rank entry module {entry!r} does not exist"
                        + (" (pipeline runs need llmcomm/measure/runs/pipeline.py)" if layout.p > 1 else ""))
    spec = rank_spec(model, layout, workloads, seed=seed, backend=backend, reference=check_tokens, sync=sync,
                     options=options)
    tmp = out_dir is None
    out = Path(tempfile.mkdtemp(prefix="llmcomm-run-")) if tmp else Path(out_dir)
    started = datetime.now(timezone.utc)
    results: list[MeasureResult] = []

    def take(i: int, records: list[dict], facts: dict) -> None:
        try:
            res = _assemble(records, model, layout, workloads[i], facts, started, entry, backend, check_tokens,
                            sweep={"index": i, "configs": len(workloads)})
        except RunError as e:
            raise RunError(f"configuration {i + 1} of {len(workloads)} ({workloads[i].label}): {e} "
                           f"(run folder: {out})", run_dir=out, config=i) from None
        results.append(res)
        if on_result is not None:
            on_result(i, res)

    try:
        _, facts = launch_ranks(entry, spec, nranks, out, timeout_s=timeout_s, env=env, hostfile=hostfile,
                                on_config=take)
    except SpecError:                       # refused before any rank started (e.g. too few GPUs)
        if tmp:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for r in results:                       # known once the launch is over: its wall time, the buffers it removed
        r.provenance.update(launch_wall_s=facts["launch_wall_s"], shm_buffers_removed=facts["shm_buffers_removed"])
    if tmp:
        shutil.rmtree(out, ignore_errors=True)
    return results


def rank_spec(model: ModelSpec, layout: Layout, workload: Workload | Sequence[Workload], *, seed: int = 0,
              backend: str | None = None, reference: bool = True, sync: bool = False, capture: bool = True,
              options: Mapping[str, Any] | None = None) -> dict:
    """The ``spec.json`` every rank reads (format in :mod:`llmcomm.measure.runs.rankio`); a list of workloads is a
    sweep in one launch (``"workloads"``; ``"workload"`` is the first)."""
    workloads = [workload] if isinstance(workload, Workload) else list(workload)
    spec = {"model": {"name": model.name, "hf_config": dict(model.hf_config) or _hf_dict(model)},
            "layout": {"t": layout.t, "p": layout.p, "e": layout.e}, "workload": workloads[0].as_dict(), "seed": seed,
            "backend": backend, "reference": reference, "sync": sync, "capture": capture,
            "options": dict(options or {})}
    if not isinstance(workload, Workload):
        spec["workloads"] = [w.as_dict() for w in workloads]
    return spec


def provenance(records: list[dict], facts: Mapping[str, Any], started: datetime) -> dict:
    """Where and with what a run was made (:func:`llmcomm.record.provenance`), plus what the ranks reported: their
    device, communication path and library versions, and the launch facts (command, port, wall time)."""
    r0 = records[0]
    return record_provenance(facts.get("command"), started=started.isoformat(timespec="seconds"),
                             device=r0.get("device"), rank_versions=r0.get("versions"), comm=r0.get("comm"),
                             **{k: v for k, v in facts.items() if k != "command"})


def _hf_dict(m: ModelSpec) -> dict:
    """HF config keys of a ModelSpec built without one."""
    return {"hidden_size": m.h, "num_hidden_layers": m.L, "num_attention_heads": m.heads,
            "num_key_value_heads": m.kv_heads, "intermediate_size": m.ffn, "vocab_size": m.V,
            "tie_word_embeddings": m.tied, "head_dim": m.head_dim}


def node_of_records(records: list[dict]):
    """Rank → the host it ran on (what its result recorded): the placement the measured traffic is counted on."""
    host = {r["rank"]: r.get("hostname") for r in records}
    return lambda rank: host.get(rank)


def allreduce_algorithm(records: list[dict]) -> str:
    """How the run's all-reduces moved bytes: ``direct`` on DeepSpeed's shared-memory kernel (every rank reads every
    other rank's buffer), else ``ring`` (gloo, NCCL)."""
    paths = {(r.get("comm") or {}).get("allreduce_path") for r in records}
    return "direct" if paths == {"shm"} else "ring"


def _joined_shares(records) -> tuple[list, list | None]:
    """(tokens, reference) of a run whose ranks generated disjoint shares of the batch (``"share": [lo, hi)``),
    joined in sequence order; a gap or overlap between the shares is a :class:`RunError`."""
    parts = sorted(records, key=lambda r: r["share"][0])
    expect = 0
    for r in parts:
        lo, hi = r["share"]
        if lo != expect or r.get("tokens") is None or len(r["tokens"]) != hi - lo:
            raise RunError(f"rank {r['rank']} reported sequences [{lo}, {hi}) and {len(r.get('tokens') or [])} "
                           f"generations where sequence {expect} was due")
        expect = hi
    tokens = [seq for r in parts for seq in r["tokens"]]
    refs = [r.get("reference_tokens") for r in parts]
    return tokens, (None if any(x is None for x in refs) else [seq for x in refs for seq in x])


def _assemble(records, model, layout, workload, facts, started, entry, backend, check_tokens,
              sweep: dict | None = None) -> MeasureResult:
    from llmcomm.derive.traffic import summary
    from llmcomm.measure.capture import CaptureError, aggregate, calls_of, check_consistent

    events = [e for r in records for e in r["events"]]
    try:
        check_consistent(events)
    except CaptureError as e:
        raise RunError(f"the ranks' captures disagree: {e}") from None
    shared = [r for r in records if r.get("share") is not None]
    if shared:                               # expert parallelism: each (stage-0) rank generated its own sequences
        tokens, reference = _joined_shares(shared)
    else:
        seen = [(r["rank"], r["tokens"]) for r in records if r.get("tokens") is not None]
        if not seen:
            raise RunError("no rank reported generated tokens")
        tokens = seen[-1][1]                  # TP: all equal; pipeline: the last stage holds the logits
        for rank, tk in seen:
            if tk != tokens:
                raise RunError(f"rank {rank} generated {tk}, rank {seen[-1][0]} generated {tokens}")
        reference = next((r["reference_tokens"] for r in records if r.get("reference_tokens") is not None), None)
    if check_tokens and reference is not None and tokens != reference:
        msg = f"generated tokens {tokens} differ from the single-process reference {reference}"
        if workload.dtype == "fp32":
            raise RunError(msg)
        warnings.warn(msg + f" ({workload.dtype}: rounding may flip near-ties)", RuntimeWarning, stacklevel=3)
    timing = lambda k: max(float(r.get("timings", {}).get(k, 0.0)) for r in records)  # noqa: E731
    prov = provenance(records, facts, started)
    prov.update(entry=entry, backend_requested=backend, model=model.name,
                layout={"t": layout.t, "p": layout.p, **({"e": layout.e} if layout.e > 1 else {})},
                workload=workload.as_dict())
    if sweep is not None:
        prov["launch"] = dict(sweep, setup="once per launch, shared by its configurations; one untimed warm-up "
                                           "generation before the first")
    node_of, algorithm = node_of_records(records), allreduce_algorithm(records)
    return MeasureResult(rows=aggregate(events, node_of=node_of, algorithm=algorithm),
                         traffic=summary(calls_of(events), node_of, algorithm), tokens=tokens,
                         reference_tokens=reference, ttft_s=timing("ttft_s"), tpot_s=timing("tpot_s"),
                         e2e_s=timing("e2e_s"), events=events, provenance=prov, ranks=records)


# ----------------------------------------------------------------------------------------------- rank supervisor
def _supervise(argv: list[str]) -> int:
    """Run one rank (``python -m <entry> <args>``) as a child; record its pid and exit status (see module docs)."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    try:
        i = args.index("--entry")
        entry = args[i + 1]
        rest = args[:i] + args[i + 2:]
        out = Path(rest[rest.index("--out") + 1])
    except (ValueError, IndexError):
        print("usage: python -m llmcomm.measure.launch --entry MODULE --spec FILE --out DIR", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    with open(out / f"rank{rank}.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-u", "-m", entry, *rest], stdout=log, stderr=subprocess.STDOUT)
    atomic_write_text(out / f"rank{rank}.host", socket.gethostname())
    atomic_write_text(out / f"rank{rank}.pid", str(child.pid))

    def forward(signum, frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    write_json(out / f"rank{rank}.exit.json", {"rank": rank, "returncode": rc, "t": time.time()})
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(_supervise(sys.argv[1:]))
