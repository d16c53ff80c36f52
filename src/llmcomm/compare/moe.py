"""Mixture-of-experts runs beside their closed forms: every all-to-all of an expert-parallel run tied to the
routing that sized it.

An EP run (:mod:`llmcomm.measure.runs.ep`) records, per rank, every collective (the capture: each
``all_to_all_single`` with its bytes and per-peer split) and, for each MoE layer of each forward, the router's
per-expert counts κ of the rank's tokens and the capacity C DeepSpeed used (``routing`` of each rank's result).
:func:`a2a_exactness` pairs them: MoE layer j of forward f issues the dispatch and the combine all-to-all, in that
order, so the 2·(f·L_moe + j)-th and next all-to-all of a rank belong to it. Each call's predicted size is the
closed form m = E·C·h·w (:data:`llmcomm.derive.moe.A2A_BYTES`) with C

* capacity routing — :func:`llmcomm.derive.moe.capacity` of the rank's tokens (no count needed: routing-independent);
* dropless routing — :func:`llmcomm.derive.moe.dropless_capacity` of the **measured** counts of every EP rank.

The run is exact when every call's predicted size equals the measured one.

Beside every call and every phase total stands what capacity routing dropped: measured from the routing log (the
routes beyond C of every expert, Σ_j (κ_j − C)⁺ over the EP group's ranks: :func:`llmcomm.derive.moe.dropped_routes`;
DeepSpeed's own count of kept routes checks it where the log has it) and predicted under uniform routing
(:func:`llmcomm.derive.moe.dropped_fraction`; dropless routing drops nothing).
"""
from __future__ import annotations

import pandas as pd

from ..deployment import Deployment, Routing
from ..derive.moe import (A2A_BYTES, capacity, dropless_capacity, dropped_fraction, dropped_routes,
                          expected_max_count, generation_dropped, skew_capacity)
from ..notation import C, E, h, w
from ..spec import Layout, ModelSpec, Workload

__all__ = ["routing_frame", "a2a_exactness", "phase_totals", "count_distribution", "layouts_traffic", "skew_capacity",
           "models_frame", "run_ep", "run_autotp", "skew_frame", "ep_crossover", "layouts_latency", "skew_latency",
           "advice_frame", "advice_winners", "host_op_model", "dropped_frame"]


def _records(result) -> list[dict]:
    return sorted(result.ranks, key=lambda r: r["rank"])


def routing_frame(result) -> pd.DataFrame:
    """Every rank's routing log: rank, forward, phase (forward 0 is the prefill), layer, tokens T, capacity C, the
    routes DeepSpeed kept (None in logs recorded before it was logged) and the per-expert counts κ (one column per
    expert, ``kappa0 … kappa{E−1}``)."""
    rows = []
    for rec in _records(result):
        for x in rec.get("routing") or []:
            rows.append({"rank": rec["rank"], "forward": x["forward"],
                         "phase": "prefill" if x["forward"] == 0 else "decode", "layer": x["layer"],
                         "tokens": x["tokens"], "capacity": x["capacity"], "kept": x.get("kept"),
                         **{f"kappa{j}": count for j, count in enumerate(x["counts"])}})
    return pd.DataFrame(rows)


