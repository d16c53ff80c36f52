"""Execute book notebooks in place, top to bottom, in a fresh ``python3`` kernel (``make execute``/``make book``).

    python tools/execute_notebooks.py [--timeout S] [--kernel NAME] book/CHAPTER.ipynb [book/CHAPTER2.ipynb ...]

Why not ``jupyter nbconvert --execute --inplace``: nbconvert is not part of jupyter-book 1.x's dependencies, and
``jupyter execute`` (nbclient's CLI) cannot switch off per-cell timing metadata, which would put fresh timestamps
into every cell of every commit. This is nbclient with ``record_timing=False``, the kernel's working directory set
to the notebook's folder (as jupyter-book and nbval do), and stale timing metadata removed.

Launches of the chapters' measurements start from one fork server for the whole call (:mod:`llmcomm.measure.forkserver`,
on CPU only; ``LLMCOMM_FORK_SERVER=`` (empty) turns it off): the kernels inherit its socket in their environment.

A notebook that fails is NOT overwritten (the committed, executed version stays); the partly executed copy is
written to ``.cache/failed/<name>.ipynb`` for inspection. All notebooks are attempted; the exit status is 1 if
any failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from llmcomm.measure.forkserver import running


def execute(path: Path, timeout: int, kernel: str, failed_dir: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)  # timestamps from an interactive run
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    start = time.monotonic()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        failed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, failed_dir / path.name)
        print(f"== {path}: FAILED after {time.monotonic() - start:.0f} s (kept the committed version; partly "
              f"executed copy: {failed_dir / path.name})\n{exc}", file=sys.stderr, flush=True)
        return False
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"== {path}: executed in {time.monotonic() - start:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (-1: no limit)")
    ap.add_argument("--kernel", default="python3", help="kernel spec name")
    ap.add_argument("--failed-dir", type=Path, default=Path(".cache/failed"))
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    failed = []
    with running():
        for path in args.notebooks:
            print(f"== executing {path}", flush=True)
            if not execute(path, args.timeout, args.kernel, args.failed_dir):
                failed.append(str(path))
    if failed:
        print(f"== {len(failed)} notebook(s) failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
