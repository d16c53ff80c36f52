"""Public NCCL and custom all-reduce measurements (aiconfigurator's H100 SXM and H200 SXM tables) beside the time
model: loaders, fits per NCCL version, leave-one-size-decade-out checks, the code paths' floors, and predictions of
what the tables leave out.

Source: github.com/ai-dynamo/aiconfigurator @ 095f58a (Apache-2.0, (c) NVIDIA), kept unchanged in
``data/external/aiconfigurator/`` with its README (units: ``message_size`` is in elements, ``latency`` in ms) and
LICENSE. nccl-tests sweeps on one 8-GPU node (2/4/8 GPUs, 512 B – 512 MiB, half and int8, eager C launches, no CUDA
graphs) and vLLM / SGLang / TRT-LLM custom all-reduce replayed in CUDA graphs (and vLLM / SGLang eager).

* **NCCL** (:func:`fit_nccl_tables`): NCCL's tuning structure (:func:`llmcomm.predict.fit.fit_nccl`) fitted per system
  and per NCCL version (each table separately: the versions' kernels and tuner differ, and ``2.27.3`` / ``2.26.2``
  repeat every point twice although their rows say 2.29.2 — kept as measured). Validation **leave one size decade
  out** (:func:`size_decade`): the rows of one decade of m (all ops and n of the table) predicted by the fit to the
  other decades. NVLS is visible only where the dtype allows it (half, not int8: ``ncclNvlsSupported``), which
  separates it from the ring.
* **Never fitted** (:func:`predict_unmeasured`): all_to_all at 2/4/8 GPUs and all_gather at 8 GPUs are not in the
  tables (kept back upstream for checks); the model predicts them from the fits.
* **Custom all-reduce** (:func:`fit_custom_tables`): per (path, version, n) the one-shot/two-shot kernel model
  (:func:`llmcomm.predict.fit.fit_custom_allreduce`) below the size where the table falls back to NCCL
  (``max_bytes``, the size from which the NCCL model fits the table better, chosen on the data), eager paths with a
  host floor.
* **Floors and the 8-GPU rows** (:func:`floors_table`, :func:`allreduce_paths_table`): one floor per code path
  (:mod:`llmcomm.predict.paths`), and each path's measured and predicted all-reduce at 64 KiB and 1 MiB.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..predict import fit
from ..predict.collectives import custom_allreduce_time, nccl_time
from ..record import repo_root

__all__ = ["DATA", "SOURCE", "NCCL_VERSIONS", "PRESET_VERSION", "PRESET_OF", "CUSTOM_PATHS", "load_nccl",
           "load_custom", "size_decade", "losdo", "check_table", "fit_nccl_tables", "predict_unmeasured", "fit_custom_tables",
           "custom_section", "floors_table", "allreduce_paths_table", "summarise"]

DATA = Path("data") / "external" / "aiconfigurator"
SOURCE = ("aiconfigurator, github.com/ai-dynamo/aiconfigurator @ 095f58a (Apache-2.0, (c) NVIDIA); "
          "data/external/aiconfigurator/")
#: the NCCL tables per system (directory names; 2.27.3 and 2.26.2 rows say 2.29.2: README)
NCCL_VERSIONS = {"h100_sxm": ("2.23", "2.27.3", "2.29.2"), "h200_sxm": ("2.23", "2.26.2", "2.29.2")}
#: the version whose fit prices the presets: the newest, the only one upstream marks ``collected`` (not ``legacy``)
PRESET_VERSION = "2.29.2"
#: GPU preset → the system of its NCCL model
PRESET_OF = {"h100-sxm": "h100_sxm", "h200": "h200_sxm"}
#: the custom all-reduce tables' ``kernel_source`` → the code path (llmcomm.predict.paths) it measures
CUSTOM_PATHS = {"vLLM_custom_graph": "vllm-custom-graph", "vLLM_custom_eager": "vllm-custom-eager",
                "SGLang_CustomAllReduce_graph": "sglang-custom-graph",
                "SGLang_CustomAllReduce_eager": "sglang-custom-eager", "TRTLLM": "trtllm-graph"}
_ELEMENT_BYTES = {"half": 2, "int8": 1, "bfloat16": 2}


def _path(*parts: str) -> Path:
    return repo_root() / DATA.joinpath(*parts)


def load_nccl(system: str, version: str) -> pd.DataFrame:
    """One NCCL table as ``system, version, op, n, dtype, m, seconds, nvls`` (m in bytes, seconds per call; ``nvls``:
    the dtype is one NVLS reduces — half, not int8)."""
    raw = pd.read_csv(_path("nccl", f"{system}_nccl_{version}.csv"))
    return pd.DataFrame({"system": system, "version": version, "op": raw.op_name, "n": raw.num_gpus.astype(int),
                         "dtype": raw.nccl_dtype, "m": raw.message_size * raw.nccl_dtype.map(_ELEMENT_BYTES),
                         "seconds": raw.latency * 1e-3, "nvls": raw.nccl_dtype == "half"})


def load_custom(system: str) -> pd.DataFrame:
    """Every custom all-reduce table of ``system`` as ``system, path, version, n, m, seconds`` (the version from the
    file name: one vLLM table's rows say ``0.14.1.dev1``)."""
    out = []
    for csv in sorted(_path("custom_allreduce").glob(f"{system}_*.csv")):
        version = csv.stem.split("_")[-1]
        raw = pd.read_csv(csv)
        out.append(pd.DataFrame({"system": system, "path": raw.kernel_source.map(CUSTOM_PATHS), "version": version,
                                 "n": raw.num_gpus.astype(int), "m": raw.message_size * 2.0,
                                 "seconds": raw.latency * 1e-3}))
    return pd.concat(out, ignore_index=True)


def size_decade(m):
    """The decade of a size in bytes: ⌊log10 m⌋ (512 B → 2, 64 KiB → 4, 512 MiB → 8)."""
    return np.floor(np.log10(np.asarray(m, dtype=float))).astype(int)


def losdo(frame: pd.DataFrame, fit_rows, predict_rows) -> pd.DataFrame:
    """Leave one size decade out: for each decade of ``frame.m``, ``fit_rows(training rows)`` on the other decades
    and ``predict_rows(params, held-out rows)``; the held-out rows with ``predicted_s``."""
    decade = size_decade(frame.m)
    out = []
    for dec in np.unique(decade):
        train, test = frame[decade != dec], frame[decade == dec]
        if train.empty:
            continue
        out.append(test.assign(predicted_s=predict_rows(fit_rows(train), test), validation="losdo"))
    return pd.concat(out) if out else frame.iloc[:0].assign(predicted_s=[], validation=[])


def _fit(rows: pd.DataFrame) -> dict:
    return fit.fit_nccl(rows.op, rows.n, rows.m, rows.seconds, nvls=rows.nvls.to_numpy(), with_nvls=True)


def _predict(params: dict, rows: pd.DataFrame):
    return fit.nccl_predict(rows.op, rows.n, rows.m, params, rows.nvls.to_numpy())


def check_table(system: str, version: str) -> tuple[dict, pd.DataFrame]:
    """One NCCL table fitted (all its rows) and checked leave one size decade out: ``(params, rows)``, one row per
    prediction (``validation`` in_sample or losdo, ``predicted_s``)."""
    frame = load_nccl(system, version)
    full = _fit(frame)
    return full, pd.concat([frame.assign(predicted_s=_predict(full, frame), validation="in_sample"),
                            losdo(frame, _fit, _predict)], ignore_index=True)


def fit_nccl_tables(log=print) -> tuple[dict, pd.DataFrame]:
    """Every NCCL table fitted and checked (:func:`check_table`): ``(params, rows)`` with ``params[system][version]``
    and every table's rows."""
    params, rows = {}, []
    for system, versions in NCCL_VERSIONS.items():
        for version in versions:
            full, checked = check_table(system, version)
            params.setdefault(system, {})[version] = full
            rows.append(checked)
            log(f"  nccl {system} {version}: fitted ({'NVLS' if 'nvls' in full else 'no NVLS'})")
    return params, pd.concat(rows, ignore_index=True)


def predict_unmeasured(params: dict) -> pd.DataFrame:
    """What the tables leave out, predicted by each (system, version) fit and never fitted: all_to_all on 2, 4 and 8
    GPUs and all_gather on 8, at the sweep's sizes (512 B – 512 MiB, doubling), with the chosen algorithm and
    protocol."""
    sizes = 512.0 * 2.0 ** np.arange(21)
    out = []
    for system, by_version in params.items():
        for version, prm in by_version.items():
            for op, group in (("all_to_all", 2), ("all_to_all", 4), ("all_to_all", 8), ("all_gather", 8)):
                tau, alg, proto = nccl_time(op, group, sizes, prm, detail=True)
                out.append(pd.DataFrame({"system": system, "version": version, "op": op, "n": group, "m": sizes,
                                         "predicted_s": tau, "algorithm": alg, "protocol": proto}))
    return pd.concat(out, ignore_index=True)


# ----------------------------------------------------------------------------------------------- custom all-reduce
def _custom_fit(rows: pd.DataFrame, group: int, eager: bool) -> dict:
    return fit.fit_custom_allreduce(group, rows.m, rows.seconds, with_floor=eager)


def _loss(pred, meas) -> float:
    r = np.log(np.asarray(pred) / np.asarray(meas))
    return float(np.sum(2 * (np.sqrt(1 + (r / 0.05) ** 2) - 1)))


def _fit_one_custom(rows: pd.DataFrame, group: int, eager: bool, nccl_params: dict, floor_s: float):
    """(fit with ``max_bytes``, the NCCL fallback's predictions) of one (path, version, n) table: every candidate
    limit from 1 MiB up (and none) is tried — the kernel model fitted below it, the NCCL model of the system (plus
    the eager floor) above — and the one of least robust loss kept."""
    rows = rows.sort_values("m")
    nccl = nccl_time("all_reduce", group, rows.m.to_numpy(), nccl_params, floor_s=floor_s if eager else 0.0)
    best = None
    for limit in [x for x in np.unique(rows.m) if x >= 2 ** 20] + [np.inf]:
        below = (rows.m < limit).to_numpy()
        if below.sum() < 6:
            continue
        prm = _custom_fit(rows[below], group, eager)
        pred = np.where(below, custom_allreduce_time(group, rows.m.to_numpy(), prm), nccl)
        loss = _loss(pred, rows.seconds)
        if best is None or loss < best[0]:
            best = (loss, dict(prm, max_bytes=float(limit)), pred)
    return best[1], best[2]


def fit_custom_tables(nccl_params: dict, floor_s: dict, log=print) -> tuple[dict, pd.DataFrame]:
    """Every custom all-reduce table fitted per (system, path, version, n): ``(fits, rows)`` with
    ``fits[system][path][version][n]`` (the kernel model and its ``max_bytes``) and one row per prediction —
    ``in_sample`` and ``losdo`` (the kernel's sizes, below ``max_bytes``, the limit kept) and ``fallback`` (sizes at
    and above it: the NCCL model of the system's :data:`PRESET_VERSION` fit, never fitted to these rows).
    ``floor_s[system]``: the NCCL eager floor for eager fallbacks."""
    fits, rows = {}, []
    for system in NCCL_VERSIONS:
        table = load_custom(system)
        prm = nccl_params[system][PRESET_VERSION]
        for (path, version, group), grp in table.groupby(["path", "version", "n"], sort=True):
            eager = path.endswith("eager")
            full, pred = _fit_one_custom(grp, int(group), eager, prm, floor_s.get(system, 0.0))
            fits.setdefault(system, {}).setdefault(path, {}).setdefault(version, {})[str(int(group))] = full
            grp = grp.sort_values("m").assign(predicted_s=pred)
            below = grp.m < full["max_bytes"]
            rows.append(grp[below].assign(validation="in_sample"))
            rows.append(grp[~below].assign(validation="fallback"))
            rows.append(losdo(grp[below], lambda tr, ranks=int(group), ea=eager: _custom_fit(tr, ranks, ea),
                              lambda fit_, te, ranks=int(group): custom_allreduce_time(ranks, te.m.to_numpy(), fit_)))
        log(f"  custom all-reduce {system}: {table.groupby(['path', 'version', 'n']).ngroups} tables fitted")
    return fits, pd.concat(rows, ignore_index=True)


def _version_key(version: str):
    return tuple(int(x) if x.isdigit() else 0 for x in version.replace("rc", ".").split("."))


def custom_section(fits_of_system: dict) -> dict:
    """The ``custom_allreduce`` section of a preset's ``nccl`` calibration: per path every version's fits by n and
    the default version (the oldest measured: nearest to the engines the profiles describe)."""
    out = {}
    for path, versions in fits_of_system.items():
        default = min(versions, key=_version_key)
        out[path] = {"default_version": default, "versions": {v: {"by_n": fits} for v, fits in versions.items()},
                     "source": f"fitted to {SOURCE} (custom_allreduce tables; llmcomm calibrate --public-gpu): "
                               "one-shot/two-shot kernel model below max_bytes (the size from which the table "
                               "follows NCCL, chosen on the data); eager paths with their host floor_s"}
    return out


# ---------------------------------------------------------------------------------------------- floors and tables
def floors_table(nccl_params: dict, custom_fits: dict, eager_floors: dict) -> pd.DataFrame:
    """One floor per (system, code path, version, n): the least time a call of that path costs — for ``nccl-graph``
    the NCCL model's all-reduce of 0 bytes (the kernel's own latency, fitted to nccl-tests), for ``nccl-eager`` and
    ``deepspeed-eager`` the eager floor (``eager_floors[system]``: ``(floor_s, source)``, fitted to eager launches),
    for a custom path its fitted floor (eager) or the one-shot kernel's latency (graph). Columns ``system, path,
    version, n, floor_s, source``."""
    rows = []
    for system, by_version in nccl_params.items():
        prm = by_version[PRESET_VERSION]
        floor_s, source = eager_floors.get(system, (np.nan, "no eager measurement"))
        for group in (2, 4, 8):
            kernel = float(nccl_time("all_reduce", group, 0.0, prm))
            rows.append({"system": system, "path": "nccl-graph", "version": f"NCCL {PRESET_VERSION}", "n": group,
                         "floor_s": kernel,
                         "source": f"NCCL model's 0-byte all-reduce, fitted to {SOURCE} (nccl tables)"})
            rows += [{"system": system, "path": path, "version": "", "n": group, "floor_s": max(floor_s, kernel),
                      "source": source} for path in ("nccl-eager", "deepspeed-eager")]
        for path, versions in custom_fits.get(system, {}).items():
            for version, by_n in sorted(versions.items()):
                for group, prm in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                    rows.append({"system": system, "path": path, "version": version, "n": int(group),
                                 "floor_s": float(custom_allreduce_time(int(group), 0.0, prm)),
                                 "source": f"fitted to {SOURCE} (custom_allreduce tables)"})
    return pd.DataFrame(rows)


def allreduce_paths_table(nccl_rows: pd.DataFrame, custom_rows: pd.DataFrame, n: int = 8,
                          sizes=(64 * 2 ** 10, 2 ** 20)) -> pd.DataFrame:
    """Every code path's all-reduce on ``n`` GPUs at ``sizes`` beside the model: the measured time (mean of the
    table's rows at that size; NCCL in half precision) and the model's in-sample prediction, per (system, path,
    version). ``nccl_rows`` / ``custom_rows``: the in-sample rows of :func:`fit_nccl_tables` and
    :func:`fit_custom_tables` (fallback rows included)."""
    nc = nccl_rows[(nccl_rows.validation == "in_sample") & (nccl_rows.op == "all_reduce") & (nccl_rows.n == n)
                   & (nccl_rows.dtype == "half") & nccl_rows.m.isin(sizes)]
    nc = nc.assign(path="nccl-tests (eager C launches)", version="NCCL " + nc.version)
    cu = custom_rows[custom_rows.validation.isin(["in_sample", "fallback"]) & (custom_rows.n == n)
                     & custom_rows.m.isin(sizes)]
    both = pd.concat([nc, cu], ignore_index=True)
    out = both.groupby(["system", "path", "version", "m"], sort=True).agg(
        measured_s=("seconds", "mean"), predicted_s=("predicted_s", "mean")).reset_index()
    return out.assign(rel_err=out.predicted_s / out.measured_s - 1.0)


def summarise(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: ``rows`` (the count), median, 90th percentile and max of |relative error|."""
    by = rows.assign(abs_err=(rows.predicted_s / rows.seconds - 1.0).abs()).groupby(keys, sort=True).abs_err
    return pd.DataFrame({"rows": by.size(), "median_abs_err": by.median(), "p90_abs_err": by.quantile(0.9),
                         "max_abs_err": by.max()}).reset_index()
