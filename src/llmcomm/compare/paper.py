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
from ..deployment import Deployment
from ..record import load_frame
from ..spec import Layout, Workload, load_model

__all__ = ["NOTATION_MAP", "reported", "formulas", "beside_reported", "explain_misses", "e2e_order", "FOLDER"]

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


def beside_reported(hw: Hardware, gpus_per_node: int, framework: str = "vllm") -> pd.DataFrame:
    """Every reported row beside the time model's prediction of the same configuration (batch 1, S = 128,
    G = 128, bf16) on ``hw`` with ``gpus_per_node`` (``framework``'s pattern and host profile): reported values as
    transcribed, predicted values, and the
    evidence level of each column."""
    df, _ = reported()
    rows = []
    for r in df.itertuples():
        model = load_model(r.model)
        pred = predict_latency(model, Layout(int(r.tp), int(r.pp)), Workload(1, 128, 128, "bf16"), hw,
                               Deployment(framework), gpus_per_node=gpus_per_node)
        weights = (model.params * 2) / int(r.tp)               # bf16 weights one TP rank reads per token
        rows.append({"model": r.model, "layout": r.layout, "GPUs": r.gpus, "nodes": r.nodes,
                     "TTFT ms reported": 1e3 * r.ttft_s, "TTFT ms predicted": 1e3 * pred["ttft_s"],
                     "TPOT ms reported": 1e3 * r.tpot_s, "TPOT ms predicted": 1e3 * pred["tpot_s"],
                     "TPOT ms floor": 1e3 * weights / hw.mem_bw,
                     "TPOT comm ms predicted": 1e3 * pred["breakdown"]["decode"]["comm_s"],
                     "E2E s reported": r.e2e_s, "E2E s predicted": pred["e2e_s"]})
    out = pd.DataFrame(rows)
    out.attrs["hardware"] = {"name": hw.name, "mem_bw_GBps": hw.mem_bw / 1e9}
    out.attrs["evidence"] = {"reported": "secondary transcription of the paper (weak)",
                             "predicted": f"time model on the {hw.name} preset, {gpus_per_node} GPUs per node "
                                          f"(published figures and labelled ASSUMPTIONs)"}
    return out.round(3)


def explain_misses(side: pd.DataFrame) -> str:
    """Prose generated from :func:`beside_reported`'s frame: how far each metric is from the report, and what the
    reported numbers contain that the model leaves out (start-up and scheduling in TTFT, the HBM floor under TPOT)."""
    hw = side.attrs.get("hardware", {})
    ttft = side.dropna(subset=["TTFT ms reported"])
    r_ttft = ttft["TTFT ms reported"] / ttft["TTFT ms predicted"]
    tpot = side.dropna(subset=["TPOT ms reported"])
    below = tpot[tpot["TPOT ms reported"] < tpot["TPOT ms floor"]]
    one_node = tpot[tpot.nodes == 1]
    two = tpot[tpot.nodes > 1]
    parts = [f"**TTFT.** The reported times are {r_ttft.min():.0f}–{r_ttft.max():.0f}× the predicted ones. A "
             f"128-token prefill of these models costs milliseconds of kernels and collectives on H100s; hundreds of "
             f"milliseconds contain what happens before the first token that neither counts — vLLM V0's scheduling "
             f"and input preparation of the first step, and for pipelines its pipeline-parallel path — so the model "
             f"is not bent toward them."]
    if not one_node.empty:
        rt = one_node["TPOT ms reported"] / one_node["TPOT ms predicted"]
        parts.append(f"**TPOT on one node** ({', '.join(one_node.layout)}): reported/predicted "
                     + ", ".join(f"{x:.2f}" for x in rt) + ".")
        over = one_node[rt < 1]
        if not over.empty:
            comp = over["TPOT ms predicted"] - over["TPOT comm ms predicted"]
            parts.append(f"Here the model is the slower one: its decode compute alone is {comp.min():.2f}–"
                         f"{comp.max():.2f} ms per step ({', '.join(over.layout)}). It counts the HF decoder layer's "
                         "ops one by one (two norms, rotary, SiLU·mul, two residual adds beside the four GEMMs and "
                         "attention), each with the kernel floor fitted to kernels timed one at a time; vLLM fuses "
                         "several of them (residual add with the norm, SiLU with the mul) and replays the step as a "
                         "CUDA graph, and the model credits neither — a known gap, left visible rather than tuned.")
    if not below.empty:
        parts.append("Reported TPOTs **below the physical floor** — every bf16 weight of a TP rank read once per token "
                     f"at the preset's {hw.get('mem_bw_GBps', float('nan')):,.0f} GB/s — in "
                     + ", ".join(f"{r.model} {r.layout} ({r['TPOT ms reported']:.2f} ms < {r['TPOT ms floor']:.2f} ms)"
                                 for _, r in below.iterrows())
                     + ": either the transcription is off or the GPUs' HBM is faster than this preset's (at "
                       "H100 SXM's 3.35 TB/s HBM3 the floors would be "
                     + ", ".join(f"{r['TPOT ms floor'] * hw.get('mem_bw_GBps', 3350) / 3350:.2f} ms"
                                 for _, r in below.iterrows()) + ").")
    if not two.empty:
        parts.append("**Across two nodes** the reported TPOTs ("
                     + ", ".join(f"{r.model} {r.layout}: {r['TPOT ms reported']:.1f} ms" for _, r in two.iterrows())
                     + ") are far above the predictions ("
                     + ", ".join(f"{r['TPOT ms predicted']:.2f} ms, of which {r['TPOT comm ms predicted']:.2f} ms "
                                 f"communication" for _, r in two.iterrows())
                     + "): the model charges each cross-node all-reduce its predicted NCCL time over NDR, which "
                       "no public measurement checks (previous section); what else a V0 decode step pays across "
                       "nodes (its per-step broadcasts from the driver, Ray or multiprocessing hand-offs) is not "
                       "modelled.")
    return "\n\n".join(parts)


def e2e_order(side: pd.DataFrame, model: str = "llama-3.2-3b") -> dict:
    """Layouts of ``model`` on one node ordered by E2E, fastest first, in the reported and in the predicted numbers
    (the paper's qualitative claim: TP answers fastest inside a node)."""
    one = side[(side.model == model) & (side.nodes == 1)].dropna(subset=["E2E s reported"])
    return {col: list(one.sort_values(f"E2E s {col}").layout) for col in ("reported", "predicted")}
