"""Tables the book shows: closed forms as LaTeX cells, bytes of real models and layouts, the notation.

Everything here is presentation of what :mod:`llmcomm.derive` and :mod:`llmcomm.predict` compute: LaTeX cells render
in the HTML book, the text/plain form stays exact for nbval.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import sympy as sp

from ..deployment import Deployment, pattern_of
from ..derive.evaluate import generation_calls, rows as predict_rows, traffic_totals
from ..derive.patterns import pattern as pattern_messages
from ..derive.phases import PHASES
from ..derive.volumes import branch, tidy
from ..derive.traffic import node_of_placement, summary
from ..notation import GROUPS, NOTATION
from ..spec import Layout, ModelSpec, SpecError, Workload, load_model, stage_layers

__all__ = ["latex", "pattern_frame", "model_bytes_frame", "layouts_frame", "notation_table",
           "layout_kind", "markdown", "run_times", "stage_split_frame", "models_frame", "relative_to_tp",
           "bytes_by_phase", "pattern_ratio", "latency_table", "latency_breakdown", "compute_calibration",
           "collective_fits", "sources_frame", "advice_rows", "tp_over_pp", "hop_traffic", "latency_parts",
           "decode_allreduce_facts", "host_bound_facts", "robustness_text", "latency_shares", "winner_shares", "share_text", "error_summary", "proofs_frame", "gpu_kernel_errors", "gpu_collective_errors", "GPU_GOALS", "in_run_calibration", "validation_runs",
           "time_breakdown"]


def latex(expr) -> str:
    """``$…$`` of a sympy expression (or condition)."""
    return f"${sp.latex(expr)}$"


def markdown(df: pd.DataFrame):
    """A frame as a Markdown table the book renders (cells with ``$…$`` become math)."""
    from IPython.display import Markdown

    return Markdown(df.to_markdown(index=False))


def pattern_frame(name: str = "deepspeed") -> pd.DataFrame:
    """One forward's messages of message pattern ``name`` as a table: op, group, calls, bytes per call, when (else
    none), why."""
    rows = []
    for msg in pattern_messages(name):
        calls, cond = branch(tidy(msg.calls))
        rows.append({"op": msg.op, "group": latex(msg.group), "calls per forward": latex(calls),
                     "bytes per call": latex(msg.bytes_per_call), "when": latex(cond) if cond is not None else "always",
                     "why": msg.why})
    return pd.DataFrame(rows)


def _traffic_cols(summary: dict, scale: float = 1e6) -> dict:
    """The traffic columns of a :func:`llmcomm.derive.traffic.summary`, in MB."""
    out = {"busiest MB": summary["sent_bytes_busiest_rank"] / scale, "links MB": summary["link_bytes"] / scale}
    if summary.get("inter_node_bytes") is not None:
        out["inter-node MB"] = summary["inter_node_bytes"] / scale
    return out


def model_bytes_frame(models: Iterable[ModelSpec], layout: Layout, workload: Workload,
                      patterns=("deepspeed", "vllm"), traffic: bool = False) -> pd.DataFrame:
    """Bytes per phase for real models (one row per model × message pattern, column ``pattern``: a name of
    :data:`llmcomm.derive.patterns.PATTERNS`): the nccl-tests sizes summed (MB), and with
    ``traffic`` what moves over the generation (:func:`llmcomm.derive.evaluate.traffic_totals`, ring all-reduce):
    the busiest rank's sent MB and all links' MB."""
    rows = []
    for model in models:
        for pattern in patterns:
            r = predict_rows(model, layout, workload, pattern)
            pre = sum(x["bytes"] for x in r if x["phase"] == "prefill")
            dec = sum(x["bytes"] for x in r if x["phase"] == "decode")
            rows.append({"model": model.name, "pattern": pattern, "prefill MB": pre / 1e6, "decode MB": dec / 1e6,
                         "total MB": (pre + dec) / 1e6, "calls": sum(x["calls"] for x in r)})
            if traffic:
                rows[-1].update(_traffic_cols(traffic_totals(model, layout, workload, pattern)))
    return pd.DataFrame(rows)


def layout_kind(t: int, p: int) -> str:
    """"TP", "PP", "hybrid" (or "single" for one rank)."""
    return "single" if t == p == 1 else "TP" if p == 1 else "PP" if t == 1 else "hybrid"


def layouts_frame(models: Iterable[ModelSpec], layouts: Iterable[Layout], workloads: Iterable[Workload],
                  patterns=("deepspeed",), gpus_per_node: int | None = None) -> pd.DataFrame:
    """Tidy bytes of every model × layout × workload × message pattern (column ``pattern``): one row per phase (prefill, decode, total) with the
    nccl-tests sizes summed (``bytes``) and the traffic (ring all-reduce): ``sent_bytes_busiest_rank`` (the rank
    that sends the most in that phase), ``link_bytes`` and, with ``gpus_per_node``, ``inter_node_bytes``. Layouts a
    model cannot take are skipped. Columns: model, pattern, layout ("t×p"), t, p, N, kind, b, S, G, dtype, phase,
    bytes, sent_bytes_busiest_rank, link_bytes[, inter_node_bytes]."""
    layouts, workloads = list(layouts), list(workloads)
    node_of = node_of_placement(gpus_per_node) if gpus_per_node is not None else None
    rows = []
    for model in models:
        for lay in layouts:
            try:
                lay.validate(model)
            except SpecError:
                continue
            for wl in workloads:
                for pattern in patterns:
                    calls = generation_calls(model, lay, wl, pattern)
                    base = {"model": model.name, "pattern": pattern, "layout": f"{lay.t}×{lay.p}", "t": lay.t,
                            "p": lay.p, "N": lay.ranks, "kind": layout_kind(lay.t, lay.p), "b": wl.b, "S": wl.S,
                            "G": wl.G, "dtype": wl.dtype}
                    for phase in (*PHASES, "total"):
                        tr = summary([c for c in calls if phase in ("total", c[0])], node_of)
                        row = dict(base, phase=phase, bytes=tr["bytes"],
                                   sent_bytes_busiest_rank=tr["sent_bytes_busiest_rank"], link_bytes=tr["link_bytes"])
                        if node_of is not None:
                            row["inter_node_bytes"] = tr["inter_node_bytes"]
                        rows.append(row)
    return pd.DataFrame(rows)


def notation_table() -> pd.DataFrame:
    """The project's notation (:data:`llmcomm.notation.NOTATION`) as the book shows it: one row per symbol, grouped."""
    rows = []
    for group in GROUPS:
        for x in NOTATION.values():
            if x.group == group:
                rows.append({"symbol": f"${x.latex}$", "meaning": x.meaning, "group": group,
                             "code": f"`{x.code}`" if x.code else "", "CLI": f"`{x.cli}`" if x.cli else "",
                             "JSON": f"`{x.json}`" if x.json else "", "HF config": f"`{x.hf}`" if x.hf else ""})
    return pd.DataFrame(rows)


