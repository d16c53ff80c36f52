"""A fork server for CPU launches: DeepSpeed's launcher and the ranks started from one process that has imported
torch, transformers and DeepSpeed already.

Why: on a small CPU machine most of a launch is imports — ~3 s for the launcher (it imports DeepSpeed, hence torch)
and ~8 s per rank (torch, DeepSpeed, transformers), two or four ranks sharing two cores — while the measured work of a
tiny model takes a second or two. ``make test`` starts some twenty launches and ``make book`` as many; forked from a
process that imported everything once, each costs seconds instead of tens of seconds.

What is the same: the processes run the same code (``python -m deepspeed.launcher.launch …`` and ``python -m
<rank entry> …``, :func:`runpy.run_module` as ``__main__``) in the same environment (the requester's, set before the
module runs), with their output in the same log files; every rank still starts through DeepSpeed's launcher and its
supervisor (:mod:`llmcomm.measure.supervise`), which still records its pid and exit status. What differs: the
modules the server imported are not imported again; the server runs one OpenMP thread (a pool of worker threads
would not survive a fork) and each child sets its own from the requester's ``OMP_NUM_THREADS``
(``torch.set_num_threads``, before its first parallel region); Python's exit handlers do not run (the
process ends with ``os._exit`` once its module returned). The server forks only while it is single-threaded (checked
at start: importing these modules starts no thread) and only for CPU processes whose import-time environment
(``DS_ACCELERATOR``) equals its own; anything else is refused and the caller starts the process as usual.

Use: ``$LLMCOMM_FORK_SERVER`` names the server's socket (``tests/conftest.py`` starts one for a test session,
``tools/execute_notebooks.py`` for ``make book``: :func:`running`); without it every process starts fresh (the
command line's default). Protocol: one JSON line per connection, ``{"module", "args", "env", "cwd", "log", "exit",
"setsid"}``; the answer ``{"pid"}`` or ``{"refused"}``; when the child ends the server writes its exit status to
``exit`` (``{"returncode"}``, atomically) — the requester (a supervisor, or the launcher's watcher) is not its parent
and reads it from there (:class:`ForkedProcess`).
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

__all__ = ["ENV", "ForkedProcess", "spawn", "running", "serve"]

#: the environment variable naming the server's socket
ENV = "LLMCOMM_FORK_SERVER"
#: what the server imports before it forks (the rank entries' heavy dependencies; never the entries themselves:
#: runpy runs those as ``__main__``)
PRELOAD = ("torch", "deepspeed", "deepspeed.comm", "deepspeed.moe.layer", "deepspeed.pipe",
           "deepspeed.runtime.pipe.p2p", "transformers", "transformers.masking_utils",
           "llmcomm.measure.runs.rankio", "llmcomm.measure.runs.common", "llmcomm.measure.capture",
           "llmcomm.measure.moe_adapter", "llmcomm.measure.oplock")
#: model classes the rank entries build (transformers imports them lazily, each a second or more)
PRELOAD_ATTRS = (("transformers", ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM",
                                   "Qwen2MoeForCausalLM", "DynamicCache", "LlamaConfig", "MixtralConfig",
                                   "Qwen3MoeConfig", "Qwen2MoeConfig")),)
#: environment the server's imports depend on: a request must agree
IMPORT_ENV = ("DS_ACCELERATOR",)
#: the exit status a requester sees for a forked process that vanished without one (its server was killed)
UNKNOWN_EXIT = 255
#: seconds a forked process may stay a zombie before its requester stops waiting for the server to reap it
ZOMBIE_GRACE_S = 2.0


class ForkedProcess:
    """A process the server forked, as the requester sees it (the subset of :class:`subprocess.Popen` the launcher
    uses): ``pid``, :meth:`poll`, :meth:`wait`, ``returncode`` — read from the exit file the server writes."""

    def __init__(self, pid: int, exit_path: Path):
        self.pid, self.exit_path, self.returncode = pid, Path(exit_path), None
        self._zombie_since: float | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._read_exit()
            if self.returncode is None and not self._running():
                # ended, and no exit file: the server that would reap it is gone (killed with the requester);
                # the status is unknown — never wait for a file that cannot come
                self.returncode = self._read_exit()
                if self.returncode is None:
                    self.returncode = UNKNOWN_EXIT
        return self.returncode

    def _running(self) -> bool:
        """Whether the process still runs. A zombie has ended: its server reaps it and writes the exit file at once,
        so one that stays a zombie for :data:`ZOMBIE_GRACE_S` has no server left to do it."""
        state = _state(self.pid)
        if state != "Z":
            self._zombie_since = None
            return state is not None
        self._zombie_since = self._zombie_since or time.monotonic()
        return time.monotonic() - self._zombie_since < ZOMBIE_GRACE_S

    def _read_exit(self) -> int | None:
        try:
            return int(json.loads(self.exit_path.read_text())["returncode"])
        except (OSError, ValueError, KeyError):
            return None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


def _state(pid: int) -> str | None:
    """The state letter of ``pid`` (``/proc/<pid>/stat``: R, S, Z …), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def spawn(module: str, args: Sequence[str], env: Mapping[str, str], cwd: str | Path, log: str | Path,
          exit_path: str | Path, setsid: bool = False) -> ForkedProcess | None:
    """``python -m module *args`` forked by the server ``$LLMCOMM_FORK_SERVER`` (in ``env``), output to ``log``; None
    when there is no server, it is unreachable, or it refuses (the caller then starts the process itself)."""
    path = env.get(ENV)
    if not path or env.get("DS_ACCELERATOR") != "cpu":
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(exit_path)                              # a stale status would end the new process at once
    request = {"module": module, "args": list(args), "env": dict(env), "cwd": str(cwd), "log": str(log),
               "exit": str(exit_path), "setsid": setsid}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(s.makefile("r").readline() or "{}")
    except (OSError, ValueError):
        return None
    return ForkedProcess(int(answer["pid"]), Path(exit_path)) if "pid" in answer else None


