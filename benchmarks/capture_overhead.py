"""Overhead of observing the communication of a TP generation: none vs llmcomm capture vs DeepSpeed's comms logger vs
torch.profiler, side by side in ONE launch (same ranks, same engine, rotating order per repetition), medians over
repetitions, as ratios to the no-capture baseline. Writes ``data/benchmarks/capture_overhead.json``.

    python benchmarks/capture_overhead.py [--model tiny-llama] [--t 2] [--b 1] [--S 16] [--G 32] [--reps 9]

Numbers from a shared or loaded machine are provisional: rerun on a quiet one.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from llmcomm.measure.launch import rank_spec
from llmcomm.measure.results import provenance
from llmcomm.measure.supervise import launch_ranks
from llmcomm.measure.runs.overhead import MODES
from llmcomm.record import write_json
from llmcomm.spec import Layout, Workload, load_model

REPO = Path(__file__).resolve().parents[1]


def summarize(samples: dict[str, list[dict]], calls: int | None) -> dict:
    """Medians per mode and their ratios to the ``none`` baseline (e2e, ttft, tpot)."""
    med = {m: {k: statistics.median(s[k] for s in v) for k in ("e2e_s", "ttft_s", "tpot_s")}
           for m, v in samples.items() if v}
    base = med["none"]
    out = {}
    for m, v in med.items():
        out[m] = {**{f"median_{k}": x for k, x in v.items()},
                  **{f"ratio_{k[:-2]}": (x / base[k] if base[k] else None) for k, x in v.items()},
                  "reps": len(samples[m])}
        if calls:
            out[m]["overhead_per_call_us"] = (v["e2e_s"] - base["e2e_s"]) / calls * 1e6
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--t", type=int, default=2)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--S", type=int, default=16)
    ap.add_argument("--G", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(REPO / "data" / "benchmarks" / "capture_overhead.json"))
    a = ap.parse_args(argv)

    model = load_model(a.model)
    layout = Layout(t=a.t).validate(model)
    workload = Workload(b=a.b, S=a.S, G=a.G, dtype=a.dtype).validate(model)
    spec = rank_spec(model, layout, workload, backend=a.backend, reference=False, capture=False,
                     options={"reps": a.reps, "warmup": a.warmup, "modes": list(MODES)})
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="llmcomm-overhead-") as tmp:
        records, facts = launch_ranks("llmcomm.measure.runs.overhead", spec, layout.ranks, Path(tmp),
                                      startup_timeout_s=a.timeout, progress_timeout_s=a.timeout)
    r0 = records[0]
    result = {
        "what": "end-to-end generation time under each way of observing the communication, median over reps; "
                "ratio_* = median / median of mode 'none' (rank 0; ranks are in lockstep)",
        "model": model.name, "layout": {"t": layout.t, "p": layout.p}, "workload": workload.as_dict(),
        "calls_per_generation": r0["calls_per_generation"],
        "modes": summarize(r0["samples"], r0["calls_per_generation"]),
        "wrapper_cost": r0["wrapper_cost"],
        "samples": r0["samples"],
        "provenance": provenance(records, facts, started),
    }
    # What the wrapper's per-call cost implies for one generation (robust where whole-generation medians are noisy).
    base = result["modes"]["none"]["median_e2e_s"]
    result["wrapper_cost"]["implied_ratio_e2e"] = \
        1 + result["wrapper_cost"]["overhead_us"] * 1e-6 * (r0["calls_per_generation"] or 0) / base
    out = write_json(a.out, result, indent=1)
    for m, v in result["modes"].items():
        print(f"{m:15s} e2e {v['median_e2e_s'] * 1e3:8.2f} ms   ratio {v['ratio_e2e']:.3f}   "
              f"tpot {v['median_tpot_s'] * 1e3:7.3f} ms")
    w = result["wrapper_cost"]
    print(f"llmcomm wrapper: {w['overhead_us']:.2f} us/call over a bare {w['bare_call_us']:.2f} us all-reduce "
          f"-> implied e2e ratio {w['implied_ratio_e2e']:.4f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