def run_times(runs: pd.DataFrame) -> pd.DataFrame:
    """A sweep's measured times per configuration, in ms (``p`` only when some run has p > 1)."""
    keys = [c for c in ("model", "t", "p", "b", "S", "G") if not (c == "p" and (runs["p"] == 1).all())]
    out = runs[keys].copy()
    for metric in ("ttft", "tpot", "e2e"):
        out[f"{metric}_ms"] = 1e3 * runs[f"{metric}_s"]
    return out.round(2)


def stage_split_frame(cfgs) -> pd.DataFrame:
    """For each distinct (model, t, p) of a sweep: layers per stage (DeepSpeed's uniform split, the first L mod p
    stages one more) and the all-reduces each stage issues per forward (two per layer, plus the head's on the last
    stage; none without TP)."""
    rows = []
    for cfg in cfgs:
        parts = stage_layers(load_model(cfg.model).L, cfg.p)
        per_stage = [2 * layers for layers in parts[:-1]] + [2 * parts[-1] + 1] if cfg.t > 1 else "—"
        rows.append({"model": cfg.model, "L": sum(parts), "t": cfg.t, "p": cfg.p, "layers per stage": str(parts),
                     "all-reduces per stage and forward": str(per_stage)})
    return pd.DataFrame(rows).drop_duplicates(ignore_index=True)


def models_frame(models: Iterable[ModelSpec]) -> pd.DataFrame:
    """The shapes that decide communication: L, h, V and the KV heads (which cap AutoTP's t)."""
    return pd.DataFrame([{"model": spec.name, "L": spec.L, "h": spec.h, "V": spec.V, "KV heads": spec.kv_heads}
                         for spec in models])


def relative_to_tp(totals: pd.DataFrame) -> pd.DataFrame:
    """Per layout of a :func:`layouts_frame` selection (one workload, phase "total"): the sizes, the busiest rank's
    bytes, all links' bytes (and inter-node bytes when placed), in MB and as a ratio to the TP layout of the same
    model on the same N."""
    tp = totals[totals.kind == "TP"].set_index(["model", "N"])
    key = totals.set_index(["model", "N"]).index
    metrics = [("bytes", "sizes"), ("sent_bytes_busiest_rank", "busiest"), ("link_bytes", "links")]
    if "inter_node_bytes" in totals:
        metrics.append(("inter_node_bytes", "inter-node"))
    out = totals[["model", "N", "layout", "kind"]].copy()
    for col, name in metrics:
        out[f"{name} MB"] = (totals[col] / 1e6).round(1)
    for col, name in metrics:
        ref = key.map(tp[col]).astype(float)
        out[f"{name} / TP"] = (totals[col].astype(float) / ref).where(ref > 0).round(4)
    return out.reset_index(drop=True)


