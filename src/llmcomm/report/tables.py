"""Tables the book shows: closed forms as LaTeX cells, bytes of real models and layouts, the notation.

Everything here is presentation of what :mod:`llmcomm.derive` and :mod:`llmcomm.predict` compute: LaTeX cells render
in the HTML book, the text/plain form stays exact for nbval.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd
import sympy as sp

from ..derive.evaluate import rows as predict_rows
from ..derive.patterns import pattern
from ..derive.phases import PHASES
from ..derive.volumes import branch, tidy
from ..derive.conventions import bus_factor
from ..notation import GROUPS, NOTATION
from ..spec import Layout, ModelSpec, SpecError, Workload, load_model, stage_layers

__all__ = ["latex", "pattern_frame", "model_bytes_frame", "layouts_frame", "wire_bytes", "notation_table",
           "layout_kind", "markdown", "run_times", "stage_split_frame", "models_frame", "relative_to_tp",
           "bytes_by_phase", "engine_ratio", "latency_table", "latency_breakdown", "compute_calibration",
           "collective_fits", "sources_frame", "advice_rows"]


def latex(expr) -> str:
    """``$…$`` of a sympy expression (or condition)."""
    return f"${sp.latex(expr)}$"


def markdown(df: pd.DataFrame):
    """A frame as a Markdown table the book renders (cells with ``$…$`` become math)."""
    from IPython.display import Markdown

    return Markdown(df.to_markdown(index=False))


def pattern_frame(engine: str = "deepspeed") -> pd.DataFrame:
    """One forward's messages as a table: op, group, calls, bytes per call, when (else none), why."""
    rows = []
    for msg in pattern(engine):
        calls, cond = branch(tidy(msg.calls))
        rows.append({"op": msg.op, "group": latex(msg.group), "calls per forward": latex(calls),
                     "bytes per call": latex(msg.bytes_per_call), "when": latex(cond) if cond is not None else "always",
                     "why": msg.why})
    return pd.DataFrame(rows)


def model_bytes_frame(models: Iterable[ModelSpec], layout: Layout, workload: Workload,
                      engines=("deepspeed", "vllm"), wire: bool = False) -> pd.DataFrame:
    """Bytes per phase for real models (one row per model × engine): the numbers the book quotes; ``wire`` adds
    the wire MB (:func:`wire_bytes`)."""
    rows = []
    for model in models:
        for engine in engines:
            r = predict_rows(model, layout, workload, engine)
            pre = sum(x["bytes"] for x in r if x["phase"] == "prefill")
            dec = sum(x["bytes"] for x in r if x["phase"] == "decode")
            rows.append({"model": model.name, "engine": engine, "prefill MB": pre / 1e6, "decode MB": dec / 1e6,
                         "total MB": (pre + dec) / 1e6, "calls": sum(x["calls"] for x in r)})
            if wire:
                rows[-1]["wire MB"] = wire_bytes(r) / 1e6
    return pd.DataFrame(rows)


def wire_bytes(rows: Iterable[dict]) -> float:
    """Bytes one rank of each group puts on its links: nccl-tests size × bus factor f(n), summed over rows."""
    return float(sum(r["bytes"] * bus_factor(r["op"], r["group_size"]) for r in rows if r["op"] != "barrier"))


def layout_kind(t: int, p: int) -> str:
    """"TP", "PP", "hybrid" (or "single" for one rank)."""
    return "single" if t == p == 1 else "TP" if p == 1 else "PP" if t == 1 else "hybrid"


def layouts_frame(models: Iterable[ModelSpec], layouts: Iterable[Layout], workloads: Iterable[Workload],
                  engines=("deepspeed",)) -> pd.DataFrame:
    """Tidy bytes of every model × layout × workload × engine: one row per phase (prefill, decode, total) with the
    nccl-tests bytes and the wire bytes (:func:`wire_bytes`). Layouts a model cannot take are skipped. Columns:
    model, engine, layout ("t×p"), t, p, N, kind, b, S, G, dtype, phase, bytes, wire_bytes."""
    layouts, workloads = list(layouts), list(workloads)
    rows = []
    for model in models:
        for lay in layouts:
            try:
                lay.validate(model)
            except SpecError:
                continue
            for wl in workloads:
                for engine in engines:
                    r = predict_rows(model, lay, wl, engine)
                    base = {"model": model.name, "engine": engine, "layout": f"{lay.t}×{lay.p}", "t": lay.t,
                            "p": lay.p, "N": lay.ranks, "kind": layout_kind(lay.t, lay.p), "b": wl.b, "S": wl.S,
                            "G": wl.G, "dtype": wl.dtype}
                    for phase in (*PHASES, "total"):
                        sel = [x for x in r if phase in ("total", x["phase"])]
                        rows.append(dict(base, phase=phase, bytes=sum(x["bytes"] for x in sel),
                                         wire_bytes=wire_bytes(sel)))
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
    for c in cfgs:
        parts = stage_layers(load_model(c.model).L, c.p)
        per_stage = [2 * k for k in parts[:-1]] + [2 * parts[-1] + 1] if c.t > 1 else "—"
        rows.append({"model": c.model, "L": sum(parts), "t": c.t, "p": c.p, "layers per stage": str(parts),
                     "all-reduces per stage and forward": str(per_stage)})
    return pd.DataFrame(rows).drop_duplicates(ignore_index=True)


