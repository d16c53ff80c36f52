"""Disaggregated prefill and decode, measured beside the derivation: the chapter's (and the tests') configurations,
one launch each (:func:`llmcomm.measure.disaggregate.measure_disaggregated`), and three comparisons —

* :func:`rows_frame`: every row of the run (prefill, kv_transfer, decode) against
  :func:`llmcomm.derive.disagg.disaggregated_calls`, counted as the run was (its all-reduce algorithm, all ranks on
  one host), by :func:`llmcomm.compare.sweeps.compare_rows`;
* :func:`pairs_frame`: the hand-off per (sender, receiver): the messages and bytes each prefill rank sent to each
  decode rank as captured (its ``send`` events of phase ``kv_transfer``) beside the plan
  (:func:`llmcomm.derive.disagg.rank_split`) — the diagonal of the chapter's figure;
* :func:`messages_match`: message by message, in order — sender, receiver, bytes and shape ``[2, b, heads, S, d]``.

Measured on CPU with the tiny Llama (2 KV heads, so t ≤ 2 on a side): equal TP (2 → 2), unequal TP (1 → 2, the
issue's example, and 2 → 1), a pipeline on the prefill side (p_P = 2 → t_D = 2) and one on the decode side
(1 → p_D = 2: its last stage hands each token back to its first).
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd

from ..deployment import Deployment
from ..derive.disagg import KV_PHASE, disaggregated_calls, handoff_messages, node_of, rank_split
from ..derive.traffic import rows_of_calls
from ..spec import Disaggregation, Layout, ModelSpec, Workload, load_model
from .sweeps import compare_rows

__all__ = ["MODEL", "CONFIGS", "WORKLOADS", "measure_all", "rows_frame", "pairs_frame", "messages_match",
           "predicted_rows", "runs_frame", "run_chapter", "cpu_handoff_frame", "handoff_breakdown",
           "p2p_sizes_frame"]

MODEL = "tiny-llama"
#: label → the disaggregated layout the chapter and the tests measure
CONFIGS = {"equal TP 2 → 2": Disaggregation(Layout(2), Layout(2)),
           "unequal TP 1 → 2": Disaggregation(Layout(1), Layout(2)),
           "unequal TP 2 → 1": Disaggregation(Layout(2), Layout(1)),
           "prefill PP 1×2 → TP 2": Disaggregation(Layout(1, 2), Layout(2)),
           "decode PP 1 → 1×2": Disaggregation(Layout(1), Layout(1, 2))}
WORKLOADS = (Workload(b=2, S=8, G=4), Workload(b=1, S=32, G=3))


def measure_all(configs: dict | None = None, workloads: Iterable[Workload] = WORKLOADS, **kw) -> list[tuple]:
    """``(label, model, dis, workload, result)`` for every configuration × workload: one launch per configuration."""
    from ..measure.disaggregate import measure_disaggregated

    model = load_model(MODEL)
    out = []
    for label, dis in (configs or CONFIGS).items():
        for wl, res in zip(workloads, measure_disaggregated(model, dis, list(workloads), **kw)):
            out.append((label, model, dis, wl, res))
    return out


def predicted_rows(model: ModelSpec, dis: Disaggregation, workload: Workload, res) -> list[dict]:
    """The predicted rows of a measured disaggregated run, counted as it was: its all-reduce algorithm, every rank
    on the host the run put it on (one host: ranks in order)."""
    from ..measure.results import allreduce_algorithm

    pattern = Deployment(p2p="full").pattern(model, dis.prefill)    # as predict --disaggregate: whole [b, s, h]
    return rows_of_calls(disaggregated_calls(model, dis, workload, pattern),
                         node_of(dis, dis.ranks, separate=False), allreduce_algorithm(res.ranks))


def rows_frame(measured: list[tuple]) -> pd.DataFrame:
    """Every row of every run, measured beside predicted (``match``: all values equal), with the configuration."""
    frames = []
    for label, model, dis, wl, res in measured:
        cmp = compare_rows(res.rows, predicted_rows(model, dis, wl, res))
        frames.append(cmp.assign(config=label, b=wl.b, S=wl.S, G=wl.G))
    return pd.concat(frames, ignore_index=True)


def _sends(res) -> list[dict]:
    """The hand-off's send events of a run, in each rank's order."""
    return sorted((ev for ev in res.events if ev["phase"] == KV_PHASE and ev["op"] == "send"),
                  key=lambda ev: (ev["rank"], ev["seq"]))


def pairs_frame(measured: list[tuple]) -> pd.DataFrame:
    """Per run and (sender, receiver): ``messages`` and ``bytes`` measured and predicted, the layers and heads the
    plan gives the pair, and ``kind`` (kv or the first token)."""
    rows = []
    for label, model, dis, wl, res in measured:
        got: dict[tuple, list[int]] = {}
        for ev in _sends(res):                         # the first token's ids are int64, the KV the model dtype
            kind = "token" if "int" in str(ev["dtype"]) else "kv"
            acc = got.setdefault((kind, ev["rank"], ev["peer"]), [0, 0])
            acc[0] += 1
            acc[1] += int(ev["bytes"])
        for r in rank_split(model, dis, wl):
            m_msgs, m_bytes = got.pop((r["kind"], r["src"], r["dst"]), [0, 0])
            rows.append({"config": label, "b": wl.b, "S": wl.S, "kind": r["kind"], "src": r["src"], "dst": r["dst"],
                         "layers": f"{r['layers'][0]}–{r['layers'][1]}" if r["kind"] == "kv" else "",
                         "heads": ", ".join(f"{lo}–{hi - 1}" for lo, hi in r["heads"]),
                         "messages_predicted": r["messages"], "messages_measured": m_msgs,
                         "bytes_predicted": r["bytes"], "bytes_measured": m_bytes})
        for (_, src, dst), (n_, nb) in got.items():    # a send the plan does not have
            rows.append({"config": label, "b": wl.b, "S": wl.S, "kind": "unplanned", "src": src, "dst": dst,
                         "layers": "", "heads": "", "messages_predicted": 0, "messages_measured": n_,
                         "bytes_predicted": 0, "bytes_measured": nb})
    df = pd.DataFrame(rows)
    return df.assign(match=(df.messages_predicted == df.messages_measured) & (df.bytes_predicted == df.bytes_measured))


def messages_match(model: ModelSpec, dis: Disaggregation, workload: Workload, res) -> bool:
    """Message by message, per sender in its order: (receiver, bytes, shape) measured == planned (the plan's KV
    message is ``[2, b, hi − lo, S, d]``, its token message ``[b, 1]``)."""
    plan: dict[int, list] = {}
    for x in handoff_messages(model, dis, workload):
        shape = [2, workload.b, x.hi - x.lo, workload.S, model.head_dim] if x.kind == "kv" else [workload.b, 1]
        plan.setdefault(x.src, []).append((x.dst, x.nbytes, shape))
    got: dict[int, list] = {}
    for ev in _sends(res):
        got.setdefault(ev["rank"], []).append((ev["peer"], int(ev["bytes"]), list(ev["shape"])))
    return got == plan


def runs_frame(measured: list[tuple]) -> pd.DataFrame:
    """One line per run: tokens equal to the single-process reference, TTFT (prefill + hand-off), the hand-off's
    own time and TPOT as measured on this machine (wall clock; timings, not checked values)."""
    return pd.DataFrame([{"config": label, "b": wl.b, "S": wl.S, "G": wl.G, "ranks": dis.ranks,
                          "tokens_match": res.tokens == res.reference_tokens,
                          "prefill_ms": res.provenance["prefill_s"] * 1e3,
                          "handoff_ms": res.provenance["handoff_s"] * 1e3, "ttft_ms": res.ttft_s * 1e3,
                          "tpot_ms": res.tpot_s * 1e3} for label, model, dis, wl, res in measured])


def run_chapter(command: str) -> tuple[list, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The chapter's measurement: every configuration × workload (:func:`measure_all`), its rows, pairs and run
    frames, saved with provenance as ``disagg_rows``, ``disagg_pairs`` and ``disagg_runs`` when ``$LLMCOMM_SAVE=1``
    (:func:`llmcomm.compare.sweeps.save`), checked: every run's tokens equal the single-process reference."""
    from .sweeps import save

    measured = measure_all(progress_timeout_s=240)
    rows, pairs, runs = rows_frame(measured), pairs_frame(measured), runs_frame(measured)
    for df, name in ((rows, "disagg_rows"), (pairs, "disagg_pairs"), (runs, "disagg_runs")):
        save(df, name, command)
    assert runs.tokens_match.all(), f"tokens differ from the single-process reference:\n{runs[~runs.tokens_match]}"
    return measured, rows, pairs, runs


