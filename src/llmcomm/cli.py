"""The ``llmcomm`` command.

``llmcomm predict`` evaluates the closed forms; ``llmcomm measure`` runs DeepSpeed ranks and captures every collective.
Both print the same rows (``--json``: one JSON object with a list ``"ops"`` of
``{"phase", "op", "group_size", "calls", "bytes"}``). Bad input: one line on stderr, exit status 2, no traceback; a
failed run (dead or hung rank): one line, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from .spec import DTYPE_BYTES, Layout, SpecError, Workload, load_model


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


def _add_spec_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", required=True, help="preset name or path to an HF config.json")
    sp.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree t")
    sp.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel degree p")
    sp.add_argument("--batch", type=positive_int, default=1, help="batch size b")
    sp.add_argument("--prompt", type=positive_int, default=16, help="prompt length S")
    sp.add_argument("--generate", type=positive_int, default=4, help="generated tokens G")
    sp.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32")
    sp.add_argument("--p2p", choices=["partitioned", "full"], default="partitioned",
                    help="stage-to-stage mode of the DeepSpeed pipeline runner when --pp > 1: 'partitioned' (each TP "
                         "rank sends 1/t of [b, s, h], the next stage all-gathers; the default) or 'full' (every TP "
                         "rank sends the whole tensor); the same with --tp 1")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def _specs(args):
    model = load_model(args.model)
    layout = Layout(args.tp, args.pp).validate(model)
    workload = Workload(args.batch, args.prompt, args.generate, args.dtype).validate(model)
    return model, layout, workload


def _header(model, layout, workload) -> dict:
    return {"model": model.name, "tp": layout.t, "pp": layout.p, "batch": workload.b, "prompt": workload.S,
            "generate": workload.G, "dtype": workload.dtype}


def _print_rows(head: dict, rows: list[dict], extra_lines=()) -> None:
    print(" ".join(f"{k}={v}" for k, v in head.items()))
    if not rows:
        print("(no communication)")
    else:
        cols = ["phase", "op", "group_size", "calls", "bytes"]
        width = {c: max(len(c), *(len(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])) for r in rows)) for c in cols}
        fmt = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
        print("  ".join(c.rjust(width[c]) for c in cols))
        for r in rows:
            print("  ".join(fmt(r[c]).rjust(width[c]) for c in cols))
        print(f"total bytes: {sum(r['bytes'] for r in rows if r['phase'] != 'setup'):,} (setup apart)")
    for line in extra_lines:
        print(line)


def _with_p2p(head: dict, layout, p2p: str) -> dict:
    """The stage-to-stage mode joins the header only where it means something (pipelines)."""
    return dict(head, p2p=p2p) if layout.p > 1 else head


def cmd_predict(args) -> int:
    from .volumes import engine_for, predict_rows

    model, layout, workload = _specs(args)
    engine = engine_for(args.engine, args.p2p)          # deepspeed + full → the "deepspeed-full" pattern
    rows = predict_rows(model, layout, workload, engine=engine)
    head = dict(_header(model, layout, workload), engine=args.engine)
    if args.engine == "deepspeed":
        head = _with_p2p(head, layout, args.p2p)
    out = dict(head, ops=rows)
    extra = []
    if args.hardware:
        from .timing import predict_latency

        lat = predict_latency(model, layout, workload, args.hardware, gpus_per_node=args.gpus_per_node,
                              engine=engine)
        out["latency"] = lat
        extra = [f"TTFT {lat['ttft_s'] * 1e3:.3f} ms  TPOT {lat['tpot_s'] * 1e3:.3f} ms  E2E {lat['e2e_s'] * 1e3:.3f} ms"
                 f"  (hardware {args.hardware})"]
    if args.json:
        print(json.dumps(out))
    else:
        _print_rows(head, rows, extra)
    return 0


def cmd_measure(args) -> int:
    from .launch import measure

    model, layout, workload = _specs(args)
    backend = None if args.backend == "auto" else args.backend
    options = {"p2p": args.p2p} if layout.p > 1 else None      # the TP runner has no stage-to-stage messages
    res = measure(model, layout, workload, timeout_s=args.timeout, out_dir=args.out, backend=backend, options=options,
                  hostfile=args.hostfile)
    head = _with_p2p(dict(_header(model, layout, workload), engine="deepspeed"), layout, args.p2p)
    if args.json:
        print(json.dumps(dict(head, ops=res.rows, tokens=res.tokens, ttft_s=res.ttft_s, tpot_s=res.tpot_s,
                              e2e_s=res.e2e_s, provenance=res.provenance)))
    else:
        _print_rows(head, res.rows, [f"TTFT {res.ttft_s * 1e3:.2f} ms  TPOT {res.tpot_s * 1e3:.2f} ms  "
                                     f"E2E {res.e2e_s * 1e3:.2f} ms (this machine; tokens match the reference)"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llmcomm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    pr = sub.add_parser("predict", help="closed-form calls and bytes per op and phase")
    _add_spec_args(pr)
    pr.add_argument("--engine", choices=["deepspeed", "vllm"], default="deepspeed")
    pr.add_argument("--hardware", help="hardware preset: adds TTFT/TPOT/E2E predictions")
    pr.add_argument("--gpus-per-node", type=positive_int, default=8)
    pr.set_defaults(func=cmd_predict)

    me = sub.add_parser("measure", help="run DeepSpeed ranks and capture every collective")
    _add_spec_args(me)
    me.add_argument("--timeout", type=float, default=300.0, help="seconds before a hung run is killed")
    me.add_argument("--out", help="folder for per-rank results (kept)")
    me.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    me.add_argument("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' lines, slots summing to t*p): run across "
                    "nodes; --out must then be a folder every node shares")
    me.set_defaults(func=cmd_measure)

    _more_commands(sub)
    return ap


def _more_commands(sub) -> None:
    """Subcommands defined beside their logic: ``bench-collectives`` (llmcomm.bench), ``advise`` (llmcomm.advise)."""
    from . import advise, bench

    bench.register(sub)
    advise.register(sub)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SpecError as e:
        print(f"llmcomm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed run: one line, not a traceback
        from .launch import RunError

        if isinstance(e, RunError):
            print(f"llmcomm: run failed: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
