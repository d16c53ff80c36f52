"""The collectives microbenchmark (``llmcomm bench-collectives``), nccl-tests style: the driver.

:func:`run_bench` starts the rank side (:mod:`llmcomm.measure.runs.bench`) once per group size n through the one
launcher (:func:`llmcomm.measure.launch.launch_ranks`: supervision, timeouts, shm cleanup), shows a progress bar, and
writes ``<out>/collectives.csv`` plus ``<out>/collectives.json`` (atomically).

Backends ("backend" column): ``shm`` — ``deepspeed.comm.inference_all_reduce``, DeepSpeed's shared-memory
all-reduce kernel on CPU (only all_reduce exists on this path); ``gloo`` — ``deepspeed.comm`` all_reduce /
all_gather / broadcast / isend+irecv over torch's gloo process group; ``nccl`` — the same calls on a CUDA machine
(one GPU per rank).
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

from ..derive.conventions import COLLECTIVES, bus_factor, canonical_op
from ..record import provenance, read_sidecar, write_frame, writable_dir
from ..spec import DTYPE_BYTES, SpecError
from .supervise import gpu_ids, launch_ranks

__all__ = ["run_bench", "parse_size", "size_grid", "CSV_COLUMNS", "DEFAULT_OPS", "BACKENDS"]

#: the collectives the microbenchmark times (the registry's ``benched`` ops)
DEFAULT_OPS = tuple(name for name, c in COLLECTIVES.items() if c.benched)
BACKENDS = ("shm", "gloo", "nccl")
CSV_COLUMNS = ["machine", "backend", "op", "group_size", "link", "dtype", "bytes", "count", "time_s", "time_p10_s",
               "time_p90_s", "algbw_GBps", "busbw_GBps", "reps", "inner"]
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str | int) -> int:
    """``"4"``, ``"64K"``, ``"64M"``, ``"1G"`` (binary units) → bytes; anything else is a one-line SpecError."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        found = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
        if not found or found.group(2).upper() not in _UNITS:
            raise SpecError(f"bad size {text!r}: use e.g. 4, 64K, 64M, 1G")
        value = int(found.group(1)) * _UNITS[found.group(2).upper()]
    if value < 1:
        raise SpecError(f"size {text!r} must be at least 1 byte")
    return value


def size_grid(min_bytes: int = 4, max_bytes: int = 64 << 20, factor: int = 2) -> list[int]:
    """Sizes min, min·factor, … ≤ max (nccl-tests ``-b -e -f``)."""
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise SpecError(f"bad size range {min_bytes}..{max_bytes} step ×{factor}")
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= factor
    return out


