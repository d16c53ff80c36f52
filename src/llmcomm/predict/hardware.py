"""Hardware presets: device memory, compute and memory bandwidth, and the α-β parameters of its links.

A preset is a JSON file in ``llmcomm/presets/hardware`` (or any path / dict with the same keys)::

    {"name", "description", "gpus_per_node", "memory_gib", "reserve_fraction", "mem_bw_GBps",
     "peak_tflops": {dtype: TFLOP/s}, "efficiency": {"flops", "mem_bw"}, "layer_overhead_us",
     "links": {"intra": LINK, "inter": LINK},
     "collectives": {level: {op: {"<n>" | "any": FIT}}},     # optional: fitted per-op overrides (cpu-local)
     "subgroup_collectives": {level: {op: {...: FIT}}},      # optional: fits for proper sub-groups (CPU hybrids: gloo)
     "compute_by_threads": {"<threads>": {...}},             # optional: compute calibration per thread count
                                                              # (cpu-local; for_ranks picks one)
     "kernels": {"gemm": {...}, "memops": {kind: {...}}},    # optional: fitted kernel model (llmcomm.predict.kernels);
                                                              # without it: the roofline of peak·efficiency
     "nccl": {"protocols", "ring_bytes_per_s", "nvls", "send_recv": {"intra", "inter"},
              "net": {"hop_s", "bytes_per_s", "rails"}, "floors": {path: {"floor_s"}},
              "custom_allreduce": {path: {"default_version", "versions": {v: {"by_n": {n: FIT}}}}}},
                                                              # optional: fitted NCCL model (llmcomm.predict.collectives)
     "source": {field: where the number comes from},          # every number is labelled (published or ASSUMPTION)
     "calibrated_in": "data/calibration/<name>.json"}         # optional: fitted sections kept with the data

A preset whose numbers are fitted to measurements names the file that holds them (``calibrated_in``, relative to the
repository; :func:`calibration_path`): ``cpu-local`` (this machine's microbenchmarks and compute timing, ``llmcomm
calibrate``), ``h100-sxm`` and ``a100-sxm-80gb`` (``kernels`` and ``nccl`` fitted to the public Vidur measurements,
``llmcomm calibrate --public-gpu``). The file is ``{"provenance", "preset", "overlay": {key: value}}`` and its
``overlay`` replaces the preset's keys on load; calibrations are results, so they live under ``data/``, never in the
package (:mod:`llmcomm.compare.calibration` writes them).

    LINK = {"name", "bw_GBps", "efficiency", "alpha_us", "algorithm": "ring"|"tree"|"direct"|"auto"}
    FIT  = {"alpha_us", "busbw_GBps", "algorithm", "backend", ...}

``level`` is ``intra`` (ranks on one node: NVLink, or shared memory on a CPU) or ``inter`` (ranks on different
nodes: InfiniBand). With an ``nccl`` section (GPU presets fitted to public NCCL kernel times) every collective
follows the fitted NCCL model (:func:`llmcomm.predict.collectives.nccl_time`: the fastest (algorithm, protocol) of
NCCL's tuning structure; across nodes a prediction from the cluster's own send/recv), sends and receives their own fit,
and every call pays the floor of its code path (:mod:`llmcomm.predict.paths`: eager launches from Python, a CUDA
graph, a custom all-reduce). Otherwise a collective on ``n`` ranks costs
:func:`llmcomm.predict.collectives.alpha_beta_time` with the α (s per step) and β (s per busbw-byte; per byte a rank
sends for a one-shot ``direct`` fit) of the fitted entry for (level, op, n) when there is one, else of (level, op,
"any"), else of the link (β = 1 / (bw·efficiency)).

:func:`for_ranks` picks, from a CPU preset's ``compute_by_threads``, the calibration at the thread count each rank of
a run has; :func:`scale_links` is the what-if of faster links.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import json

import numpy as np

from ..derive.conventions import canonical_op, latency_steps
from ..record import repo_root
from ..spec import SpecError, cpu_threads_per_rank, preset_names, read_json_file, read_preset_or_file, resolve
from .collectives import bytes_factor, custom_allreduce_time, nccl_sendrecv_time, nccl_time, shm_time
from .paths import parse_path, path_for
from .kernels import roofline_device
from .unique import on_unique

__all__ = ["Hardware", "Link", "hardware_names", "load_hardware", "for_ranks", "for_layout", "scale_links",
           "calibration_path", "CALIBRATION_ENV"]

GiB = 1 << 30
#: environment variable naming another folder of calibration files (default ``<repo>/data/calibration``)
CALIBRATION_ENV = "LLMCOMM_CALIBRATION"


def calibration_path(preset: str) -> Path:
    """Where the fitted sections of hardware preset ``preset`` live: ``$LLMCOMM_CALIBRATION/<preset>.json``, else
    ``<repo>/data/calibration/<preset>.json``."""
    import os

    root = os.environ.get(CALIBRATION_ENV)
    return (Path(root) if root else repo_root() / "data" / "calibration") / f"{preset}.json"


def _calibrated(preset: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``preset`` with its calibration file's overlay (module docs), when the preset names one."""
    if "calibrated_in" not in preset:
        return preset
    path = calibration_path(Path(str(preset["calibrated_in"])).stem)
    if not path.exists():
        raise SpecError(f"hardware {name!r} is fitted to measurements kept in {path}, which is missing (make data "
                        f"writes cpu-local's, make gpu-fits the GPU presets')")
    cal = read_json_file(path, "calibration")
    try:
        overlay = cal["overlay"]
    except (KeyError, TypeError):
        raise SpecError(f"calibration file {path} has no 'overlay' object") from None
    out = {key: v for key, v in preset.items() if key != "calibrated_in"}
    out.update(overlay)
    out["source"] = dict(preset.get("source", {}), **overlay.get("source", {}))
    return out


