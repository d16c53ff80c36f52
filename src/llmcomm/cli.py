"""The ``llmcomm`` command: every subcommand, and (with its argparse types, :mod:`llmcomm.argtypes`) the only module that
parses a user's arguments. It parses, calls the
library (each ``cmd_*`` names the function it calls) and renders: ``--json`` the library's dict (JSON Lines for several
configurations), else :mod:`llmcomm.report.text` of the same dict. Inputs are resolved here once; what a command will
write is checked before anything runs. Exit status: 0 success; 2 bad input (one line on stderr); 1 a failed run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from functools import lru_cache

from . import __version__
from .argtypes import Parser as _Parser, non_negative_int, positive_float, positive_int, repetitions
from .deployment import ENGINE_FLAGS, P2P_MODES, ROUTING_MODES, Deployment, Routing
from .spec import DTYPE_BYTES, KV_DTYPE_BYTES, Disaggregation, Layout, SpecError, load_model, workload_grid

__all__ = ["main", "build_parser"]


def _deployment(args) -> Deployment:
    routing = Routing(getattr(args, "moe_routing", None) or "capacity", getattr(args, "capacity_factor", 1.0),
                      getattr(args, "min_capacity", 4))
    return Deployment.from_flags(getattr(args, "engine", "deepspeed"), p2p=getattr(args, "p2p", "partitioned"),
                                 routing=routing, profile=getattr(args, "host_profile", None))


def _specs(args, layout: Layout | None = None):
    """The model, layout, workloads (the cross product of the workload options) and deployment of a command."""
    model = load_model(args.model)
    layout = (layout or Layout(args.tp, args.pp, getattr(args, "ep", 1))).validate(model)
    workloads = [w.validate(model) for w in workload_grid(args.batch, args.prompt, args.generate, args.dtype)]
    return model, layout, workloads, _deployment(args).resolve(model, layout)


def _emit(obj: dict, as_json: bool, text: str, several: bool) -> None:
    """One result: one JSON line, or its text (a blank line after each of several)."""
    print(json.dumps(obj, default=str) if as_json else text + ("\n" if several else ""), flush=True)


def _hardware(name):
    from .predict.hardware import load_hardware

    return load_hardware(name) if name else None


def _disaggregated(args, dis: Disaggregation) -> int:
    """``predict``/``measure --disaggregate``: the prefill side, the KV hand-off (phase kv_transfer), the decode side."""
    from .report.text import render_rows
    model, _, workloads, _ = _specs(args, Layout())                # the sides' layouts are checked by the library
    if args.func is cmd_predict:
        from .predict.report import disaggregated_report as report
        objs = report(model, dis, workloads, _hardware(args.hardware), args.gpus_per_node, args.algorithm)
    else:
        from .measure.disaggregate import measure_report as report
        objs = report(model, dis, workloads, args.out, args.backend, args.timeout, args.startup_timeout)
    for obj in objs:
        _emit(obj, args.json, render_rows(obj), len(workloads) > 1)
    return 0


def cmd_predict(args) -> int:
    from .predict.report import predict_report
    from .report.text import render_memory_warning, render_rows

    model, layout, workloads, deployment = _specs(args)
    for obj in predict_report(model, layout, workloads, deployment, _hardware(args.hardware), args.gpus_per_node,
                              args.algorithm):
        if render_memory_warning(obj):
            print(render_memory_warning(obj), file=sys.stderr)
        _emit(obj, args.json, render_rows(obj), len(workloads) > 1)
    return 0


def cmd_measure(args) -> int:
    from .measure.launch import measure_sweep
    from .report.text import render_rows

    model, layout, workloads, deployment = _specs(args)
    measure_sweep(model, layout, workloads, deployment, out=args.out, resume=args.resume,
                  backend=None if args.backend == "auto" else args.backend, hostfile=args.hostfile,
                  progress_timeout_s=args.timeout, startup_timeout_s=args.startup_timeout,
                  emit=lambda obj, stored: _emit(obj, args.json, render_rows(obj, stored), len(workloads) > 1))
    return 0


def cmd_advise(args) -> int:
    from .predict.advise import advise_report
    from .predict.disagg_advice import disaggregated_advice_report
    from .report.text import render_advice, render_disaggregated_advice

    model = load_model(args.model)
    if args.split:                                   # advise --disaggregate: splits beside co-located deployments
        rep = disaggregated_advice_report(model, args.gpus, args.gpus_per_node, _hardware(args.hardware), args.prompt,
                                          args.generate, args.batch, args.objective, args.dtype)
    else:
        rep = advise_report(model, args.gpus, args.gpus_per_node, _hardware(args.hardware), args.prompt,
                            args.generate, args.batch, args.objective, args.dtype, _deployment(args),
                            args.moe_routing is not None)
    _emit(rep, args.json, (render_disaggregated_advice if args.split else render_advice)(rep), False)
    return 0


def cmd_cost(args) -> int:
    from .measure.bench import parse_size
    from .predict.cost import cost_report
    from .report.text import render_cost

    experts = "tp-experts" if args.engine == "tp-experts" else None
    rep = cost_report(_hardware(args.hardware), model=load_model(args.model) if args.model else None, t=args.tp,
                      tokens=args.tokens, context=args.context, dtype=args.dtype, experts=experts,
                      collective=args.collective, ranks=args.ranks,
                      sizes=[parse_size(x) for x in args.bytes] if args.bytes else None,
                      gpus_per_node=args.gpus_per_node, path=args.path)
    _emit(rep, args.json, render_cost(rep), False)
    return 0


def cmd_bench(args) -> int:
    from .measure.bench import parse_size, run_bench, size_grid
    from .report.text import render_bench

    sizes = [parse_size(x) for x in args.sizes] if args.sizes else \
        size_grid(parse_size(args.min_bytes), parse_size(args.max_bytes))
    df, out = run_bench(ops=args.ops, sizes=sizes, ranks=args.ranks, backends=args.backend, out=args.out,
                        machine=args.machine, dtype=args.dtype, warmup=args.warmup, min_reps=args.min_reps,
                        max_reps=args.max_reps, point_s=args.point_seconds, sample_s=args.sample_seconds,
                        timeout_s=args.timeout, append=args.append, progress=not args.no_progress,
                        command=args.command)
    print(render_bench(df, out))
    return 0


def cmd_calibrate(args) -> int:
    from .compare import calibration
    from .report.text import render_fits, render_gpu_fits, render_in_run

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    write = calibration.write_target(args.write, required=args.in_run and not args.public_gpu)
    if args.public_gpu:
        print(render_gpu_fits(calibration.calibrate_public_gpu(args.command, log)))
    elif args.in_run:
        print(render_in_run(calibration.calibrate_in_run(args.reps, args.command, write, log)))
    else:
        _, fits = calibration.read_bench_table(args.csv)
        print(fits.to_json(orient="records") if args.json else render_fits(fits))
        if args.write is not None:
            calibration.calibrate_cpu_local(args.csv, write, args.compute, args.threads, args.command)
            print(f"wrote the cpu-local calibration ({write or 'data/calibration/cpu-local.json'})")
    return 0


def cmd_validate_time(args) -> int:
    from .compare.validate import validate_time_runs
    from .report.text import render_validation

    validate_time_runs(_hardware(args.hardware), args.runs, args.reps, args.out, args.command,
                       lambda s: print(render_validation([s]), flush=True), not args.reuse_calibration)
    return 0


# ----------------------------------------------------------------------------------------------------------- parser
def _add_spec_args(sp: argparse.ArgumentParser) -> None:
    """What predict and measure share: model, layout, the workload lists, the stage-to-stage mode, --json."""
    add = sp.add_argument
    add("--model", required=True, help="preset name or path to an HF config.json")
    add("--tp", type=positive_int, default=1, help="tensor-parallel degree t")
    add("--pp", type=positive_int, default=1, help="pipeline-parallel degree p")
    add("--batch", type=positive_int, nargs="+", default=[1], metavar="b", help="batch size b")
    add("--prompt", type=positive_int, nargs="+", default=[16], metavar="S", help="prompt length S")
    add("--generate", type=positive_int, nargs="+", default=[4], metavar="G", help="generated tokens G")
    add("--dtype", choices=list(DTYPE_BYTES), nargs="+", default=["fp32"],
        help="several values of --batch/--prompt/--generate/--dtype: their cross product, one result each (JSON Lines)")
    add("--p2p", choices=list(P2P_MODES), default="partitioned",
        help="stage-to-stage mode of the DeepSpeed pipeline runner when --pp > 1: "
             + "; ".join(f"{k}: {v}" for k, v in P2P_MODES.items()))
    add("--json", action="store_true", help="print one JSON object per configuration (one line each)")
    add("--disaggregate", action="store_true", help="prefill and decode on different ranks, the KV cache handed over")
    for flag in ("--prefill-tp", "--prefill-pp", "--decode-tp", "--decode-pp"):
        add(flag, type=positive_int, default=None, help="with --disaggregate: a side's TP or PP degree (default 1)")
    add("--kv-dtype", choices=list(KV_DTYPE_BYTES), default=None, help="with --disaggregate: the KV cache's dtype")
    add("--gpus", dest="gpus_given", type=positive_int, help="with --disaggregate: GPUs given (N_P + N_D must fit)")


def _add_moe_args(sp, ep: bool = True) -> None:
    """The mixture-of-experts options (``advise`` all but ``--ep``: it enumerates e itself)."""
    if ep:
        sp.add_argument("--ep", type=positive_int, default=1,
                        help="expert-parallel degree e (DeepSpeed's MoE layer; each of the e ranks runs b/e sequences)")
    sp.add_argument("--moe-routing", choices=list(ROUTING_MODES), default="capacity",
                    help="routing of expert parallelism: DeepSpeed's capacity routing (its default) or dropless "
                         "(advise: unset = rank only lossless layouts)")
    sp.add_argument("--capacity-factor", type=positive_float, default=1.0, help="capacity factor γ (default 1.0)")
    sp.add_argument("--min-capacity", type=non_negative_int, default=4, help="minimum capacity C_min (default 4)")


_ENGINE_HELP = "deepspeed (AutoTP as it is: a mixture of experts keeps its experts whole on every rank), " \
               "tp-experts (every expert sharded t ways)"


@lru_cache(maxsize=1)                            # one per process: building it is most of a bad input's 10 ms
def build_parser() -> argparse.ArgumentParser:
    from .derive.conventions import COLLECTIVES, TRAFFIC_ALGORITHMS

    ap = _Parser(prog="llmcomm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"llmcomm {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    pr = sub.add_parser("predict", help="closed-form calls and bytes per op and phase")
    _add_spec_args(pr)
    pr.add_argument("--engine", choices=list(ENGINE_FLAGS), default="deepspeed", help=_ENGINE_HELP + ", or vllm")
    _add_moe_args(pr)
    pr.add_argument("--hardware", help="hardware preset or JSON file: adds TTFT/TPOT/E2E and the memory check")
    pr.add_argument("--gpus-per-node", type=positive_int, default=None,
                    help="GPUs per node g, ranks in order: adds inter_node_bytes (latency default: the preset's)")
    pr.add_argument("--host-profile", default=None,
                    help="host profile (presets/profiles or a JSON file; default: the framework's on the hardware)")
    pr.add_argument("--algorithm", choices=list(TRAFFIC_ALGORITHMS), default="ring",
                    help="how all-reduces move bytes, for the traffic fields: ring (NCCL), direct (one-shot) or shm "
                         "(DeepSpeed's CPU all-reduce: one-shot below 1 MiB, two-phase above)")
    pr.set_defaults(func=cmd_predict)

    me = sub.add_parser("measure", help="run DeepSpeed ranks and capture every collective")
    _add_spec_args(me)
    _add_moe_args(me)
    me.add_argument("--engine", choices=["deepspeed", "tp-experts"], default="deepspeed", help=_ENGINE_HELP)
    me.add_argument("--timeout", type=positive_float, default=300.0,
                    help="seconds the ranks may go without progress once started before they are stopped as hung")
    me.add_argument("--startup-timeout", type=positive_float, default=600.0,
                    help="seconds until every rank has started (imports, JIT op load, model setup)")
    me.add_argument("--out", help="folder for the results (one JSON file per configuration, written as each "
                                  "finishes) and the ranks' files (ranks-<dtype>/)")
    me.add_argument("--resume", action="store_true", help="with --out: skip the configurations already there")
    me.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    me.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N', slots summing to t*p): run across nodes "
                                       "(--out on a folder every node shares)")
    me.set_defaults(func=cmd_measure)

    co = sub.add_parser("cost", help="what one op costs on one device: a layer's ops, or one collective")
    co.add_argument("--hardware", required=True, help="hardware preset or JSON file")
    co.add_argument("--model", help="preset name or path to an HF config.json (compute costs)")
    co.add_argument("--tp", type=positive_int, default=1, help="TP degree t: shapes as one TP rank holds them")
    co.add_argument("--tokens", type=positive_int, nargs="+", help="tokens in one forward on one rank (GEMM rows)")
    co.add_argument("--context", type=non_negative_int, default=None, help="tokens cached: adds the attention row")
    co.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    co.add_argument("--engine", choices=["deepspeed", "tp-experts"], default="deepspeed", help=_ENGINE_HELP)
    co.add_argument("--collective", choices=[n for n, c in COLLECTIVES.items() if c.timed],
                    help="collective costs (nccl-tests size convention)")
    co.add_argument("--ranks", type=positive_int, help="ranks n of the collective")
    co.add_argument("--gpus-per-node", type=positive_int, default=None, help="ranks placed g per node")
    co.add_argument("--bytes", nargs="+", metavar="m", help="message sizes m (4 64K 1M …)")
    co.add_argument("--path", default="nccl-eager", help="code path: nccl-eager, nccl-graph, vllm-custom-graph[:ver] …")
    co.add_argument("--json", action="store_true", help="print one JSON object")
    co.set_defaults(func=cmd_cost)

    ad = sub.add_parser("advise", help="rank every layout of N GPUs by predicted latency or bytes")
    ad.add_argument("--model", required=True, help="preset name or path to an HF config.json")
    ad.add_argument("--gpus", type=positive_int, required=True, help="number of GPUs N")
    ad.add_argument("--gpus-per-node", type=positive_int, default=None, help="GPUs per node g (default: the preset's)")
    ad.add_argument("--hardware", default="h100-sxm", help="hardware preset or JSON file (default h100-sxm)")
    ad.add_argument("--prompt", type=positive_int, default=1024, help="prompt length S")
    ad.add_argument("--generate", type=positive_int, default=128, help="generated tokens G")
    ad.add_argument("--batch", type=positive_int, default=1, help="batch size b")
    ad.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    ad.add_argument("--objective", default="e2e", choices=["ttft", "tpot", "e2e", "inter_node_bytes",
                                                           "sent_bytes_busiest_rank", "link_bytes"],
                    help="rank by a latency or by a traffic metric of the whole generation")
    ad.add_argument("--engine", choices=["deepspeed", "vllm"], default="deepspeed", help="whose host profile")
    ad.add_argument("--disaggregate", dest="split", action="store_true", help="splits beside co-located deployments")
    _add_moe_args(ad, ep=False)
    ad.add_argument("--json", action="store_true", help="print one JSON object")
    ad.set_defaults(func=cmd_advise, moe_routing=None)                  # None: only lossless layouts are ranked

    be = sub.add_parser("bench-collectives", help="microbenchmark collectives, nccl-tests style")
    benched = [n for n, c in COLLECTIVES.items() if c.benched]
    be.add_argument("--ops", nargs="+", default=benched, help=f"collectives (default: {' '.join(benched)})")
    be.add_argument("--sizes", nargs="+", default=None, help="sizes m (4 64K 1M …); default --min-bytes..--max-bytes")
    be.add_argument("--min-bytes", default="4", help="smallest size (default 4)")
    be.add_argument("--max-bytes", default="64M", help="largest size (default 64M)")
    be.add_argument("--ranks", nargs="+", type=positive_int, default=[2, 4], help="group sizes n (default: 2 4)")
    be.add_argument("--backend", nargs="+", choices=["shm", "gloo", "nccl"], default=None,
                    help="default: shm gloo on CPU, nccl on CUDA")
    be.add_argument("--out", default=None, help="output folder (default data/<machine>)")
    be.add_argument("--machine", default=None, help="machine label (default: llmcomm.record.machine_id())")
    be.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32")
    be.add_argument("--warmup", type=non_negative_int, default=3)
    be.add_argument("--min-reps", type=repetitions, default=5)
    be.add_argument("--max-reps", type=repetitions, default=30)
    be.add_argument("--point-seconds", type=positive_float, default=0.2, help="time budget per (op, size) point")
    be.add_argument("--sample-seconds", type=positive_float, default=0.02, help="back-to-back calls per sample")
    be.add_argument("--timeout", type=positive_float, default=900.0, help="seconds without a finished point")
    be.add_argument("--append", action="store_true", help="merge into an existing CSV (same keys replaced)")
    be.add_argument("--no-progress", action="store_true")
    be.set_defaults(func=cmd_bench)

    ca = sub.add_parser("calibrate", help="α-β fits of a bench-collectives table; the cpu-local calibration")
    ca.add_argument("--csv", default="data/cpu-local/collectives.csv", help="a bench-collectives collectives.csv")
    ca.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                    help="write the cpu-local calibration (data/calibration/cpu-local.json, or PATH)")
    ca.add_argument("--compute", action="store_true", help="also time compute (matmul, bandwidth, a decoder layer)")
    ca.add_argument("--threads", type=positive_int, nargs="+", default=None,
                    help="threads of the compute timing (default: cores // ranks for 2 and 4 ranks)")
    ca.add_argument("--json", action="store_true", help="print the fits as JSON records")
    ca.add_argument("--in-run", action="store_true",
                    help="instead: compute and all-reduces inside runs of calib-llama (TP2, PP2, 2x2; minutes)")
    ca.add_argument("--reps", type=repetitions, default=5, help="--in-run: repetitions of each workload")
    ca.add_argument("--public-gpu", action="store_true",
                    help="instead: fit the GPU kernel and NCCL models to data/external/vidur (minutes)")
    ca.set_defaults(func=cmd_calibrate)

    va = sub.add_parser("validate-time", help="the CPU validation of the time model: reruns of the latency sweep")
    va.add_argument("--hardware", default="cpu-local", help="hardware preset (default cpu-local)")
    va.add_argument("--runs", type=repetitions, default=3, help="independent reruns of the whole sweep")
    va.add_argument("--reps", type=repetitions, default=5, help="repetitions of each point (median, IQR)")
    va.add_argument("--out", default=None, help="data root (default data/); files go to <root>/<machine>/")
    va.add_argument("--reuse-calibration", action="store_true", help="keep --hardware as is (default: calibrate first)")
    va.set_defaults(func=cmd_validate_time)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a failed run, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .measure.supervise import RunError

    try:
        args = build_parser().parse_args(argv)
        args.command = "llmcomm " + shlex.join(argv)
        dis = Disaggregation.from_flags(vars(args))               # None unless --disaggregate
        return args.func(args) if dis is None else _disaggregated(args, dis)
    except SystemExit as e:                      # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except SpecError as e:
        print(f"llmcomm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"llmcomm: run failed: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:                      # the reader went away (`llmcomm … | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
