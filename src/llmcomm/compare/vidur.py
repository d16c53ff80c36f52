"""Public GPU measurements (Vidur's profiling data) beside the time model: loaders, fits, out-of-sample checks.

Source: github.com/microsoft/vidur, commit 7d47513 (MIT licence, Copyright (c) Microsoft Corporation), a subset kept
unchanged in ``data/external/vidur/`` with its README (what every column means) and LICENSE. Kernel times of one
decoder layer's linear layers at tensor-parallel shard widths on H100 and A100 (fp16, medians of 20 calls, PyTorch
profiler), and NCCL all-reduce / send-recv kernel times on DGX H100, DGX A100 and pairwise-NVLink nodes.

Validation, never fit-and-score on the same rows:

* GEMMs and memory-bound ops: **leave one model out** (LOMO): each model's rows are predicted by parameters fitted
  to the other models of the same GPU (the GEMM model's structural variant is chosen inside each fold too). H100
  has two models (Llama-2-7B at four TP widths, phi-2): two folds.
* all-reduce on the NVSwitch systems: **leave one group size out** (LOGO): n predicted from the other two.
* every (system, op, n): fits on S ≤ 8 MiB predict S > 8 MiB (size extrapolation), reported as such.

:func:`fit_all` runs everything (minutes: hundreds of robust fits); ``llmcomm calibrate --public-gpu`` writes the
full-data parameters into the GPU presets and the error tables into ``data/validation/`` with provenance. Chapters
read those tables and predict with the presets; they never refit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..predict import fit
from ..predict.collectives import cross_node_allreduce_time, nccl_ring_time, nccl_sendrecv_time
from ..predict.kernels import gemm_time, memop_time
from ..record import repo_root

__all__ = ["DATA", "SOURCE", "SM", "PRESET_OF", "NIC_BYTES_PER_S", "load_compute", "load_network", "gemm_rows",
           "memop_rows", "fit_all", "error_summary", "preset_sections", "predict_gemm_rows", "predict_network_rows",
           "cross_node_table"]

DATA = Path("data") / "external" / "vidur"
SOURCE = ("Vidur profiling data, github.com/microsoft/vidur @ 7d47513 (MIT licence, (c) Microsoft Corporation); "
          "data/external/vidur/")
#: SM counts (stated assumption: the H100 is the SXM part, its 850+ TFLOP/s exceed the PCIe/NVL dense peaks)
SM = {"h100": 132, "a100": 108}
#: which public system each GPU preset takes its fitted kernels and NCCL model from
PRESET_OF = {"h100-sxm": ("h100", "h100_dgx"), "a100-sxm-80gb": ("a100", "a100_dgx")}
#: achievable per-NIC bandwidth used for cross-node predictions: NDR 400 Gb/s ≈ 46–48 GB/s in nccl-tests
#: (NVIDIA/nccl-tests issue #290), HDR 200 Gb/s ≈ 24 GB/s (NVIDIA/nccl-tests issue #119)
NIC_BYTES_PER_S = {"ndr": 47e9, "hdr": 24e9}
#: the public data's op names → the book's
GEMM_NAMES = {"attn_pre_proj": "qkv_proj", "attn_post_proj": "attn_out_proj", "mlp_up_proj": "mlp_gate_up_proj",
              "mlp_down_proj": "mlp_down_proj"}
MEMOP_NAMES = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
               "attn_rope": "rope", "mlp_act": "mlp_act", "add": "residual_add", "emb": "emb"}
EXTRAPOLATE_ABOVE = 8 * 2 ** 20


def _path(name: str) -> Path:
    return repo_root() / DATA / name


def load_compute() -> pd.DataFrame:
    """``compute_linear_ops.csv`` as published (times in ms)."""
    return pd.read_csv(_path("compute_linear_ops.csv"))


def load_network() -> pd.DataFrame:
    """``network.csv`` as published, plus ``seconds`` (the median) and ``S`` (bytes)."""
    net = pd.read_csv(_path("network.csv"))
    return net.assign(seconds=net.median_ms * 1e-3, S=net.size_bytes.astype(float))


def gemm_rows(c: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU, model, tp, tokens, GEMM): M, N, K of one TP rank's shard and the measured seconds."""
    d, f, a, akv, tp = (c[x].to_numpy() for x in ("n_embd", "n_expanded_embd", "n_head", "n_kv_head", "tp"))
    hd = d // a
    gated = np.where(c.use_gated_mlp.to_numpy(), 2, 1)
    shapes = {"attn_pre_proj": ((a + 2 * akv) * hd // tp, d), "attn_post_proj": (d, a * hd // tp),
              "mlp_up_proj": (gated * f // tp, d), "mlp_down_proj": (d, f // tp)}
    out = [pd.DataFrame({"gpu": c.gpu, "model": c.model, "tp": tp, "op": GEMM_NAMES[op], "M": c.num_tokens,
                         "N": N, "K": K, "seconds": c[f"{op}_ms"] * 1e-3}) for op, (N, K) in shapes.items()]
    return pd.concat(out, ignore_index=True)


def memop_rows(c: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU, model, tp, tokens, memory-bound op) with its kernel kind, bytes and row bytes (w = 2).
    phi-2 uses LayerNorm and GELU (kinds of their own) and a parallel attention/MLP block (two residual adds); its
    rotary kernel follows the full head size, not the rotated 32 of 80 dims (7.8 % against 51 % LOMO median)."""
    out = []
    w = 2.0
    for op, name in MEMOP_NAMES.items():
        s = c[c[f"{op}_ms"].notna()]
        d, f, a, akv, tp = (s[x].to_numpy(dtype=float) for x in ("n_embd", "n_expanded_embd", "n_head", "n_kv_head",
                                                                   "tp"))
        gated = s.use_gated_mlp.to_numpy()
        phi = s.model.str.contains("phi-2").to_numpy()
        if op in ("input_layernorm", "post_attention_layernorm", "emb"):
            row = 2 * w * d
        elif op == "add":
            row = 3 * w * d * np.where(phi, 2, 1)
        elif op == "mlp_act":
            row = np.where(gated, 3, 2) * w * f / tp
        else:
            row = 2 * w * (a + akv) / tp * (d / a)
        kind = {"input_layernorm": np.where(gated, "rmsnorm", "layernorm"),
                "post_attention_layernorm": np.where(gated, "rmsnorm", "layernorm"),
                "mlp_act": np.where(gated, "silu_mul", "gelu"), "attn_rope": "rope", "add": "add", "emb": "emb"}[op]
        T = s.num_tokens.to_numpy(dtype=float)
        out.append(pd.DataFrame({"gpu": s.gpu, "model": s.model, "tp": s.tp, "op": name, "kind": kind, "T": T,
                                 "bytes": T * row, "row_bytes": row, "seconds": s[f"{op}_ms"] * 1e-3}))
    return pd.concat(out, ignore_index=True)


def _err(pred, meas):
    return np.asarray(pred, dtype=float) / np.asarray(meas, dtype=float) - 1.0


# ----------------------------------------------------------------------------------------------------------- fits
def _fit_gemms(rows: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for gpu, d in rows.groupby("gpu", sort=True):
        d = d.reset_index(drop=True)
        M, N, K, t = (d[x].to_numpy(dtype=float) for x in ("M", "N", "K", "seconds"))
        p = fit.fit_gemm(M, N, K, t, SM[gpu])
        params[gpu] = p
        errs.append(d.assign(part="gemm", validation="in_sample", predicted_s=gemm_time(M, N, K, 2, p)))
        for m in d.model.unique():                                  # leave one model out
            te = (d.model == m).to_numpy()
            pf = fit.fit_gemm(M[~te], N[~te], K[~te], t[~te], SM[gpu])
            errs.append(d[te].assign(part="gemm", validation="lomo",
                                     predicted_s=gemm_time(M[te], N[te], K[te], 2, pf)))
            log(f"  gemm {gpu}: without {m}: variant {pf['variant']}, F {pf['F'] / 1e12:.0f} TFLOP/s")
    return params, errs


def _fit_memops(rows: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for (gpu, kind), d in rows.groupby(["gpu", "kind"], sort=True):
        d = d.reset_index(drop=True)
        b, r, t = (d[x].to_numpy(dtype=float) for x in ("bytes", "row_bytes", "seconds"))
        p = fit.fit_memop(b, r, t)
        params.setdefault(gpu, {})[kind] = p
        errs.append(d.assign(part="memop", validation="in_sample", predicted_s=memop_time(b, r, p)))
        if d.model.nunique() < 2:
            continue                      # a kernel only one model uses: no out-of-model check is possible
        for m in d.model.unique():
            te = (d.model == m).to_numpy()
            pf = fit.fit_memop(b[~te], r[~te], t[~te])
            errs.append(d[te].assign(part="memop", validation="lomo", predicted_s=memop_time(b[te], r[te], pf)))
    log(f"  memory-bound ops: {sum(len(v) for v in params.values())} kernel kinds")
    return params, errs


def _fit_network(net: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for system, d in net.groupby("system", sort=True):
        ar = d[d.collective == "all_reduce"].reset_index(drop=True)
        S, n, t = ar.S.to_numpy(), ar.num_workers.to_numpy(dtype=float), ar.seconds.to_numpy()
        small = S <= EXTRAPOLATE_ABOVE
        if "dgx" in system:                     # NVSwitch: one parameter set for every n
            p = fit.fit_nccl_allreduce(S, n, t)
            params.setdefault(system, {})["all_reduce"] = p
            errs.append(ar.assign(validation="in_sample", predicted_s=nccl_ring_time("all_reduce", n, S, p)))
            for k in np.unique(n):             # leave one group size out
                te = n == k
                pf = fit.fit_nccl_allreduce(S[~te], n[~te], t[~te])
                errs.append(ar[te].assign(validation="logo",
                                          predicted_s=nccl_ring_time("all_reduce", n[te], S[te], pf)))
            pe = fit.fit_nccl_allreduce(S[small], n[small], t[small])
            errs.append(ar[~small].assign(validation="extrapolation",
                                          predicted_s=nccl_ring_time("all_reduce", n[~small], S[~small], pe)))
        else:                                   # pairwise NVLink: n = 2 (bridge) and n = 4 (PCIe) are other links
            for k in np.unique(n):
                g = n == k
                p = fit.fit_nccl_allreduce(S[g], n[g], t[g], gamma=False)
                params.setdefault(system, {}).setdefault("all_reduce_by_n", {})[str(int(k))] = p
                errs.append(ar[g].assign(validation="in_sample",
                                         predicted_s=nccl_ring_time("all_reduce", n[g], S[g], p)))
                tr = g & small
                pe = fit.fit_nccl_allreduce(S[tr], n[tr], t[tr], gamma=False)
                ex = g & ~small
                errs.append(ar[ex].assign(validation="extrapolation",
                                          predicted_s=nccl_ring_time("all_reduce", n[ex], S[ex], pe)))
        for dpn, g in d[d.collective == "send_recv"].groupby("devices_per_node"):
            S2, t2 = g.S.to_numpy(), g.seconds.to_numpy()
            where = "inter" if dpn == 1 else "intra"
            p = fit.fit_nccl_sendrecv(S2, t2)
            params.setdefault(system, {}).setdefault("send_recv", {})[where] = p
            errs.append(g.assign(validation="in_sample", predicted_s=nccl_sendrecv_time(S2, p)))
            sm2 = S2 <= EXTRAPOLATE_ABOVE
            pe = fit.fit_nccl_sendrecv(S2[sm2], t2[sm2])
            errs.append(g[~sm2].assign(validation="extrapolation", predicted_s=nccl_sendrecv_time(S2[~sm2], pe)))
        log(f"  nccl {system}: fitted")
    return params, [e.assign(part="collective") for e in errs]


def fit_all(log=print) -> tuple[dict, pd.DataFrame]:
    """Every fit and every out-of-sample check: ``(params, errors)``. ``params``: ``{"gemm": {gpu: …}, "memops":
    {gpu: {kind: …}}, "nccl": {system: {"all_reduce" | "all_reduce_by_n", "send_recv": {"intra", "inter"}}}}``
    fitted to all rows; ``errors``: one row per prediction with ``validation`` ∈ in_sample, lomo, logo,
    extrapolation, ``predicted_s``, ``seconds`` (measured) and ``rel_err``."""
    c = load_compute()
    gp, ge = _fit_gemms(gemm_rows(c), log)
    mp, me = _fit_memops(memop_rows(c), log)
    npar, ne = _fit_network(load_network(), log)
    errors = pd.concat(ge + me + ne, ignore_index=True)
    errors["rel_err"] = _err(errors.predicted_s, errors.seconds)
    return {"gemm": gp, "memops": mp, "nccl": npar}, errors


def error_summary(errors: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables the book shows: ``kernels`` per (part, GPU, op, validation) and ``collectives`` per (system, op
    = collective, n, devices per node, validation): count, median and 90th percentile of |relative error|."""
    def summarise(df, keys):
        g = df.assign(abs_err=df.rel_err.abs()).groupby(keys, sort=True).abs_err
        return pd.DataFrame({"n": g.size(), "median_abs_err": g.median(), "p90_abs_err": g.quantile(0.9),
                             "max_abs_err": g.max()}).reset_index()
    kern = errors[errors.part.isin(["gemm", "memop"])]
    coll = errors[errors.part == "collective"]
    return {"kernels": summarise(kern, ["part", "gpu", "op", "validation"]),
            "collectives": summarise(coll, ["system", "collective", "num_workers", "devices_per_node", "validation"])}


def preset_sections(params: dict, preset: str) -> dict:
    """The ``kernels`` and ``nccl`` sections of GPU preset ``preset`` from :func:`fit_all`'s parameters, each with
    its source. The cross-node link: α per network step from the fitted cross-node send/recv latency minus the
    in-node one plus an in-node ring step; bandwidth per NIC from the NDR figure (the public data do not document
    their inter-node network, and their cross-node send/recv reaches 36 GB/s: NIC_BYTES_PER_S)."""
    gpu, system = PRESET_OF[preset]
    nc = params["nccl"][system]
    ar, sr = nc["all_reduce"], nc["send_recv"]
    alpha_net = max(sr["inter"]["c"] - sr["intra"]["c"], 0.0) + ar["alpha"]
    nic = NIC_BYTES_PER_S["ndr"]
    return {"kernels": {"gemm": params["gemm"][gpu], "memops": params["memops"][gpu],
                        "source": f"fitted to {SOURCE} ({gpu} rows; llmcomm calibrate --public-gpu); F at fp16"},
            "nccl": {"all_reduce": ar, "send_recv": sr,
                     "net": {"alpha_net": alpha_net, "B_nic": nic, "rails": None},
                     "source": f"fitted to {SOURCE} ({system} rows). F is the launch floor of eager back-to-back "
                               "launches; net: alpha from the cross-node send_recv fit, B_nic = 47 GB/s per NDR "
                               "NIC (nccl-tests issue #290), one NIC per GPU (rails = GPUs per node). Cross-node "
                               "all-reduce is a PREDICTION: the public data have none."}}


# ------------------------------------------------------------------------------------------------- for the book
def predict_gemm_rows(rows: pd.DataFrame, kernels_of: dict) -> pd.DataFrame:
    """``rows`` (:func:`gemm_rows`) with ``predicted_s`` from the presets' fitted GEMM models (``{gpu: params}``)."""
    pred = np.full(len(rows), np.nan)
    for gpu, p in kernels_of.items():
        m = (rows.gpu == gpu).to_numpy()
        pred[m] = gemm_time(rows.M[m], rows.N[m], rows.K[m], 2, p)
    return rows.assign(predicted_s=pred)


def predict_network_rows(net: pd.DataFrame, nccl_of: dict, floor: bool = True) -> pd.DataFrame:
    """``net`` (:func:`load_network`) with ``predicted_s`` from fitted NCCL models (``{system: nccl section}``)."""
    pred = np.full(len(net), np.nan)
    for system, nc in nccl_of.items():
        d = net.system == system
        ar = (d & (net.collective == "all_reduce")).to_numpy()
        pred[ar] = nccl_ring_time("all_reduce", net.num_workers[ar], net.S[ar], nc["all_reduce"], floor)
        for where in ("intra", "inter"):
            m = (d & (net.collective == "send_recv") & ((net.devices_per_node == 1) == (where == "inter"))).to_numpy()
            if m.any() and where in nc.get("send_recv", {}):
                pred[m] = nccl_sendrecv_time(net.S[m], nc["send_recv"][where], floor)
    return net.assign(predicted_s=pred)


def cross_node_table(nccl: dict, sizes=(2 ** 20, 16 * 2 ** 20, 64 * 2 ** 20, 256 * 2 ** 20, 2 ** 30),
                     layouts=((8, 1), (16, 2), (32, 4))) -> pd.DataFrame:
    """PREDICTED all-reduce times and busbw across nodes (n ranks over k nodes) from a preset's ``nccl`` section."""
    rows = []
    for n, k in layouts:
        for S in sizes:
            t = float(cross_node_allreduce_time(S, n, k, nccl["all_reduce"], nccl["net"], nccl["net"].get("rails")))
            rows.append({"ranks": n, "nodes": k, "bytes": S, "seconds": t, "busbw_GBps": S / t * 2 * (n - 1) / n / 1e9})
    return pd.DataFrame(rows)
