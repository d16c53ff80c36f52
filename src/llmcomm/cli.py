"""The ``llmcomm`` command: every subcommand, and the only module that parses a user's arguments.

``predict`` evaluates the closed forms (no torch needed); ``measure`` runs DeepSpeed ranks and captures every
collective; both print the same rows (``--json``: one JSON object with a list ``"ops"`` of
``{"phase", "op", "group_size", "calls", "bytes", "algorithm", "sent_bytes_per_rank", "link_bytes"}``, plus
``"inter_node_bytes"`` when a placement is known, and a ``"traffic"`` summary of the whole generation; several values
of a workload option: one object per configuration, JSON Lines). ``cost`` prints what one op costs on one device
(the rows ``predict`` sums). ``advise`` ranks every t×p layout of N GPUs (no torch needed); ``bench-collectives``
times collectives nccl-tests style; ``calibrate`` writes the ``cpu-local`` preset (microbenchmarks, ``--in-run``) or
the GPU presets' fitted kernels and NCCL model (``--public-gpu``); ``validate-time`` reruns the CPU validation.

Inputs are resolved here, once (model and hardware presets or files → :class:`~llmcomm.spec.ModelSpec`,
:class:`~llmcomm.predict.hardware.Hardware`), and passed inward as objects. Exit status: 0 success; 2 bad input (one
line on stderr, no traceback); 1 a failed run (one line naming the rank, then the tail of its log).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import __version__
from .spec import DTYPE_BYTES, Layout, SpecError, load_model, workload_grid

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        raise SpecError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be at least 0")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a positive, finite number")
    return v


def _add_spec_args(sp: argparse.ArgumentParser) -> None:
    from .derive.patterns import P2P_MODES

    sp.add_argument("--model", required=True, help="preset name or path to an HF config.json")
    sp.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree t")
    sp.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel degree p")
    sp.add_argument("--batch", type=positive_int, nargs="+", default=[1], metavar="B", help="batch size b")
    sp.add_argument("--prompt", type=positive_int, nargs="+", default=[16], metavar="S", help="prompt length S")
    sp.add_argument("--generate", type=positive_int, nargs="+", default=[4], metavar="G", help="generated tokens G")
    sp.add_argument("--dtype", choices=list(DTYPE_BYTES), nargs="+", default=["fp32"],
                    help="several values of --batch/--prompt/--generate/--dtype: the cross product, one result each "
                         "(order: dtype, batch, prompt, generate; --json prints JSON Lines)")
    sp.add_argument("--p2p", choices=list(P2P_MODES), default="partitioned",
                    help="stage-to-stage mode of the DeepSpeed pipeline runner when --pp > 1: 'partitioned' (each TP "
                         "rank sends 1/t of [b, s, h], the next stage all-gathers; the default) or 'full' (every TP "
                         "rank sends the whole tensor); the same with --tp 1")
    sp.add_argument("--json", action="store_true",
                    help="print one JSON object per configuration (one line each)")


def _specs(args):
    """The model, layout and workloads (the cross product of the workload options, :func:`workload_grid`)."""
    model = load_model(args.model)
    layout = Layout(args.tp, args.pp, getattr(args, "ep", 1)).validate(model)
    workloads = [w.validate(model) for w in workload_grid(args.batch, args.prompt, args.generate, args.dtype)]
    return model, layout, workloads


def _header(model, layout, workload) -> dict:
    return {"model": model.name, "tp": layout.t, "pp": layout.p, "batch": workload.b, "prompt": workload.S,
            "generate": workload.G, "dtype": workload.dtype}


_COLUMNS = {"phase": "phase", "op": "op", "group_size": "n", "calls": "calls", "bytes": "bytes (m)",
            "algorithm": "algorithm", "sent_bytes_per_rank": "busiest sends", "link_bytes": "all links",
            "inter_node_bytes": "inter-node"}


def _print_rows(head: dict, rows: list[dict], traffic: dict | None = None, extra_lines=()) -> None:
    print(" ".join(f"{k}={v}" for k, v in head.items()))
    if not rows:
        print("(no communication)")
    else:
        cols = [c for c in _COLUMNS if all(c in r for r in rows)]
        fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:,.1f}" if isinstance(v, float) else str(v)  # noqa
        width = {c: max(len(_COLUMNS[c]), *(len(fmt(r[c])) for r in rows)) for c in cols}
        print("  ".join(_COLUMNS[c].rjust(width[c]) for c in cols))
        for r in rows:
            print("  ".join(fmt(r[c]).rjust(width[c]) for c in cols))
        print(f"total nccl-tests size: {sum(r['bytes'] for r in rows if r['phase'] != 'setup'):,} B (setup apart)")
        if traffic:
            inter = traffic.get("inter_node_bytes")
            print(f"traffic ({traffic['algorithm']} all-reduce): busiest rank {traffic['busiest_rank']} sends "
                  f"{fmt(traffic['sent_bytes_busiest_rank'])} B; all links carry {fmt(traffic['link_bytes'])} B"
                  + (f"; {fmt(inter)} B cross nodes" if inter is not None else ""))
    for line in extra_lines:
        print(line)


def _with_p2p(head: dict, layout, p2p: str) -> dict:
    """The stage-to-stage mode joins the header only where it means something (pipelines)."""
    return dict(head, p2p=p2p) if layout.p > 1 else head


# ---------------------------------------------------------------------------------------------------------- predict
def _moe_lines(summary: dict | None, engine: str) -> list[str]:
    """The MoE lines under predict's rows: what the expert messages rest on."""
    if summary is None:
        return []
    head = f"MoE: E={summary['E']} experts, top-{summary['k']}, {summary['L_moe']} MoE layers; "
    if summary["e"] == 1:
        return [head + {"deepspeed-moe-autotp": "DeepSpeed AutoTP leaves the fused experts whole on every TP rank "
                        "(one all-reduce per MoE layer)",
                        "tp-experts": "every expert sharded t ways (two all-reduces per layer, like dense)"}
                .get(engine, f"engine pattern {engine}")]
    r = summary["routing"]
    lines = [head + f"expert parallelism e={summary['e']}, {r['mode']} routing"
             + (f" (capacity factor {r['capacity_factor']}, min capacity {r['min_capacity']})"
                if r["mode"] == "capacity" else "")]
    for phase, x in summary["phases"].items():
        if "capacity" in x:
            lines.append(f"  {phase}: {x['tokens_per_rank']} tokens per EP rank, capacity C={x['capacity']}")
        else:
            lo, hi = x["capacity_bounds"]
            lines.append(f"  {phase}: {x['tokens_per_rank']} tokens per EP rank, dropless C between {lo} and {hi}; "
                         f"rows use E[C]={x['capacity_expected']:.3f} under uniform routing ({x['method']})")
    return lines