def a2a_exactness(result, model: ModelSpec, layout: Layout, workload: Workload,
                  routing: Routing | None = None) -> pd.DataFrame:
    """One row per all-to-all call of the run (the dispatch and the combine of each MoE layer of each forward), as
    the lowest rank of its EP group issued it (one group per pipeline stage: ranks stage·e … stage·e + e − 1):
    stage, phase, forward, layer, which (dispatch / combine), C predicted from the routing (see the module docs) and
    as DeepSpeed used it, the predicted and the measured size m, the measured per-peer split, and whether they are
    equal; beside it the layer's routes on the EP group (T·k per rank), the routes dropped (measured from the log:
    Σ (κ − C)⁺; ``dropped_routes_deepspeed``: T·k minus what DeepSpeed kept, where logged) and the dropped share
    predicted under uniform routing."""
    routing = routing or Routing()
    k = model.moe.top_k
    logs = routing_frame(result)
    experts = [f"kappa{j}" for j in range(model.E)]
    size = A2A_BYTES.subs({E: model.E, h: model.h, w: workload.w})
    base = min(r["rank"] for r in result.ranks)
    rows = []
    for stage in range(layout.p):
        rank0 = base + stage * layout.e
        calls = [ev for ev in result.events if ev["rank"] == rank0 and ev["op"] == "all_to_all"
                 and ev["phase"] in ("prefill", "decode")]
        mine = logs[logs["rank"] == rank0].reset_index(drop=True)
        if len(calls) != 2 * len(mine):
            raise ValueError(f"{len(calls)} all-to-all calls on rank {rank0} for {len(mine)} MoE layer forwards: "
                             "expected a dispatch and a combine for each")
        for i, x in mine.iterrows():
            same = logs[(logs.forward == x.forward) & (logs.layer == x.layer)]   # the layer's EP group
            if routing.mode == "capacity":
                c_pred = capacity(int(x.tokens), model.E, k, routing.capacity_factor, routing.min_capacity)
                share = dropped_fraction(int(x.tokens), model.E, k, c_pred)
            else:
                c_pred = dropless_capacity(same[experts].to_numpy())
                share = 0.0
            m_pred = int(size.subs(C, c_pred))
            routes = int(same.tokens.sum()) * k
            dropped = sum(dropped_routes(r[experts].to_numpy(), int(r.capacity)) for _, r in same.iterrows())
            by_ds = routes - int(same.kept.sum()) if same.kept.notna().all() else None
            for j, which in enumerate(("dispatch", "combine")):
                ev = calls[2 * i + j]
                rows.append({"stage": stage, "phase": x.phase, "forward": int(x.forward), "layer": int(x.layer),
                             "call": which, "tokens_per_rank": int(x.tokens), "C_predicted": int(c_pred),
                             "C_run": int(x.capacity), "bytes_predicted": m_pred, "bytes_measured": int(ev["bytes"]),
                             "split_measured": ev.get("splits"), "equal": m_pred == int(ev["bytes"]),
                             "routes": routes, "dropped_routes": dropped, "dropped_routes_deepspeed": by_ds,
                             "dropped_fraction_predicted": share})
    return pd.DataFrame(rows)


def phase_totals(exact: pd.DataFrame) -> pd.DataFrame:
    """:func:`a2a_exactness` summed per phase: calls, predicted and measured bytes, whether every call matched, and
    the routes the phase's MoE layer forwards dropped — measured (``dropped_fraction_measured``: dropped / routes
    over the phase) beside the uniform-routing prediction (``dropped_fraction_predicted``, the same weighting)."""
    by = exact.groupby("phase", sort=False)
    layer = exact[exact.call == "dispatch"].groupby("phase", sort=False)         # one row per MoE layer forward
    routes = layer.routes.sum()
    return pd.DataFrame({"calls": by.size(), "bytes_predicted": by.bytes_predicted.sum(),
                         "bytes_measured": by.bytes_measured.sum(), "all_equal": by.equal.all(),
                         "routes": routes, "dropped_routes": layer.dropped_routes.sum(),
                         "dropped_fraction_measured": layer.dropped_routes.sum() / routes,
                         "dropped_fraction_predicted": layer.apply(
                             lambda grp: float((grp.dropped_fraction_predicted * grp.routes).sum()
                                               / grp.routes.sum()), include_groups=False)}).reset_index()


