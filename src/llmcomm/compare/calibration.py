"""Calibrations: the fitted numbers of the hardware presets, written from measurements into ``data/calibration/``.

A calibration is a result, so it lives with the data, never in the package: ``data/calibration/<preset>.json`` =
``{"provenance", "preset", "overlay": {key: value}}``, which :func:`llmcomm.predict.hardware.load_hardware` lays over
the packaged preset (:func:`write_calibration` merges new sections into it, atomically). The writers:

* :func:`calibrate_cpu_local` — ``llmcomm calibrate`` (``make data``): this machine's collectives and compute;
* :func:`calibrate_in_run` — ``llmcomm calibrate --in-run``: compute and all-reduces inside runs of each validated
  layout (:mod:`llmcomm.compare.inrun`);
* :func:`calibrate_public_gpu` — ``llmcomm calibrate --public-gpu`` (``make gpu-fits``): the GPU kernel and NCCL
  models fitted to the public Vidur and aiconfigurator measurements (:mod:`llmcomm.compare.vidur`,
  :mod:`llmcomm.compare.nccl_data`), and their out-of-sample errors into ``data/validation/``; and the
  ``h800-roce`` preset's KV hand-off fitted to the Mooncake points (:func:`llmcomm.compare.handoff.calibrate_handoff`).

Collectives: the α-β fits (:mod:`llmcomm.predict.fit`) of a ``llmcomm bench-collectives`` table — all_reduce from
DeepSpeed's shm kernel (``shm``: its one-shot path below 1 MiB and its two-phase path above, each fitted on its own
side), the other ops and the all-reduces of sub-groups from gloo (ring form).
Compute: :func:`llmcomm.measure.calibrate.time_compute` at every thread count the measured runs use, then the roofline
efficiency ``e_f`` and per-layer overhead ``o`` fitted so that :func:`llmcomm.predict.compute.layer_cost` reproduces
the measured prefill and decode layer times: ``τ = o + max(flops/(peak·e_f), bytes/bw)``.

"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..measure.calibrate import time_compute, time_cpu_kernels
from ..predict.compute import layer_cost
from ..predict.fit import fit_table
from ..predict.hardware import calibration_path
from ..record import provenance, write_json
from ..spec import ModelSpec, SpecError, cpu_threads_per_rank, read_json_file
from .cpu_calibration import fit_cpu_kernels

__all__ = ["calibrate_cpu_local", "calibrate_in_run", "calibrate_machine", "calibrate_public_gpu", "write_calibration",
           "write_target", "fit_roofline",
           "default_threads", "subgroup_fits", "read_bench_table"]


def write_calibration(preset: str, overlay: dict, command: str, path: str | Path | None = None) -> Path:
    """Merge ``overlay`` into the calibration file of ``preset`` (default :func:`~llmcomm.predict.hardware.
    calibration_path`; ``path`` to write elsewhere): its keys replace the file's, ``source`` is merged; the file's
    provenance becomes this write's (each section keeps the provenance it carries). Checked before anything runs:
    :func:`write_target`."""
    path = Path(path) if path is not None else calibration_path(preset)
    old = read_json_file(path, "calibration") if path.exists() else {"overlay": {}}
    merged = dict(old.get("overlay") or {})
    merged.update({key: v for key, v in overlay.items() if key != "source"})
    merged["source"] = dict(merged.get("source", {}), **overlay.get("source", {}))
    return write_json(path, {"provenance": provenance(command), "preset": preset, "overlay": merged}, indent=1)


def write_target(write: str | None, required: bool = False) -> str | None:
    """The calibration file a ``--write [PATH]`` names (None: not given; ``""``, a bare ``--write``: the default
    file, returned as None), its folder checked writable before anything runs (one :class:`SpecError`, as when
    ``required`` and it was not given)."""
    from ..record import writable_dir

    if write is None and required:
        raise SpecError("calibrate --in-run writes the calibration's in_run section: give --write [PATH]")
    if write:
        writable_dir(os.path.dirname(write) or ".", "--write folder")
    return write or None


def read_bench_table(csv_path):
    """(table, fits) of a ``bench-collectives`` CSV; one :class:`SpecError` when it is not one."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path)
        return table, fit_table(table)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"cannot read a bench-collectives table from {str(csv_path)!r}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _entry(r, backend: str) -> dict:
    return {"alpha_us": round(r["alpha_us"], 3), "busbw_GBps": round(r["busbw_GBps"], 4),
            "algorithm": r["algorithm"], "backend": backend, "r2": round(r["r2"], 4),
            "median_rel_err": round(r["median_rel_err"], 4)}


