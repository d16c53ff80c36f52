"""Why a launch failed: which rank, and how — from what the ranks and their supervisors left in the run folder.

* :func:`diagnose_hang` — on a timeout every pending rank is asked for its Python stack (SIGUSR1 → faulthandler, see
  :mod:`llmcomm.measure.runs.rankio`): a rank outside any collective is the one that hung, ranks inside one were
  waiting for it; a rank waiting on the JIT-load lock is named with the lock file
  (:func:`llmcomm.measure.oplock.describe_wait`);
* :func:`first_failure` — after a run ended without every result: the rank that failed first (its error report, else
  the first non-zero exit status its supervisor recorded), else the launcher's own status;
* :func:`tail` — the last lines of a log, for the one error message.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Mapping

from llmcomm.measure.oplock import describe_wait

__all__ = ["diagnose_hang", "first_failure", "tail", "read_json"]

# frames that mean "inside a collective" in a faulthandler stack dump
_COMM_MARKERS = ("deepspeed/comm/", "torch/distributed/", "llmcomm/measure/capture.py")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def tail(path: Path, n: int = 15) -> str:
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


def diagnose_hang(out: Path, pending: list[int], env: Mapping[str, str] | None = None) -> tuple[list[int], str]:
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


#: what a rank's error says when only its peer failed (gloo's and NCCL's words for a connection a dead rank dropped)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe")


def first_failure(out: Path, nranks: int, launcher_rc: int | None) -> tuple[int | None, str]:
    """After a run ended without all results: which rank failed first, and how."""
    errors = {r: read_json(out / f"rank{r}.error.json") for r in range(nranks)}
    errors = {r: e for r, e in errors.items() if e}
    exits = [e for e in (read_json(out / f"rank{r}.exit.json") for r in range(nranks)) if e and e["returncode"]]
    if errors:
        # A rank that died without a report (os._exit, a signal other than the launcher's SIGKILL) is the culprit
        # when every report only says that a peer went away (gloo/NCCL: "Connection closed by peer", …)
        silent = [e for e in exits if e["rank"] not in errors and e["returncode"] != -signal.SIGKILL]
        if not silent or not all(any(x in e["error"] for x in _PEER_GONE) for e in errors.values()):
            r = min(errors)
            return r, f"rank {r} failed: {errors[r]['error']}"
        exits = silent
    if exits:
        # the first to go is the culprit; the rest were killed by the launcher afterwards (SIGKILL, later)
        first = min(exits, key=lambda e: (e["returncode"] == -signal.SIGKILL, e["t"]))
        rc = first["returncode"]
        how = f"was killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exited with status {rc}"
        return first["rank"], f"rank {first['rank']} {how} before writing its result"
    return None, f"the DeepSpeed launcher exited with status {launcher_rc} before any rank reported"