def cmd_predict(args) -> int:
    from .derive.evaluate import rows as predict_rows, traffic_totals
    from .derive.moe import Routing, moe_summary
    from .derive.patterns import engine_for

    model, layout, workloads = _specs(args)
    routing = Routing(args.moe_routing, args.capacity_factor, args.min_capacity)
    # deepspeed + full → the "deepspeed-full" pattern; a mixture of experts → its AutoTP or expert-parallel pattern
    engine = engine_for(args.engine, args.p2p, model, layout.e, routing.mode)
    hw = None
    if args.hardware:
        from .predict.hardware import load_hardware

        hw = load_hardware(args.hardware)
    if args.engine_profile and hw is None:
        raise SpecError("--engine-profile needs --hardware (it changes the latency, not the bytes)")
    for workload in workloads:
        rows = predict_rows(model, layout, workload, engine, args.algorithm, args.gpus_per_node, routing)
        traffic = traffic_totals(model, layout, workload, engine, args.algorithm, args.gpus_per_node, routing)
        head = dict(_header(model, layout, workload), engine=args.engine)
        if args.engine == "deepspeed":
            head = _with_p2p(head, layout, args.p2p)
        if layout.e > 1:
            head = dict(head, ep=layout.e, moe_routing=routing.mode)
        summary = moe_summary(model, layout, workload, routing)
        out = dict(head, ops=rows, traffic=traffic)
        if summary is not None:
            out["moe"] = dict(summary, pattern=engine)
        extra = _moe_lines(summary, engine)
        if hw is not None:
            from .predict.advise import memory_per_rank
            from .predict.latency import predict_latency

            lat = predict_latency(model, layout, workload, hw, gpus_per_node=args.gpus_per_node, engine=engine,
                                  profile=args.engine_profile, routing=routing)
            out["latency"] = lat
            if model.is_moe:
                from .predict.moe_advice import moe_memory_per_rank

                scheme = "ep" if layout.e > 1 else "tp-experts" if engine == "tp-experts" else "autotp"
                need = float(moe_memory_per_rank(model, scheme, layout.t, layout.p, layout.e, workload.b,
                                                 workload.S, workload.G, workload.w)["total"])
            else:
                need = float(memory_per_rank(model, layout.t, layout.p, workload.b, workload.S, workload.G,
                                             workload.w)["total"])
            out["memory"] = {"fits": need <= hw.usable_memory_bytes, "needed_gib_per_rank": need / 2 ** 30,
                             "usable_gib_per_rank": hw.usable_memory_bytes / 2 ** 30}
            extra += [f"TTFT {lat['ttft_s'] * 1e3:.3f} ms  TPOT {lat['tpot_s'] * 1e3:.3f} ms  "
                     f"E2E {lat['e2e_s'] * 1e3:.3f} ms  (hardware {hw.name}, {lat['gpus_per_node']} GPUs per node, "
                     f"engine profile {lat['engine_profile']})"]
            if out["memory"]["fits"] is False:
                print(f"llmcomm: warning: {model.name} t={layout.t} p={layout.p} b={workload.b} S={workload.S} "
                      f"G={workload.G} {workload.dtype} needs {need / 2 ** 30:.1f} GiB per rank; {hw.name} has "
                      f"{hw.usable_memory_bytes / 2 ** 30:.1f} GiB usable: it does not fit (numbers printed anyway)",
                      file=sys.stderr)
        _emit(out, args.json, lambda: _print_rows(head, rows, traffic, extra), len(workloads) > 1)
    return 0


