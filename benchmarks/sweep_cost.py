"""What a sweep costs: one `llmcomm measure` launch of 8 configurations against one launch of a single configuration
and against 8 separate launches (how every sweep ran before sweeps shared a launch). Wall times of the command as a
user runs it (process start, imports, process group, model build and sharding, the generations, teardown),
interleaved (single, sweep, separate, single, …) so that drift of a shared machine hits each alike; medians over
repetitions; the ratio sweep / single is the figure of merit (target ≤ 1.5 on a 2-core machine). Writes
``data/benchmarks/sweep_cost.json`` with provenance and the load average.

    python benchmarks/sweep_cost.py [--reps 3] [--separate-reps 1]

Numbers from a shared or loaded machine are provisional: rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmcomm.record import load_average, provenance, write_json
from llmcomm.spec import workload_grid

REPO = Path(__file__).resolve().parents[1]
BASE = ["--model", "tiny-llama", "--tp", "2", "--json"]
GRID = {"batch": [1, 2], "prompt": [8, 16], "generate": [4, 8]}          # 2 × 2 × 2 = 8 configurations


def _flags(grid: dict) -> list[str]:
    return list(itertools.chain.from_iterable([f"--{k}", *map(str, v)] for k, v in grid.items()))


def run_cli(argv: list[str]) -> tuple[float, list[dict]]:
    """Wall seconds of ``llmcomm <argv>`` in a fresh process, and the JSON lines it printed."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llmcomm.cli", *argv], capture_output=True, text=True,
                       env={**os.environ, "LLMCOMM_PROGRESS": "0"})
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"llmcomm {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, [json.loads(ln) for ln in p.stdout.splitlines()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the single launch and of the sweep")
    ap.add_argument("--separate-reps", type=int, default=1, help="repetitions of the 8 separate launches")
    ap.add_argument("--out", default=str(REPO / "data" / "benchmarks" / "sweep_cost.json"))
    a = ap.parse_args(argv)

    workloads = workload_grid(GRID["batch"], GRID["prompt"], GRID["generate"])
    single_argv = ["measure", *BASE, *_flags({k: v[:1] for k, v in GRID.items()})]
    sweep_argv = ["measure", *BASE, *_flags(GRID)]
    separate = [["measure", *BASE, "--batch", str(w.b), "--prompt", str(w.S), "--generate", str(w.G)]
                for w in workloads]
    load_before = load_average()
    run_cli(single_argv)                               # warm: the shm op is compiled, files are in the page cache
    times = {"single": [], "sweep": [], "separate": []}
    lines = {}
    for rep in range(max(a.reps, a.separate_reps)):
        if rep < a.reps:
            wall, lines["single"] = run_cli(single_argv)
            times["single"].append(wall)
            wall, lines["sweep"] = run_cli(sweep_argv)
            times["sweep"].append(wall)
        if rep < a.separate_reps:
            t, out = 0.0, []
            for argv_one in separate:
                wall, got = run_cli(argv_one)
                t += wall
                out += got
            times["separate"].append(t)
            lines["separate"] = out
    strip = lambda objs: [{k: o[k] for k in ("batch", "prompt", "generate", "ops", "tokens")} for o in objs]  # noqa
    assert strip(lines["sweep"]) == strip(lines["separate"]), "the sweep measured something else than the launches"
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"configurations": len(workloads), "grid": GRID, "times_s": times, "median_s": med,
           "ratio_sweep_over_single": med["sweep"] / med["single"],
           "ratio_separate_over_single": med["separate"] / med["single"],
           "speedup_sweep_over_separate": med["separate"] / med["sweep"],
           "commands": {"single": "llmcomm " + " ".join(single_argv), "sweep": "llmcomm " + " ".join(sweep_argv),
                        "separate": f"{len(separate)} × llmcomm measure … (one configuration each)"},
           "provenance": provenance("python benchmarks/sweep_cost.py " + " ".join(argv or sys.argv[1:]),
                                    load_avg_before=load_before, load_avg_after=load_average())}
    write_json(a.out, res, indent=1)
    print(f"single launch {med['single']:.1f} s, sweep of {len(workloads)} in one launch {med['sweep']:.1f} s "
          f"(×{res['ratio_sweep_over_single']:.2f}), {len(workloads)} separate launches {med['separate']:.1f} s "
          f"(×{res['ratio_separate_over_single']:.2f}); load average {load_before} → {load_average()}")
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
