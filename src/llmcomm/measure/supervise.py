"""Start the ranks of a launch with DeepSpeed's launcher and watch them until every rank has written its result.

How a launch goes (:func:`launch_ranks`)
---------------------------------------
* DeepSpeed's per-node launcher, ``python -m deepspeed.launcher.launch --world_info=<{"localhost": [0..N-1]}>
  --master_addr=127.0.0.1 --master_port=<free> --module llmcomm.measure.supervise --entry <rank entry>
  --spec RUN/spec.json --out RUN`` — exactly what ``deepspeed --num_gpus N ...`` runs after resolving hosts — in its
  own session (process group). It starts N processes with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*, and ``LOCAL_SIZE=N``,
  which is what enables DeepSpeed's shared-memory all-reduce on CPU. Several nodes: DeepSpeed's runner
  (``deepspeed --hostfile``, :func:`launcher_cmd`).
* Each rank runs under a tiny supervisor (this module run as ``__main__``): it starts the real rank process with its
  output in ``RUN/rank{r}.log`` — a fresh ``python -m <entry>``, or forked by the fork server when
  ``$LLMCOMM_FORK_SERVER`` names one (:mod:`llmcomm.measure.forkserver`; the launcher too) —, records its pid
  (``rank{r}.pid``) and, when it ends, its exit status (``rank{r}.exit.json``). DeepSpeed's launcher only says "a process died" and then kills the rest; the exit files
  tell which rank died first and how (:func:`llmcomm.measure.diagnose.first_failure`).
* Two watchdogs. **Start-up** (``startup_timeout_s``, default 600 s): until every rank has reported progress once —
  imports, the JIT load of DeepSpeed's op (~30 s the first time), the model built and sharded. **Progress**
  (``progress_timeout_s``): afterwards, the longest the ranks may go without reporting progress — a heartbeat file
  ``rank{r}.beat`` touched at every configuration, phase and forward (:meth:`llmcomm.measure.runs.rankio.RankContext.beat`),
  or a finished configuration. On a timeout every pending rank is asked for its stack and the one that hung is named
  (:func:`llmcomm.measure.diagnose.diagnose_hang`); a hung rank thus costs seconds, not minutes, once the run is going.
* The launch is over when every rank has written ``rank{r}.json`` (written atomically: a file that exists is
  complete); the session is then killed at once instead of waiting for the interpreters to tear down (seconds per
  launch). It is killed too when a rank dies or a watchdog fires. ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
  (66 MiB per rank, never removed by DeepSpeed) are removed for this run's port, whatever happened; other runs'
  buffers (other ports) are left alone.
* On a GPU node (``DS_ACCELERATOR`` not ``cpu``) each rank gets one GPU: the launcher's world_info lists the first N
  visible GPUs (``CUDA_VISIBLE_DEVICES`` when set, else all that ``nvidia-smi -L`` lists), the launcher exports them as
  ``CUDA_VISIBLE_DEVICES`` and rank r computes on ``cuda:{LOCAL_RANK}``; fewer GPUs than ranks is refused up front.
"""
from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from llmcomm.measure.diagnose import diagnose_hang, first_failure, read_json, tail
from llmcomm.measure.forkserver import spawn
from llmcomm.record import atomic_write_text, repo_root, write_json
from llmcomm.spec import SpecError, cpu_threads_per_rank

__all__ = ["RunError", "SHM_PREFIX", "has_cuda", "gpu_ids", "read_hostfile", "launcher_cmd", "default_env",
           "launch_ranks", "STARTUP_TIMEOUT_S", "PROGRESS_TIMEOUT_S"]

SHM_PREFIX = "deepspeed_allreduce_buffer"
#: default seconds until every rank has reported progress once (imports, JIT load, model setup)
STARTUP_TIMEOUT_S = 600.0
#: default seconds the ranks may go without progress once started
PROGRESS_TIMEOUT_S = 300.0