def cpu_handoff_frame(measured: list[tuple], hw) -> pd.DataFrame:
    """The measured runs' hand-off time beside :func:`llmcomm.predict.handoff.handoff_time` on this machine's
    calibration ``hw`` (per-message floor and bandwidth from its point-to-point link; all ranks on one host): a
    benchmark (timings of a shared 2-core machine), not a check."""
    from ..predict.handoff import handoff_time
    from ..predict.hardware import for_ranks

    rows = []
    for label, model, dis, wl, res in measured:
        pred = handoff_time(model, dis, wl, for_ranks(hw, dis.ranks), gpus_per_node=dis.ranks)
        meas = res.provenance["handoff_s"]
        rows.append({"config": label, "b": wl.b, "S": wl.S, "messages": pred["messages"],
                     "measured_ms": meas * 1e3, "predicted_ms": pred["seconds"] * 1e3,
                     "measured / predicted": meas / pred["seconds"]})
    return pd.DataFrame(rows)


def handoff_breakdown(measured: list[tuple]) -> pd.DataFrame:
    """Where a measured hand-off's time goes, from the busiest sender's captured send calls (their wall-clock start
    and end, the prefill's end): ``handoff_ms`` (prefill end → the decode side's last receive done), the sender's
    time ``before_first_send_ms``, ``in_send_ms`` (inside its send calls), ``between_sends_ms`` (slicing and
    stacking K and V between them) and ``after_last_send_ms``, and ``per_send_us``, the mean time inside one send.
    Timings of this machine (wall clock of one host), shown, not checked."""
    rows = []
    for label, model, dis, wl, res in measured:
        stamps = [r.get("timings", {}) for r in res.ranks]
        prefill_end = max(x["prefill_end"] for x in stamps if "prefill_end" in x)
        handoff_end = max(x["handoff_end"] for x in stamps if "handoff_end" in x)
        per_rank: dict[int, list] = {}
        for ev in _sends(res):
            per_rank.setdefault(ev["rank"], []).append(ev)
        sender = max(per_rank, key=lambda r: (len(per_rank[r]), -r))
        sends = per_rank[sender]                       # in the rank's order (_sends sorts by rank, seq)
        inside = sum(ev["t_end"] - ev["t_start"] for ev in sends)
        span = sends[-1]["t_end"] - sends[0]["t_start"]
        rows.append({"config": label, "b": wl.b, "S": wl.S, "handoff_ms": (handoff_end - prefill_end) * 1e3,
                     "sender": sender, "sends": len(sends),
                     "before_first_send_ms": (sends[0]["t_start"] - prefill_end) * 1e3,
                     "in_send_ms": inside * 1e3, "between_sends_ms": (span - inside) * 1e3,
                     "after_last_send_ms": (handoff_end - sends[-1]["t_end"]) * 1e3,
                     "per_send_us": inside / len(sends) * 1e6})
    return pd.DataFrame(rows)