def bytes_by_phase(phases: pd.DataFrame) -> pd.DataFrame:
    """MB per phase (columns prefill, decode) per model, N and layout of a :func:`layouts_frame` selection."""
    piv = phases.assign(MB=(phases.bytes / 1e6).round(2)).pivot_table(index=["model", "N", "layout"], columns="phase",
                                                                      values="MB", sort=False)
    return piv[list(PHASES)]


def pattern_ratio(totals: pd.DataFrame, a: str = "vllm", b: str = "deepspeed") -> pd.DataFrame:
    """MB of two message patterns side by side per model, N and layout, and their ratio ``a / b``."""
    side = totals.pivot_table(index=["model", "N", "layout"], columns="pattern", values="bytes", sort=False) / 1e6
    side.columns = [f"{col} MB" for col in side.columns]
    side[f"{a} / {b}"] = side[f"{a} MB"] / side[f"{b} MB"]
    return side.round(3)


def _ms(series) -> pd.Series:
    return (1e3 * series).round(2)


def latency_table(val: pd.DataFrame) -> pd.DataFrame:
    """A validation frame (:func:`llmcomm.compare.validate.validate_latency`) as the book shows it: measured and
    predicted TTFT, TPOT, E2E in ms, with signed errors."""
    lay = "t=" + val.t.astype(str) + "×p=" + val.p.astype(str)
    sign = lambda x: "" if pd.isna(x) else f"{x:+.0%}"  # noqa: E731
    out = pd.DataFrame({"model": val.model, "layout": lay, "b": val.b, "S": val.S, "G": val.G,
                        "all-reduce": val.allreduce, "threads": val.threads})
    for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")):
        out[f"{name} meas ms"] = _ms(val[f"{metric}_s_measured"])
        if f"{metric}_s_iqr" in val:
            out[f"{name} IQR ms"] = _ms(val[f"{metric}_s_iqr"])
        out[f"{name} pred ms"] = _ms(val[f"{metric}_s_predicted"])
        out[f"err {name}"] = val[f"err_{metric}"].map(sign)
    return out


def latency_breakdown(val: pd.DataFrame) -> pd.DataFrame:
    """Per phase of one forward: measured time in communication calls (rank 0) and the rest, beside the predicted
    communication and compute (ms)."""
    return pd.DataFrame({
        "model": val.model, "t": val.t, "p": val.p, "b": val.b, "S": val.S,
        "prefill comm meas": _ms(val.prefill_comm_meas_s), "prefill comm pred": _ms(val.prefill_comm_pred_s),
        "prefill rest meas": _ms(val.ttft_s_measured - val.prefill_comm_meas_s),
        "prefill compute pred": _ms(val.prefill_compute_pred_s),
        "decode comm meas": _ms(val.decode_comm_meas_s), "decode comm pred": _ms(val.decode_comm_pred_s),
        "decode rest meas": _ms(val.tpot_s_measured - val.decode_comm_meas_s),
        "decode compute pred": _ms(val.decode_compute_pred_s)})


def time_breakdown(obj: dict, without: tuple[str, ...] = ()) -> pd.DataFrame:
    """``benchmarks/cpu_time_breakdown.py``'s result (``data/benchmarks/cpu_time_breakdown.json``) as the time chapter
    shows it: per layout, profiled rank (rank 0 and each pipeline stage's first rank) and phase, the profiled phase's
    wall time per forward (ms, profiler included) and the share of it each category of
    :mod:`llmcomm.measure.opprofile` took (%; ``host`` = outside every op), with the op that took most. ``without``
    leaves categories out and shares the rest of the time among the others (e.g. ``("communication",)``: how a
    rank's own work splits, whatever it waited for)."""
    rows = []
    for run in obj["runs"]:
        lay = f"t={run['layout']['t']}×p={run['layout']['p']}"
        for rk in run["ranks"]:
            for phase, ph in rk["phases"].items():
                top = ph["top_ops"][0] if ph["top_ops"] else {"name": "-", "self_s": 0.0}
                rows.append({"layout": lay, "rank": rk["rank"], "stage": rk["stage"], "phase": phase,
                             "ms per forward": round(1e3 * ph["wall_s"] / max(ph.get("forwards", 1), 1), 2),
                             **_shares(ph["seconds"], without),
                             "top op": f"{top['name']} ({100 * top['self_s'] / ph['wall_s']:.0f} %)"
                             if ph["wall_s"] else top["name"]})
    return pd.DataFrame(rows)


def _shares(seconds: dict, without: tuple[str, ...]) -> dict:
    kept = {c: x for c, x in seconds.items() if c not in without}
    total = sum(kept.values())
    return {f"{c} %": round(100 * x / total, 1) if total else 0.0 for c, x in kept.items()}


