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
* every (system, op, n): fits on m ≤ 8 MiB predict m > 8 MiB (size extrapolation), reported as such.

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
           "memop_rows", "fit_all", "error_summary", "preset_sections", "cross_node_table"]

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
    """``network.csv`` as published, plus ``seconds`` (the median) and ``m`` (the message size in bytes)."""
    net = pd.read_csv(_path("network.csv"))
    return net.assign(seconds=net.median_ms * 1e-3, m=net.size_bytes.astype(float))


def gemm_rows(compute: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU, model, tp, tokens, GEMM): its dimensions M_g, N_g, K_g (columns ``M``, ``N``, ``K``) on one
    TP rank's shard and the measured seconds."""
    h, ffn, a, akv, tp = (compute[x].to_numpy() for x in ("n_embd", "n_expanded_embd", "n_head", "n_kv_head", "tp"))
    d = h // a
    gated = np.where(compute.use_gated_mlp.to_numpy(), 2, 1)
    shapes = {"attn_pre_proj": ((a + 2 * akv) * d // tp, h), "attn_post_proj": (h, a * d // tp),
              "mlp_up_proj": (gated * ffn // tp, h), "mlp_down_proj": (h, ffn // tp)}
    out = [pd.DataFrame({"gpu": compute.gpu, "model": compute.model, "tp": tp, "op": GEMM_NAMES[op],
                         "M": compute.num_tokens, "N": N_g, "K": K_g, "seconds": compute[f"{op}_ms"] * 1e-3})
           for op, (N_g, K_g) in shapes.items()]
    return pd.concat(out, ignore_index=True)


def memop_rows(compute: pd.DataFrame) -> pd.DataFrame:
    """One row per (GPU, model, tp, tokens, memory-bound op) with its kernel kind, bytes and row bytes (w = 2).
    phi-2 uses LayerNorm and GELU (kinds of their own) and a parallel attention/MLP block (two residual adds); its
    rotary kernel follows the full head size, not the rotated 32 of 80 dims (7.8 % against 51 % LOMO median)."""
    out = []
    w = 2.0
    for op, name in MEMOP_NAMES.items():
        rows = compute[compute[f"{op}_ms"].notna()]
        h, ffn, a, akv, tp = (rows[x].to_numpy(dtype=float) for x in ("n_embd", "n_expanded_embd", "n_head",
                                                                       "n_kv_head", "tp"))
        gated = rows.use_gated_mlp.to_numpy()
        phi2 = rows.model.str.contains("phi-2").to_numpy()
        if op in ("input_layernorm", "post_attention_layernorm", "emb"):
            row = 2 * w * h
        elif op == "add":
            row = 3 * w * h * np.where(phi2, 2, 1)
        elif op == "mlp_act":
            row = np.where(gated, 3, 2) * w * ffn / tp
        else:
            row = 2 * w * (a + akv) / tp * (h / a)
        kind = {"input_layernorm": np.where(gated, "rmsnorm", "layernorm"),
                "post_attention_layernorm": np.where(gated, "rmsnorm", "layernorm"),
                "mlp_act": np.where(gated, "silu_mul", "gelu"), "attn_rope": "rope", "add": "add", "emb": "emb"}[op]
        T = rows.num_tokens.to_numpy(dtype=float)
        out.append(pd.DataFrame({"gpu": rows.gpu, "model": rows.model, "tp": rows.tp, "op": name, "kind": kind,
                                 "T": T, "bytes": T * row, "row_bytes": row, "seconds": rows[f"{op}_ms"] * 1e-3}))
    return pd.concat(out, ignore_index=True)


def _err(pred, meas):
    return np.asarray(pred, dtype=float) / np.asarray(meas, dtype=float) - 1.0


# ----------------------------------------------------------------------------------------------------------- fits
def _fit_gemms(rows: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for gpu, grp in rows.groupby("gpu", sort=True):
        grp = grp.reset_index(drop=True)
        M_g, N_g, K_g, tau = (grp[x].to_numpy(dtype=float) for x in ("M", "N", "K", "seconds"))
        full = fit.fit_gemm(M_g, N_g, K_g, tau, SM[gpu])
        params[gpu] = full
        errs.append(grp.assign(part="gemm", validation="in_sample", predicted_s=gemm_time(M_g, N_g, K_g, 2, full)))
        for model in grp.model.unique():                            # leave one model out
            te = (grp.model == model).to_numpy()
            pf = fit.fit_gemm(M_g[~te], N_g[~te], K_g[~te], tau[~te], SM[gpu])
            errs.append(grp[te].assign(part="gemm", validation="lomo",
                                       predicted_s=gemm_time(M_g[te], N_g[te], K_g[te], 2, pf)))
            log(f"  gemm {gpu}: without {model}: variant {pf['variant']}, "
                f"{pf['flops_per_s'] / 1e12:.0f} TFLOP/s")
    return params, errs


def _fit_memops(rows: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for (gpu, kind), grp in rows.groupby(["gpu", "kind"], sort=True):
        grp = grp.reset_index(drop=True)
        nb, r, tau = (grp[x].to_numpy(dtype=float) for x in ("bytes", "row_bytes", "seconds"))
        full = fit.fit_memop(nb, r, tau)
        params.setdefault(gpu, {})[kind] = full
        errs.append(grp.assign(part="memop", validation="in_sample", predicted_s=memop_time(nb, r, full)))
        if grp.model.nunique() < 2:
            continue                      # a kernel only one model uses: no out-of-model check is possible
        for model in grp.model.unique():
            te = (grp.model == model).to_numpy()
            pf = fit.fit_memop(nb[~te], r[~te], tau[~te])
            errs.append(grp[te].assign(part="memop", validation="lomo", predicted_s=memop_time(nb[te], r[te], pf)))
    log(f"  memory-bound ops: {sum(len(v) for v in params.values())} kernel kinds")
    return params, errs


def _fit_network(net: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    params, errs = {}, []
    for system, grp in net.groupby("system", sort=True):
        ar = grp[grp.collective == "all_reduce"].reset_index(drop=True)
        m, n, tau = ar.m.to_numpy(), ar.num_workers.to_numpy(dtype=float), ar.seconds.to_numpy()
        small = m <= EXTRAPOLATE_ABOVE
        if "dgx" in system:                     # NVSwitch: one parameter set for every n
            full = fit.fit_nccl_allreduce(m, n, tau)
            params.setdefault(system, {})["all_reduce"] = full
            errs.append(ar.assign(validation="in_sample", predicted_s=nccl_ring_time("all_reduce", n, m, full)))
            for left_out in np.unique(n):       # leave one group size out
                te = n == left_out
                pf = fit.fit_nccl_allreduce(m[~te], n[~te], tau[~te])
                errs.append(ar[te].assign(validation="logo",
                                          predicted_s=nccl_ring_time("all_reduce", n[te], m[te], pf)))
            pe = fit.fit_nccl_allreduce(m[small], n[small], tau[small])
            errs.append(ar[~small].assign(validation="extrapolation",
                                          predicted_s=nccl_ring_time("all_reduce", n[~small], m[~small], pe)))
        else:                                   # pairwise NVLink: n = 2 (bridge) and n = 4 (PCIe) are other links
            for workers in np.unique(n):
                of_n = n == workers
                full = fit.fit_nccl_allreduce(m[of_n], n[of_n], tau[of_n], bw_growth=False)
                params.setdefault(system, {}).setdefault("all_reduce_by_n", {})[str(int(workers))] = full
                errs.append(ar[of_n].assign(validation="in_sample",
                                            predicted_s=nccl_ring_time("all_reduce", n[of_n], m[of_n], full)))
                tr = of_n & small
                pe = fit.fit_nccl_allreduce(m[tr], n[tr], tau[tr], bw_growth=False)
                ex = of_n & ~small
                errs.append(ar[ex].assign(validation="extrapolation",
                                          predicted_s=nccl_ring_time("all_reduce", n[ex], m[ex], pe)))
        for dpn, pairs in grp[grp.collective == "send_recv"].groupby("devices_per_node"):
            m2, tau2 = pairs.m.to_numpy(), pairs.seconds.to_numpy()
            where = "inter" if dpn == 1 else "intra"
            full = fit.fit_nccl_sendrecv(m2, tau2)
            params.setdefault(system, {}).setdefault("send_recv", {})[where] = full
            errs.append(pairs.assign(validation="in_sample", predicted_s=nccl_sendrecv_time(m2, full)))
            sm2 = m2 <= EXTRAPOLATE_ABOVE
            pe = fit.fit_nccl_sendrecv(m2[sm2], tau2[sm2])
            errs.append(pairs[~sm2].assign(validation="extrapolation",
                                           predicted_s=nccl_sendrecv_time(m2[~sm2], pe)))
        log(f"  nccl {system}: fitted")
    return params, [err.assign(part="collective") for err in errs]


def fit_all(log=print) -> tuple[dict, pd.DataFrame]:
    """Every fit and every out-of-sample check: ``(params, errors)``. ``params``: ``{"gemm": {gpu: …}, "memops":
    {gpu: {kind: …}}, "nccl": {system: {"all_reduce" | "all_reduce_by_n", "send_recv": {"intra", "inter"}}}}``
    fitted to all rows; ``errors``: one row per prediction with ``validation`` ∈ in_sample, lomo, logo,
    extrapolation, ``predicted_s``, ``seconds`` (measured) and ``rel_err``."""
    compute = load_compute()
    gp, ge = _fit_gemms(gemm_rows(compute), log)
    mp, me = _fit_memops(memop_rows(compute), log)
    npar, ne = _fit_network(load_network(), log)
    errors = pd.concat(ge + me + ne, ignore_index=True)
    errors["rel_err"] = _err(errors.predicted_s, errors.seconds)
    return {"gemm": gp, "memops": mp, "nccl": npar}, errors


def error_summary(errors: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables the book shows: ``kernels`` per (part, GPU, op, validation) and ``collectives`` per (system, op
    = collective, n = num_workers, devices per node, validation): ``rows`` (the count), median and 90th percentile
    of |relative error|."""
    def summarise(df, keys):
        by = df.assign(abs_err=df.rel_err.abs()).groupby(keys, sort=True).abs_err
        return pd.DataFrame({"rows": by.size(), "median_abs_err": by.median(), "p90_abs_err": by.quantile(0.9),
                             "max_abs_err": by.max()}).reset_index()
    kern = errors[errors.part.isin(["gemm", "memop"])]
    coll = errors[errors.part == "collective"]
    return {"kernels": summarise(kern, ["part", "gpu", "op", "validation"]),
            "collectives": summarise(coll, ["system", "collective", "num_workers", "devices_per_node", "validation"])}


def preset_sections(params: dict, preset: str) -> dict:
    """The ``kernels`` and ``nccl`` sections of GPU preset ``preset`` from :func:`fit_all`'s parameters, each with
    its source. The cross-node link: ``step_net_s`` (s per network step) from the fitted cross-node send/recv
    latency minus the in-node one plus an in-node ring step; ``nic_bytes_per_s`` from the NDR figure (the public data
    do not document their inter-node network, and their cross-node send/recv reaches 36 GB/s: NIC_BYTES_PER_S)."""
    gpu, system = PRESET_OF[preset]
    nc = params["nccl"][system]
    ar, sr = nc["all_reduce"], nc["send_recv"]
    step_net_s = max(sr["inter"]["latency_s"] - sr["intra"]["latency_s"], 0.0) + ar["step_s"]
    nic = NIC_BYTES_PER_S["ndr"]
    return {"kernels": {"gemm": params["gemm"][gpu], "memops": params["memops"][gpu],
                        "source": f"fitted to {SOURCE} ({gpu} rows; llmcomm calibrate --public-gpu); flops_per_s at "
                                  "fp16"},
            "nccl": {"all_reduce": ar, "send_recv": sr,
                     "net": {"step_net_s": step_net_s, "nic_bytes_per_s": nic, "rails": None},
                     "source": f"fitted to {SOURCE} ({system} rows). floor_s is the launch floor of eager "
                               "back-to-back launches; net: step_net_s from the cross-node send_recv fit, "
                               "nic_bytes_per_s = 47 GB/s per NDR NIC (nccl-tests issue #290), one NIC per GPU (rails "
                               "= GPUs per node). Cross-node all-reduce is a PREDICTION: the public data have none."}}


def cross_node_table(nccl: dict, sizes=(2 ** 20, 16 * 2 ** 20, 64 * 2 ** 20, 256 * 2 ** 20, 2 ** 30),
                     layouts=((8, 1), (16, 2), (32, 4))) -> pd.DataFrame:
    """PREDICTED all-reduce times and busbw across nodes (n ranks over ``nodes`` nodes) of messages of m = ``sizes``
    bytes from a preset's ``nccl`` section."""
    rows = []
    for n, nodes in layouts:
        for m in sizes:
            tau = float(cross_node_allreduce_time(m, n, nodes, nccl["all_reduce"], nccl["net"],
                                                  nccl["net"].get("rails")))
            rows.append({"ranks": n, "nodes": nodes, "message_bytes": m, "seconds": tau,
                         "busbw_GBps": m / tau * 2 * (n - 1) / n / 1e9})
    return pd.DataFrame(rows)
