"""The text the command line prints: one renderer per answer of the library, each a pure function of the dict (or
frame) the library returned — the same dict ``--json`` prints, so text and JSON can never disagree.

* :func:`render_rows` — a ``predict`` or ``measure`` result (:func:`llmcomm.predict.report.predict_report`,
  :func:`llmcomm.measure.launch.measure_sweep`): the configuration, the rows, the traffic, what a mixture of experts
  rests on, the latency (predicted) or timings (measured);
* :func:`render_advice` — :func:`llmcomm.predict.advise.advise_report`;
* :func:`render_cost` — :func:`llmcomm.predict.cost.cost_report`;
* :func:`render_bench`, :func:`render_fits`, :func:`render_in_run`, :func:`render_validation` — what the
  microbenchmark and the calibrations wrote.
"""
from __future__ import annotations

__all__ = ["render_rows", "render_memory_warning", "render_advice", "render_cost", "render_bench", "render_fits",
           "render_gpu_fits", "render_in_run", "render_validation", "table"]

_COLUMNS = {"phase": "phase", "op": "op", "group_size": "n", "calls": "calls", "bytes": "bytes (m)",
            "algorithm": "algorithm", "sent_bytes_per_rank": "busiest sends", "link_bytes": "all links",
            "inter_node_bytes": "inter-node"}
_HEAD = ("model", "tp", "pp", "prefill_tp", "prefill_pp", "decode_tp", "decode_pp", "batch", "prompt", "generate",
         "dtype", "kv_dtype", "engine", "p2p", "ep", "moe_routing")


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{v:,.1f}" if isinstance(v, float) \
        else str(v)