def compute_calibration(raw: dict) -> pd.DataFrame:
    """A CPU preset's kernel model and host times per thread count (``compute_by_threads``,
    :mod:`llmcomm.compare.cpu_calibration`) as a table: the GEMM's compute rate, its weight-streaming rates (blocked
    GEMM and one-token matrix-vector), the memory-bound ops' rate, the host time per decoder layer and per forward
    of each phase, and the GEMM fit's median |error|."""
    rows = []
    for threads, v in raw.get("compute_by_threads", {}).items():
        gemm, host = v["kernels"]["gemm"], v["host_us"]
        rows.append({"threads": threads, "GEMM GFLOP/s": gemm["flops_per_s"] / 1e9,
                     "GEMM weights GB/s (M ≥ 2)": gemm["bytes_per_s"] / 1e9,
                     "GEMV weights GB/s (M = 1)": gemm["gemv_bytes_per_s"] / 1e9,
                     "memory-bound ops GB/s": v["kernels"]["memops"]["rmsnorm"]["bytes_per_s"] / 1e9,
                     "host µs/layer prefill": host["prefill"]["layer"], "host µs/layer decode": host["decode"]["layer"],
                     "host µs/forward prefill": host["prefill"]["forward"],
                     "host µs/forward decode": host["decode"]["forward"],
                     "GEMM fit median |err|": v["fit"]["gemm_median_rel_err"], "GEMM points": v["fit"]["gemm_points"]})
    return pd.DataFrame(rows).round(3)


def collective_fits(fits: pd.DataFrame) -> pd.DataFrame:
    """α-β fits (:func:`llmcomm.predict.fit.fit_table`) per measured group size, as the book shows them (``path``:
    which of the shm all-reduce's two paths a row fits, empty for the other backends)."""
    per_n = fits[fits.group_size != "any"] if (fits.group_size != "any").any() else fits
    cols = ["backend", "op", "group_size", "path", "algorithm", "alpha_us", "busbw_GBps", "r2", "median_rel_err",
            "n_points"]
    return per_n[cols].round(4).reset_index(drop=True)


def sources_frame(hw) -> pd.DataFrame:
    """Where each number of a hardware preset comes from (its ``source`` labels), one row per field; the fitted
    ``kernels`` and ``nccl`` sections with their sources, and the fields they (or, on GPUs, the host profiles)
    replace marked as not used."""
    src = dict(hw.raw["source"])
    for section in ("kernels", "nccl"):
        if hw.raw.get(section):
            src[section] = hw.raw[section].get("source", "")
    if hw.raw.get("kernels") and "efficiency" in src:
        src["efficiency"] = "NOT USED (the fitted kernels replace it): " + src["efficiency"]
    if hw.raw.get("device") != "cpu" and "layer_overhead_us" in src:
        src["layer_overhead_us"] = "NOT USED on GPUs (the host profile's host time replaces it): " \
                                   + src["layer_overhead_us"]
    return pd.DataFrame(sorted(src.items()), columns=["field", "source"])


def advice_rows(by_gpus_per_node: dict) -> pd.DataFrame:
    """Ranked layouts of :func:`llmcomm.predict.advise.advise` for several node sizes {g: rows}, as one table: the
    latencies, what crosses nodes per forward (transfers on the critical path — stage hops and the token hand-back —
    and collectives on TP groups that span nodes) and over the generation (MB)."""
    out = []
    for g, ranked in by_gpus_per_node.items():
        for r in ranked:
            out.append({"GPUs per node": g, "layout": f"t={r['tp']}×p={r['pp']}", "rank": r["rank"],
                        "TTFT ms": round(1e3 * r["ttft_s"], 2), "TPOT ms": round(1e3 * r["tpot_s"], 3),
                        "E2E s": round(r["e2e_s"], 4),
                        "hops across nodes / forward": r["inter_node_hops_per_forward"],
                        "collectives across nodes / forward": r["inter_node_collectives_per_forward"],
                        "inter-node MB": round(r["inter_node_bytes"] / 1e6, 1)})
    return pd.DataFrame(out)


def tp_over_pp(models: Iterable[ModelSpec], gpus: Iterable[int], workload: Workload, pattern: str = "deepspeed",
               gpus_per_node: int | None = None) -> pd.DataFrame:
    """TP (N×1) against PP (1×N) on the same N GPUs, one row per model and N: the ratio of what the busiest rank
    sends, of what all links carry, (placed g per node) of what crosses nodes, and — labelled as such — of the
    nccl-tests sizes."""
    rows = []
    for model in models:
        for N in gpus:
            tp = traffic_totals(model, Layout(N, 1), workload, pattern, gpus_per_node=gpus_per_node)
            pp = traffic_totals(model, Layout(1, N), workload, pattern, gpus_per_node=gpus_per_node)
            row = {"model": model.name, "N": N,
                   "busiest rank: TP / PP": tp["sent_bytes_busiest_rank"] / pp["sent_bytes_busiest_rank"],
                   "all links: TP / PP": tp["link_bytes"] / pp["link_bytes"]}
            if gpus_per_node is not None and pp["inter_node_bytes"]:
                row["inter-node: TP / PP"] = tp["inter_node_bytes"] / pp["inter_node_bytes"]
            row["sizes (nccl-tests m): TP / PP"] = tp["bytes"] / pp["bytes"]
            rows.append(row)
    cols = ["model", "N", "busiest rank: TP / PP", "all links: TP / PP", "inter-node: TP / PP",
            "sizes (nccl-tests m): TP / PP"]
    df = pd.DataFrame(rows)
    return df[[c for c in cols if c in df]].round(2)