def p2p_sizes_frame(measured: list[tuple], hw, csv=None) -> pd.DataFrame:
    """The point-to-point microbenchmark of this machine (``bench-collectives``, gloo, 2 ranks) at the sizes the
    measured hand-offs sent: its median and 10th–90th percentile beside the α-β line the time model uses
    (``hw``'s intra link: one fit over every size of the sweep) — at a few KiB the line is below the medians.
    ``csv``: the benchmark table (default ``data/cpu-local/collectives.csv`` of the checkout)."""
    from ..record import data_dir
    from .calibration import read_bench_table

    table, _ = read_bench_table(csv or data_dir("cpu-local") / "collectives.csv")
    p2p = table[(table.op == "send_recv") & (table.backend == "gloo")].set_index("bytes")
    link = hw.links["intra"]
    sizes = sorted({int(ev["bytes"]) for *_, res in measured for ev in _sends(res)})
    rows = []
    for m_ in sizes:
        near = p2p.index[abs(p2p.index - m_).argmin()]           # the sweep's sizes are powers of two
        rows.append({"message_bytes": m_, "benchmark_bytes": int(near),
                     "benchmark_median_us": p2p.loc[near, "time_s"] * 1e6,
                     "benchmark_p10_us": p2p.loc[near, "time_p10_s"] * 1e6,
                     "benchmark_p90_us": p2p.loc[near, "time_p90_s"] * 1e6,
                     "alpha_beta_line_us": (link.alpha_s + m_ * link.beta_s_per_B) * 1e6})
    return pd.DataFrame(rows)