def count_distribution(result, model: ModelSpec, layout: Layout) -> pd.DataFrame:
    """Per phase: the measured dropless C of each MoE layer forward (the largest count over experts and EP ranks)
    beside its expectation under uniform routing (:func:`llmcomm.derive.moe.expected_max_count`, with the method
    it used) — how far the router of these random weights is from uniform."""
    logs = routing_frame(result)
    experts = [f"kappa{j}" for j in range(model.E)]
    rows = []
    for (phase, fwd, layer), same in logs.groupby(["phase", "forward", "layer"], sort=False):
        T = int(same.tokens.iloc[0])
        expect, method = expected_max_count(T, model.E, model.moe.top_k, layout.e)
        rows.append({"phase": phase, "forward": fwd, "layer": layer, "tokens_per_rank": T,
                     "C_measured": int(same[experts].to_numpy().max()), "C_uniform_expected": float(expect),
                     "method": method})
    return pd.DataFrame(rows)


def _three_layouts(gpus: int, routing: Routing) -> list[tuple[str, Layout, Deployment]]:
    """The three ways to lay a mixture of experts on N = ``gpus`` ranks of one node that the chapter compares."""
    return [("TP, experts replicated (AutoTP)", Layout(gpus, 1), Deployment(experts="autotp")),
            ("TP, experts sharded", Layout(gpus, 1), Deployment(experts="tp-experts")),
            (f"EP ({routing.mode})", Layout(1, 1, gpus), Deployment(experts="ep", routing=routing))]


def layouts_traffic(model: ModelSpec, gpus: int, workloads, routing: Routing | None = None) -> pd.DataFrame:
    """The bytes of a whole generation of ``model`` on N = ``gpus`` ranks of one node, three ways (closed forms): TP
    as DeepSpeed's AutoTP leaves a mixture of experts (t = N, experts replicated: ``deepspeed-moe-autotp``), TP with
    every expert sharded t ways as serving frameworks do (``tp-experts``) and expert parallelism with data-parallel
    attention (e = N, ``routing``; dropless: the uniform-routing expectation). One row per (workload, layout): the
    bytes the busiest rank sends and what all links carry."""
    from ..derive.evaluate import traffic_totals

    routing = routing or Routing()
    rows = []
    for wl in workloads:
        for name, layout, dep in _three_layouts(gpus, routing):
            tr = traffic_totals(model, layout, wl, dep.pattern(model, layout), routing=routing)
            rows.append({"model": model.name, "b": wl.b, "S": wl.S, "G": wl.G, "layout": name,
                         "busiest rank sends (B)": float(tr["sent_bytes_busiest_rank"]),
                         "all links (B)": float(tr["link_bytes"])})
    return pd.DataFrame(rows)


def models_frame(models) -> pd.DataFrame:
    """The mixture-of-experts presets as the closed forms see them: E, k, F_ex, MoE layers, parameters in total and
    active per token (billions)."""
    return pd.DataFrame([{"model": spec.name, "family": spec.moe.family, "h": spec.h, "L": spec.L,
                          "L_moe": spec.L_moe, "E": spec.E, "k": spec.moe.top_k, "F_ex": spec.moe.expert_ffn,
                          "a_kv": spec.kv_heads, "params (B)": round(spec.params / 1e9, 2),
                          "active (B)": round(spec.active_params / 1e9, 2)} for spec in models])


def _measured(kind: str, runner=None):
    """The configurations of sweep ``kind`` measured (:func:`llmcomm.compare.sweeps.measure_configs`: one launch per
    model and layout), each checked: tokens equal the single-process reference."""
    from .sweeps import configs, measure_configs

    out = measure_configs(configs(kind), runner)
    for cfg, _, res in out:
        if res.tokens != res.reference_tokens:
            raise ValueError(f"{cfg.label}: tokens differ from the single-process reference")
    return out