def _entries(rows, backend: str) -> dict:
    """``{n: FIT}`` of one (backend, op) of a fit table; DeepSpeed's shm all-reduce: the one-shot path's α and
    busbw, its two-phase path's under ``two_phase`` (:func:`llmcomm.predict.collectives.shm_time`)."""
    out = {}
    for n, grp in rows.groupby("group_size"):
        paths = {r["path"]: r for _, r in grp.iterrows()}
        if "one-shot" in paths or "two-phase" in paths:
            one = paths.get("one-shot", paths.get("two-phase"))
            two = paths.get("two-phase", one)
            out[n] = dict(_entry(one, backend), algorithm="shm",
                          two_phase={x: round(float(two[x]), 4) for x in ("alpha_us", "busbw_GBps", "r2",
                                                                          "median_rel_err")})
        else:
            out[n] = _entry(next(iter(paths.values())), backend)
    return out


def default_threads(cores: int | None = None, ranks=(2, 4)) -> list[int]:
    """Thread counts the CPU runs use (:func:`llmcomm.spec.cpu_threads_per_rank`) for 2- and 4-rank runs."""
    return sorted({cpu_threads_per_rank(r, cores) for r in ranks})


def subgroup_fits(coll: dict, fits) -> dict:
    """The fits a TP sub-group of a hybrid uses on CPU: DeepSpeed's shm all-reduce ignores sub-groups, so there the
    all-reduce goes through gloo (ring form). ``{op: {n: FIT}}``; empty when the table has no gloo all_reduce."""
    sub = fits[(fits["op"] == "all_reduce") & (fits["backend"] == "gloo")]
    if sub.empty or coll.get("all_reduce", {}).get("any", coll.get("all_reduce", {}).get("2", {})).get(
            "backend") != "shm":
        return {}
    return {"all_reduce": _entries(sub, "gloo")}


