"""What one CPU launch costs, started fresh against forked from a fork server (:mod:`llmcomm.measure.forkserver`).

One configuration (tiny-llama, t = 2, b = 1, S = 8, G = 4) measured through :func:`llmcomm.measure.launch.measure`
— DeepSpeed's launcher, two ranks under their supervisor, capture, teardown — with every process started fresh
(``python -m …``: each imports torch, DeepSpeed and transformers) and with the same processes forked from a server
that imported them once. Interleaved (fresh, forked, fresh, …) so that drift of a shared machine hits both alike;
medians over repetitions; the ratio fresh / forked is the figure of merit. The two must measure the same rows (checked
here; ``tests/test_launch.py`` checks it too). Writes ``data/benchmarks/launch_cost.json`` with provenance and the
load average. CPU only (``DS_ACCELERATOR=cpu``, as the Makefile sets).

    python benchmarks/launch_cost.py [--reps 3]

Numbers from a shared or loaded machine are provisional: rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from llmcomm import load_model
from llmcomm.measure.cache import ENV as RUN_CACHE
from llmcomm.measure.forkserver import ENV as FORK_SERVER, running
from llmcomm.measure.launch import measure
from llmcomm.record import load_average, provenance, write_json
from llmcomm.spec import Layout, Workload

REPO = Path(__file__).resolve().parents[1]


def _one() -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    res = measure(load_model("tiny-llama"), Layout(t=2), Workload(b=1, S=8, G=4))
    return time.perf_counter() - t0, res.rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "data" / "benchmarks" / "launch_cost.json"))
    a = ap.parse_args(argv)
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        raise SystemExit("launch_cost: CPU only (DS_ACCELERATOR=cpu)")
    os.environ.pop(RUN_CACHE, None)                      # every launch really starts
    os.environ["LLMCOMM_PROGRESS"] = "0"
    load_before = load_average()
    times: dict[str, list[float]] = {"fresh": [], "forked": []}
    rows = {}
    with running() as server:
        if server is None:
            raise SystemExit("launch_cost: no fork server could start (see llmcomm.measure.forkserver.running)")
        _one()                                           # warm: the shm op is compiled, files are in the page cache
        for _ in range(a.reps):
            os.environ.pop(FORK_SERVER)
            wall, rows["fresh"] = _one()
            times["fresh"].append(wall)
            os.environ[FORK_SERVER] = server
            wall, rows["forked"] = _one()
            times["forked"].append(wall)
    assert rows["fresh"] == rows["forked"], "the forked launch measured something else than the fresh one"
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"configuration": "tiny-llama t=2 b=1 S=8 G=4 (llmcomm.measure.launch.measure)", "times_s": times,
           "median_s": med, "ratio_fresh_over_forked": med["fresh"] / med["forked"],
           "provenance": provenance("python benchmarks/launch_cost.py " + " ".join(argv or sys.argv[1:]),
                                    load_avg_before=load_before, load_avg_after=load_average())}
    write_json(a.out, res, indent=1)
    print(f"one launch: fresh {med['fresh']:.1f} s, forked {med['forked']:.1f} s "
          f"(×{res['ratio_fresh_over_forked']:.1f}); load average {load_before} → {load_average()}")
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