def run_ep(kind: str = "moe-ep", command: str = "", runner=None, name: str | None = None) -> dict:
    """Measure the expert-parallel configurations of sweep ``kind`` (:func:`llmcomm.compare.sweeps.configs`: e ranks,
    alone or in p pipeline stages of e ranks, each routing mode — one launch for all) and tie every all-to-all to
    its closed form. Returns ``{"exact": frame of every call (a2a_exactness, with routing and workload columns),
    "totals": per routing, workload and phase, "counts": measured dropless C beside the uniform expectation,
    "rows": measured beside predicted rows}``; saved with provenance under ``LLMCOMM_SAVE=1`` (``{name}_calls``,
    ``{name}_rows``; ``name`` default: ``kind`` with ``_`` for ``-``)."""
    from ..derive.evaluate import rows as predict_rows
    from .sweeps import compare_rows, save

    name = name or kind.replace("-", "_")
    exact, totals, counts, rows = [], [], [], []
    done = _measured(kind, runner)
    for cfg, model, res in done:
        layout, wl, routing = cfg.layout, cfg.workload, cfg.deployment.routing
        tag = {"routing": cfg.routing, "b": wl.b, "S": wl.S, "G": wl.G}
        ex = a2a_exactness(res, model, layout, wl, routing)
        exact.append(ex.assign(**tag))
        totals.append(phase_totals(ex).assign(**tag))
        counts.append(count_distribution(res, model, layout).assign(**tag))
        meas = [r for r in res.rows if r["phase"] != "setup"]
        pred = predict_rows(model, layout, wl, cfg.deployment.pattern(model, layout), routing=routing)
        if cfg.routing == "dropless":
            # the all-to-all sizes are the closed form on the measured counts (above), summed per phase; the
            # capacity all-reduce's 8 B do not depend on them. Compared: calls and bytes.
            keys = ("phase", "op", "group_size", "calls", "bytes")
            per_phase = phase_totals(ex).set_index("phase").bytes_predicted
            pred = [{key: (int(per_phase[r["phase"]]) if key == "bytes" and r["op"] == "all_to_all" else r[key])
                     for key in keys} for r in pred]
            meas = [{key: r[key] for key in keys} for r in meas]
        rows.append(compare_rows(meas, pred).assign(**tag))
    out = {"exact": pd.concat(exact, ignore_index=True), "totals": pd.concat(totals, ignore_index=True),
           "counts": pd.concat(counts, ignore_index=True), "rows": pd.concat(rows, ignore_index=True)}
    cfg0 = done[0][0]
    save(out["exact"].drop(columns=["split_measured"]), f"{name}_calls", command, model=cfg0.model, e=cfg0.e,
         p=cfg0.p)
    save(out["rows"], f"{name}_rows", command, model=cfg0.model, e=cfg0.e, p=cfg0.p)
    return out


def run_autotp(kind: str = "moe-autotp", command: str = "", runner=None, name: str | None = None) -> pd.DataFrame:
    """DeepSpeed AutoTP on a mixture of experts, the configurations of sweep ``kind``: as it is (expert layout
    ``autotp``, experts whole on every rank) or with every expert sharded t ways after it (``tp-experts``,
    :func:`llmcomm.measure.moe_adapter.shard_experts`). Measured rows beside the ``deepspeed-moe-autotp`` or
    ``tp-experts`` closed forms, one block per configuration (column ``experts``); saved as ``name`` (default
    ``kind`` with ``_`` for ``-`` and ``_rows``)."""
    from .sweeps import compare_rows, predicted_like, save

    parts = []
    done = _measured(kind, runner)
    for cfg, model, res in done:
        pred = predicted_like(model, cfg.layout, cfg.workload, res, cfg.deployment.pattern(model, cfg.layout))
        parts.append(compare_rows([r for r in res.rows if r["phase"] != "setup"], pred)
                     .assign(t=cfg.t, b=cfg.b, S=cfg.S, G=cfg.G, experts=cfg.experts))
    out = pd.concat(parts, ignore_index=True)
    save(out, name or kind.replace("-", "_") + "_rows", command, model=done[0][0].model, t=done[0][0].t)
    return out