def _emit(obj: dict, as_json: bool, text, several: bool) -> None:
    """One configuration's result: one JSON line, or the text form (``text()``; a blank line after each of
    several)."""
    if as_json:
        print(json.dumps(obj, default=str), flush=True)
    else:
        text()
        if several:
            print(flush=True)


# ---------------------------------------------------------------------------------------------------------- measure
def result_name(model, layout, workload, p2p: str, engine: str = "deepspeed") -> str:
    """File name of one configuration's result under ``measure --out``."""
    import re

    name = re.sub(r"[^A-Za-z0-9.-]+", "-", model.name).strip("-")
    tail = (f"_{p2p}" if layout.p > 1 else "") + ("_tp-experts" if engine == "tp-experts" else "")
    ep = f"_e{layout.e}" if layout.e > 1 else ""
    return f"{name}_t{layout.t}_p{layout.p}{ep}_b{workload.b}_S{workload.S}_G{workload.G}_{workload.dtype}{tail}.json"


def _stored(path, head: dict, backend) -> dict | None:
    """A result ``measure --out`` wrote before for exactly this configuration (``--resume``), else None."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = all(obj.get(k) == v for k, v in head.items()) and \
        (obj.get("provenance") or {}).get("backend_requested") == backend
    return obj if same and "ops" in obj else None


def cmd_measure(args) -> int:
    from pathlib import Path

    from .measure.launch import RunError, measure_many, progress
    from .record import write_json

    from dataclasses import asdict

    from .derive.moe import Routing

    model, layout, workloads = _specs(args)
    backend = None if args.backend == "auto" else args.backend
    options = {"p2p": args.p2p} if layout.p > 1 else None      # the TP runner has no stage-to-stage messages
    routing = Routing(args.moe_routing, args.capacity_factor, args.min_capacity)
    if layout.e > 1:
        options = {"routing": asdict(routing)}
    if args.engine == "tp-experts":                           # every expert sharded t ways after AutoTP
        options = dict(options or {}, experts="sharded")
    if args.resume and not args.out:
        raise SpecError("--resume needs --out (the folder whose finished configurations are skipped)")
    out = Path(args.out) if args.out else None
    heads = [_with_p2p(dict(_header(model, layout, w), engine=args.engine), layout, args.p2p) for w in workloads]
    if layout.e > 1:
        heads = [dict(hd, ep=layout.e, moe_routing=routing.mode) for hd in heads]
    paths = [out / result_name(model, layout, w, args.p2p, args.engine) if out else None for w in workloads]
    ready: dict[int, tuple[dict, object]] = {}
    if args.resume:
        for i, path in enumerate(paths):
            obj = _stored(path, heads[i], backend)
            if obj is not None:
                ready[i] = (obj, None)
    stored, skipped = set(ready), len(ready)
    emitted, finished = 0, []
    bar = progress(len(workloads), "configurations", initial=skipped, enabled=None if sys.stderr.isatty() else False)

    def emit_ready():
        nonlocal emitted
        while emitted in ready:
            obj, res = ready.pop(emitted)
            line = f"TTFT {obj['ttft_s'] * 1e3:.2f} ms  TPOT {obj['tpot_s'] * 1e3:.2f} ms  E2E {obj['e2e_s'] * 1e3:.2f} ms"
            _emit(obj, args.json, lambda: _print_rows(heads[emitted], obj["ops"], obj.get("traffic"), [
                line + (" (this machine; tokens match the reference)" if res is not None else
                        f" (stored: {paths[emitted]})")]), len(workloads) > 1)
            emitted += 1

    def done(i: int, res) -> None:
        obj = dict(heads[i], ops=res.rows, traffic=res.traffic, tokens=res.tokens, ttft_s=res.ttft_s,
                   tpot_s=res.tpot_s, e2e_s=res.e2e_s, provenance=res.provenance)
        if paths[i] is not None:
            write_json(paths[i], obj, indent=1)               # atomic: a file that exists is complete
        ready[i] = (obj, res)
        finished.append(i)
        bar.update(workloads[i].label)
        emit_ready()

    emit_ready()
    try:
        for dtype in dict.fromkeys(w.dtype for w in workloads):          # one launch per dtype
            todo = [i for i, w in enumerate(workloads) if w.dtype == dtype and i not in stored]
            if not todo:
                continue
            measure_many(model, layout, [workloads[i] for i in todo], timeout_s=args.timeout,
                         out_dir=out / f"ranks-{dtype}" if out else None, backend=backend, options=options,
                         hostfile=args.hostfile, on_result=lambda j, res, todo=todo: done(todo[j], res))
    except RunError as e:
        kept = f"; their results are in {out}" if out and finished else ""
        raise RunError(f"{e}\n{len(finished)} of {len(workloads) - skipped} configurations to run finished before "
                       f"the failure"
                       f"{kept}", rank=e.rank, run_dir=e.run_dir, config=e.config) from None
    finally:
        bar.close()
    return 0


# ----------------------------------------------------------------------------------------------------------- advise
def cmd_advise(args) -> int:
    from .predict.advise import advise_report
    from .predict.hardware import load_hardware

    from .derive.moe import Routing

    model, hw = load_model(args.model), load_hardware(args.hardware)
    routing = Routing(args.moe_routing, args.capacity_factor, args.min_capacity)
    rep = advise_report(model, args.gpus, args.gpus_per_node, hw, args.prompt, args.generate, args.batch,
                        args.objective, args.dtype, args.engine, routing)
    if args.json:
        print(json.dumps(rep))
        return 0
    w = rep["workload"]
    moe = model.is_moe
    print(f"model={rep['model']} gpus={rep['gpus']} gpus_per_node={rep['gpus_per_node']} hardware={rep['hardware']} "
          f"b={w['b']} S={w['S']} G={w['G']} dtype={w['dtype']} objective={rep['objective']}"
          + (f" moe_routing={routing.mode}" if moe else ""))
    print(("    scheme " if moe else "") + f"{'rank':>4} {'tp':>4} {'pp':>4} " + ("  ep " if moe else "")
          + f"{'TTFT ms':>10} {'TPOT ms':>10} {'E2E s':>9} {'busiest sends':>15} "
          f"{'inter-node B':>15} {'GiB/GPU':>8} {'fits':>5} {'pareto':>6}")
    for r in rep["layouts"]:
        print((f"{r['scheme']:>10} " if moe else "") + f"{r['rank']:>4} {r['tp']:>4} {r['pp']:>4} " + (f"{r['ep']:>4} " if moe else "")
              + f"{r['ttft_s'] * 1e3:>10.3f} {r['tpot_s'] * 1e3:>10.3f} "
              f"{r['e2e_s']:>9.4f} {r['sent_bytes_busiest_rank']:>15,} {r['inter_node_bytes']:>15,} "
              f"{r['memory_gib']:>8.1f} {'yes' if r['fits'] else 'no':>5} {'*' if r['pareto'] else '':>6}")
    print("pareto: no other fitting layout is both faster and moves fewer inter-node bytes (within 1 %)")
    if moe:
        print("schemes: autotp = DeepSpeed AutoTP as it is (experts whole on every TP rank); tp-experts = every "
              "expert sharded t ways; ep = expert parallelism, data-parallel attention (predictions: uniform "
              "routing, α-β all-to-all)")
        for why in rep["not_candidates"]:
            print(f"not a candidate: {why}")
    return 0


# ------------------------------------------------------------------------------------------------ bench-collectives
def cmd_bench(args) -> int:
    from .measure.bench import parse_size, run_bench, size_grid

    sizes = [parse_size(x) for x in args.sizes] if args.sizes else \
        size_grid(parse_size(args.min_bytes), parse_size(args.max_bytes))
    df = run_bench(ops=args.ops, sizes=sizes, ranks=args.ranks, backends=args.backend, out=args.out,
                   machine=args.machine, dtype=args.dtype, warmup=args.warmup, min_reps=args.min_reps,
                   max_reps=args.max_reps, point_s=args.point_seconds, sample_s=args.sample_seconds,
                   timeout_s=args.timeout, append=args.append, progress=not args.no_progress,
                   command="llmcomm " + shlex.join(args.argv))
    for (be, op, n), grp in df.groupby(["backend", "op", "group_size"]):
        small, big = grp.iloc[0], grp.iloc[-1]
        print(f"{be:5s} {op:11s} n={n}: {small['bytes']:>9,d} B {small['time_s'] * 1e6:9.1f} us   "
              f"{big['bytes']:>9,d} B {big['time_s'] * 1e3:8.2f} ms busbw {big['busbw_GBps']:.2f} GB/s")
    print(f"wrote collectives.csv and collectives.json in {args.out or 'data/' + df['machine'].iloc[0]}")
    return 0


# ------------------------------------------------------------------------------------------------------------ cost
def cmd_cost(args) -> int:
    from .predict.cost import collective_costs, compute_costs
    from .predict.hardware import load_hardware

    if (args.model is None) == (args.collective is None):
        raise SpecError("cost: give either --model (with --tp and --tokens) or --collective (with --ranks and --bytes)")
    hw = load_hardware(args.hardware)
    if args.model is not None:
        if not args.tokens:
            raise SpecError("cost --model needs --tokens N [N ...] (the GEMM M dimension: tokens in one forward)")
        model = load_model(args.model)
        pattern = ("tp-experts" if args.engine == "tp-experts" else "deepspeed-moe-autotp") if model.is_moe else None
        if args.engine == "tp-experts" and not model.is_moe:
            raise SpecError("cost --engine tp-experts shards experts: it needs a mixture of experts")
        rows = compute_costs(model, hw, args.tp, args.tokens, args.context, args.dtype,
                             **({"engine": pattern} if pattern else {}))
        head = {"hardware": hw.name, "model": model.name, "tp": args.tp, "dtype": args.dtype, "context": args.context}
        if pattern:
            head["pattern"] = pattern
        cols = ("op", "tokens", "seconds", "flops", "bytes")
    else:
        if args.ranks is None or not args.bytes:
            raise SpecError("cost --collective needs --ranks n and --bytes S [S ...]")
        from .measure.bench import parse_size

        sizes = [parse_size(x) for x in args.bytes]
        rows = collective_costs(hw, args.collective, args.ranks, sizes, args.gpus_per_node)
        head = {"hardware": hw.name, "collective": args.collective, "ranks": args.ranks,
                "gpus_per_node": rows[0]["gpus_per_node"]}
        cols = ("op", "ranks", "gpus_per_node", "bytes", "seconds", "algbw_GBps", "busbw_GBps")
    if args.json:
        print(json.dumps(dict(head, ops=rows)))
        return 0
    print(" ".join(f"{k}={v}" for k, v in head.items() if v is not None))
    fmt = {"seconds": lambda v: f"{v * 1e6:,.2f} us", "flops": lambda v: f"{v:,.0f}", "bytes": lambda v: f"{v:,.0f}",
           "algbw_GBps": lambda v: f"{v:,.2f}", "busbw_GBps": lambda v: f"{v:,.2f}"}
    cells = [[fmt.get(c, str)(r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(wd) for c, wd in zip(cols, width)))
    for x in cells:
        print("  ".join(v.rjust(wd) for v, wd in zip(x, width)))
    return 0


# ------------------------------------------------------------------------------------------------------- calibrate
def cmd_calibrate_public(args) -> int:
    """Fit the kernel and NCCL models to the public GPU measurements; write the GPU presets and error tables."""
    import pandas as pd

    from .compare.vidur import PRESET_OF, error_summary, fit_all, preset_sections
    from .record import atomic_write_text, data_dir, provenance, repo_root, write_json

    command = "llmcomm " + shlex.join(args.argv)
    params, errors = fit_all(log=lambda msg: print(msg, file=sys.stderr, flush=True))
    prov = provenance(command)
    out = data_dir("validation")
    tables = error_summary(errors)
    # out-of-sample predictions row by row for the book's figures (H100 GEMMs, every collective; the other kernels,
    # 100k rows, are summarised only), beside the summaries
    oos = errors[errors.validation.isin(["lomo", "logo", "extrapolation"])]
    oos = oos[(oos.part == "collective") | ((oos.part == "gemm") & (oos.gpu == "h100"))]
    keep = ["part", "validation", "gpu", "model", "tp", "op", "M", "N", "K", "T", "system", "collective",
            "num_workers", "devices_per_node", "S", "seconds", "predicted_s", "rel_err"]
    tables["out_of_sample"] = oos[[c for c in keep if c in oos]]
    for name, df in tables.items():
        atomic_write_text(out / f"gpu_{name}.csv", df.to_csv(index=False, float_format="%.5g"))
        write_json(out / f"gpu_{name}.json", {"provenance": prov, "source": "data/external/vidur (Vidur, MIT)"},
                   indent=1)
    presets = repo_root() / "src" / "llmcomm" / "presets" / "hardware"
    for preset in PRESET_OF:
        path = presets / f"{preset}.json"
        d = json.loads(path.read_text())
        d.update(preset_sections(params, preset))
        d["kernels"]["provenance"] = d["nccl"]["provenance"] = prov
        write_json(path, d, indent=1)
        print(f"wrote {path.relative_to(repo_root())}")
    with pd.option_context("display.width", 160):
        print(tables["kernels"][tables["kernels"].validation == "lomo"].to_string(index=False))
        print(tables["collectives"][tables["collectives"].validation == "logo"].to_string(index=False))
    print(f"wrote {out.relative_to(repo_root())}/gpu_{{kernels,collectives,out_of_sample}}.csv")
    return 0


def cmd_calibrate_in_run(args) -> int:
    """Calibrate the cpu-local preset inside multi-rank runs of the calibration model (llmcomm.compare.inrun)."""
    from .compare.inrun import IN_RUN_LAYOUTS, calibrate_layout, layout_key
    from .predict.hardware import load_hardware
    from .record import provenance, write_json

    if not args.write:
        raise SpecError("calibrate --in-run needs --write PRESET.json (the cpu-local preset it adds to)")
    from pathlib import Path

    hw = load_hardware(args.write if Path(args.write).exists() else "cpu-local")
    entries = {}
    for t, p in IN_RUN_LAYOUTS:
        print(f"in-run calibration t={t} p={p} ...", file=sys.stderr, flush=True)
        entries[layout_key(t, p)] = e = calibrate_layout(Layout(t, p), hw, reps=args.reps)
        c = e["compute"]
        print(f"t={t} p={p}: compute {c['flops_per_s'] / 1e9:.1f} GFLOP/s, overhead {c['overhead_us']:.0f} us/layer, "
              f"median |err| {c['median_rel_err']:.1%} over {c['points']} points")
        for row in e["calls"]:
            print(f"    {row['op']:10s} n={row['n']}: in-run {row['median_in_run_us']:9.1f} us per call, "
                  f"microbenchmark fit {row['median_fit_us']:9.1f} us ({row['in_run_over_fit']:.2f}x)"
                  + (" -> refitted from the run" if row.get("refit") else f" {row.get('flag', '')}"))
    d = dict(hw.raw)
    d["in_run"] = dict(entries, provenance=provenance("llmcomm " + shlex.join(args.argv)))
    d.setdefault("source", {})["in_run"] = ("llmcomm calibrate --in-run: compute rate, per-layer overhead and "
                                            "all-reduce fits measured inside runs of calib-llama in each validated "
                                            "layout (llmcomm.compare.inrun)")
    write_json(args.write, d, indent=1)
    print(f"wrote {args.write}")
    return 0


def cmd_validate_time(args) -> int:
    """The CPU validation of the time model: ``runs`` reruns of the latency sweep, each point ``reps`` times."""
    import pandas as pd

    from .compare.sweeps import configs
    from .compare.validate import validate_latency
    from .predict.hardware import load_hardware
    from .record import atomic_write_text, data_dir, load_average, provenance, write_json

    hw = load_hardware(args.hardware)
    out = data_dir(root=args.out) if args.out else data_dir()
    summaries = []
    for k in range(1, args.runs + 1):
        load_before = load_average()
        df, summary = validate_latency(configs("latency", "cpu"), hw, reps=args.reps)
        prov = provenance("llmcomm " + shlex.join(args.argv), run=k, reps=args.reps, load_avg_before=load_before,
                          load_avg_after=load_average())
        atomic_write_text(out / f"latency_validation_run{k}.csv", df.to_csv(index=False, float_format="%.6g"))
        write_json(out / f"latency_validation_run{k}.json", {"provenance": prov, "summary": summary}, indent=1)
        summaries.append(dict(run=k, **summary, load_avg=load_before))
        print(f"run {k}: median |error| {summary['median_abs_err']:.1%} (TTFT {summary['median_abs_err_ttft']:.1%}, "
              f"TPOT {summary['median_abs_err_tpot']:.1%}, E2E {summary['median_abs_err_e2e']:.1%}); "
              f"load average {load_before}", flush=True)
    print(pd.DataFrame(summaries).to_string(index=False))
    return 0


def cmd_calibrate(args) -> int:
    if args.public_gpu:
        return cmd_calibrate_public(args)
    if args.in_run:
        return cmd_calibrate_in_run(args)
    import pandas as pd

    from .compare.calibration import calibrate_cpu_local
    from .predict.fit import fit_table

    try:
        table = pd.read_csv(args.csv)
        fits = fit_table(table)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"cannot read a bench-collectives table from {args.csv!r}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if args.json:
        print(fits.to_json(orient="records"))
    else:
        cols = ["backend", "op", "group_size", "algorithm", "alpha_us", "busbw_GBps", "r2", "median_rel_err",
                "n_points"]
        print(fits[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if args.write:
        calibrate_cpu_local(args.csv, args.write, compute=args.compute, threads=args.threads, existing=args.write,
                            command="llmcomm " + shlex.join(args.argv))
        print(f"wrote {args.write}")
    return 0


# ----------------------------------------------------------------------------------------------------------- parser
def _add_moe_args(sp, ep: bool = True) -> None:
    """The mixture-of-experts options ``predict`` and ``measure`` share (``advise`` all but ``--ep``: it enumerates
    e itself)."""
    if ep:
        sp.add_argument("--ep", type=positive_int, default=1,
                        help="expert-parallel degree e of a mixture of experts (DeepSpeed's MoE layer, data-parallel "
                             "attention: each of the e ranks runs b/e sequences; default 1)")
    sp.add_argument("--moe-routing", choices=["capacity", "dropless"], default="capacity",
                    help="with --ep: DeepSpeed's capacity routing (drop_tokens=True, its default) or dropless")
    sp.add_argument("--capacity-factor", type=positive_float, default=1.0,
                    help="capacity factor of capacity routing (DeepSpeed's eval_capacity_factor; default 1.0)")
    sp.add_argument("--min-capacity", type=non_negative_int, default=4,
                    help="minimum capacity per expert of capacity routing (DeepSpeed's min_capacity; default 4)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llmcomm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"llmcomm {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    pr = sub.add_parser("predict", help="closed-form calls and bytes per op and phase")
    _add_spec_args(pr)
    pr.add_argument("--engine", choices=["deepspeed", "vllm", "tp-experts"], default="deepspeed",
                    help="whose messages: deepspeed (AutoTP; a mixture of experts as AutoTP leaves it, experts whole "
                         "on every rank), vllm, or tp-experts (a mixture of experts with every expert sharded t ways)")
    _add_moe_args(pr)
    pr.add_argument("--hardware", help="hardware preset or JSON file: adds TTFT/TPOT/E2E predictions")
    pr.add_argument("--gpus-per-node", type=positive_int, default=None,
                    help="GPUs per node g: ranks placed in order, g per node; adds inter_node_bytes (default: the "
                         "hardware preset's for the latency, no placement for the traffic)")
    pr.add_argument("--engine-profile", default=None,
                    help="host-overhead profile (llmcomm/presets/engines: deepspeed-eager, deepspeed-cpu, vllm-v0, "
                         "vllm-v0-custom-ar, or a JSON file); default: the engine's on this hardware")
    pr.add_argument("--algorithm", choices=["ring", "direct"], default="ring",
                    help="how all-reduces move bytes, for the traffic metrics: ring (default; NCCL's bandwidth "
                         "algorithm) or direct (one-shot: every rank sends its buffer to every other)")
    pr.set_defaults(func=cmd_predict)

    me = sub.add_parser("measure", help="run DeepSpeed ranks and capture every collective")
    _add_spec_args(me)
    _add_moe_args(me)
    me.add_argument("--engine", choices=["deepspeed", "tp-experts"], default="deepspeed",
                    help="deepspeed (AutoTP as it is; a mixture of experts keeps its experts whole on every rank) or "
                         "tp-experts (a mixture of experts with every expert sharded t ways after AutoTP)")
    me.add_argument("--timeout", type=positive_float, default=300.0,
                    help="seconds a launch may go without finishing a configuration before it is killed as hung")
    me.add_argument("--out", help="folder for the results, one JSON file per configuration (written atomically as "
                                  "each finishes), and the ranks' files and logs (ranks-<dtype>/)")
    me.add_argument("--resume", action="store_true",
                    help="with --out: skip the configurations whose results are already there")
    me.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    me.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' lines, slots summing to t*p): run across "
                    "nodes; --out must then be a folder every node shares")
    me.set_defaults(func=cmd_measure)

    co = sub.add_parser("cost", help="what one op costs on one device: a layer's ops, or one collective")
    co.add_argument("--hardware", required=True, help="hardware preset or JSON file")
    co.add_argument("--model", help="preset name or path to an HF config.json (compute costs)")
    co.add_argument("--tp", type=positive_int, default=1, help="TP degree T: shapes as one TP rank holds them")
    co.add_argument("--tokens", type=positive_int, nargs="+", help="tokens in one forward on one rank (GEMM M)")
    co.add_argument("--context", type=int, default=None,
                    help="tokens already cached: adds the attention row (unvalidated roofline)")
    co.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    co.add_argument("--engine", choices=["deepspeed", "tp-experts"], default="deepspeed",
                    help="a mixture of experts: DeepSpeed AutoTP (experts whole on every TP rank) or tp-experts")
    co.add_argument("--collective", choices=["all_reduce", "all_gather", "broadcast", "send_recv", "all_to_all"],
                    help="collective costs (nccl-tests size convention)")
    co.add_argument("--ranks", type=positive_int, help="ranks n of the collective")
    co.add_argument("--gpus-per-node", type=positive_int, default=None,
                    help="ranks placed k per node (default: as many as fit on one node of the hardware)")
    co.add_argument("--bytes", nargs="+", help="sizes (4 64K 1M …)")
    co.add_argument("--json", action="store_true", help="print one JSON object")
    co.set_defaults(func=cmd_cost)

    ad = sub.add_parser("advise", help="rank every t×p layout of N GPUs (a mixture of experts: every t×p and e, "
                                       "three schemes) by predicted latency or bytes")
    ad.add_argument("--model", required=True, help="preset name or path to an HF config.json")
    ad.add_argument("--gpus", type=positive_int, required=True, help="number of GPUs N (layouts with t·p = N)")
    ad.add_argument("--gpus-per-node", type=positive_int, default=None,
                    help="GPUs per node g (default: the hardware preset's)")
    ad.add_argument("--hardware", default="h100-sxm", help="hardware preset or JSON file (default h100-sxm)")
    ad.add_argument("--prompt", type=positive_int, default=1024, help="prompt length S")
    ad.add_argument("--generate", type=positive_int, default=128, help="generated tokens G")
    ad.add_argument("--batch", type=positive_int, default=1, help="batch size b")
    ad.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    ad.add_argument("--objective", choices=["ttft", "tpot", "e2e", "inter_node_bytes", "sent_bytes_busiest_rank",
                                            "link_bytes"], default="e2e",
                    help="rank by a latency or by a traffic metric of the whole generation (default e2e)")
    ad.add_argument("--engine", choices=["deepspeed", "vllm"], default="deepspeed",
                    help="whose pattern and host profile; a mixture of experts: DeepSpeed's MoE patterns under the "
                         "deepspeed (eager) or vllm (CUDA graphs) host profile")
    _add_moe_args(ad, ep=False)
    ad.add_argument("--json", action="store_true", help="print one JSON object")
    ad.set_defaults(func=cmd_advise)

    be = sub.add_parser("bench-collectives", help="microbenchmark all_reduce/all_gather/broadcast/send_recv")
    be.add_argument("--ops", nargs="+", default=["all_reduce", "all_gather", "broadcast", "send_recv"],
                    help="collectives: all_reduce all_gather broadcast send_recv (default: all four)")
    be.add_argument("--sizes", nargs="+", default=None,
                    help="explicit sizes (4 64K 1M …); default: powers of two from --min-bytes to --max-bytes")
    be.add_argument("--min-bytes", default="4", help="smallest size (default 4)")
    be.add_argument("--max-bytes", default="64M", help="largest size (default 64M)")
    be.add_argument("--ranks", nargs="+", type=positive_int, default=[2, 4], help="group sizes n (default: 2 4)")
    be.add_argument("--backend", nargs="+", choices=["shm", "gloo", "nccl"], default=None,
                    help="default: shm gloo on CPU, nccl on CUDA")
    be.add_argument("--out", default=None, help="output folder (default data/<machine>)")
    be.add_argument("--machine", default=None, help="machine label (default: llmcomm.record.machine_id())")
    be.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32")
    be.add_argument("--warmup", type=int, default=3)
    be.add_argument("--min-reps", type=positive_int, default=5)
    be.add_argument("--max-reps", type=positive_int, default=30)
    be.add_argument("--point-seconds", type=positive_float, default=0.2, help="time budget per (op, size) point")
    be.add_argument("--sample-seconds", type=positive_float, default=0.02,
                    help="back-to-back calls per sample last about this long (amortises barrier exit skew)")
    be.add_argument("--timeout", type=positive_float, default=900.0, help="seconds per launch before it is killed")
    be.add_argument("--append", action="store_true", help="merge into an existing CSV (same keys replaced)")
    be.add_argument("--no-progress", action="store_true")
    be.set_defaults(func=cmd_bench)

    ca = sub.add_parser("calibrate", help="α-β fits of a bench-collectives table; --write the cpu-local preset")
    ca.add_argument("--csv", default="data/cpu-local/collectives.csv", help="a bench-collectives collectives.csv")
    ca.add_argument("--write", help="write the cpu-local hardware preset JSON here")
    ca.add_argument("--compute", action="store_true", help="also time compute (matmul, bandwidth, a decoder layer)")
    ca.add_argument("--threads", type=positive_int, nargs="+", default=None,
                    help="torch threads of the compute timing (default: cores // ranks for 2 and 4 ranks)")
    ca.add_argument("--json", action="store_true", help="print the fits as JSON records")
    ca.add_argument("--in-run", action="store_true",
                    help="instead: calibrate compute and all-reduces inside DeepSpeed runs of calib-llama in each "
                         "validated CPU layout (TP2, PP2, 2x2); adds 'in_run' to the --write preset (minutes)")
    ca.add_argument("--reps", type=positive_int, default=5,
                    help="--in-run: repetitions of each calibration workload (medians; default 5)")
    ca.add_argument("--public-gpu", action="store_true",
                    help="instead: fit the GPU kernel and NCCL models to data/external/vidur, write them into the "
                         "h100-sxm and a100-sxm-80gb presets and the out-of-sample errors to data/validation/ "
                         "(minutes)")
    ca.set_defaults(func=cmd_calibrate)

    va = sub.add_parser("validate-time", help="the CPU validation of the time model: reruns of the latency sweep")
    va.add_argument("--hardware", default="cpu-local", help="hardware preset (default cpu-local)")
    va.add_argument("--runs", type=positive_int, default=3, help="independent reruns of the whole sweep (default 3)")
    va.add_argument("--reps", type=positive_int, default=5, help="repetitions of each point (median, IQR; default 5)")
    va.add_argument("--out", default=None, help="data root (default data/); files go to <root>/<machine>/")
    va.set_defaults(func=cmd_validate_time)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a failed run, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .measure.launch import RunError

    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except SystemExit as e:                      # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except SpecError as e:
        print(f"llmcomm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"llmcomm: run failed: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:                      # the reader went away (`llmcomm … | head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
