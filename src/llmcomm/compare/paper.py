"""The seed paper (arXiv 2507.14392) beside the book: its formulas in the book's quantities, and its reported
latencies beside the book's predictions.

Evidence levels are kept apart: the paper's numbers are a **secondary transcription**
(``data/external/paper-2507.14392/reported.json`` says how weak), the book's are **predictions** of the time model
with sourced presets; neither is a measurement of this project.
"""
from __future__ import annotations

import pandas as pd
import sympy as sp

from ..derive import volumes as v
from ..notation import G, L, S, V, b, h, p, t, w
from ..predict.hardware import Hardware
from ..predict.latency import predict_latency
from ..record import load_frame
from ..spec import Layout, Workload, load_model

__all__ = ["NOTATION_MAP", "reported", "formulas", "beside_reported", "FOLDER"]

#: where the transcription lives under data/
FOLDER = "external/paper-2507.14392"

#: the paper's symbols → the book's (each paper formula counts elements: multiply by w for bytes)
NOTATION_MAP = [("S_p (prompt tokens)", "S"), ("S_d (decode tokens)", "G"), ("v (vocabulary)", "V"),
                ("h, L, b", "h, L, b"), ("t, p", "t, p"),
                ("V (the paper's 'volume', elements)", "one of the book's traffic metrics ÷ w — which one differs "
                                                        "per formula (below)"),
                ("(implicit) bytes per element", "w")]


def reported() -> tuple[pd.DataFrame, dict]:
    """The paper's reported latencies and their provenance (a secondary transcription: weak evidence)."""
    return load_frame("reported", FOLDER)


def formulas() -> list[dict]:
    """Each of the paper's formulas (as transcribed) in the book's symbols, beside the book's quantity it equals —
    checked by sympy — and what kind of quantity that is (per rank, all links, per stage, per sender)."""
    P = {"TP": (2 * L + 1) * (S + G - 1) * h * b * 2 * (t - 1) / t + G * (V / t) * b,
         "PP": (p - 1) * 2 * (S + G - 1) * h * b,
         "hybrid all-reduce": (2 * L / p) * (S + G - 1) * h * b * 2 * (t - 1) / t,
         "hybrid all-gather": 2 * (p - 1) * (S + G - 1) * h * b * (t - 1) / t,
         "hybrid gather": G * (V / t) * b,
         "hybrid p2p": (p - 1) * 2 * (S + G - 1) * (h / t) * b}
    busiest_tp = v.regime(v.busiest_sent("vllm"), "TP")
    link_pp = v.regime(v.link_bytes("vllm"), "PP")
    stage_ar = v.even_split(v.regime(v.class_sent("vllm", "middle", op="all_reduce"), "hybrid"))
    ag_rank = v.regime(v.class_sent("vllm", "last", op="all_gather"), "hybrid") * (p - 1)
    gather_sender = v.regime(v.class_sent("vllm", "last", op="gather"), "hybrid")
    hop_lane = v.regime(v.link_bytes("vllm", op="send_recv"), "hybrid") / t
    book = {"TP": (busiest_tp, "bytes the busiest rank sends (a non-root rank: its all-reduces and its logits shard)"),
            "PP": (link_pp, "bytes over all links (every hop of every boundary) = the sizes summed"),
            "hybrid all-reduce": (stage_ar, "bytes one rank of a stage sends in its all-reduces (L/p layers; the "
                                            "embedding's all-reduce, on the first stage, apart)"),
            "hybrid all-gather": (ag_rank, "bytes one rank of a receiving stage sends in its all-gathers, times the "
                                           "p−1 receiving stages: one rank per stage, summed"),
            "hybrid gather": (gather_sender, "bytes one non-root rank of the last stage sends in the logits gather"),
            "hybrid p2p": (hop_lane, "bytes one TP rank's lane of hops carries over all boundaries: all hop links ÷ t")}
    out = []
    for name, paper in P.items():
        expr, what = book[name]
        out.append({"formula": name, "paper (elements)": paper, "book (bytes)": expr, "what it is": what,
                    "equal (× w)": sp.simplify(sp.expand(paper * w - expr)) == 0})
    return out


def beside_reported(hw: Hardware, gpus_per_node: int, engine: str = "vllm") -> pd.DataFrame:
    """Every reported row beside the time model's prediction of the same configuration (batch 1, S = 128,
    G = 128, bf16) on ``hw`` with ``gpus_per_node``: reported values as transcribed, predicted values, and the
    evidence level of each column."""
    df, _ = reported()
    rows = []
    for r in df.itertuples():
        model = load_model(r.model)
        pred = predict_latency(model, Layout(int(r.tp), int(r.pp)), Workload(1, 128, 128, "bf16"), hw,
                               gpus_per_node=gpus_per_node, engine=engine)
        rows.append({"model": r.model, "layout": r.layout, "GPUs": r.gpus, "nodes": r.nodes,
                     "TTFT ms reported": 1e3 * r.ttft_s, "TTFT ms predicted": 1e3 * pred["ttft_s"],
                     "TPOT ms reported": 1e3 * r.tpot_s, "TPOT ms predicted": 1e3 * pred["tpot_s"],
                     "E2E s reported": r.e2e_s, "E2E s predicted": pred["e2e_s"]})
    out = pd.DataFrame(rows)
    out.attrs["evidence"] = {"reported": "secondary transcription of the paper (weak)",
                             "predicted": f"time model on the {hw.name} preset, {gpus_per_node} GPUs per node "
                                          f"(published figures and labelled ASSUMPTIONs)"}
    return out.round(3)