def hop_traffic(model: ModelSpec, layout: Layout, workload: Workload, gpus_per_node: int) -> pd.DataFrame:
    """The stage-to-stage traffic of a generation in the runner's two modes (partitioned, full): bytes over all links
    and across nodes of the hops (their sends and the all-gathers that rebuild them), the token hand-back apart."""
    rows = []
    for mode in ("partitioned", "full"):
        calls = [c for c in generation_calls(model, layout, workload, pattern_of(None, p2p=mode))
                 if c[1] == "all_gather" or (c[1] == "send_recv" and c[2][1] // layout.t == c[2][0] // layout.t + 1)]
        tr = summary(calls, node_of_placement(gpus_per_node))
        rows.append({"mode": mode, "all links": tr["link_bytes"], "across nodes": tr["inter_node_bytes"],
                     "inside nodes": tr["link_bytes"] - tr["inter_node_bytes"]})
    return pd.DataFrame(rows)


def latency_parts(model: ModelSpec, hw, layouts: Iterable[Layout], xs: Iterable[int], x: str = "S",
                  b: int = 1, S: int = 1024, G: int = 128, dtype: str = "bf16", gpus_per_node: int | None = None,
                  framework: str = "deepspeed") -> pd.DataFrame:
    """Predicted TTFT and TPOT split into compute and communication (ms) for each layout as ``x`` ("S" or "b")
    varies: columns layout, ``x``, metric, compute_ms, comm_ms (for :func:`llmcomm.report.plots.latency_stack`)."""
    from ..predict.latency import predict_latency_grid
    import numpy as np

    rows = []
    xs = list(xs)
    w = Workload(b, S, G, dtype).w
    for lay in layouts:
        bb = np.array(xs) if x == "b" else b
        SS = np.array(xs) if x == "S" else S
        lat = predict_latency_grid(model, hw, lay.t, lay.p, bb, SS, G, w, gpus_per_node=gpus_per_node,
                                   deployment=Deployment(framework))
        for i, xv in enumerate(xs):
            for metric, phase in (("TTFT", "prefill"), ("TPOT", "decode")):
                rows.append({"layout": f"{lay.t}×{lay.p}", x: xv, "metric": metric,
                             "compute_ms": 1e3 * float(np.broadcast_to(lat[f"{phase}_compute_s"], (len(xs),))[i]),
                             "comm_ms": 1e3 * float(np.broadcast_to(lat[f"{phase}_comm_s"], (len(xs),))[i])})
    return pd.DataFrame(rows)


def decode_allreduce_facts(model: ModelSpec, hw, t: int, workload: Workload, gpus_per_node: int | None = None,
                           framework: str = "deepspeed") -> dict:
    """What the time model charges a TP decode step's all-reduces on ``t`` GPUs of one node under ``framework``'s
    pattern and default host profile: the size of one call, its predicted seconds, the calls per step, and their
    share of the predicted TPOT; plus the predicted prefill compute and communication."""
    from ..predict.latency import predict_latency

    res = predict_latency(model, Layout(t, 1), workload, hw, Deployment(framework), gpus_per_node=gpus_per_node)
    dec, pre = res["breakdown"]["decode"], res["breakdown"]["prefill"]
    layer_ar = max((msg for msg in dec["messages"] if msg["op"] == "all_reduce"), key=lambda msg: msg["calls"])
    per_call = layer_ar["time_s"] / layer_ar["calls"]
    return {"bytes_per_call": layer_ar["bytes_per_call"], "seconds_per_call": per_call,
            "calls_per_step": sum(msg["calls"] for msg in dec["messages"] if msg["op"] == "all_reduce"),
            "comm_share_of_tpot": dec["comm_s"] / res["tpot_s"], "tpot_s": res["tpot_s"],
            "prefill_compute_s": pre["compute_s"], "prefill_comm_s": pre["comm_s"]}


def host_bound_facts(model: ModelSpec, hw, t: int, workload: Workload, framework: str = "deepspeed") -> dict:
    """One decoder layer of a decode step (the mean step) on one of ``t`` TP ranks: the seconds of its kernels on
    the device (:func:`llmcomm.predict.compute.layer_op_times`) beside the host seconds the host profile charges
    per layer; ``host_bound`` when the host is the slower (on a GPU the layer then costs the host's time)."""
    from ..predict.compute import layer_op_times, phase_context
    from ..predict.profiles import profile_for

    prof = profile_for(Deployment(framework), hw)
    s, ell, c = phase_context("decode", workload.S, workload.G)
    kernels = float(sum(layer_op_times(model, hw, t, workload.b, s, ell, c, workload.w).values()))
    host = prof.layer_overhead_s("decode", hw)
    return {"profile": prof.name, "kernels_s": kernels, "host_s": host, "host_bound": host > kernels}


def _layouts(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _s_values(values) -> str:
    return "S = " + ", ".join(f"{int(x):,}" for x in sorted(values))


def _pct_range(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:+.1%}" if f"{lo:+.1%}" == f"{hi:+.1%}" else f"{lo:+.1%} to {hi:+.1%}"


def robustness_text(frame: pd.DataFrame, labels: dict | None = None) -> str:
    """Prose from :func:`llmcomm.predict.advise.robustness_frame`: how many winners hold under all three assumptions
    (no overlap of communication with host time, full overlap, the model's error ``frame.attrs["rel_err"]``), which,
    and for every tie between which layouts and why; prompt lengths with the same outcome share one sentence (their
    margins as a range). ``labels``: framework → how to name it (default the framework's name)."""
    labels = labels or {}
    e = frame.attrs.get("rel_err", float("nan"))
    groups: dict[tuple, list] = {}
    cols = {c: i for i, c in enumerate(frame.columns)}
    for row in frame.itertuples(index=False, name=None):
        r = {c: row[i] for c, i in cols.items()}
        why = []
        if r["winner, full overlap"] != r["winner, no overlap"]:
            full = r["winner, full overlap"].split(" = ")
            why.append(f"with full overlap {_layouts(full)} cost the same" if len(full) > 1
                       else f"with full overlap {full[0]} wins")
        if r["within error"] != "—":
            why.append(f"{r['within error']} within the {e:.1%} error band")
        key = (labels.get(r["framework"], r["framework"]), r["model"], r["gpus"], r["gpus_per_node"], r["b"],
               r["verdict"], tuple(r["tied"]), "; ".join(why))
        groups.setdefault(key, []).append(r)
    where = {k: f"{k[0]}, {k[1]} on {k[2]} GPUs ({k[3]} per node), b = {k[4]}, S = "
                + ", ".join(f"{int(x['S']):,}" for x in rs) for k, rs in groups.items()}
    holds = {k: v for k, v in groups.items() if k[5] == "holds"}
    ties = {k: v for k, v in groups.items() if k[5] != "holds"}
    n_hold = sum(len(v) for v in holds.values())
    head = (f"**{n_hold} of {len(frame)} winners hold** under all three assumptions — no overlap of communication "
            f"with host time, full overlap, and every prediction off by up to e = {e:.1%}")
    head += (": " + "; ".join(f"{where[k]}: {k[6][0]} (runner-up "
                                f"{_pct_range([x['margin, no overlap'] for x in v])}, "
                                f"{_pct_range([x['margin, full overlap'] for x in v])} with full overlap)"
                                for k, v in holds.items()) + "." if holds else ".")
    if not ties:
        return head
    lines = [f"* {where[k]}: **TIE** between {_layouts(k[6])} — {k[7]} (runner-up "
             f"{_pct_range([x['margin, no overlap'] for x in v])} with no overlap)." for k, v in ties.items()]
    return head + f"\n\nThe other {len(frame) - n_hold} are **ties**:\n" + "\n".join(lines)


def latency_shares(hw, messages) -> pd.DataFrame:
    """The time model's price of each collective of ``messages`` (``{label: (op, n, m)}``, intra-node, without the
    eager launch floor) split at its size m into a latency part and a bandwidth part: the bandwidth part is m times
    the model's marginal cost per byte there (τ is piecewise linear in m: the algorithm and protocol it picks at m),
    the latency part the rest. ``half_size``: the size where the two parts of that branch are equal (Hockney's
    m½ for an n-way collective, not a link's α/β); ``size / half_size`` how far above (> 1) or below it m lies."""
    rows = []
    for label, (op, n, m) in messages.items():
        tau = float(hw.collective_time(op, n, m, "intra", floor=False))
        dm = max(1.0, 1e-6 * m)
        slope = (float(hw.collective_time(op, n, m + dm, "intra", floor=False)) - tau) / dm
        lat = tau - slope * m
        half = lat / slope if slope > 0 else float("inf")
        rows.append({"message": label, "op": op, "n": n, "size": m, "seconds": tau, "latency_s": lat,
                     "bandwidth_s": slope * m, "latency_share": lat / tau, "half_size": half, "size / half_size": m / half})
    return pd.DataFrame(rows)


def winner_shares(maps: pd.DataFrame) -> pd.DataFrame:
    """Per framework and model of advice maps (:func:`llmcomm.predict.advise.advice_map` frames, concatenated): the
    share of (b, S) cells each winning layout takes (columns ``t=…×p=…``, widest TP first)."""
    out = pd.crosstab([maps.framework, maps.model], maps.best, normalize="index")
    order = sorted(out.columns, key=lambda c: (-int(c.split("×")[0][2:]), c))
    return out[order]


def share_text(shares: pd.DataFrame, framework: str, model: str) -> str:
    """One row of :func:`winner_shares` as text: ``t=8×p=1 56%, t=4×p=2 44%`` (layouts that win no cell left out)."""
    row = shares.loc[(framework, model)]
    return ", ".join(f"{lay} {v:.0%}" for lay, v in row[row > 0].items())


def error_summary(val: pd.DataFrame, by=("model",)) -> pd.DataFrame:
    """Median signed and absolute errors of a validation frame (:func:`llmcomm.compare.validate.validate_latency`)
    per group: where the model misses, and in which direction."""
    rows = []
    for key, grp in val.groupby(list(by)):
        errs = pd.concat([grp["err_ttft"], grp["err_tpot"].dropna(), grp["err_e2e"]])
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), runs=len(grp),
                         **{"median error": errs.median(), "median |error|": errs.abs().median(),
                            "share too fast (predicted < measured)": (errs < 0).mean()}))
    return pd.DataFrame(rows).round(3)


