"""``llmcomm bench-collectives``: an nccl-tests-style microbenchmark of the collectives inference uses.

Two halves in one module:

* the **driver** (:func:`main`) picks sizes, starts ranks with the DeepSpeed launcher (``deepspeed --num_gpus n
  --module llmcomm.bench --worker CFG``) once per group size, shows a progress bar, and writes
  ``<out>/collectives.csv`` plus ``<out>/collectives.provenance.json``;
* the **rank side** (``python -m llmcomm.bench --worker CFG``, what the launcher starts) times the ops.

Backends ("backend" column):

``shm``   ``deepspeed.comm.inference_all_reduce`` — with ``LOCAL_SIZE`` set (the launcher sets it) DeepSpeed's
          shared-memory all-reduce kernel on CPU; only all_reduce exists on this path.
``gloo``  ``deepspeed.comm.all_reduce / all_gather / broadcast / isend+irecv`` over torch's gloo process group.
``nccl``  the same calls on a CUDA machine (one GPU per rank).

Timing follows nccl-tests: a *sample* is ``inner`` back-to-back calls after a barrier, divided by ``inner`` (so that
the barrier's exit skew is amortised); the sample's time is the slowest rank's. ``reps`` samples per point give the
median (``time_s``) and the spread (``time_p10_s``, ``time_p90_s``). ``algbw = S/t``, ``busbw = algbw·f(n)`` with the
sizes S as nccl-tests defines them (:mod:`llmcomm.collectives`). send_recv is nccl-tests' ``sendrecv``: each rank
sends S bytes to the next rank and receives S from the previous one, concurrently.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .data import cpu_model

__all__ = ["main", "run_bench", "parse_size", "size_grid", "register", "CSV_COLUMNS", "DEFAULT_OPS"]

DEFAULT_OPS = ("all_reduce", "all_gather", "broadcast", "send_recv")
CSV_COLUMNS = ["machine", "backend", "op", "group_size", "link", "dtype", "bytes", "count", "time_s", "time_p10_s",
               "time_p90_s", "algbw_GBps", "busbw_GBps", "reps", "inner"]
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str | int) -> int:
    """``"4"``, ``"64K"``, ``"64M"``, ``"1G"`` (binary units) → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 4, 64K, 64M, 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def size_grid(min_bytes: int = 4, max_bytes: int = 64 << 20, factor: int = 2) -> list[int]:
    """Sizes min, min·factor, … ≤ max (nccl-tests ``-b -e -f``)."""
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"bad size range {min_bytes}..{max_bytes} step ×{factor}")
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= factor
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------------------------------
def _elements(op: str, size: int, n: int, itemsize: int) -> tuple[int, int]:
    """(elements per rank buffer, S actually moved) for a requested nccl-tests size ``size``."""
    if op == "all_gather":
        per = max(1, size // (n * itemsize))
        return per, per * n * itemsize
    per = max(1, size // itemsize)
    return per, per * itemsize


def _worker(cfg_path: str) -> None:
    import numpy as np
    import torch
    import deepspeed
    import deepspeed.comm as dist

    cfg = json.loads(Path(cfg_path).read_text())
    deepspeed.init_distributed(dist_backend=cfg["dist_backend"], verbose=False)
    rank, n = dist.get_rank(), dist.get_world_size()
    cuda = cfg["dist_backend"] == "nccl"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, cfg["dtype"])
    itemsize = torch.tensor([], dtype=dtype).element_size()

    from deepspeed.comm import comm as _comm

    cdb = _comm.cdb  # bound at init_distributed (``deepspeed.comm.cdb`` is the import-time None)
    shm_active = bool(getattr(cdb, "shm_comm_op", None) is not None
                      and getattr(cdb, "shm_vector_kernel_level", 0) >= (1 if dtype == torch.float32 else 2)
                      and hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_"))

    def make(backend: str, op: str, per: int):
        x = torch.ones(per, dtype=dtype, device=device)
        if op == "all_reduce":
            if backend == "shm":
                return lambda: dist.inference_all_reduce(x)
            return lambda: dist.all_reduce(x)
        if op == "all_gather":
            if cuda:
                out = torch.empty(per * n, dtype=dtype, device=device)
                return lambda: dist.all_gather_into_tensor(out, x)
            outs = [torch.empty_like(x) for _ in range(n)]
            return lambda: dist.all_gather(outs, x)
        if op == "broadcast":
            return lambda: dist.broadcast(x, src=0)
        if op == "send_recv":
            y = torch.empty_like(x)
            nxt, prv = (rank + 1) % n, (rank - 1) % n

            def sr():
                reqs = [dist.isend(x, nxt), dist.irecv(y, src=prv)]
                for r in reqs:
                    r.wait()
            return sr
        raise ValueError(op)

    points, seen = [], set()
    for be in cfg["backends"]:
        for op in cfg["ops"]:
            if be == "shm" and op != "all_reduce":
                continue
            for size in cfg["sizes"]:
                key = (be, op, _elements(op, size, n, itemsize)[1])
                if key not in seen:                 # sizes below n elements round to the same S: measure once
                    seen.add(key)
                    points.append((be, op, size))
    # global warm-up: the first calls after start-up (page faults on the shm buffers, gloo connections) are slow
    for be in cfg["backends"]:
        fn = make(be, "all_reduce", 1)
        dist.barrier()
        for _ in range(50):
            fn()
        sync()
    progress = Path(cfg["progress"]) if rank == 0 else None
    rows = []
    for i, (be, op, size) in enumerate(points):
        per, nbytes = _elements(op, size, n, itemsize)
        fn = make(be, op, per)
        for _ in range(cfg["warmup"]):
            fn()
        sync()
        # estimate one call's time (slowest rank) by blocks of 1, 4, 16 … back-to-back calls until a block lasts
        # sample_s: the first call after a barrier pays the peers' wake-up (ms on a busy CPU), a block amortises it
        k = 1
        while True:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            el = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(el, op=dist.ReduceOp.MAX)        # every rank takes the same decision
            if float(el) >= cfg["sample_s"] or k >= 256:
                break
            k *= 4
        est = max(float(el) / k, 1e-7)
        inner = int(min(1000, max(1, math.ceil(cfg["sample_s"] / est))))
        reps = int(min(cfg["max_reps"], max(cfg["min_reps"], cfg["point_s"] // (inner * est + 2e-3))))
        times = torch.zeros(reps, dtype=torch.float64)
        for r in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[r] = (time.perf_counter() - t0) / inner
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        if rank == 0:
            tv = times.numpy()
            rows.append({"backend": be, "op": op, "group_size": n, "bytes": nbytes, "count": per, "reps": reps,
                         "inner": inner, "time_s": float(np.median(tv)), "time_p10_s": float(np.percentile(tv, 10)),
                         "time_p90_s": float(np.percentile(tv, 90))})
            progress.write_text(json.dumps({"done": i + 1, "total": len(points)}))
    if rank == 0:
        meta = {"shm_active": shm_active, "world_size": n, "dist_backend": cfg["dist_backend"],
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}
        Path(cfg["result"]).write_text(json.dumps({"rows": rows, "meta": meta}))
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cleanup_shm(port: int) -> list[str]:
    """Remove the shm all-reduce buffers of the run that used ``port`` (named …_<uid>_<addr>_<port>_<rank>)."""
    removed = []
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(f)
            removed.append(f)
        except OSError:
            pass
    return removed


def _launch(n: int, cfg: dict, workdir: Path, timeout_s: float, show_progress: bool) -> dict:
    """Start ``n`` ranks with the DeepSpeed launcher; return rank 0's result dict."""
    port = _free_port()
    cfg = dict(cfg, result=str(workdir / f"result_n{n}.json"), progress=str(workdir / f"progress_n{n}.json"))
    cfg_path = workdir / f"cfg_n{n}.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(port),
           "--module", "llmcomm.bench", "--worker", str(cfg_path)]
    try:   # the measurement launcher's environment (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS …)
        from .launch import default_env

        env = default_env(n)
    except ImportError:
        env = dict(os.environ)
    if cfg["dist_backend"] != "nccl":
        env.setdefault("DS_ACCELERATOR", "cpu")
    log_path = workdir / f"launcher_n{n}.log"
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        nops = sum(1 for be in cfg["backends"] for op in cfg["ops"] if not (be == "shm" and op != "all_reduce"))
        bar = tqdm(total=nops * len(cfg["sizes"]), desc=f"bench-collectives n={n}", unit="pt", file=sys.stderr)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            t_end = time.monotonic() + timeout_s
            while proc.poll() is None:
                if time.monotonic() > t_end:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise RuntimeError(f"bench-collectives with {n} ranks timed out after {timeout_s:.0f} s "
                                       f"(log: {log_path})")
                if bar is not None and Path(cfg["progress"]).exists():
                    try:
                        prog = json.loads(Path(cfg["progress"]).read_text())
                        if (bar.total, bar.n) != (prog["total"], prog["done"]):
                            bar.total, bar.n = prog["total"], prog["done"]
                            bar.refresh()
                    except (ValueError, KeyError):
                        pass
                time.sleep(0.3)
    finally:
        if bar is not None:
            if Path(cfg["progress"]).exists():
                try:
                    bar.n = json.loads(Path(cfg["progress"]).read_text())["done"]
                except (ValueError, KeyError):
                    pass
            bar.close()
        _cleanup_shm(port)
    if proc.returncode != 0 or not Path(cfg["result"]).exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"bench-collectives with {n} ranks failed (exit {proc.returncode}); log tail:\n{tail}")
    res = json.loads(Path(cfg["result"]).read_text())
    res["meta"]["master_port"] = port
    return res


def _default_machine(cuda: bool) -> str:
    from .data import machine_id

    return machine_id()


def run_bench(ops=DEFAULT_OPS, sizes=None, ranks=(2, 4), backends=None, out=None, machine=None, dtype="float32",
              warmup=3, min_reps=5, max_reps=30, point_s=0.2, sample_s=0.02, timeout_s=900.0, append=False,
              progress=True, command=None):
    """Run the microbenchmark; return the results as a pandas DataFrame (also written to ``out``)."""
    import pandas as pd
    import torch

    from .collectives import busbw_factor, canonical_op

    cuda = torch.cuda.is_available()
    if backends is None:
        backends = ["nccl"] if cuda else ["shm", "gloo"]
    backends = list(backends)
    for be in backends:
        if be not in ("shm", "gloo", "nccl"):
            raise ValueError(f"unknown backend {be!r}: shm, gloo or nccl")
    if "nccl" in backends and len(backends) > 1:
        raise ValueError("nccl cannot be measured together with shm or gloo (different process groups)")
    ops = [canonical_op(o) for o in ops]
    sizes = sorted(set(sizes or size_grid(4, 64 << 20)))
    machine = machine or _default_machine("nccl" in backends)
    out = Path(out) if out else Path("data") / machine
    cfg = {"ops": ops, "sizes": sizes, "backends": [b for b in backends if b != "nccl"] or ["nccl"],
           "dist_backend": "nccl" if "nccl" in backends else "gloo", "dtype": dtype, "warmup": warmup,
           "min_reps": min_reps, "max_reps": max_reps, "point_s": point_s, "sample_s": sample_s}
    rows, metas = [], {}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="llmcomm-bench-") as tmp:
        for n in ranks:
            res = _launch(int(n), cfg, Path(tmp), timeout_s, progress)
            metas[str(n)] = res["meta"]
            if "shm" in backends and not res["meta"].get("shm_active", False):
                print(f"warning: shm all-reduce kernel not active with {n} ranks: 'shm' rows fell back to gloo",
                      file=sys.stderr)
            rows.extend(res["rows"])
    wall = time.time() - t_start
    df = pd.DataFrame(rows)
    df["machine"] = machine
    df["dtype"] = dtype
    df["link"] = "intra"
    df["algbw_GBps"] = df["bytes"] / df["time_s"] / 1e9
    df["busbw_GBps"] = df["algbw_GBps"] * [float(busbw_factor(o, k)) for o, k in zip(df["op"], df["group_size"])]
    df = df[CSV_COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "collectives.csv"
    if append and csv_path.exists():
        old = pd.read_csv(csv_path)
        key = ["backend", "op", "group_size", "dtype", "bytes"]
        merged = pd.concat([old, df]).drop_duplicates(subset=key, keep="last")
        df_write = merged.sort_values(["backend", "op", "group_size", "bytes"]).reset_index(drop=True)
    else:
        df_write = df.sort_values(["backend", "op", "group_size", "bytes"]).reset_index(drop=True)
    df_write.to_csv(csv_path, index=False)
    import deepspeed  # noqa: F401  (version only)

    prov = {"machine": machine, "cpu_model": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "command": command or "llmcomm bench-collectives (python API)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall, 1),
            "config": {k: cfg[k] for k in ("ops", "backends", "dist_backend", "dtype", "warmup", "min_reps",
                                           "max_reps", "point_s", "sample_s")},
            "sizes": [min(sizes), max(sizes), len(sizes)], "ranks": list(ranks), "ranks_meta": metas,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "note": "times are the slowest rank's; per sample = inner back-to-back calls / inner after a barrier"}
    prov_path = out / "collectives.provenance.json"
    if append and prov_path.exists():                  # the CSV mixes runs: keep the earlier runs' provenance
        try:
            old_prov = json.loads(prov_path.read_text())
            prov["earlier_runs"] = old_prov.pop("earlier_runs", []) + [old_prov]
        except ValueError:
            pass
    prov_path.write_text(json.dumps(prov, indent=2) + "\n")
    return df_write


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS),
                    help="collectives: all_reduce all_gather broadcast send_recv (default: all four)")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="explicit sizes (4 64K 1M …); default: powers of two from --min-bytes to --max-bytes")
    ap.add_argument("--min-bytes", default="4", help="smallest size (default 4)")
    ap.add_argument("--max-bytes", default="64M", help="largest size (default 64M)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="group sizes n (default: 2 4)")
    ap.add_argument("--backend", nargs="+", choices=["shm", "gloo", "nccl"], default=None,
                    help="default: shm gloo on CPU, nccl on CUDA")
    ap.add_argument("--out", default=None, help="output folder (default data/<machine>)")
    ap.add_argument("--machine", default=None, help="machine name for the data folder (default cpu-local or the GPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--point-seconds", type=float, default=0.2, help="time budget per (op, size) point")
    ap.add_argument("--sample-seconds", type=float, default=0.02,
                    help="back-to-back calls per sample last about this long (amortises barrier exit skew)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per launch before it is killed")
    ap.add_argument("--append", action="store_true", help="merge into an existing CSV (same keys replaced)")
    ap.add_argument("--no-progress", action="store_true")


def _run_args(args, command: str | None = None):
    try:
        sizes = [parse_size(s) for s in args.sizes] if args.sizes else \
            size_grid(parse_size(args.min_bytes), parse_size(args.max_bytes))
    except ValueError as e:
        from .spec import SpecError

        raise SpecError(str(e)) from None
    df = run_bench(ops=args.ops, sizes=sizes, ranks=args.ranks, backends=args.backend, out=args.out,
                   machine=args.machine, dtype=args.dtype, warmup=args.warmup, min_reps=args.min_reps,
                   max_reps=args.max_reps, point_s=args.point_seconds, sample_s=args.sample_seconds,
                   timeout_s=args.timeout, append=args.append,
                   progress=not args.no_progress, command=command or "llmcomm bench-collectives " +
                   " ".join(shlex.quote(a) for a in (getattr(args, "_argv", None) or [])))
    return df


def _cmd(args) -> int:
    df = _run_args(args, command="llmcomm " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    out = Path(args.out) if args.out else Path("data") / df["machine"].iloc[0]
    _print_summary(df)
    print(f"wrote {out / 'collectives.csv'} and {out / 'collectives.provenance.json'}")
    return 0


def _print_summary(df) -> None:
    for (be, op, n), g in df.groupby(["backend", "op", "group_size"]):
        small, big = g.iloc[0], g.iloc[-1]
        print(f"{be:5s} {op:11s} n={n}: {small['bytes']:>9,d} B {small['time_s'] * 1e6:9.1f} us   "
              f"{big['bytes']:>9,d} B {big['time_s'] * 1e3:8.2f} ms busbw {big['busbw_GBps']:.2f} GB/s")


def register(subparsers) -> None:
    """Add ``bench-collectives`` to the ``llmcomm`` CLI (a hook for ``cli._EXTRA_COMMANDS``)."""
    sp = subparsers.add_parser("bench-collectives", help="microbenchmark all_reduce/all_gather/broadcast/send_recv")
    _add_args(sp)
    sp.set_defaults(func=_cmd)


def main(argv=None) -> int:
    """``python -m llmcomm.bench [args]`` (driver) or ``… --worker CFG`` (rank side, started by the launcher)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        i = argv.index("--worker")
        _worker(argv[i + 1])
        return 0
    ap = argparse.ArgumentParser(prog="llmcomm bench-collectives", description=__doc__.split("\n\n")[0])
    _add_args(ap)
    args = ap.parse_args(argv)
    df = _run_args(args, command="llmcomm bench-collectives " + " ".join(shlex.quote(a) for a in argv))
    _print_summary(df)
    return 0


if __name__ == "__main__":
    sys.exit(main())
