"""How fast is the latency model? Points (layout × workload) per second on one core, beside llm-analysis.

    python benchmarks/predict_speed.py [--llm-analysis-python /tmp/la/bin/python] [--out data/benchmarks]

The grid: llama-3.1-70b on h100-sxm (8 GPUs per node), t ∈ {1,2,4,8} × p ∈ {1,2,4,5,8,10,16,20} × b ∈ 1..32 ×
32 prompt lengths × 32 generation lengths = 1,048,576 points, evaluated by one call of
:func:`llmcomm.predict.latency.predict_latency_grid` (TTFT, TPOT, E2E and the compute/comm split per phase). Best of 3 runs,
pinned to one core.

llm-analysis (PyPI ``llm-analysis``, per-point Python) is timed on a random sample of the same grid in a throwaway
venv (``python -m venv /tmp/la && /tmp/la/bin/pip install llm-analysis``; it is not a project dependency); its
points/s is extrapolated from the sample. If that venv is missing, the JSON says why.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llmcomm.record import load_average, provenance, write_json

T = [1, 2, 4, 8]
P = [1, 2, 4, 5, 8, 10, 16, 20]
B = list(range(1, 33))
S = [int(x) for x in np.linspace(16, 8192, 32).astype(int)]
G = [int(x) for x in np.linspace(1, 1024, 32).astype(int)]

LA_SCRIPT = r"""
import json, sys, time, logging, random
from llm_analysis.analysis import LLMAnalysis
from llm_analysis.config import ModelConfig, ParallelismConfig, get_gpu_config_by_name, get_dtype_config_by_name
import llm_analysis
logging.disable(logging.CRITICAL)
pts = json.load(open(sys.argv[1]))
model = ModelConfig(name="llama-3.1-70b", num_layers=80, n_head=64, hidden_dim=8192, vocab_size=128256,
                    max_seq_len=131072, num_key_value_heads=8, ffn_embed_dim=28672, expansion_ratio=3.5,
                    model_type="llama")
gpu = get_gpu_config_by_name("h100-sxm-80gb")
dtype = get_dtype_config_by_name("w16a16e16")
from importlib.metadata import version
errors, t_ok, why = 0, 0.0, {}
t0 = time.perf_counter()
for t, p, b, s, g in pts:
    t1 = time.perf_counter()
    try:
        LLMAnalysis(model, gpu, dtype, ParallelismConfig(tp_size=t, pp_size=p), flops_efficiency=0.7,
                    hbm_memory_efficiency=0.8).inference(batch_size_per_gpu=b, seq_len=s, num_tokens_to_generate=g)
        t_ok += time.perf_counter() - t1
    except Exception as e:              # llm-analysis asserts when a point does not fit the GPU memory
        errors += 1
        key = type(e).__name__ + ": " + str(e).split("(")[0][:60]
        why[key] = why.get(key, 0) + 1
dt = time.perf_counter() - t0
print(json.dumps({"points": len(pts), "seconds": dt, "errors": errors, "errors_by_kind": why,
                  "seconds_successful_points": t_ok, "version": version("llm-analysis")}))
"""


def _pin_one_core():
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        return True
    except (AttributeError, OSError):
        return False


def bench_llmcomm(repeats: int = 3) -> dict:
    from llmcomm import load_model
    from llmcomm.predict.hardware import load_hardware
    from llmcomm.predict.latency import predict_latency_grid

    model, hw = load_model("llama-3.1-70b"), load_hardware("h100-sxm")
    t, p, b, s, g = np.meshgrid(T, P, B, S, G, indexing="ij")
    t, p, b, s, g = (x.ravel() for x in (t, p, b, s, g))
    predict_latency_grid(model, hw, t[:100], p[:100], b[:100], s[:100], g[:100], 2)  # lambdify once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = predict_latency_grid(model, hw, t, p, b, s, g, 2, gpus_per_node=8)
        best = min(best, time.perf_counter() - t0)
    assert np.isfinite(out["e2e_s"]).all()
    return {"points": int(t.size), "seconds": best, "points_per_s": t.size / best, "repeats": repeats,
            "outputs": sorted(out)}


def bench_llm_analysis(python: str, sample: int = 300, seed: int = 0) -> dict:
    if not Path(python).exists():
        return {"status": "not run", "why": f"{python} missing: create the throwaway venv with "
                                            "`python -m venv /tmp/la && /tmp/la/bin/pip install llm-analysis`"}
    rng = np.random.default_rng(seed)
    pts = [[int(rng.choice(T)), int(rng.choice(P)), int(rng.choice(B)), int(rng.choice(S)), int(rng.choice(G))]
           for _ in range(sample)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pts.json").write_text(json.dumps(pts))
        (Path(tmp) / "la.py").write_text(LA_SCRIPT)
        cmd = [python, str(Path(tmp) / "la.py"), str(Path(tmp) / "pts.json")]
        pin = ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[0])] if _which("taskset") else []
        r = subprocess.run(pin + cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"status": "failed", "why": r.stderr.strip().splitlines()[-1:] or ["?"]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ok = res["points"] - res["errors"]
    res.update(status="ok", points_per_s=res["points"] / res["seconds"], sampled_from_same_grid=True,
               points_per_s_successful=(ok / res["seconds_successful_points"]) if ok else None,
               settings="flops_efficiency=0.7, hbm_memory_efficiency=0.8, w16a16e16, h100-sxm-80gb preset")
    return res


def _which(name):
    from shutil import which

    return which(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm-analysis-python", default="/tmp/la/bin/python")
    ap.add_argument("--sample", type=int, default=300, help="llm-analysis points to time")
    ap.add_argument("--out", default="data/benchmarks")
    args = ap.parse_args(argv)
    pinned = _pin_one_core()
    ours = bench_llmcomm()
    print(f"llmcomm: {ours['points']:,} points in {ours['seconds']:.3f} s = {ours['points_per_s']:,.0f} points/s")
    la = bench_llm_analysis(args.llm_analysis_python, args.sample)
    if la.get("status") == "ok":
        print(f"llm-analysis {la.get('version')}: {la['points']} points in {la['seconds']:.2f} s = "
              f"{la['points_per_s']:,.0f} points/s ({la['errors']} errors)")
    else:
        print(f"llm-analysis: {la}")
    load = load_average()
    command = "python benchmarks/predict_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"grid": {"model": "llama-3.1-70b", "hardware": "h100-sxm", "gpus_per_node": 8, "t": T, "p": P,
                    "b": [min(B), max(B), len(B)], "S": S, "G": G},
           "llmcomm": ours, "llm_analysis": la,
           "speedup": (ours["points_per_s"] / la["points_per_s"]) if la.get("status") == "ok" else None,
           "provenance": provenance(command, pinned_one_core=pinned, load_avg=load)}
    out = write_json(Path(args.out) / "predict_speed.json", res, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