def skew_frame(model: ModelSpec, e_: int, workload: Workload, phis) -> pd.DataFrame:
    """Per phase and share φ (:func:`skew_capacity`): the tokens per EP rank T, the dropless C, the size m of one
    all-to-all (E·C·h·w, column ``message_bytes``) and m relative to balanced routing (C = ⌈T·k/E⌉)."""
    from ..derive.phases import PHASES, forwards
    from ..derive.moe import rank_batch

    size = A2A_BYTES.subs({E: model.E, h: model.h, w: workload.w})
    k_ = model.moe.top_k
    rows = []
    for phase in PHASES:
        tokens, _ = forwards(phase)
        s_ = int(tokens.subs({sym: getattr(workload, sym.name) for sym in tokens.free_symbols}))
        T = rank_batch(workload.b, e_) * s_
        base = int(size.subs(C, skew_capacity(T, model.E, k_, k_ / model.E)))
        for phi in phis:
            c_ = skew_capacity(T, model.E, k_, phi)
            m = int(size.subs(C, c_))
            rows.append({"phase": phase, "phi": float(phi), "tokens_per_rank": T, "C": c_, "message_bytes": m,
                         "relative": m / base})
    return pd.DataFrame(rows)


def skew_latency(model: ModelSpec, e_: int, workload: Workload, phis, hw, p_: int = 1) -> pd.DataFrame:
    """The predicted step times of dropless expert parallelism (``e_`` ranks, ``p_`` stages) when the busiest expert
    takes a share φ of each rank's tokens (:class:`llmcomm.derive.moe.Routing` ``skew``; φ = k/E is balanced): per φ,
    TTFT and TPOT, the decode step's compute (E/e experts on the e·C rows of the buffer) and communication, and
    TTFT and TPOT relative to balanced routing. A prediction: α-β all-to-all, the hardware's kernel model."""
    from ..predict.latency import predict_latency

    rows = []
    base = None
    for phi in [model.moe.top_k / model.E, *phis]:
        r = predict_latency(model, Layout(1, p_, e_), workload, hw,
                            Deployment(routing=Routing("dropless", skew=float(phi))), gpus_per_node=e_ * p_)
        dec = r["breakdown"]["decode"]
        row = {"phi": float(phi), "TTFT ms": 1e3 * r["ttft_s"], "TPOT ms": 1e3 * r["tpot_s"],
               "decode compute ms": 1e3 * dec["compute_s"], "decode comm ms": 1e3 * dec["comm_s"]}
        base = base or row
        rows.append(dict(row, **{"TTFT relative": row["TTFT ms"] / base["TTFT ms"],
                                 "TPOT relative": row["TPOT ms"] / base["TPOT ms"]}))
    return pd.DataFrame(rows[1:])


def dropped_frame(model: ModelSpec, e_: int, workloads, routing: Routing | None = None, phis=()) -> pd.DataFrame:
    """What capacity routing (``routing``, default DeepSpeed's: γ = 1, C_min = 4) drops on ``e_`` EP ranks, predicted
    (:func:`llmcomm.derive.moe.generation_dropped`): one row per workload and router — uniform, then each skew φ of
    ``phis`` — with the expected dropped share of the prefill's, a decode step's and the whole generation's routes,
    and whether the capacity provably drops nothing (C ≥ T in both phases)."""
    routing = routing or Routing()
    rows = []
    for wl in workloads:
        for phi in (None, *phis):
            drop = generation_dropped(routing, model.E, model.moe.top_k, wl.b, wl.S, wl.G, e_, phi)
            rows.append({"model": model.name, "e": e_, "b": wl.b, "S": wl.S, "G": wl.G,
                         "router": "uniform" if phi is None else f"skew {phi:g}",
                         "dropped prefill": drop["prefill"], "dropped decode": drop["decode"],
                         "dropped generation": drop["generation"], "lossless": drop["lossless"]})
    return pd.DataFrame(rows)