def fit_roofline(timed: dict) -> tuple[float, float]:
    """(e_f, o): the flops efficiency and per-layer overhead with which the roofline reproduces both measured layer
    times of :func:`~llmcomm.measure.calibrate.time_compute` (a fixed point of the two equations)."""
    shape = timed["shape"]
    S, h, heads = shape["S"], shape["h"], shape["heads"]
    spec = ModelSpec(name="calibration", h=h, L=1, heads=heads, kv_heads=shape["kv_heads"], ffn=shape["ffn"], V=256,
                     tied=False, head_dim=h // heads)
    peak, bw = timed["peak_flops_fp32"], timed["mem_bw_Bps"]
    flops_pre, _ = (float(x) for x in layer_cost(spec, 1, 1, S, 0, (S + 1) / 2, 4))
    flops_dec, bytes_dec = (float(x) for x in layer_cost(spec, 1, 1, 1, S + 3, S + 4, 4))
    e_f, overhead = 1.0, 0.0
    for _ in range(50):
        overhead = max(0.0, timed["layer_decode_s"] - max(flops_dec / (peak * e_f), bytes_dec / bw))
        e_f = min(1.5, max(1e-3, flops_pre / (peak * max(timed["layer_prefill_s"] - overhead, 1e-9))))
    return e_f, overhead


def calibrate_cpu_local(csv_path, out_path=None, compute: bool = True, threads=None,
                        command: str | None = None) -> dict:
    """The ``cpu-local`` calibration from a bench-collectives CSV and, with ``compute``, from
    :func:`~llmcomm.measure.calibrate.time_compute` at every thread count in ``threads`` (default
    :func:`default_threads`), kept in ``compute_by_threads``; the top-level compute numbers are those of the first
    count (without ``compute`` the file's earlier compute numbers stay). Written with :func:`write_calibration`
    (``out_path``: elsewhere than ``data/calibration/cpu-local.json``); returns the overlay."""
    threads = default_threads() if threads is None else [int(x) for x in ([threads] if isinstance(threads, int)
                                                                          else threads)]
    df, fits = read_bench_table(csv_path)
    target = Path(out_path) if out_path is not None else calibration_path("cpu-local")
    prev = (read_json_file(target, "calibration").get("overlay") or {}) if target.exists() else {}
    coll: dict = {}
    src_backend = {"all_reduce": "shm" if (df["backend"] == "shm").any() else "gloo"}
    for op in sorted(set(fits["op"])):
        be = src_backend.get(op, "gloo")
        sub = fits[(fits["op"] == op) & (fits["backend"] == be)]
        if not sub.empty:
            coll[op] = _entries(sub, be)
    gl = fits[(fits["backend"] == "gloo") & (fits["op"] == "all_reduce")]
    gl_any = gl[gl["group_size"] == "any"]
    gl_row = (gl_any if not gl_any.empty else gl).iloc[0] if not gl.empty else None
    # everything on one machine: the inter-node "link" is a stand-in (the same loopback / shared memory)
    link = {"name": "loopback TCP (gloo ring) on this machine",
            "bw_GBps": round(gl_row["busbw_GBps"], 4) if gl_row is not None else 1.0, "efficiency": 1.0,
            "alpha_us": round(gl_row["alpha_us"], 3) if gl_row is not None else 100.0, "algorithm": "ring"}
    sub_coll = subgroup_fits(coll, fits)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    preset = {
        "gpus_per_node": os.cpu_count() or 1,
        "memory_gib": round(mem_gib, 2),
        "reserve_fraction": 0.25,
        "mem_bw_GBps": prev.get("mem_bw_GBps", 10.0),
        "peak_tflops": prev.get("peak_tflops", {"fp32": 0.05, "bf16": 0.01}),
        "efficiency": prev.get("efficiency", {"flops": 1.0, "mem_bw": 1.0}),
        "layer_overhead_us": prev.get("layer_overhead_us", 0.0),
        "links": {"intra": link, "inter": dict(link, name="stand-in: the same loopback (one machine, no network)")},
        "collectives": {"intra": coll, "inter": coll},
        "subgroup_collectives": {"intra": sub_coll, "inter": sub_coll} if sub_coll else {},
        "fits": json.loads(fits.to_json(orient="records")),
        "source": {
            "collectives": f"alpha-beta fits of {csv_path} (llmcomm.predict.fit; all_reduce = DeepSpeed shm "
                           "inference_all_reduce, its one-shot (< 1 MiB) and two-phase paths fitted apart; other "
                           "ops = gloo, ring form)",
            "links": "gloo all_reduce fit (pooled over group sizes); 'inter' is a stand-in: this is one machine",
            "memory_gib": "os.sysconf physical pages of this machine",
            "reserve_fraction": "ASSUMPTION: Python, torch and the OS keep ~25% of RAM",
            "gpus_per_node": "the cores of this machine (one rank per core at most)",
            "subgroup_collectives": "gloo all_reduce fits: DeepSpeed's shm all-reduce ignores sub-groups, so the "
                                    "TP groups of a hybrid all-reduce through gloo",
        },
    }
    if not compute:
        for key in ("compute_calibration", "compute_by_threads"):
            if key in prev:
                preset[key] = prev[key]
    else:
        by = {}
        for th in threads:
            timed = time_compute(threads=th)
            e_f, overhead = fit_roofline(timed)
            calib = dict(timed, eff_flops=e_f, layer_overhead_s=overhead)
            entry = {"mem_bw_GBps": round(timed["mem_bw_Bps"] / 1e9, 3),
                     "peak_tflops": {"fp32": round(timed["peak_flops_fp32"] / 1e12, 5)},
                     "efficiency": {"flops": round(e_f, 4), "mem_bw": 1.0},
                     "layer_overhead_us": round(overhead * 1e6, 2), "calibration": calib}
            # the CPU kernel model (what the latency model uses; the roofline above is the fallback)
            entry.update(fit_cpu_kernels(time_cpu_kernels(threads=th)))
            if timed.get("peak_flops_bf16"):
                entry["peak_tflops"]["bf16"] = round(timed["peak_flops_bf16"] / 1e12, 5)
                entry["peak_tflops"]["fp16"] = entry["peak_tflops"]["bf16"]
            by[str(th)] = entry
        top = by[str(threads[0])]
        preset.update({x: top[x] for x in ("mem_bw_GBps", "peak_tflops", "efficiency", "layer_overhead_us")})
        preset["compute_calibration"] = top["calibration"]
        preset["compute_by_threads"] = by
        preset["source"].update({
            "compute_by_threads": "time_compute at each thread count the measured runs use (OMP_NUM_THREADS = "
                                  "cores // ranks); llmcomm.predict.hardware.for_ranks picks one per run",
            "peak_tflops": f"measured: best of torch.mm 1024^3 with {threads[0]} thread(s) "
                           "(llmcomm.measure.calibrate.time_compute)",
            "mem_bw_GBps": "measured: 64 MiB tensor copy (read + write bytes)",
            "efficiency": "fitted so that the roofline reproduces the measured per-layer prefill time (h=512, S=128)",
            "layer_overhead_us": "fitted from the measured per-layer decode time (Python/ATen dispatch per layer)",
            "kernels": "the CPU kernel model, fitted per thread count to llmcomm.measure.calibrate.time_cpu_kernels "
                       "(GEMM grid of generic shapes; HF Llama forwards of a tiny and a calibration shape): "
                       "llmcomm.compare.cpu_calibration",
            "host_us": "host time per decoder layer and per forward, per phase: llmcomm.compare.cpu_calibration"})
    prov = provenance(command or "llmcomm calibrate", collectives_csv=str(csv_path))
    bench = Path(csv_path).with_name("collectives.json")
    if bench.exists():
        doc = json.loads(bench.read_text())
        doc = doc.get("provenance", doc)
        prov["bench"] = {x: doc.get(x) for x in ("cpu", "cpu_model", "date", "command", "wall_s", "git") if x in doc}
    preset["calibration"] = prov
    write_calibration("cpu-local", preset, command or "llmcomm calibrate", target)
    return preset


def calibrate_in_run(reps: int = 5, command: str | None = None, path=None, log=None) -> dict:
    """``llmcomm calibrate --in-run``: every layout of :data:`llmcomm.compare.inrun.IN_RUN_LAYOUTS` calibrated inside
    runs of the calibration model (:func:`llmcomm.compare.inrun.calibrate_layout`, on the ``cpu-local`` preset as it
    is), written as the calibration's ``in_run`` section. Returns ``{layout key: entry}``."""
    from ..predict.hardware import load_hardware
    from ..spec import Layout
    from .inrun import IN_RUN_LAYOUTS, calibrate_layout, layout_key

    import time

    hw = load_hardware("cpu-local")
    entries, t0 = {}, time.monotonic()
    for t, p in IN_RUN_LAYOUTS:
        t1 = time.monotonic()
        entries[layout_key(t, p)] = calibrate_layout(Layout(t, p), hw, reps=reps)
        if log:
            log(f"in-run calibration t={t} p={p}: {time.monotonic() - t1:.0f} s")
    command = command or "llmcomm calibrate --in-run"
    prov = provenance(command, wall_s=round(time.monotonic() - t0, 1))
    write_calibration("cpu-local", {"in_run": dict(entries, provenance=prov), "source": {
        "in_run": "llmcomm calibrate --in-run: factors on the kernel and host times and the latency each call pays, "
                  "measured inside runs of calib-llama in each validated layout (llmcomm.compare.inrun)"}},
                      command, path)
    return entries


def calibrate_machine(command: str | None = None, log=None, reps: int = 3, csv_path=None) -> dict:
    """Calibrate the CPU this runs on (≈ 1 min on 2 cores): the kernel model and host times
    (:func:`calibrate_cpu_local` with ``compute``; collectives from the committed microbenchmark table ``csv_path``,
    default ``data/cpu-local/collectives.csv``) and the in-run factors and call latencies of every validated layout
    (:func:`calibrate_in_run`, ``reps`` rounds of the calibration workloads; launches forked from one fork server),
    written to the ``cpu-local`` calibration with this machine's provenance. Returns ``{"seconds", "in_run"}``."""
    import time

    from ..measure.forkserver import running
    from ..record import repo_root

    t0 = time.monotonic()
    command = command or "llmcomm calibrate (machine)"
    csv_path = csv_path or repo_root() / "data" / "cpu-local" / "collectives.csv"
    calibrate_cpu_local(csv_path, compute=True, command=command)
    if log:
        log(f"kernel model and host times: {time.monotonic() - t0:.0f} s")
    with running():
        in_run = calibrate_in_run(reps, command, None, log)
    if log:
        log(f"this machine calibrated in {time.monotonic() - t0:.0f} s")
    return {"seconds": time.monotonic() - t0, "in_run": in_run}


def calibrate_public_gpu(command: str | None = None, log=None) -> dict:
    """``llmcomm calibrate --public-gpu``: the GPU kernel and NCCL models fitted to the public measurements — Vidur
    (:func:`llmcomm.compare.vidur.fit_all`: kernels, A100/H100 NCCL all-reduce and send/recv with their eager floor)
    and aiconfigurator (:mod:`llmcomm.compare.nccl_data`: H100/H200 NCCL per version, custom all-reduce) — written as
    the ``kernels`` and ``nccl`` sections of the GPU presets' calibrations (``h100-sxm``: Vidur's kernels, the NCCL
    model of aiconfigurator's NCCL 2.29.2 table, Vidur's eager floor, send/recv and network; ``a100-sxm-80gb``: all
    Vidur; ``h200``: aiconfigurator's H200 NCCL and custom tables, the rest as h100-sxm), and their error tables
    (out of sample included), the never-fitted predictions and the floors to ``data/validation/gpu_<name>.csv``
    with sidecars. Returns the tables."""
    import pandas as pd

    from ..record import data_dir, save_frame
    from . import nccl_data as nd
    from .vidur import SOURCE, cross_node_predictions, error_summary, fit_all, preset_sections

    command = command or "llmcomm calibrate --public-gpu"
    log = log or (lambda msg: None)
    params, errors = fit_all(log=log)
    nccl_params, nccl_rows = nd.fit_nccl_tables(log=log)
    eager = {system: params["nccl"][vidur_system]["all_reduce"]["floor_s"]
             for system, vidur_system in (("h100_sxm", "h100_dgx"), ("h200_sxm", "h100_dgx"))}
    custom, custom_rows = nd.fit_custom_tables(nccl_params, eager, log=log)
    prov = provenance(command)
    tables = error_summary(errors)
    keys = ["system", "collective", "num_workers", "devices_per_node", "validation"]
    public = nccl_rows.assign(collective=nccl_rows.op, num_workers=nccl_rows.n, devices_per_node=nccl_rows.n,
                              nccl_version=nccl_rows.version)
    tables["collectives"] = pd.concat([tables["collectives"].assign(source="vidur", nccl_version="not stated"),
                                       nd.summarise(public, keys + ["nccl_version"]).assign(source="aiconfigurator")],
                                      ignore_index=True)
    # out-of-sample predictions row by row for the book's figures (H100 GEMMs, every collective; the other kernels,
    # 100k rows, are summarised only), beside the summaries
    oos = errors[errors.validation.isin(["lomo", "logo", "losdo"])]
    oos = oos[(oos.part == "collective") | ((oos.part == "gemm") & (oos.gpu == "h100"))].assign(source="vidur")
    public_oos = public[public.validation == "losdo"].assign(part="collective", source="aiconfigurator",
                                                             rel_err=lambda x: x.predicted_s / x.seconds - 1)
    keep = ["source", "part", "validation", "gpu", "model", "tp", "op", "M", "N", "K", "T", "system", "nccl_version",
            "collective", "num_workers", "devices_per_node", "dtype", "m", "seconds", "predicted_s", "rel_err"]
    both = pd.concat([oos, public_oos], ignore_index=True)
    tables["out_of_sample"] = both[[col for col in keep if col in both]]
    tables["unmeasured"] = nd.predict_unmeasured(nccl_params)
    # the A100 cluster only: Vidur's H100 fit lets NVLS take every 8-GPU all-reduce, so its ring bandwidth at n = 8
    # (what a cross-node ring of 8 GPUs per node runs at) is not identified by its rows; the h100-sxm preset prices
    # cross-node calls with aiconfigurator's NCCL model instead
    tables["cross_node"] = cross_node_predictions(params, "a100_dgx")
    tables["custom_allreduce"] = nd.summarise(custom_rows, ["system", "path", "version", "n", "validation"])
    floors = {system: (float(value), f"fitted to {SOURCE} (h100_dgx all_reduce rows: eager back-to-back launches)"
                       + ("; ASSUMPTION for H200: H100's" if system == "h200_sxm" else ""))
              for system, value in eager.items()}
    tables["floors"] = nd.floors_table(nccl_params, custom, floors)
    tables["allreduce_paths"] = nd.allreduce_paths_table(nccl_rows, custom_rows)
    root = data_dir("validation").parent
    for name, df in tables.items():
        # byte counts are whole numbers: written exactly, not through the float format (1 MiB is not 1048600)
        df = df.assign(**{col: df[col].round().astype("Int64") for col in ("m", "size_bytes") if col in df})
        save_frame(df, f"gpu_{name}", command, machine="validation", root=root, float_format="%.5g",
                   source=f"data/external/vidur (Vidur, MIT); {nd.SOURCE}")
    for preset, system in (("a100-sxm-80gb", None), ("h100-sxm", "h100_sxm"), ("h200", "h200_sxm")):
        base = "h100-sxm" if preset == "h200" else preset
        model = nccl_params[system][nd.PRESET_VERSION] if system else None
        source = f"NCCL model fitted to {nd.SOURCE} ({system} NCCL {nd.PRESET_VERSION} table)" if system else ""
        sections = preset_sections(params, base, model, source, nd.custom_section(custom[system]) if system else None)
        if preset == "h200":
            sections.pop("kernels")                 # derived from h100-sxm's (HBM ratio): the preset says so
            sections["nccl"]["source"] += " H200: send_recv, the eager floor and the network are H100's (ASSUMPTION)."
        for section in sections.values():
            section["provenance"] = prov
        write_calibration(preset, sections, command)
    from .handoff import calibrate_handoff

    calibrate_handoff(command)              # the h800-roce preset's KV hand-off, fitted to the Mooncake points
    return tables
