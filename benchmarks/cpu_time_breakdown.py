"""Where a CPU run's time goes: small-llama (the time validation's model) as TP2, PP2 and the 2×2 hybrid on CPU
ranks, one workload, each layout's configuration generated once timed and once more under ``torch.profiler``
(launch option ``profile``: :meth:`llmcomm.measure.runs.rankio.RankContext.profiled`), split per phase into GEMM,
attention, elementwise, views/allocation, communication and host time (:mod:`llmcomm.measure.opprofile`), on rank 0
and on the first rank of every pipeline stage. Writes ``data/benchmarks/cpu_time_breakdown.json``.

    python benchmarks/cpu_time_breakdown.py [--model small-llama] [--b 1] [--S 64] [--G 8]

The profiler slows every op and the machine may be loaded (the load average is in the provenance): absolute seconds
are inflated, the shares of each phase's wall time are what this measures.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmcomm.measure.launch import measure_many
from llmcomm.record import load_average, provenance, write_json
from llmcomm.spec import Layout, Workload, load_model

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ((2, 1), (1, 2), (2, 2))


def profiles(res, layout: Layout) -> list[dict]:
    """The profile of rank 0 and of each pipeline stage's first rank, with the rank's timed generation beside it."""
    firsts = {s * layout.t for s in range(layout.p)}
    out = []
    for r in sorted(res.ranks, key=lambda r: r["rank"]):
        if r["rank"] in firsts:
            out.append({"rank": r["rank"], "stage": r["rank"] // layout.t, "timed": r["timings"],
                        "allreduce_path": r["comm"]["allreduce_path"], **r["profile"]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-llama")
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--S", type=int, default=64)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "data" / "benchmarks" / "cpu_time_breakdown.json"))
    a = ap.parse_args(argv)

    model = load_model(a.model)
    workload = Workload(b=a.b, S=a.S, G=a.G).validate(model)
    load_before = load_average()
    runs = []
    for t, p in LAYOUTS:
        layout = Layout(t=t, p=p).validate(model)
        res = measure_many(model, layout, [workload], env={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""},
                           options={"profile": True})[0]
        runs.append({"layout": {"t": t, "p": p}, "backend": res.provenance.get("backend_requested"),
                     "ranks": profiles(res, layout)})
        print(f"t={t} p={p}: done", file=sys.stderr)
    command = "python benchmarks/cpu_time_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"what": "per phase (prefill: 1 forward; decode: G-1 forwards) of one profiled generation after the "
                      "timed one: wall seconds and self CPU seconds per op category (llmcomm.measure.opprofile), "
                      "host = the phase's time outside every op; communication = each collective / send / recv call "
                      "as the application made it, waiting included. The profiler inflates op-heavy phases and the "
                      "machine may be loaded (load_avg in the provenance): read the shares, not the seconds.",
              "model": model.name, "workload": workload.as_dict(), "runs": runs,
              "provenance": provenance(command, load_avg=load_before, load_avg_after=load_average(),
                                       niceness=os.nice(0))}
    out = write_json(Path(a.out), result, indent=1)
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