def models_frame(models: Iterable[ModelSpec]) -> pd.DataFrame:
    """The shapes that decide communication: L, h, V and the KV heads (which cap AutoTP's t)."""
    return pd.DataFrame([{"model": m.name, "L": m.L, "h": m.h, "V": m.V, "KV heads": m.kv_heads} for m in models])


def relative_to_tp(totals: pd.DataFrame) -> pd.DataFrame:
    """Per layout of a :func:`layouts_frame` selection (one workload, phase "total"): MB, wire MB, and both as a
    ratio to the TP layout of the same model on the same N."""
    tp = totals[totals.kind == "TP"].set_index(["model", "N"])
    key = totals.set_index(["model", "N"]).index
    out = totals.assign(**{"MB": (totals.bytes / 1e6).round(1), "wire MB": (totals.wire_bytes / 1e6).round(1),
                           "bytes / TP": (totals.bytes / key.map(tp.bytes)).round(4),
                           "wire / TP": (totals.wire_bytes / key.map(tp.wire_bytes)).round(4)})
    return out[["model", "N", "layout", "kind", "MB", "wire MB", "bytes / TP", "wire / TP"]].reset_index(drop=True)


def bytes_by_phase(phases: pd.DataFrame) -> pd.DataFrame:
    """MB per phase (columns prefill, decode) per model, N and layout of a :func:`layouts_frame` selection."""
    piv = phases.assign(MB=(phases.bytes / 1e6).round(2)).pivot_table(index=["model", "N", "layout"], columns="phase",
                                                                      values="MB", sort=False)
    return piv[list(PHASES)]


def engine_ratio(totals: pd.DataFrame, a: str = "vllm", b: str = "deepspeed") -> pd.DataFrame:
    """MB of two engines side by side per model, N and layout, and their ratio ``a / b``."""
    side = totals.pivot_table(index=["model", "N", "layout"], columns="engine", values="bytes", sort=False) / 1e6
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


def compute_calibration(raw: dict) -> pd.DataFrame:
    """A CPU preset's compute calibration per thread count (``compute_by_threads``) as a table."""
    return pd.DataFrame([{"threads": k, "peak fp32 GFLOP/s": 1e3 * v["peak_tflops"]["fp32"],
                          "mem bw GB/s": v["mem_bw_GBps"], "e_f": v["efficiency"]["flops"],
                          "layer overhead o (µs)": v["layer_overhead_us"],
                          "layer prefill (ms)": 1e3 * v["calibration"]["layer_prefill_s"],
                          "layer decode (ms)": 1e3 * v["calibration"]["layer_decode_s"]}
                         for k, v in raw.get("compute_by_threads", {}).items()]).round(3)


def collective_fits(fits: pd.DataFrame) -> pd.DataFrame:
    """α-β fits (:func:`llmcomm.predict.fit.fit_table`) per measured group size, as the book shows them."""
    per_n = fits[fits.group_size != "any"] if (fits.group_size != "any").any() else fits
    cols = ["backend", "op", "group_size", "algorithm", "alpha_us", "busbw_GBps", "r2", "median_rel_err", "n_points"]
    return per_n[cols].round(4).reset_index(drop=True)


def sources_frame(hw) -> pd.DataFrame:
    """Where each number of a hardware preset comes from (its ``source`` labels), one row per field."""
    return pd.DataFrame(sorted(hw.raw["source"].items()), columns=["field", "source"])


def advice_rows(by_gpus_per_node: dict) -> pd.DataFrame:
    """Ranked layouts of :func:`llmcomm.predict.advise.advise` for several node sizes {g: rows}, as one table."""
    out = []
    for g, ranked in by_gpus_per_node.items():
        for r in ranked:
            out.append({"GPUs per node": g, "layout": f"t={r['tp']}×p={r['pp']}", "rank": r["rank"],
                        "TTFT ms": round(1e3 * r["ttft_s"], 2), "TPOT ms": round(1e3 * r["tpot_s"], 3),
                        "E2E s": round(r["e2e_s"], 4), "TP groups spanning nodes": r["tp_inter_fraction"],
                        "stage sends crossing nodes": round(r["pp_inter_fraction"], 3)})
    return pd.DataFrame(out)