def table(rows: list[dict], columns: dict[str, str], fmt=None) -> list[str]:
    """Right-aligned text columns (``columns``: key → title) of the ``rows`` that have them."""
    fmt = fmt or {}
    cols = [c for c in columns if all(c in r for r in rows)]
    cells = [[fmt.get(c, _fmt)(r[c]) for c in cols] for r in rows]
    width = [max(len(columns[c]), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    return ["  ".join(columns[c].rjust(wd) for c, wd in zip(cols, width))] + \
        ["  ".join(v.rjust(wd) for v, wd in zip(x, width)) for x in cells]


def _moe_lines(moe: dict | None) -> list[str]:
    """What a mixture of experts' rows rest on."""
    if not moe:
        return []
    head = f"MoE: E={moe['E']} experts, top-{moe['k']}, {moe['L_moe']} MoE layers; "
    if moe["e"] == 1:
        return [head + {"autotp": "DeepSpeed AutoTP leaves the fused experts whole on every TP rank (one all-reduce "
                                  "per MoE layer)",
                        "tp-experts": "every expert sharded t ways (two all-reduces per layer, like dense)"}
                .get(moe.get("experts"), f"message pattern {moe.get('pattern')}")]
    r = moe["routing"]
    lines = [head + f"expert parallelism e={moe['e']}, {r['mode']} routing"
             + (f" (capacity factor {r['capacity_factor']}, min capacity {r['min_capacity']})"
                if r["mode"] == "capacity" else "")]
    for phase, x in moe["phases"].items():
        if "capacity" in x:
            lines.append(f"  {phase}: {x['tokens_per_rank']} tokens per EP rank, capacity C={x['capacity']}"
                         + (", drops nothing (C ≥ T)" if x.get("lossless") else
                            f", drops an expected {100 * x['dropped_fraction_expected']:.3g} % of the routes "
                            "(uniform routing)" if "dropped_fraction_expected" in x else ""))
        else:
            lo, hi = x["capacity_bounds"]
            lines.append(f"  {phase}: {x['tokens_per_rank']} tokens per EP rank, dropless C between {lo} and {hi}; "
                         f"rows use E[C]={x['capacity_expected']:.3f} under uniform routing ({x['method']})")
    return lines


def render_rows(obj: dict, stored: str | None = None) -> str:
    """A ``predict`` or ``measure`` result as text (``stored``: the file a resumed measurement came from)."""
    lines = [" ".join(f"{k}={obj[k]}" for k in _HEAD if k in obj)]
    rows, traffic = obj["ops"], obj.get("traffic")
    if not rows:
        lines.append("(no communication)")
    else:
        lines += table(rows, _COLUMNS)
        lines.append(f"total nccl-tests size: {sum(r['bytes'] for r in rows if r['phase'] != 'setup'):,} B "
                     f"(setup apart)")
        if traffic:
            inter = traffic.get("inter_node_bytes")
            lines.append(f"traffic ({traffic['algorithm']} all-reduce): busiest rank {traffic['busiest_rank']} sends "
                         f"{_fmt(traffic['sent_bytes_busiest_rank'])} B; all links carry {_fmt(traffic['link_bytes'])} B"
                         + (f"; {_fmt(inter)} B cross nodes" if inter is not None else ""))
    lines += _moe_lines(obj.get("moe"))
    lines += _handoff_lines(obj.get("handoff"), obj.get("handoff_s"))
    lat = obj.get("latency")
    if lat:
        lines.append(f"TTFT {lat['ttft_s'] * 1e3:.3f} ms  TPOT {lat['tpot_s'] * 1e3:.3f} ms  E2E {lat['e2e_s'] * 1e3:.3f} ms"
                     f"  (hardware {lat['hardware']}, {lat['gpus_per_node']} GPUs per node, host profile "
                     f"{lat['host_profile']})")
        if "handoff_s" in lat:
            lines.append(f"KV hand-off {lat['handoff_s'] * 1e3:.3f} ms = {lat['handoff_share']:.1%} of TTFT "
                         f"(prefill {lat['prefill_s'] * 1e3:.3f} ms on the prefill side)")
    if "ttft_s" in obj:
        lines.append(f"TTFT {obj['ttft_s'] * 1e3:.2f} ms  TPOT {obj['tpot_s'] * 1e3:.2f} ms  E2E {obj['e2e_s'] * 1e3:.2f} ms"
                     + (f" (stored: {stored})" if stored else " (this machine; tokens match the reference)"))
    return "\n".join(lines)


def _handoff_lines(handoff: dict | None, seconds: float | None) -> list[str]:
    """The KV hand-off of a disaggregated result: its size and messages, and who sends what to whom."""
    out = []
    if handoff:
        out.append(f"KV hand-off: {handoff['kv_bytes']:,} B in {handoff['kv_messages']} messages (sizes "
                   + ", ".join(f"{n} x {_fmt(m)} B" for m, n in handoff["message_sizes"].items())
                   + f") + the first token to {handoff['messages'] - handoff['kv_messages']} decode ranks")
        out += [f"  rank {r['src']} (prefill stage {r['side_src'][0]}, TP {r['side_src'][1]}) -> rank {r['dst']} "
                f"(decode stage {r['side_dst'][0]}, TP {r['side_dst'][1]}): layers {r['layers'][0]}-{r['layers'][1]}, "
                f"KV heads {', '.join(f'{a}-{b - 1}' for a, b in r['heads'])}, {r['messages']} messages, "
                f"{r['bytes']:,} B" for r in handoff["per_rank"] if r["kind"] == "kv"]
    if seconds is not None:
        out.append(f"hand-off measured: {seconds * 1e3:.2f} ms (this machine)")
    return out


def render_memory_warning(obj: dict) -> str | None:
    """The warning a ``predict`` result with a hardware preset deserves when the layout does not fit, else None."""
    mem, lat = obj.get("memory"), obj.get("latency") or {}
    if not mem or mem["fits"]:
        return None
    return (f"llmcomm: warning: {obj['model']} t={obj['tp']} p={obj['pp']} b={obj['batch']} S={obj['prompt']} "
            f"G={obj['generate']} {obj['dtype']} needs {mem['needed_gib_per_rank']:.1f} GiB per rank; "
            f"{lat.get('hardware')} has {mem['usable_gib_per_rank']:.1f} GiB usable: it does not fit (numbers "
            f"printed anyway)")


def render_advice(rep: dict) -> str:
    """``advise`` as text: the request, then one line per layout (best first) and the legend."""
    w, moe = rep["workload"], "routing" in rep
    lines = [f"model={rep['model']} gpus={rep['gpus']} gpus_per_node={rep['gpus_per_node']} hardware={rep['hardware']} "
             f"b={w['b']} S={w['S']} G={w['G']} dtype={w['dtype']} objective={rep['objective']}"
             + (f" moe_routing={rep['routing']['mode'] if rep['routing'].get('asked', True) else 'lossless'}"
                if moe else "")]
    lines.append(("    scheme  routing " if moe else "") + f"{'rank':>4} {'tp':>4} {'pp':>4} " + ("  ep " if moe else "")
                 + f"{'TTFT ms':>10} {'TPOT ms':>10} {'E2E s':>9} {'busiest sends':>15} "
                 f"{'inter-node B':>15} {'GiB/GPU':>8} {'fits':>5} {'pareto':>6}" + ("  drop %" if moe else ""))
    for r in rep["layouts"]:
        lines.append((f"{r['scheme']:>10} {r.get('routing') or '-':>8} " if moe else "")
                     + f"{r['rank']:>4} {r['tp']:>4} {r['pp']:>4} "
                     + (f"{r['ep']:>4} " if moe else "")
                     + f"{r['ttft_s'] * 1e3:>10.3f} {r['tpot_s'] * 1e3:>10.3f} "
                     f"{r['e2e_s']:>9.4f} {r['sent_bytes_busiest_rank']:>15,.0f} {r['inter_node_bytes']:>15,.0f} "
                     f"{r['memory_gib']:>8.1f} {'yes' if r['fits'] else 'no':>5} {'*' if r['pareto'] else '':>6}"
                     + (f" {100 * r['dropped_route_fraction']['generation']:>7.3g}" if moe else ""))
    lines.append("pareto: no other fitting layout is both faster and moves fewer inter-node bytes (within 1 %)")
    if moe:
        lines.append("schemes: autotp = DeepSpeed AutoTP as it is (experts whole on every TP rank); tp-experts = "
                     "every expert sharded t ways; ep = expert parallelism, data-parallel attention (predictions: "
                     "uniform routing, α-β all-to-all)")
        ro = rep["routing"]
        if ro.get("lossless_only", False):
            lines.append("routing: lossless layouts only — the TP schemes and ep under dropless routing (or capacity "
                         "routing where C ≥ T, which provably drops nothing); --moe-routing capacity ranks DeepSpeed's "
                         "capacity routing too")
        elif ro["mode"] == "capacity":
            lines.append(f"routing: capacity routing as asked (γ={ro['capacity_factor']:g}, C_min={ro['min_capacity']})"
                         ": ep rows drop the expected share of routes in 'drop %' (of the generation's routes, uniform "
                         "routing) — a lossy computation ranked against the exact TP schemes")
        lines += [f"not a candidate: {why}" for why in rep["not_candidates"]]
    return "\n".join(lines)


_COST_FMT = {"seconds": lambda v: f"{v * 1e6:,.2f} us", "flops": lambda v: f"{v:,.0f}",
             "memory_bytes": lambda v: f"{v:,.0f}", "message_bytes": lambda v: f"{v:,.0f}",
             "algbw_GBps": lambda v: f"{v:,.2f}", "busbw_GBps": lambda v: f"{v:,.2f}"}


def render_cost(rep: dict) -> str:
    """``cost`` as text: the request, then one line per op."""
    cols = ("op", "tokens", "seconds", "flops", "memory_bytes") if "model" in rep else \
        ("op", "ranks", "gpus_per_node", "message_bytes", "seconds", "algbw_GBps", "busbw_GBps", "algorithm",
         "protocol")
    head = " ".join(f"{k}={v}" for k, v in rep.items() if k != "ops" and v is not None)
    return "\n".join([head] + table(rep["ops"], {c: c for c in cols}, {c: _COST_FMT.get(c, str) for c in cols}))


def render_bench(df, where) -> str:
    """``bench-collectives``: the smallest and largest size of every (backend, op, n), and where the table went."""
    lines = []
    for (be, op, n), grp in df.groupby(["backend", "op", "group_size"]):
        small, big = grp.iloc[0], grp.iloc[-1]
        lines.append(f"{be:5s} {op:11s} n={n}: {small['bytes']:>9,d} B {small['time_s'] * 1e6:9.1f} us   "
                     f"{big['bytes']:>9,d} B {big['time_s'] * 1e3:8.2f} ms busbw {big['busbw_GBps']:.2f} GB/s")
    lines.append(f"wrote collectives.csv and collectives.json in {where}")
    return "\n".join(lines)


def render_fits(fits) -> str:
    """The α-β fits of a microbenchmark table."""
    cols = [c for c in ("backend", "op", "group_size", "path", "algorithm", "alpha_us", "busbw_GBps", "r2",
                        "median_rel_err", "n_points") if c in fits]
    return fits[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")


def render_gpu_fits(tables: dict) -> str:
    """The out-of-sample errors of the GPU fits (``calibrate --public-gpu``): kernels leave-one-model-out,
    collectives leave-one-size-decade-out (and leave-one-group-out)."""
    kern, coll = tables["kernels"], tables["collectives"]
    return "\n".join([kern[kern.validation == "lomo"].to_string(index=False),
                      coll[coll.validation.isin(["losdo", "logo"])].to_string(index=False)])


def render_in_run(entries: dict) -> str:
    """What ``calibrate --in-run`` found per layout."""
    lines = []
    for key, entry in entries.items():
        fit = entry["compute"]
        lines.append(f"{key}: compute {fit['flops_per_s'] / 1e9:.1f} GFLOP/s, overhead {fit['overhead_us']:.0f} "
                     f"us/layer, median |err| {fit['median_rel_err']:.1%} over {fit['points']} points")
        for row in entry["calls"]:
            lines.append(f"    {row['op']:10s} n={row['n']}: in-run {row['median_in_run_us']:9.1f} us per call, "
                         f"microbenchmark fit {row['median_fit_us']:9.1f} us ({row['in_run_over_fit']:.2f}x)"
                         + (" -> refitted from the run" if row.get("refit") else f" {row.get('flag', '')}"))
    return "\n".join(lines)


def render_validation(summaries: list[dict]) -> str:
    """One line per rerun of ``validate-time`` (or per step of its calibration: ``{"calibration": text}``)."""
    return "\n".join(f"calibration: {s['calibration']}" if "calibration" in s else
                     f"run {s['run']}: median |error| {s['median_abs_err']:.1%} (TTFT {s['median_abs_err_ttft']:.1%}, "
                     f"TPOT {s['median_abs_err_tpot']:.1%}, E2E {s['median_abs_err_e2e']:.1%}); load average "
                     f"{s['load_avg']}" for s in summaries)


def render_disaggregated_advice(rep: dict, top: int = 12) -> str:
    """``advise --disaggregate`` as text: the ranked deployments (co-located and split), then the verdict."""
    w = rep["workload"]
    lines = [f"model={rep['model']} gpus={rep['gpus']} hardware={rep['hardware']} b={w['b']} S={w['S']} G={w['G']} "
             f"{w['dtype']}  ranked by {rep['objective']} (x = {rep['rows'][0]['prefills_per_step']:g} prefills per "
             f"decode step)"]
    rows = []
    for r in rep["rows"][:top]:
        side = lambda k: f"{r[k + '_replicas']}x({r[k + '_tp']}x{r[k + '_pp']})"  # noqa: E731
        rows.append({"rank": r["rank"], "kind": r["kind"],
                     "layout": side("prefill") if r["kind"] == "co-located" else f"{side('prefill')} -> "
                                                                                f"{side('decode')}",
                     "TTFT ms": f"{r['ttft_s'] * 1e3:.2f}", "TPOT ms": f"{r['tpot_s'] * 1e3:.2f}",
                     "hand-off ms": f"{r['handoff_s'] * 1e3:.3f}" if r["kind"] == "split" else "",
                     "inter-node B": _fmt(r["inter_node_bytes"]), "fits": "yes" if r["fits"] else "no",
                     "keeps up": "" if r["kind"] == "co-located" else ("yes" if r["keeps_up"] else "no")})
    lines += table(rows, {k: k for k in rows[0]}) if rows else ["(no deployment)"]
    lines.append(rep["verdict"]["statement"])
    return "\n".join(lines)