class RunError(RuntimeError):
    """A measurement that did not produce a valid result: a rank died, hung, failed, or produced wrong tokens.

    ``rank`` is the rank at fault (None when unknown), ``run_dir`` the run folder (kept for inspection),
    ``master_port`` the port the run used (its shm buffers are named after it), ``config`` the index of the
    configuration of a sweep that failed (None outside a sweep or before any configuration ran)."""

    def __init__(self, message: str, *, rank: int | None = None, run_dir: Path | None = None,
                 master_port: int | None = None, config: int | None = None):
        super().__init__(message)
        self.rank, self.run_dir, self.master_port, self.config = rank, run_dir, master_port, config


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
    tail = ["--module", "llmcomm.measure.supervise", "--entry", entry, "--spec", str(spec_path), "--out", str(out)]
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


def remove_shm(port: int) -> list[str]:
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
            recs = [read_json(self.out / f"rank{r}.c{self.done}.json") for r in range(self.nranks)]
            if not all(recs):
                break
            i, self.done = self.done, self.done + 1        # counted first: a failing on_config is not retried
            self.on_config(i, recs, dict(self.facts, done_after_s=round(time.monotonic() - self.t0, 3)))
        return self.done > before


class _Watchdog:
    """The two watchdogs of a launch (module docs): start-up until every rank has beaten once, then progress."""

    def __init__(self, out: Path, nranks: int, startup_s: float, progress_s: float):
        self.beats = [out / f"rank{r}.beat" for r in range(nranks)]
        self.startup_s, self.progress_s = startup_s, progress_s
        self.t0 = self.last = time.monotonic()
        self.seen: dict[int, int] = {}                     # rank -> mtime_ns of its last beat
        self.started = False

    def progress(self) -> None:
        """Something finished (a configuration): progress for every rank."""
        self.last = time.monotonic()

    def expired(self) -> str | None:
        """None while the launch is within its limits, else what ran out."""
        for r, path in enumerate(self.beats):
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self.seen.get(r) != stamp:
                self.seen[r] = stamp
                self.last = time.monotonic()
        now = time.monotonic()
        if not self.started:
            if len(self.seen) == len(self.beats):
                self.started, self.last = True, now
            elif now - self.t0 > self.startup_s:
                return (f"not started after {self.startup_s:g} s (start-up timeout; "
                        f"{len(self.seen)} of {len(self.beats)} ranks reported progress)")
            return None
        if now - self.last > self.progress_s:
            return f"no progress for {self.progress_s:g} s (progress timeout)"
        return None


def _start_launcher(cmd: list[str], out: Path, env: Mapping[str, str]):
    """The one place a launcher process starts, in its own session (killing the group stops every rank): forked by
    the fork server when there is one (:mod:`llmcomm.measure.forkserver`), else a fresh process.
    ``$LLMCOMM_LAUNCH_LOG``: a file that gets one line per launch (how the README counts a test run's launches)."""
    if os.environ.get("LLMCOMM_LAUNCH_LOG"):
        with open(os.environ["LLMCOMM_LAUNCH_LOG"], "a") as f:
            f.write(f"{time.time():.3f} {out}\n")
    if cmd[1:3] == ["-u", "-m"]:
        forked = spawn(cmd[3], cmd[4:], env, out, out / "launcher.log", out / "launcher.exit.json", setsid=True)
        if forked is not None:
            return forked
    with open(out / "launcher.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
                                cwd=str(out))


