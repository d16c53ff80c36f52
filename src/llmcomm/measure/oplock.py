"""Load DeepSpeed's JIT-compiled ops under a lock that dies with its holder (works around pytorch/pytorch#189245).

The problem (torch 2.13.0, the pinned version): ``torch.utils.cpp_extension.load`` — which DeepSpeed's op builders call,
e.g. for the CPU shared-memory all-reduce ``deepspeed_shm_comm`` that ``deepspeed.init_distributed`` loads on every
rank — serialises builds with a ``FileBaton``: it creates ``<build dir>/lock`` with ``O_EXCL`` on *every* load (even
when nothing needs rebuilding) and removes it afterwards. A process killed in between (a ``--timeout``, a Ctrl-C, an
out-of-memory kill) leaves the file behind, and every later load waits in ``FileBaton.wait()`` for it to disappear —
forever: each later run hangs until its own timeout. ``tests/test_sweep.py`` kills a rank inside the load. Upstream replaced the
baton with an OS-level ``flock`` after 2.13.0.

The workaround, in this one place: every llmcomm rank loads the op (:func:`preload_shm_op`, through DeepSpeed's own
builder, which caches the module so that ``init_distributed`` later finds it loaded and never touches the baton again;
the lock must not be held across ``init_distributed`` itself, whose rendezvous waits for every rank) while holding an
exclusive ``fcntl.flock`` on ``<extensions root>/<op>.flock`` (e.g. ``deepspeed_shm_comm.flock``). The kernel
releases a flock when its holder dies, so a killed rank can never block the next run; and since every llmcomm loader holds the flock while torch's baton exists, a baton found by the
flock's holder was left by a dead process, and is removed. The flock file holds the holder's pid and host, so a rank
waiting on it can be explained (:func:`describe_wait`). Limit: a process outside llmcomm loading the same op from the
same extensions folder at the same moment does not take the flock; llmcomm's default folder is the checkout's
``.cache/torch_extensions`` (``llmcomm.measure.supervise.default_env``), which only llmcomm uses.

Remove this module when the pinned torch includes the upstream fix (``torch.utils.file_baton`` using ``flock``).
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Mapping

__all__ = ["SHM_OP", "lock_paths", "op_load_lock", "preload_shm_op", "describe_wait"]

#: the op ``deepspeed.init_distributed`` JIT-loads on DeepSpeed's CPU accelerator
SHM_OP = "deepspeed_shm_comm"
_FLOCK_SUFFIX = ".flock"          # next to torch's build folder of the op


def _extensions_root(env: Mapping[str, str] | None = None) -> Path | None:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR`` when set (llmcomm always sets it for its ranks),
    else torch's own default (asked from torch; None when torch is not importable here)."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    try:
        # private, but it is exactly the folder torch's load() uses (with its accelerator suffix)
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(SHM_OP, verbose=False)).parent
    except Exception:                                          # pragma: no cover - torch missing or changed
        return None


def lock_paths(op: str = SHM_OP, env: Mapping[str, str] | None = None) -> tuple[Path, Path] | None:
    """``(flock file, torch's baton)`` of ``op`` for ranks started with ``env``; None when the folder is unknown."""
    root = _extensions_root(env)
    return None if root is None else (root / f"{op}{_FLOCK_SUFFIX}", root / op / "lock")


@contextlib.contextmanager
def op_load_lock(op: str = SHM_OP):
    """Hold the flock of ``op`` for the block (the op's JIT load), after removing a baton a dead process left.
    Yields ``{"lock": path, "stale_baton_removed": bool, "waited_s": float}``."""
    import fcntl
    import time

    paths = lock_paths(op)
    if paths is None:                                          # pragma: no cover - no torch: nothing to protect
        yield {"lock": None, "stale_baton_removed": False, "waited_s": 0.0}
        return
    flock_path, baton = paths
    flock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(flock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)                         # a dead holder's lock is released by the kernel
        waited = time.monotonic() - t0
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        removed = False
        if baton.exists():                                     # every llmcomm loader holds the flock around it
            baton.unlink(missing_ok=True)
            removed = True
        yield {"lock": str(flock_path), "stale_baton_removed": removed, "waited_s": waited}
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def preload_shm_op() -> bool:
    """Load DeepSpeed's shared-memory comm op as ``deepspeed.init_distributed`` would (same builder, same
    compatibility test: ``deepspeed.comm.torch.build_shm_op``), under :func:`op_load_lock`. DeepSpeed's builder keeps
    the loaded module (``OpBuilder._loaded_ops``), so the load inside ``init_distributed`` is then a dictionary lookup.
    Returns whether the accelerator has the op (False on CUDA)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    with op_load_lock(SHM_OP):
        from llmcomm.measure.runs import rankio      # the test fault hook "in_op_load" (module docstring there)

        rankio.fault_in_op_load()
        builder.load()
    return True


def describe_wait(frames: list[tuple[str, str, str]], env: Mapping[str, str] | None = None) -> str | None:
    """What a rank whose stack is ``frames`` (most recent first) is waiting for, when it waits on a JIT-load lock:
    torch's baton (a stale lock file: named, with how to clear it) or llmcomm's flock (held by a live process: named,
    with its holder). None when it is not waiting on either."""
    files = [Path(f).name for f, _, _ in frames]
    paths = lock_paths(env=env)
    flock_path, baton = paths if paths else ("the op's .flock file", "the op's build folder/lock")
    if "file_baton.py" in files:
        return (f"waited on torch's JIT-build lock file {baton} (a load killed before it finished leaves it "
                f"behind: pytorch/pytorch#189245); delete it if no build is running")
    if "oplock.py" in files and any(fn == "op_load_lock" for _, _, fn in frames):
        holder = ""
        try:
            holder = Path(flock_path).read_text().strip()
        except OSError:
            pass
        return (f"waited for the op-load lock {flock_path}"
                + (f", held by process {holder.split()[0]} on {holder.split()[-1]}" if holder else "")
                + " (still compiling or loading DeepSpeed's op)")
    return None