def proofs_frame() -> pd.DataFrame:
    """Every stored proof (``data/proofs/``, written by ``tools/proofs/run_all.py``): its claims, whether all were
    proven, and when and at which commit it ran."""
    from ..record import load_json, result_names

    rows = []
    for name in result_names("proofs"):
        res = load_json(name, "proofs")
        prov = res["provenance"]
        for claim in res["claims"]:
            rows.append({"proof": res["proof"], "claim": claim, "ran": prov["date"][:10],
                         "commit": prov.get("git"), "versions": f"deepspeed {prov['versions'].get('deepspeed')}, "
                                                                f"torch {prov['versions'].get('torch')}"})
    return pd.DataFrame(rows)


#: the issue's goals for the out-of-sample errors of the public-GPU checks
GPU_GOALS = {"gemm": (0.05, 0.15), "collective": (0.10, None)}


def gpu_kernel_errors(summary: pd.DataFrame, validation: str = "lomo") -> pd.DataFrame:
    """Per (GPU, op): rows, median and 90th-percentile |error| of ``validation`` (percent), with the goal and
    whether it is met (GEMMs: median ≤ 5 %, p90 ≤ 15 %; memory-bound ops: no goal)."""
    d = summary[summary.validation == validation].copy()
    med, p90 = GPU_GOALS["gemm"]
    d["goal"] = np.where(d.part == "gemm", f"≤ {med:.0%} / ≤ {p90:.0%}", "—")
    d["met"] = np.where(d.part == "gemm", np.where((d.median_abs_err <= med) & (d.p90_abs_err <= p90), "yes", "no"),
                        "—")
    out = d.assign(**{"median |err| %": (100 * d.median_abs_err).round(2), "p90 |err| %": (100 * d.p90_abs_err).round(1)})
    return out[["part", "gpu", "op", "rows", "median |err| %", "p90 |err| %", "goal", "met"]].reset_index(drop=True)