def ep_crossover(traffic: pd.DataFrame, against: str, y: str = "busiest rank sends (B)") -> dict:
    """Per model of :func:`layouts_traffic`: the smallest batch b at which expert parallelism sends fewer bytes
    (``y``) than the layout named ``against``, or None when it never does in the frame."""
    piv = traffic.pivot_table(index=["model", "b"], columns="layout", values=y)
    ep_col = next(col for col in piv.columns if col.startswith("EP"))
    wins = piv[ep_col] < piv[against]
    return {name: (int(wins[name][wins[name]].index.min()) if wins[name].any() else None)
            for name in piv.index.levels[0]}


def layouts_latency(model: ModelSpec, gpus: int, workloads, hw, routing: Routing | None = None,
                    framework: str = "deepspeed") -> pd.DataFrame:
    """The time model on the three layouts of :func:`layouts_traffic` (N = ``gpus`` GPUs of one node of ``hw``;
    ``framework`` ``deepspeed`` = its eager host profile, ``vllm`` = CUDA graphs): TTFT, TPOT, E2E and the decode
    step's compute and communication, and the expected share of the generation's routes capacity routing drops
    (``dropped routes``: :func:`llmcomm.derive.moe.generation_dropped`; 0 for TP and dropless routing). A prediction
    resting on the labelled assumptions of :mod:`llmcomm.predict.kernels` (uniform routing) and of the α-β
    all-to-all (no public measurement fitted)."""
    from dataclasses import replace

    from ..predict.hardware import GiB
    from ..predict.latency import predict_latency
    from ..predict.moe_advice import moe_memory_per_rank

    routing = routing or Routing()
    rows = []
    for wl in workloads:
        for name, layout, dep in _three_layouts(gpus, routing):
            dep = replace(dep, framework=framework)
            r = predict_latency(model, layout, wl, hw, dep, gpus_per_node=gpus)
            dec = r["breakdown"]["decode"]
            mem = moe_memory_per_rank(model, dep.experts, layout.t, layout.p, layout.e, wl.b, wl.S, wl.G,
                                      wl.w)["total"]
            drop = generation_dropped(dep.routing, model.E, model.moe.top_k, wl.b, wl.S, wl.G, layout.e) \
                if layout.e > 1 else {"generation": 0.0}
            rows.append({"model": model.name, "b": wl.b, "S": wl.S, "G": wl.G, "layout": name,
                         "TTFT ms": 1e3 * r["ttft_s"], "TPOT ms": 1e3 * r["tpot_s"], "E2E s": r["e2e_s"],
                         "decode compute ms": 1e3 * dec["compute_s"], "decode comm ms": 1e3 * dec["comm_s"],
                         "dropped routes": drop["generation"],
                         "GiB/GPU": mem / GiB, "fits": bool(mem <= hw.usable_memory_bytes)})
    return pd.DataFrame(rows)


def advice_frame(models, gpus: int, batches, hw, S: int = 1024, G: int = 128, routing: Routing | None = None,
                 framework: str = "deepspeed") -> pd.DataFrame:
    """:func:`llmcomm.predict.moe_advice.advise_moe` of each model on ``gpus`` GPUs of ``hw`` for each batch size:
    one row per (model, b, candidate layout) — scheme, t, p, e, EP's routing, the expected share of routes it drops,
    TTFT, TPOT, E2E, decode communication, the bytes the busiest rank sends in the whole generation, memory per
    GPU, fits, rank by E2E. Predictions. ``routing`` None: lossless layouts only (the advice's default: EP under
    dropless routing, or capacity routing where it provably drops nothing); a routing: EP under it, as asked."""
    from ..predict.moe_advice import advise_moe

    rows = []
    for model in models:
        for b in batches:
            ranked, _ = advise_moe(model, gpus, None, hw, S, G, b, "e2e", "bf16",
                                   Deployment(framework, routing=routing or Routing()),
                                   routing_asked=routing is not None)
            rows += [{"model": model.name, "b": b, "scheme": r["scheme"], "t": r["tp"], "p": r["pp"], "e": r["ep"],
                      "routing": r["routing"] or "-", "dropped routes": r["dropped_route_fraction"]["generation"],
                      "TTFT ms": 1e3 * r["ttft_s"], "TPOT ms": 1e3 * r["tpot_s"], "E2E s": r["e2e_s"],
                      "decode comm ms": 1e3 * r["decode_comm_s"],
                      "busiest sends GB": r["sent_bytes_busiest_rank"] / 1e9, "GiB/GPU": r["memory_gib"],
                      "fits": r["fits"], "rank": r["rank"]} for r in ranked]
    return pd.DataFrame(rows)