def hardware_names() -> list[str]:
    """Names of the hardware presets shipped in ``llmcomm/presets/hardware``."""
    return preset_names("hardware")


@dataclass(frozen=True)
class Link:
    name: str
    alpha_s: float            # latency per algorithm step (s)
    beta_s_per_B: float       # inverse achievable bus bandwidth (s per byte)
    algorithm: str = "auto"

    @classmethod
    def from_dict(cls, link: Mapping[str, Any], where: str) -> "Link":
        try:
            bw = float(link["bw_GBps"]) * float(link.get("efficiency", 1.0)) * 1e9
            return cls(name=str(link.get("name", where)), alpha_s=float(link["alpha_us"]) * 1e-6,
                       beta_s_per_B=1.0 / bw, algorithm=str(link.get("algorithm", "auto")))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise SpecError(f"hardware link {where!r} needs bw_GBps > 0 and alpha_us ({e})") from None


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    reserve_fraction: float
    mem_bw: float                        # B/s, peak
    peak_flops: Mapping[str, float]      # FLOP/s per dtype, peak
    eff_flops: float
    eff_mem: float
    layer_overhead_s: float
    gpus_per_node: int
    links: Mapping[str, Link]
    collectives: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] = field(default_factory=dict)
    #: fits used instead of ``collectives`` when the group is a proper sub-group of the world (a TP group of a
    #: hybrid): on CPU DeepSpeed's shm all-reduce ignores sub-groups, so hybrids all-reduce through gloo
    subgroup_collectives: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_dict(cls, preset: Mapping[str, Any], name: str = "custom") -> "Hardware":
        if not isinstance(preset, Mapping):
            raise SpecError(f"hardware {name!r} is not a JSON object")
        preset = _calibrated(preset, name)
        if "derive_from" in preset:
            preset = _derive(preset, name)
        name = str(preset.get("name", name))
        try:
            links = {lvl: Link.from_dict(preset["links"][lvl], f"{name}.{lvl}") for lvl in preset["links"]}
            if "intra" not in links:
                raise KeyError("links.intra")
            links.setdefault("inter", links["intra"])
            eff = preset.get("efficiency", {})
            hw = cls(name=name, memory_bytes=float(preset["memory_gib"]) * GiB,
                     reserve_fraction=float(preset.get("reserve_fraction", 0.0)),
                     mem_bw=float(preset["mem_bw_GBps"]) * 1e9,
                     peak_flops={dtype: float(v) * 1e12 for dtype, v in preset["peak_tflops"].items()},
                     eff_flops=float(eff.get("flops", 1.0)), eff_mem=float(eff.get("mem_bw", 1.0)),
                     layer_overhead_s=float(preset.get("layer_overhead_us", 0.0)) * 1e-6,
                     gpus_per_node=int(preset.get("gpus_per_node", 8)), links=links,
                     collectives=preset.get("collectives", {}) or {},
                     subgroup_collectives=preset.get("subgroup_collectives", {}) or {}, raw=dict(preset))
        except KeyError as e:
            raise SpecError(f"hardware {name!r} lacks {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise SpecError(f"hardware {name!r} has a malformed value ({e})") from None
        return hw

    # --------------------------------------------------------------------------------------------------------------
    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * (1.0 - self.reserve_fraction)

    def flops(self, dtype: str) -> float:
        """Achievable FLOP/s for ``dtype`` (peak × efficiency)."""
        peak = self.peak_flops.get(dtype) or self.peak_flops.get("fp32") or max(self.peak_flops.values())
        return peak * self.eff_flops

    def bandwidth(self) -> float:
        """Achievable memory bandwidth (B/s)."""
        return self.mem_bw * self.eff_mem

    def _fit(self, op: str, n: int, level: str, subgroup: bool) -> Mapping[str, Any] | None:
        """The fitted entry for (level, op, n) — ``subgroup_collectives`` first for a proper sub-group — or for
        (level, op, "any"); None when the preset has none."""
        if level not in self.links:
            raise SpecError(f"hardware {self.name!r} has no {level!r} link")
        fits = self.subgroup_collectives.get(level, {}).get(op, {}) if subgroup else {}
        fits = fits or self.collectives.get(level, {}).get(op, {})
        return fits.get(str(int(n))) or fits.get("any") or None

    def coll_params(self, op: str, n: int, level: str = "intra", subgroup: bool = False) -> tuple[float, float, str]:
        """(α s/step, β s/B, algorithm) of ``op`` on ``n`` ranks at ``level``; ``subgroup``: the group is a proper
        sub-group of the world (``subgroup_collectives`` fits first, when the preset has them). For an ``shm`` fit
        these are its one-shot path's (:meth:`collective_time` adds the two-phase one)."""
        op = canonical_op(op)
        fit = self._fit(op, n, level, subgroup)
        if fit:
            return (float(fit["alpha_us"]) * 1e-6, 1.0 / (float(fit["busbw_GBps"]) * 1e9),
                    str(fit.get("algorithm", "ring")))
        link = self.links[level]
        return link.alpha_s, link.beta_s_per_B, link.algorithm

    def collective_coeffs(self, op: str, n: int, level: str = "intra", subgroup: bool = False) -> tuple[float, float]:
        """(fixed, per_byte) with seconds = fixed + per_byte·m for ``op`` on ``n`` ranks: fixed = steps·α (``auto``:
        the fewer steps of ring and tree, whose bandwidth terms are equal), per_byte = f(n)·β, for ``direct`` the
        bytes one rank sends ((n−1)·β for an all-reduce: :func:`llmcomm.predict.collectives.bytes_factor`); 0 for a
        group of one, except send_recv. Not for an ``shm`` fit (two paths: :meth:`collective_time`)."""
        alpha, beta, alg = self.coll_params(op, int(n), level, subgroup)
        steps = min(float(latency_steps(op, n, "ring")), float(latency_steps(op, n, "tree"))) if alg == "auto" \
            else float(latency_steps(op, n, alg))
        return steps * alpha, float(bytes_factor(op, n, alg)) * beta

    def _alpha_beta_time(self, op: str, n: int, size, level: str, subgroup: bool):
        """Seconds of ``op`` on a group of ``n`` ranks (one n, sizes an array) under the α-β fits or the link."""
        fit = self._fit(canonical_op(op), n, level, subgroup)
        if fit and fit.get("algorithm") == "shm":
            two = fit["two_phase"]
            return shm_time(n, size, (float(fit["alpha_us"]) * 1e-6, 1.0 / (float(fit["busbw_GBps"]) * 1e9)),
                            (float(two["alpha_us"]) * 1e-6, 1.0 / (float(two["busbw_GBps"]) * 1e9)))
        fixed, per_byte = self.collective_coeffs(op, n, level, subgroup)
        return fixed + per_byte * size

    def kernels(self, w) -> dict:
        """Kernel parameters for elements of ``w`` bytes (:mod:`llmcomm.predict.kernels`): the preset's fitted
        ``kernels`` (GEMM rate ``flops_per_s`` scaled by the dtype's peak when w = 4), else the roofline of peak ×
        efficiency."""
        dtype = "fp32" if float(w) >= 4 else "bf16"
        fitted = self.raw.get("kernels")
        if not fitted:
            return roofline_device(self.flops(dtype), self.bandwidth())
        gemm = dict(fitted["gemm"])
        if dtype == "fp32" and fitted.get("dtype") != "fp32" and self.peak_flops.get("fp32") and \
                self.peak_flops.get("bf16"):
            gemm["flops_per_s"] = float(gemm["flops_per_s"]) * self.peak_flops["fp32"] / self.peak_flops["bf16"]
        return {"gemm": gemm, "memops": fitted["memops"]}

    @property
    def nccl(self) -> Mapping[str, Any]:
        """The fitted NCCL model (empty when the preset has none)."""
        return self.raw.get("nccl") or {}

    def _custom_fit(self, path, version, n: int):
        """The fitted custom all-reduce of ``path`` (at ``version``, else the calibration's default) for a group of
        ``n``: the fit of n, else of the nearest measured group above it; None when the hardware has none."""
        entry = (self.nccl.get("custom_allreduce") or {}).get(path.name)
        if not entry:
            return None
        fits = entry["versions"].get(version or entry["default_version"])
        if fits is None:
            raise SpecError(f"hardware {self.name!r} has no {path.name} fit at version {version!r}; fitted: "
                            f"{', '.join(entry['versions'])}")
        sizes = sorted(int(x) for x in fits["by_n"] if int(x) >= n)
        return fits["by_n"][str(sizes[0])] if sizes else None

    def _nccl_call(self, op: str, n: int, size, level: str, g: int | None, path: str, custom=None):
        """(seconds, algorithm, protocol) of ``op`` on ``n`` ranks under the fitted NCCL model and code path ``path``
        (:mod:`llmcomm.predict.paths`), or None where the model has no answer (then α-β applies). ``custom``: a
        profile's own custom all-reduce numbers (``max_bytes``, ``alpha_us``, ``link_GBps``), used when the
        hardware has no fit for the path."""
        op, nc = canonical_op(op), self.nccl
        kind, version = parse_path(path)
        if not kind.nccl:
            return None
        size = np.asarray(size, dtype=float)
        if op == "send_recv":
            fit = nc.get("send_recv", {}).get(level)
            if fit is None:
                return None
            return nccl_sendrecv_time(size, fit, floor=kind.eager), "p2p", "Simple"
        if "protocols" not in nc:
            return None
        nodes = 1
        if level != "intra":
            g = int(g or self.gpus_per_node)
            if n % g or "net" not in nc:
                return None
            nodes = n // g
        floor_s = float(nc.get("floors", {}).get(kind.floor_of, {}).get("floor_s", 0.0)) if kind.floor_of else 0.0
        tau, alg, proto = nccl_time(op, n, size, nc, nodes=nodes, floor_s=floor_s, detail=True)
        if kind.custom and op == "all_reduce" and nodes == 1 and n > 1:
            fit = self._custom_fit(kind, version, n)
            if fit is None and custom:
                fit = {"one_shot_latency_s": float(custom["alpha_us"]) * 1e-6,
                       "one_shot_bytes_per_s": float(custom["link_GBps"]) * 1e9,
                       "max_bytes": float(custom["max_bytes"]), "floor_s": floor_s}
            if fit is not None:
                mine, shot = custom_allreduce_time(n, size, fit, detail=True)
                take = size < float(fit.get("max_bytes", np.inf))
                tau = np.where(take, mine, tau)
                alg = np.where(take, shot, alg)
                proto = np.where(take, f"{kind.custom} custom", proto)
        return tau, alg, proto

    def collective_time(self, op: str, n, size_bytes, level: str = "intra", subgroup: bool = False,
                        g: int | None = None, floor: bool = True, path: str | None = None, custom=None):
        """Seconds of one ``op`` of size m = ``size_bytes`` on ``n`` ranks at ``level``; ``n`` and ``size_bytes``
        may be numpy arrays (evaluated once per distinct n, over all sizes at once). An ``shm`` fit (DeepSpeed's CPU
        all-reduce) prices its one-shot and two-phase paths by size (:func:`~llmcomm.predict.collectives.shm_time`).

        With a fitted NCCL model every op — all_to_all (expert parallelism's dispatch and combine) included — takes
        NCCL's structure (:func:`~llmcomm.predict.collectives.nccl_time`; across nodes for a group of whole nodes,
        ``g`` GPUs per node, default the preset's) and pays the floor of its code path ``path``
        (:mod:`llmcomm.predict.paths`; default from ``floor``: ``nccl-eager`` when True, ``nccl-graph`` when False);
        ``custom``: a profile's own custom all-reduce numbers for hardware without a fit of that path. Without one,
        the α-β fits or links of the preset (every op, all_to_all too: (n−1)·α + (n−1)/n·m·β)."""
        path = path or path_for(floor)
        # once per distinct (n, m) of a grid (the NCCL model takes the minimum over algorithms and protocols)
        return on_unique(lambda n_, m_: self._collective_seconds(op, n_, m_, level, subgroup, g, path, custom),
                         np.asarray(n), np.asarray(size_bytes, dtype=float))

    def _collective_seconds(self, op, n_arr, size, level, subgroup, g, path, custom):
        # per group size: the NCCL model where it has one for (op, n), else the α-β fits or link of that n — chosen
        # element by element, so that a point's time never depends on the other points of a grid
        shape = np.broadcast(n_arr, size).shape
        out = np.zeros(shape)
        for x in (int(v) for v in np.unique(n_arr)):
            call = self._nccl_call(op, x, size, level, g, path, custom) if self.nccl else None
            sec = call[0] if call is not None else self._alpha_beta_time(op, x, size, level, subgroup)
            out = np.where(n_arr == x, sec, out) if n_arr.ndim else sec + out
        return out

    def collective_choice(self, op: str, n: int, size_bytes, level: str = "intra", g: int | None = None,
                          path: str = "nccl-eager", custom=None) -> dict:
        """What one call of ``op`` on ``n`` ranks does (sizes an array): ``{"seconds", "algorithm", "protocol",
        "path"}`` — NCCL's chosen (algorithm, protocol), a custom kernel's shot, or the α-β form's algorithm (protocol
        ``-``) on hardware without an NCCL model."""
        size = np.asarray(size_bytes, dtype=float)
        call = self._nccl_call(op, int(n), size, level, g, path, custom) if self.nccl else None
        if call is None:
            fit = self._fit(canonical_op(op), int(n), level, False)
            alg = str((fit or {}).get("algorithm") or self.links[level].algorithm)
            shape = np.broadcast(size, 0).shape
            call = (self._alpha_beta_time(op, int(n), size, level, False), np.full(shape, alg), np.full(shape, "-"))
            path = "host"
        return {"seconds": call[0], "algorithm": call[1], "protocol": call[2], "path": path}


def _derive(preset: Mapping[str, Any], name: str) -> dict:
    """A preset written as another plus changes (``"derive_from": {"preset", "kernel_bandwidth_scale"}``): the base
    preset's fields, replaced by this one's (``source`` merged), the fitted kernels' bandwidths (GEMM and
    memory-bound ``bytes_per_s``) scaled by the HBM ratio, and ``nccl`` entries replaced key by key
    (``nccl_changes``; ``null`` removes an entry). The base preset is taken with its calibration overlay (its fitted
    kernels and NCCL model live in ``data/calibration/``), as :func:`load_hardware` would load it."""
    spec = preset["derive_from"]
    try:
        base, _ = read_preset_or_file("hardware", str(spec["preset"]), "hardware")
    except (KeyError, TypeError):
        raise SpecError(f"hardware {name!r}: derive_from needs a 'preset'") from None
    base = _calibrated(base, str(spec["preset"]))
    out = json.loads(json.dumps(base))
    out.update({key: v for key, v in preset.items() if key not in ("derive_from", "source", "nccl_changes")})
    out["source"] = dict(base.get("source", {}), **preset.get("source", {}))
    scale = float(spec.get("kernel_bandwidth_scale", 1.0))
    if out.get("kernels"):
        out["kernels"]["gemm"]["bytes_per_s"] = float(out["kernels"]["gemm"]["bytes_per_s"]) * scale
        for params in out["kernels"]["memops"].values():
            params["bytes_per_s"] = float(params["bytes_per_s"]) * scale
        out["kernels"]["derived"] = f"from {spec['preset']}: bandwidths x {scale:.4g} (ASSUMPTION: HBM ratio)"
    for key, value in (preset.get("nccl_changes") or {}).items():
        if value is None:                       # a part the derived hardware lacks (e.g. NVLS without an NVSwitch)
            out.setdefault("nccl", {}).pop(key, None)
        else:
            out.setdefault("nccl", {})[key] = dict(out.get("nccl", {}).get(key, {}), **value)
    return out


def load_hardware(hw: "str | Path | Mapping[str, Any] | Hardware") -> Hardware:
    """A :class:`Hardware` from a preset name, a JSON path or a dict (a preset's calibration overlaid)."""
    return resolve("hardware", hw, Hardware, "hardware")


def for_ranks(hardware: Hardware, ranks: int, cores: int | None = None) -> Hardware:
    """``hardware`` with the compute calibration taken at the thread count each of ``ranks`` CPU ranks runs with.

    The ``cpu-local`` preset keeps one compute calibration per thread count (``compute_by_threads``: peak FLOP/s,
    memory bandwidth, flops efficiency, per-layer overhead); the entry for
    :func:`llmcomm.spec.cpu_threads_per_rank` (or the nearest calibrated count) replaces the top-level compute
    numbers. Presets without ``compute_by_threads`` (the GPUs) are returned unchanged."""
    by = hardware.raw.get("compute_by_threads") or {}
    if not by:
        return hardware
    want = cpu_threads_per_rank(ranks, cores)
    key = min(by, key=lambda x: (abs(int(x) - want), int(x)))
    preset = dict(hardware.raw)
    preset.update({x: v for x, v in by[key].items() if x in ("peak_tflops", "mem_bw_GBps", "efficiency",
                                                         "layer_overhead_us", "kernels", "host_us")})
    preset["threads"] = int(key)
    return Hardware.from_dict(preset, name=hardware.name)


def for_layout(hardware: Hardware, t: int, p: int, cores: int | None = None) -> Hardware:
    """``hardware`` as calibrated inside runs of layout t×p (the ``cpu-local`` calibration's ``in_run`` entries,
    written by ``llmcomm calibrate --in-run``: :mod:`llmcomm.compare.inrun`): the compute calibration of the thread
    count its ranks run with (:func:`for_ranks`), its kernel times × the layout's ``kernel_factor`` and its host
    times × ``host_factor`` (what running beside the other ranks costs: shared memory bandwidth, time-shared cores,
    polling peers), and the in-run all-reduce fits (an in-run fit of DeepSpeed's shm all-reduce replaces its one-shot
    path, on which the runs' calls were measured; the two-phase path keeps the microbenchmark's fit). Without an
    entry for the layout: :func:`for_ranks`."""
    base = for_ranks(hardware, int(t) * int(p), cores)
    entry = (hardware.raw.get("in_run") or {}).get(f"t{int(t)}p{int(p)}")
    if not entry:
        return base
    preset = json.loads(json.dumps(dict(base.raw)))
    comp = entry["compute"]
    kf, hf = float(comp["kernel_factor"]), float(comp["host_factor"])
    if "kernels" in preset:
        _scale_kernels(preset["kernels"], kf)
    preset["layer_overhead_us"] = float(preset.get("layer_overhead_us", 0.0)) * hf
    for host in (preset.get("host_us") or {}).values():
        for part in host:
            host[part] = float(host[part]) * hf
    for op, fits in (entry.get("collectives") or {}).items():
        key = "subgroup_collectives" if int(p) > 1 and op != "send_recv" else "collectives"
        for level in ("intra", "inter"):
            have = preset.setdefault(key, {}).setdefault(level, {}).setdefault(op, {})
            for n, fit in fits.items():
                base_fit = have.get(n, {})
                if base_fit.get("algorithm") == "shm" and fit.get("algorithm") == "direct":
                    # measured in the runs on the one-shot path: it replaces that path, the two-phase one stays
                    fit = dict(base_fit, alpha_us=fit["alpha_us"], busbw_GBps=fit["busbw_GBps"],
                               source=fit.get("source"))
                have[n] = fit
    preset["calibrated_layout"] = f"t{int(t)}p{int(p)}"
    return Hardware.from_dict(preset, name=hardware.name)


def _scale_kernels(kernels: dict, factor: float) -> None:
    """Every kernel time of a fitted ``kernels`` section × ``factor`` (rates ÷, floors ×), in place."""
    for params in (kernels["gemm"], *kernels.get("memops", {}).values()):
        for rate in ("flops_per_s", "bytes_per_s", "gemv_bytes_per_s"):
            if rate in params:
                params[rate] = float(params[rate]) / factor
        params["t0"] = float(params.get("t0", 0.0)) * factor


def scale_links(hardware: Hardware, factor: float, levels=("intra", "inter")) -> Hardware:
    """What-if: ``hardware`` with the bandwidth of its ``levels`` links (and fitted collectives) × ``factor``
    (β / factor; α unchanged)."""
    if not hardware.raw:
        raise SpecError(f"hardware {hardware.name!r} has no raw preset to scale")
    if factor <= 0:
        raise SpecError(f"link speed factor {factor!r} must be positive")
    preset = json.loads(json.dumps(dict(hardware.raw)))
    for lvl in levels:
        if lvl in preset.get("links", {}):
            preset["links"][lvl]["bw_GBps"] = float(preset["links"][lvl]["bw_GBps"]) * factor
        for key in ("collectives", "subgroup_collectives"):
            for fits in preset.get(key, {}).get(lvl, {}).values():
                for fit in fits.values():
                    fit["busbw_GBps"] = float(fit["busbw_GBps"]) * factor
    preset["name"] = f"{hardware.name} (links ×{factor:g})"
    return Hardware.from_dict(preset, name=preset["name"])