def _kill_forked_ranks(out: Path, nranks: int) -> None:
    """Ranks the fork server started are not in the launcher's process group: stop those still running."""
    for r in range(nranks):
        if (out / f"rank{r}.forked").exists() and not (out / f"rank{r}.zexit.json").exists():
            try:
                os.kill(int((out / f"rank{r}.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any((out / f"rank{r}.forked").exists() and not
                                              (out / f"rank{r}.zexit.json").exists() for r in range(nranks)):
        time.sleep(0.02)


def launch_ranks(entry: str, spec: Mapping[str, Any], nranks: int, out: Path, *,
                 progress_timeout_s: float = PROGRESS_TIMEOUT_S, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, hostfile: str | Path | None = None,
                 on_poll: Callable[[Path], None] | None = None,
                 on_config: Callable[[int, list[dict], dict], None] | None = None) -> tuple[list[dict], dict]:
    """Start ``nranks`` ranks of ``entry`` with ``spec`` (the rankio spec) and return their result records (sorted by
    rank) and the launch facts (command, port, wall time). Raises :class:`RunError` on any failure or timeout (the
    two watchdogs of the module docs); always removes this run's shm buffers and leaves no process behind on this
    node. With ``hostfile`` the ranks run on the nodes it names (:func:`launcher_cmd`); ``out`` must then be on a
    file system every node shares, and on a timeout only this node's processes are stopped and asked for their
    stacks. ``on_poll(out)`` is called about ten times a second while the ranks run (progress bars read the ranks'
    progress files there).

    A sweep (``spec["workloads"]`` with ``on_config``): ``on_config(i, records, facts)`` is called with the ranks'
    records of configuration i and the launch facts known so far (command, port, ``done_after_s`` since the start) as
    soon as all ranks finished it, in order, also when a later configuration fails (before the
    :class:`RunError`, whose ``config`` then names the configuration that failed)."""
    for name, val in (("progress_timeout_s", progress_timeout_s), ("startup_timeout_s", startup_timeout_s)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
            raise SpecError(f"{name}={val!r} must be a positive number of seconds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("rank*.*"), *out.glob(".rank*"), *out.glob("launcher.*")]:   # a previous run here
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
    watch = _Watchdog(out, nranks, startup_timeout_s, progress_timeout_s)
    results = [out / f"rank{r}.json" for r in range(nranks)]
    t0 = time.monotonic()
    proc = _start_launcher(cmd, out, full_env)
    error = None
    try:
        while True:
            if configs.collect():
                watch.progress()
            if all(p.exists() for p in results):
                break                               # every result is in: no need to wait for the exits
            if proc.poll() is not None:
                break
            if any(e and e["returncode"] for e in (read_json(out / f"rank{r}.exit.json") for r in range(nranks))):
                break                               # do not wait for the launcher's 1 s poll to notice
            if on_poll is not None:
                on_poll(out)
            why = watch.expired()
            if why:
                pending = [r for r in range(nranks) if not results[r].exists()]
                culprits, what = diagnose_hang(out, pending, full_env)
                error = (culprits[0] if culprits else None, f"{why}: {what}")
                break
            time.sleep(0.1)
    finally:
        _kill_session(proc)
        _kill_forked_ranks(out, nranks)
        removed = remove_shm(port)
        wall = time.monotonic() - t0
    configs.collect()                              # what finished just before the end is kept
    records = [read_json(p) for p in results]
    if error is None and not all(records):
        error = first_failure(out, nranks, proc.returncode)
    if error is not None:
        rank, what = error
        where = ""
        if configs.n and configs.done < configs.n:
            w = spec["workloads"][configs.done]
            where = (f" in configuration {configs.done + 1} of {configs.n} (b={w['b']} S={w['S']} G={w['G']} "
                     f"{w['dtype']}; {configs.done} finished before it)")
        log = out / f"rank{rank}.log" if rank is not None else out / "launcher.log"
        raise RunError(f"{entry} with {nranks} ranks{where}: {what}. All ranks were stopped. Run folder: {out}\n"
                       f"--- last lines of {log.name} ---\n{tail(log)}", rank=rank, run_dir=out, master_port=port,
                       config=configs.done if configs.n and configs.done < configs.n else None)
    return records, dict(facts, launch_wall_s=wall, shm_buffers_removed=len(removed))


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
        print("usage: python -m llmcomm.measure.supervise --entry MODULE --spec FILE --out DIR", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    child = spawn(entry, rest, os.environ, os.getcwd(), out / f"rank{rank}.log", out / f"rank{rank}.zexit.json")
    if child is None:
        with open(out / f"rank{rank}.log", "w") as log:
            child = subprocess.Popen([sys.executable, "-u", "-m", entry, *rest], stdout=log,
                                     stderr=subprocess.STDOUT)
    else:
        atomic_write_text(out / f"rank{rank}.forked", "")
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