def gpu_collective_errors(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (source, system, NCCL version, op, n, GPUs per node): median |error| (percent) of each validation the data
    allow — leave one size decade out (LOSDO, every table), leave one group size out (LOGO, Vidur's NVSwitch
    all-reduces), in-sample for reference — and whether the 10 % goal is met out of sample (LOSDO)."""
    keys = [k for k in ("source", "system", "nccl_version", "collective", "num_workers", "devices_per_node")
            if k in summary]
    wide = summary.pivot_table(index=keys, columns="validation", values="median_abs_err").reset_index()
    for v in ("losdo", "logo", "in_sample"):
        if v not in wide:
            wide[v] = np.nan
    goal = GPU_GOALS["collective"][0]
    wide["met (LOSDO ≤ 10 %)"] = np.where(wide.losdo.notna(), np.where(wide.losdo <= goal, "yes", "no"), "no LOSDO")
    for v in ("losdo", "logo", "in_sample"):
        wide[v] = (100 * wide[v]).round(1)
    cols = keys + ["losdo", "logo", "in_sample", "met (LOSDO ≤ 10 %)"]
    return wide[cols].rename(columns={"num_workers": "n", "devices_per_node": "per node", "nccl_version": "NCCL",
                                      "losdo": "LOSDO %", "logo": "LOGO %", "in_sample": "in-sample %"})


def in_run_calibration(raw: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cpu-local preset's in-run calibration (``in_run``, :mod:`llmcomm.compare.inrun`) as two tables: compute
    per layout (the factors on the kernel and host times, the fit's error) and communication per (layout, op, n)
    (the calls in the runs — median and mean, whose gap is the tail of waiting for a peer — beside the
    microbenchmark fit, and the latency per call the model takes from them)."""
    comp, calls = [], []
    for key, entry in (raw.get("in_run") or {}).items():
        if key == "provenance":
            continue
        fit = entry["compute"]
        comp.append({"layout": key, "threads per rank": entry.get("threads"), "× kernel times": fit["kernel_factor"],
                     "× host times": fit["host_factor"], "fit median |err|": fit["median_rel_err"],
                     "points": fit["points"]})
        for r in entry.get("calls", []):
            calls.append({"layout": key, "op": r["op"], "n": r["n"], "calls": r["calls"],
                          "in run µs (median)": r["median_in_run_us"], "in run µs (mean)": r["mean_in_run_us"],
                          "microbenchmark fit µs (median)": r["median_fit_us"],
                          "latency per call α µs (model)": r["alpha_us"]})
    return pd.DataFrame(comp).round(3), pd.DataFrame(calls).round(2)


def validation_runs(runs: dict, spread: dict | None = None) -> pd.DataFrame:
    """One row per rerun of the CPU validation (``{k: (frame, json)}`` from ``latency_validation_run<k>``): median
    |error| per metric and over all, how far its measurements lie from the other reruns' (``spread``, from
    :func:`llmcomm.compare.validate.rerun_spread`, when given), the load average when it started, its date and
    commit."""
    rows = []
    for run, (df, meta) in sorted(runs.items()):
        summ, prov = meta["summary"], meta["provenance"]
        rows.append({"run": run, "median |err| all": summ["median_abs_err"], "TTFT": summ["median_abs_err_ttft"],
                     "TPOT": summ["median_abs_err_tpot"], "E2E": summ["median_abs_err_e2e"],
                     **({"measured vs the other reruns (median |dev|)": spread[run]} if spread else {}),
                     "points × reps": f"{len(df)} × {prov.get('reps')}",
                     "load avg (1, 5, 15 min)": prov.get("load_avg_before"), "date": prov.get("date"),
                     "git": prov.get("git")})
    return pd.DataFrame(rows).round(3)


def handoff_frame(models: Iterable[ModelSpec], sides: Iterable[tuple], workload: Workload,
                  block: int = 16) -> pd.DataFrame:
    """The KV hand-off of each model × (prefill layout, decode layout) (:mod:`llmcomm.derive.disagg`): KV bytes per
    token, the whole hand-off, its messages and their sizes, the busiest prefill rank's share, and the pieces of a
    paged cache of ``block`` tokens (heads-major blocks; token-major ones in the last column). Layouts a model cannot
    take (t not dividing its KV heads) are left out."""
    from ..derive.disagg import handoff_summary, pieces
    from ..spec import Disaggregation, SpecError

    out = []
    for model in models:
        for prefill, decode in sides:
            dis = Disaggregation(prefill, decode, block=block)
            try:
                hs = handoff_summary(model, dis, workload)
            except SpecError:
                continue
            out.append({"model": model.name, "prefill t×p": f"{prefill.t}×{prefill.p}",
                        "decode t×p": f"{decode.t}×{decode.p}",
                        "KV B/token": hs["kv_bytes"] // (workload.b * workload.S),
                        "KV MiB": hs["kv_bytes"] / 2**20, "messages": hs["messages"],
                        "message sizes (KiB × count)": ", ".join(f"{m / 1024:g} × {c}"
                                                                for m, c in hs["message_sizes"].items()),
                        "busiest sender MiB": hs["sent_bytes_busiest"] / 2**20,
                        f"pieces (B={block}, HND)": hs["pieces"],
                        f"pieces (B={block}, NHD)": pieces(model, dis, workload, block_layout="NHD")})
    return pd.DataFrame(out)


def rank_split_frame(model: ModelSpec, dis, workload: Workload) -> pd.DataFrame:
    """Who sends what in a hand-off (:func:`llmcomm.derive.disagg.rank_split`), one row per (sender, receiver):
    global ranks, each side's (stage, TP rank), the layers and KV heads, messages and bytes."""
    from ..derive.disagg import rank_split

    rows = []
    for r in rank_split(model, dis, workload):
        rows.append({"kind": r["kind"], "from rank": r["src"], "prefill (stage, TP)": tuple(r["side_src"]),
                     "to rank": r["dst"], "decode (stage, TP)": tuple(r["side_dst"]),
                     "layers": f"{r['layers'][0]}–{r['layers'][1]}" if r["kind"] == "kv" else "",
                     "KV heads": ", ".join(f"{lo}–{hi - 1}" for lo, hi in r["heads"]),
                     "messages": r["messages"], "bytes": r["bytes"]})
    return pd.DataFrame(rows)