def run_bench(ops=DEFAULT_OPS, sizes=None, ranks=(2, 4), backends=None, out=None, machine=None, dtype="fp32",
              warmup=3, min_reps=5, max_reps=30, point_s=0.2, sample_s=0.02, timeout_s=900.0, append=False,
              progress=True, command=None):
    """Run the microbenchmark; return ``(table, folder)``: the results as a pandas DataFrame, also written to
    ``folder`` = ``out`` (default ``data/<machine>``) as ``collectives.csv`` and its sidecar. Bad arguments — an
    unwritable ``out`` included — raise :class:`SpecError` before anything starts; a failed launch raises
    :class:`~llmcomm.measure.supervise.RunError`."""
    import pandas as pd

    from ..record import data_dir, machine_id

    cuda = bool(gpu_ids())
    backends = list(backends) if backends else (["nccl"] if cuda else ["shm", "gloo"])
    for be in backends:
        if be not in BACKENDS:
            raise SpecError(f"unknown backend {be!r}: one of {', '.join(BACKENDS)}")
    if "nccl" in backends and len(backends) > 1:
        raise SpecError("nccl cannot be measured together with shm or gloo (different process groups)")
    if "nccl" in backends and not cuda:
        raise SpecError("backend 'nccl' needs CUDA GPUs; none found (use shm or gloo on CPU)")
    if dtype not in DTYPE_BYTES:
        raise SpecError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    ops = [canonical_op(o) for o in ops]
    unsupported = [o for o in ops if o not in DEFAULT_OPS]
    if unsupported:
        raise SpecError(f"bench-collectives times {', '.join(DEFAULT_OPS)}; not {', '.join(unsupported)}")
    for n in ranks:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise SpecError(f"group size {n!r} must be an integer of at least 2")
    for name, val in (("warmup", warmup), ("min_reps", min_reps), ("max_reps", max_reps)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "warmup" else 1):
            raise SpecError(f"{name}={val!r} must be a {'non-negative' if name == 'warmup' else 'positive'} integer")
    for name, val in (("point_s", point_s), ("sample_s", sample_s), ("timeout_s", timeout_s)):
        if not isinstance(val, (int, float)) or not val > 0:
            raise SpecError(f"{name}={val!r} must be a positive number of seconds")
    sizes = sorted(set(sizes or size_grid(4, 64 << 20)))
    machine = machine or machine_id()
    out = writable_dir(Path(out) if out else data_dir(machine), "bench-collectives output folder")
    opts = {"ops": ops, "sizes": sizes, "backends": [be for be in backends if be != "nccl"] or ["nccl"],
            "dtype": dtype, "warmup": warmup, "min_reps": min_reps, "max_reps": max_reps, "point_s": point_s,
            "sample_s": sample_s}
    spec = {"model": None, "layout": None, "workload": None, "seed": 0, "backend": "nccl" if "nccl" in backends
            else None, "reference": False, "sync": False, "capture": False, "options": opts}
    rows, metas = [], {}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="llmcomm-bench-") as tmp:
        for n in ranks:
            records, facts = _launch(n, spec, Path(tmp) / f"n{n}", timeout_s, progress)
            r0 = records[0]
            metas[str(n)] = {"comm": r0.get("comm"), "device": r0.get("device_name") or r0.get("device"),
                             "master_port": facts["master_port"], "launch_wall_s": round(facts["launch_wall_s"], 2)}
            if "shm" in backends and (r0.get("comm") or {}).get("allreduce_path") != "shm":
                print(f"warning: shm all-reduce kernel not active with {n} ranks: 'shm' rows fell back to gloo",
                      file=sys.stderr)
            rows.extend(r0["bench_rows"])
    wall = time.time() - t_start
    df = pd.DataFrame(rows)
    df["machine"] = machine
    df["dtype"] = dtype
    df["link"] = "intra"
    df["algbw_GBps"] = df["bytes"] / df["time_s"] / 1e9
    df["busbw_GBps"] = df["algbw_GBps"] * [float(bus_factor(o, k)) for o, k in zip(df["op"], df["group_size"])]
    df = df[CSV_COLUMNS]
    csv_path = out / "collectives.csv"
    earlier = []
    if append and csv_path.exists():
        old = pd.read_csv(csv_path)
        key = ["backend", "op", "group_size", "dtype", "bytes"]
        df = pd.concat([old, df]).drop_duplicates(subset=key, keep="last")
        try:                                           # the CSV mixes runs: keep the earlier runs' provenance
            side = read_sidecar(csv_path)
            earlier = side.get("earlier_runs", []) + [side["provenance"]]
        except (OSError, ValueError, KeyError):
            pass
    df = df.sort_values(["backend", "op", "group_size", "bytes"]).reset_index(drop=True)
    prov = provenance(command or "llmcomm bench-collectives (python API)", wall_s=round(wall, 1))
    write_frame(csv_path, df, prov, earlier_runs=earlier,
                config={x: opts[x] for x in ("ops", "backends", "dtype", "warmup", "min_reps", "max_reps",
                                             "point_s", "sample_s")},
                sizes=[min(sizes), max(sizes), len(sizes)], ranks=list(ranks), ranks_meta=metas,
                note="times are the slowest rank's; per sample = inner back-to-back calls / inner after a barrier")
    return df, out


def _launch(n: int, spec: dict, workdir: Path, timeout_s: float, show_progress: bool):
    """Start ``n`` ranks of the rank side through the one launcher; a tqdm bar follows rank 0's progress file."""
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spec["options"]["sizes"]), desc=f"bench-collectives n={n}", unit="pt",
                   file=sys.stderr)

    def poll(folder: Path):
        if bar is None:
            return
        try:
            prog = json.loads((folder / "progress.json").read_text())
        except (OSError, ValueError):
            return
        if (bar.total, bar.n) != (prog["total"], prog["done"]):
            bar.total, bar.n = prog["total"], prog["done"]
            bar.refresh()

    try:
        return launch_ranks("llmcomm.measure.runs.bench", spec, n, workdir, progress_timeout_s=timeout_s,
                            on_poll=poll)
    finally:
        if bar is not None:
            poll(workdir)
            bar.close()
