"""The prepared single-GPU measurement: one command, one time budget, files ready for ``data/<machine>/``.

On a machine with ONE GPU (H100/H200) it measures what one GPU can tell the time model (book appendix "Dependency facts": the lent GPU machine):

(a) ``layer_times``: one Llama decoder layer at the shard each rank computes under t-way tensor parallelism
    (heads, KV heads and FFN width divided by t; hidden size and head size kept), for real shapes (Llama-3.2-3B,
    Llama-3.1-8B), t = 1, 2, 4, 8, batch b and prompt S: a prefill forward over S tokens, and a decode forward of one
    token with a KV cache of S tokens. bf16, CUDA events, warm-up, repetitions; median and min per point, with the
    FLOPs and bytes :func:`llmcomm.predict.compute.layer_cost` counts for it (not a prediction: the model's work count);
(b) ``generate``: a single-GPU generation of a Llama-3.2-3B-shaped random-weight model through the project's own
    run path (:func:`llmcomm.measure.launch.measure`, t = 1: DeepSpeed launcher, ``init_inference(tp_size=1)``, capture on),
    TTFT and TPOT; ``generate_ops``: the collectives it captured (setup only at t = 1);
(c) provenance (GPU, driver, CUDA, torch, transformers, deepspeed, command, date) beside every CSV
    (:func:`llmcomm.record.save_frame`).

Files: ``OUT/<machine>/{layer_times,generate,generate_ops}.{csv,json}`` (machine = :func:`llmcomm.record.machine_id`,
e.g. ``h100-80gb-hbm3-x1``) — copy that folder to ``data/`` — and ``OUT/single_gpu.log`` (run.sh). Every step checks the
time left (``--budget-s``) before it starts and is skipped, and said so, when it would not fit.

``--dry-run`` (alias ``--cpu``): the same code on the CPU with tiny shapes and fp32, writing
``OUT/dry-run-<machine>/``; never GPU numbers. Usage: ``tools/gpu/run.sh`` (README beside this file).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(_ROOT / "src"))

# What the GPU run measures (a), (b). Ordered so that the most useful points come first under the time guard.
GPU_PLAN = {
    "models": ["llama-3.2-3b", "llama-3.1-8b"],
    "t": [1, 2, 4, 8],
    "S": [128, 512, 2048],
    "b": [1, 8],
    "dtype": "bf16",
    "warmup": 3, "reps_prefill": 10, "reps_decode": 30,
    "generate": {"model": "llama-3.2-3b", "workloads": [(1, 128, 32), (8, 1024, 32)]},
}
DRY_PLAN = {
    "models": ["tiny-llama"],
    "t": [1, 2],
    "S": [8, 32],
    "b": [1, 2],
    "dtype": "fp32",
    "warmup": 1, "reps_prefill": 3, "reps_decode": 3,
    "generate": {"model": "tiny-llama", "workloads": [(1, 8, 4)]},
}
LAYER_COLUMNS = ["model", "t", "phase", "b", "S", "new_tokens", "kv_len", "dtype", "device", "reps", "median_s",
                 "min_s", "mean_s", "flops", "bytes", "h", "heads", "kv_heads", "ffn", "head_dim", "attn"]
GENERATE_COLUMNS = ["model", "t", "b", "S", "G", "dtype", "device", "ttft_s", "tpot_s", "e2e_s", "tokens_match",
                    "launch_wall_s", "backend", "allreduce_path"]
OPS_COLUMNS = ["model", "b", "S", "G", "phase", "op", "group_size", "calls", "bytes"]


def log(msg: str) -> None:
    print(f"[single_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.monotonic(), float(seconds)

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)


def shard_config(model_name: str, t: int, dtype_attn: str = "sdpa"):
    """HF ``LlamaConfig`` of ONE decoder layer as one of t tensor-parallel ranks computes it: heads, KV heads and
    intermediate size divided by t (AutoTP's split; all must divide), hidden and head size unchanged."""
    from llmcomm.spec import load_model, SpecError

    m = load_model(model_name)
    for what, n in (("heads", m.heads), ("kv_heads", m.kv_heads), ("ffn", m.ffn)):
        if n % t:
            raise SpecError(f"{model_name}: {what}={n} is not divisible by t={t}")
    cfg = m.to_hf_config()
    cfg.num_hidden_layers = 1
    cfg.num_attention_heads = m.heads // t
    cfg.num_key_value_heads = m.kv_heads // t
    cfg.intermediate_size = m.ffn // t
    cfg.head_dim = m.head_dim
    cfg._attn_implementation = dtype_attn
    return m, cfg


def _crop(cache, S: int) -> None:
    """Back to a KV cache of S tokens (slicing: host-side, no kernel). ``crop(-n)`` removes n tokens in every
    transformers 5.x (later versions refuse a positive length)."""
    n = cache.get_seq_length() - S
    if n > 0:
        cache.crop(-n)


class _Timer:
    """CUDA events on a GPU, perf_counter on the CPU: seconds of each call of ``fn``."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn, warmup: int, reps: int, between=None) -> list[float]:
        torch = self.torch
        for _ in range(warmup):
            fn()
            if between:
                between()
        out = []
        if self.cuda:
            torch.cuda.synchronize()
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in evs:
                a.record()
                fn()
                b.record()
                if between:
                    between()           # host-side only (cache crop): launches no kernel between the events
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) * 1e-3 for a, b in evs]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
                if between:
                    between()
        return out


def time_layers(plan: dict, device, budget: Budget, reserve_s: float) -> list[dict]:
    """(a): per-layer prefill and decode times for every (model, t, b, S) of the plan that fits the budget."""
    import torch
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from llmcomm.measure.runs.common import TORCH_DTYPES, cache_kwarg
    from llmcomm.predict.compute import layer_cost

    dtype = TORCH_DTYPES[plan["dtype"]]
    w = torch.finfo(dtype).bits // 8
    timer = _Timer(device)
    rows, skipped = [], 0
    for name in plan["models"]:
        for t in plan["t"]:
            if budget.left() < reserve_s:
                skipped += 1
                continue
            spec, cfg = shard_config(name, t)
            torch.manual_seed(0)
            with torch.device(device):
                layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype).eval()
                rope = LlamaRotaryEmbedding(cfg)
            kw = cache_kwarg(layer)
            for b in plan["b"]:
                for S in plan["S"]:
                    if budget.left() < reserve_s:
                        skipped += 1
                        continue
                    try:
                        x = torch.randn(b, S, spec.h, device=device, dtype=dtype)
                        pos = torch.arange(S, device=device)[None].expand(b, S)
                        pe = rope(x, pos)
                        x1 = torch.randn(b, 1, spec.h, device=device, dtype=dtype)
                        pos1 = torch.full((b, 1), S, device=device)
                        pe1 = rope(x1, pos1)
                        with torch.inference_mode():
                            def prefill():
                                layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe,
                                      use_cache=True, cache_position=pos[0], **{kw: DynamicCache(config=cfg)})
                            pre = timer(prefill, plan["warmup"], plan["reps_prefill"])
                            cache = DynamicCache(config=cfg)          # KV cache of exactly S tokens
                            layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True,
                                  cache_position=pos[0], **{kw: cache})
                            cpos1 = pos1[0]

                            def decode():
                                layer(x1, attention_mask=None, position_ids=pos1, position_embeddings=pe1,
                                      use_cache=True, cache_position=cpos1, **{kw: cache})
                            dec = timer(decode, plan["warmup"], plan["reps_decode"], between=lambda: _crop(cache, S))
                    except torch.OutOfMemoryError:
                        log(f"{name} t={t} b={b} S={S}: out of GPU memory, skipped")
                        torch.cuda.empty_cache()
                        continue
                    for phase, times, s_new, n_kv, ctx in (("prefill", pre, S, 0, (S + 1) / 2),
                                                           ("decode", dec, 1, S, S + 1)):
                        fl, by = (float(v) for v in layer_cost(spec, t, b, s_new, n_kv, ctx, w))
                        rows.append({"model": name, "t": t, "phase": phase, "b": b, "S": S, "new_tokens": s_new,
                                     "kv_len": n_kv, "dtype": plan["dtype"], "device": str(device),
                                     "reps": len(times), "median_s": statistics.median(times), "min_s": min(times),
                                     "mean_s": statistics.fmean(times), "flops": fl, "bytes": by, "h": spec.h,
                                     "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                                     "ffn": cfg.intermediate_size, "head_dim": cfg.head_dim,
                                     "attn": cfg._attn_implementation})
                    log(f"layer {name} t={t} b={b} S={S}: prefill {statistics.median(pre) * 1e3:.3f} ms, "
                        f"decode {statistics.median(dec) * 1e3:.4f} ms ({budget.left():.0f} s left)")
            layer = None  # free the weights before the next shard (a del would confuse the closures above)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if skipped:
        log(f"time guard: {skipped} layer configurations skipped")
    return rows


def run_generate(plan: dict, budget: Budget, per_run_s: float, reserve_s: float, work: Path):
    """(b): single-GPU generation through llmcomm.measure.launch.measure (t = 1, DeepSpeed init_inference, capture on)."""
    from llmcomm.measure.launch import measure, RunError
    from llmcomm.spec import Layout, Workload, load_model

    gen, ops = [], []
    g = plan["generate"]
    for b, S, G in g["workloads"]:
        left = budget.left() - reserve_s
        if left < min(per_run_s, 60):
            log(f"time guard: generate b={b} S={S} G={G} skipped ({budget.left():.0f} s left)")
            continue
        log(f"generate {g['model']} b={b} S={S} G={G} through llmcomm.measure.launch.measure (timeout {left:.0f} s)")
        try:
            res = measure(load_model(g["model"]), Layout(1, 1), Workload(b, S, G, plan["dtype"]),
                          startup_timeout_s=left, progress_timeout_s=left, out_dir=work / f"run-b{b}-S{S}-G{G}")
        except RunError as e:
            log(f"generate b={b} S={S} G={G} FAILED: {e}")
            continue
        rank0 = res.ranks[0] if res.ranks else {}
        gen.append({"model": g["model"], "t": 1, "b": b, "S": S, "G": G, "dtype": plan["dtype"],
                    "device": rank0.get("device"), "ttft_s": res.ttft_s, "tpot_s": res.tpot_s, "e2e_s": res.e2e_s,
                    "tokens_match": res.tokens_match, "launch_wall_s": res.provenance.get("launch_wall_s"),
                    "backend": (rank0.get("comm") or {}).get("backend"),
                    "allreduce_path": (rank0.get("comm") or {}).get("allreduce_path")})
        ops += [{"model": g["model"], "b": b, "S": S, "G": G, **r} for r in res.rows]
        log(f"generate b={b} S={S} G={G}: TTFT {res.ttft_s * 1e3:.2f} ms, TPOT {res.tpot_s * 1e3:.3f} ms, "
            f"tokens match reference: {res.tokens_match}, captured rows: {len(res.rows)}")
    return gen, ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(_ROOT / "runs-out" / "gpu"),
                    help="output folder (default $OUT, else runs-out/gpu)")
    ap.add_argument("--dry-run", "--cpu", dest="dry", action="store_true",
                    help="tiny shapes on the CPU, fp32: proves the path end to end; never GPU numbers")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total seconds for all steps (default 420)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    args = ap.parse_args(argv)

    budget = Budget(args.budget_s)
    if args.dry:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""           # the dry run stays on the CPU even on a GPU machine
    import torch
    import pandas as pd
    from llmcomm import record as data

    plan = DRY_PLAN if args.dry else GPU_PLAN
    if not args.dry and not torch.cuda.is_available():
        log("no CUDA GPU visible: use --dry-run on a CPU machine")
        return 2
    device = torch.device("cpu") if args.dry else torch.device("cuda:0")
    machine = data.machine_id()
    folder = f"dry-run-{machine}" if args.dry else machine
    out = Path(args.out)
    (out / folder).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_ROOT / ".cache" / "torch_extensions"))
    command = "tools/gpu/single_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    gpu = {}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = {"gpu_name": p.name, "gpu_memory_bytes": p.total_memory, "sm_count": p.multi_processor_count,
               "capability": f"{p.major}.{p.minor}", "torch_cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version()}
    mode = "dry-run (CPU, tiny shapes: not a GPU measurement)" if args.dry else "gpu"
    log(f"machine {machine}, device {device}, mode {mode}, budget {args.budget_s:.0f} s, out {out / folder}")
    common = dict(machine=folder, mode=mode, plan={k: v for k, v in plan.items() if k != "generate"}, **gpu)
    status = 0

    if not args.skip_layers:
        # Leave the generate step its share: it needs ~2.5 min on a GPU (model build + launch), seconds dry.
        reserve = 0.0 if args.skip_generate else (20.0 if args.dry else 170.0)
        try:
            rows = time_layers(plan, device, budget, reserve)
            df = pd.DataFrame(rows, columns=LAYER_COLUMNS)
            data.save_frame(df, "layer_times", command, root=out, **common, timer="cuda events" if device.type == "cuda"
                            else "perf_counter", warmup=plan["warmup"])
            log(f"layer_times: {len(df)} rows")
        except Exception:                                  # noqa: BLE001 - keep going: the generate step may work
            traceback.print_exc()
            status = 1

    if not args.skip_generate:
        try:
            gen, ops = run_generate(plan, budget, per_run_s=20.0 if args.dry else 120.0, reserve_s=5.0,
                                    work=out / "work")
            data.save_frame(pd.DataFrame(gen, columns=GENERATE_COLUMNS), "generate", command, root=out, **common,
                            what="single-GPU generation through llmcomm.measure.launch.measure (t=1, DeepSpeed "
                                 "init_inference tp_size=1, random weights, greedy)")
            data.save_frame(pd.DataFrame(ops, columns=OPS_COLUMNS), "generate_ops", command, root=out, **common,
                            what="collectives captured during the generate runs (t=1: setup only)")
            log(f"generate: {len(gen)} runs, {len(ops)} captured rows")
        except Exception:                                  # noqa: BLE001
            traceback.print_exc()
            status = 1
    import shutil
    shutil.rmtree(out / "work", ignore_errors=True)        # per-rank logs: not among the files that come back
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    log(f"done in {budget.total - budget.left():.0f} s; files: {json.dumps(files)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