def advice_winners(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (model, b) of :func:`advice_frame`: the fitting layout with the lowest TTFT, TPOT and E2E (``scheme
    t×p×e``) — the phases may disagree."""
    fit = frame[frame.fits]
    label = fit.scheme + " " + fit.t.astype(str) + "×" + fit.p.astype(str) + "×" + fit.e.astype(str)
    if "routing" in fit:
        label = label + fit.routing.map(lambda r: "" if r == "-" else f" ({r})")
    out = {}
    for col in ("TTFT ms", "TPOT ms", "E2E s"):
        out[f"best {col.split()[0]}"] = label.loc[fit.groupby(["model", "b"])[col].idxmin()].set_axis(
            pd.MultiIndex.from_frame(fit.loc[fit.groupby(["model", "b"])[col].idxmin(), ["model", "b"]]))
    return pd.DataFrame(out)


def host_op_model(ops: pd.DataFrame) -> dict:
    """The ``ops`` of a host profile's ``moe_layer`` field (:mod:`llmcomm.predict.profiles`) from the profiler counts
    of ``benchmarks/moe_layer_ops.py`` (``data/cpu-local/moe_layer_ops.csv``): launching ops (``launch_ops``) of a
    dense decoder layer and of its MLP (tiny Llama), of the HF sparse block (gate + experts, grouped_mm; the same
    sharded), and of DeepSpeed's MoE layer split into its fixed part per gating path (``top2``: Mixtral's k = 2,
    ``topk``: k > 2) and routing, and its ops per local expert (the loop's body). Raises ValueError when the counts
    disagree where this form says they are equal (prefill and decode; e = 1 and e = 2; the two HF blocks; the
    models' experts) — then the form must change, not the numbers."""
    launch = ops.groupby(["model", "implementation", "routing", "e", "phase", "section"]).launch_ops.sum()

    def one(values, what):
        vals = set(int(v) for v in values)
        if len(vals) != 1:
            raise ValueError(f"{what}: the counts differ ({sorted(vals)})")
        return vals.pop()

    def block(frame):            # per (model, implementation, routing, e, phase): the block and everything in it
        return frame[frame.index.get_level_values("section") != "layer"].groupby(level=[0, 1, 2, 3, 4]).sum()

    dense = launch.xs("dense-mlp", level="implementation")
    out = {"dense_layer": one(dense.groupby(level="phase").sum(), "dense decoder layer"),
           "dense_mlp": one(block(launch).xs("dense-mlp", level="implementation"), "dense MLP")}
    hf = block(launch)[block(launch).index.get_level_values("implementation").isin(["hf-grouped_mm", "hf-sharded"])]
    out["hf_block"] = one(hf, "HF sparse block (grouped_mm, sharded)")
    ds = ops[(ops.implementation == "deepspeed-moe") & (ops.section != "layer")]
    out["deepspeed_per_local_expert"] = one(ds[ds.section == "expert"].launch_ops, "one local expert")
    per = out["deepspeed_per_local_expert"]
    out["deepspeed"] = {}
    for (k, routing), grp in ds.groupby(["k", "routing"]):
        total = grp.groupby(["model", "e", "phase", "local_experts"]).launch_ops.sum()
        fixed = [v - per * loc for (_, _, _, loc), v in total.items()]
        out["deepspeed"].setdefault("top2" if k == 2 else "topk", {})[routing] = one(fixed, f"DeepSpeed k={k} "
                                                                                     f"{routing} without experts")
    return out