def _write_exit(path: str, returncode: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"returncode": returncode}, f)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the server that forked it dies, however it dies (``PR_SET_PDEATHSIG``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG = 1
    if os.getppid() == 1:                                 # the server died before the call: follow it
        os._exit(UNKNOWN_EXIT)


def _child(req: dict, listener: socket.socket) -> None:
    """In the forked child: become the requested process and never return."""
    import io
    import runpy
    import traceback

    code = 1
    try:
        _die_with_parent()
        listener.close()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        if req.get("setsid"):
            os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        sys.argv = [req["module"], *req["args"]]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    except BaseException:                               # noqa: BLE001 - the child reports, then dies
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(socket_path: str | Path) -> int:
    """Import :data:`PRELOAD`, then fork one process per request until the parent that started the server is gone
    or SIGTERM comes; then kill what it forked that still runs (with its process group), so that nothing it started
    outlives it."""
    import importlib
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    for mod, attrs in PRELOAD_ATTRS:
        module = importlib.import_module(mod)
        for attr in attrs:
            getattr(module, attr)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        print("llmcomm fork server: the imports started threads; forking is not safe: refusing to serve",
              file=sys.stderr)
        return 1
    import torch

    if torch.cuda.is_available():
        print("llmcomm fork server: CUDA is available; forking CUDA processes is not safe: refusing to serve",
              file=sys.stderr)
        return 1
    parent = os.getppid()
    own = {k: os.environ.get(k) for k in IMPORT_ENV}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{socket_path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, socket_path)                          # the socket appears once it accepts
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, str] = {}
    leaders: set[int] = set()                             # children that lead their own process group

    def stop(signum, frame):                              # running() ends the server with SIGTERM
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        _serve_loop(parent, own, listener, sel, children, leaders)
    finally:
        # the requester is gone (or the server stops): nothing it started may outlive it, so no supervisor waits
        # for an exit file that no server will write
        for pid in children:
            if pid in leaders:                            # its group (a child that has not called setsid yet has none)
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5                   # reap them, so that their requesters read a status
        while children and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                path = children.pop(pid, None)
                if path:
                    with contextlib.suppress(OSError):
                        _write_exit(path, os.waitstatus_to_exitcode(status))
            else:
                time.sleep(0.01)
    return 0


def _serve_loop(parent, own, listener, sel, children, leaders) -> None:
    while os.getppid() == parent:
        for _key, _ in sel.select(timeout=0.05):
            conn, _ = listener.accept()
            with conn:
                try:
                    req = json.loads(conn.makefile("r").readline())
                    bad = [k for k in IMPORT_ENV if req["env"].get(k) != own[k]]
                    if bad:
                        conn.sendall(json.dumps({"refused": f"import-time environment differs: {bad}"}).encode()
                                     + b"\n")
                        continue
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        _child(req, listener)
                    children[pid] = req["exit"]
                    if req.get("setsid"):
                        leaders.add(pid)
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except (OSError, ValueError, KeyError) as e:
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"refused": str(e)}).encode() + b"\n")
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            path = children.pop(pid, None)
            if path:
                with contextlib.suppress(OSError):
                    _write_exit(path, os.waitstatus_to_exitcode(status))
            leaders.discard(pid)


@contextlib.contextmanager
def running(env: dict | None = None, timeout_s: float = 120.0) -> Iterator[str | None]:
    """A fork server for the duration of the block, its socket path in ``$LLMCOMM_FORK_SERVER`` (``env``: the
    environment to set it in, default ``os.environ``); yields the path, or None when none could start (CUDA, threads,
    not CPU ranks) or ``$LLMCOMM_FORK_SERVER`` is set already (empty: none wanted): then nothing changes. Stopped and
    removed at the end."""
    env = os.environ if env is None else env
    if ENV in env or env.get("DS_ACCELERATOR") != "cpu":
        yield None
        return
    folder = tempfile.mkdtemp(prefix="llmcomm-forkserver-")
    path = os.path.join(folder, "socket")
    log = open(os.path.join(folder, "server.log"), "w")
    # one OpenMP thread in the server: a pool of worker threads would not survive a fork (each child sets its own
    # thread count, torch.set_num_threads, before its first parallel region)
    proc = subprocess.Popen([sys.executable, "-m", "llmcomm.measure.forkserver", path], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(env, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = os.path.exists(path)
    if ok:
        env[ENV] = path
    try:
        yield path if ok else None
    finally:
        if ok and env.get(ENV) == path:
            del env[ENV]
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        log.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
