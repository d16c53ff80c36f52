"""Public GPU measurements (Vidur's profiling data) beside the time model: loaders, fits, out-of-sample checks.

Source: github.com/microsoft/vidur, commit 7d47513 (MIT licence, Copyright (c) Microsoft Corporation), a subset kept
unchanged in ``data/external/vidur/`` with its README (what every column means) and LICENSE. Kernel times of one
decoder layer's linear layers at tensor-parallel shard widths on H100 and A100 (fp16, medians of 20 calls, PyTorch
profiler), and NCCL all-reduce / send-recv kernel times on DGX H100, DGX A100 and pairwise-NVLink nodes.

Validation, never fit-and-score on the same rows:

* GEMMs and memory-bound ops: **leave one model out** (LOMO): each model's rows are predicted by parameters fitted
  to the other models of the same GPU (the GEMM model's structural variant is chosen inside each fold too). H100
  has two models (Llama-2-7B at four TP widths, phi-2): two folds.
* NCCL all-reduce and send/recv (NCCL's tuning structure with the eager floor of these launches,
  :func:`llmcomm.predict.fit.fit_nccl`): **leave one size decade out** (LOSDO) per (system, op, n)
  (:func:`llmcomm.compare.nccl_data.losdo`); on the NVSwitch systems also **leave one group size out** (LOGO).
* across nodes: the A100 cluster's all-reduce **predicted** from its in-node all-reduce and its own send/recv
  (:func:`cross_node_predictions`); the public data given here hold no cross-node all-reduce.

:func:`fit_all` runs everything (minutes: hundreds of robust fits); ``llmcomm calibrate --public-gpu`` writes the
full-data parameters into the GPU presets and the error tables into ``data/validation/`` with provenance. Chapters
read those tables and predict with the presets; they never refit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..predict import fit
from ..predict.collectives import nccl_sendrecv_time, nccl_time
from ..predict.kernels import gemm_time, memop_time
from ..record import repo_root
from .nccl_data import losdo, summarise

__all__ = ["DATA", "SOURCE", "SM", "PRESET_OF", "RAILS", "load_compute", "load_network", "gemm_rows", "memop_rows",
           "fit_all", "error_summary", "network_link", "preset_sections", "cross_node_predictions", "cross_node_table"]

DATA = Path("data") / "external" / "vidur"
SOURCE = ("Vidur profiling data, github.com/microsoft/vidur @ 7d47513 (MIT licence, (c) Microsoft Corporation); "
          "data/external/vidur/")
#: SM counts (stated assumption: the H100 is the SXM part, its 850+ TFLOP/s exceed the PCIe/NVL dense peaks)
SM = {"h100": 132, "a100": 108}
#: which public system each GPU preset takes its fitted kernels and NCCL model from
PRESET_OF = {"h100-sxm": ("h100", "h100_dgx"), "a100-sxm-80gb": ("a100", "a100_dgx")}
#: the public data's op names → the book's
GEMM_NAMES = {"attn_pre_proj": "qkv_proj", "attn_post_proj": "attn_out_proj", "mlp_up_proj": "mlp_gate_up_proj",
              "mlp_down_proj": "mlp_down_proj"}
MEMOP_NAMES = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
               "attn_rope": "rope", "mlp_act": "mlp_act", "add": "residual_add", "emb": "emb"}


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


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Network rows with the model's columns: ``op``, ``n`` (ranks), ``nvls`` (fp16: NVLS may reduce them)."""
    return frame.assign(op=frame.collective, n=frame.num_workers.astype(int), nvls=True)


def _fitter(with_nvls: bool):
    def fit_rows(rows):
        return fit.fit_nccl(rows.op, rows.n, rows.m, rows.seconds, nvls=True, with_nvls=with_nvls, with_floor=True)
    return fit_rows


def _predict(params, rows):
    return fit.nccl_predict(rows.op, rows.n, rows.m, params, rows.nvls.to_numpy())


def _fit_network(net: pd.DataFrame, log) -> tuple[dict, list[pd.DataFrame]]:
    """The NCCL all-reduce model (with the eager floor of these back-to-back launches) per system — one fit over every
    n of an NVSwitch system (NVLS tried on H100), one per n on the pairwise-NVLink systems (each n another link) —
    and send/recv per placement; checked leave one size decade out (and leave one group size out on NVSwitch)."""
    params, errs = {}, []
    for system, grp in net.groupby("system", sort=True):
        ar = _rows(grp[grp.collective == "all_reduce"].reset_index(drop=True))
        if "dgx" in system:
            fitter = _fitter(with_nvls=system.startswith("h100"))
            full = fitter(ar)
            params.setdefault(system, {})["all_reduce"] = full
            errs += [ar.assign(validation="in_sample", predicted_s=_predict(full, ar)), losdo(ar, fitter, _predict)]
            for left_out in sorted(ar.n.unique()):                  # leave one group size out
                te = ar.n == left_out
                errs.append(ar[te].assign(validation="logo", predicted_s=_predict(fitter(ar[~te]), ar[te])))
        else:                                   # pairwise NVLink: n = 2 (bridge) and n = 4 (PCIe) are other links
            fitter = _fitter(with_nvls=False)
            for workers, of_n in ar.groupby("n"):
                full = fitter(of_n)
                params.setdefault(system, {}).setdefault("all_reduce_by_n", {})[str(int(workers))] = full
                errs += [of_n.assign(validation="in_sample", predicted_s=_predict(full, of_n)),
                         losdo(of_n, fitter, _predict)]
        for dpn, pairs in grp[grp.collective == "send_recv"].groupby("devices_per_node"):
            where = "inter" if dpn == 1 else "intra"
            full = fit.fit_nccl_sendrecv(pairs.m, pairs.seconds)
            params.setdefault(system, {}).setdefault("send_recv", {})[where] = full
            errs += [pairs.assign(validation="in_sample", predicted_s=nccl_sendrecv_time(pairs.m, full)),
                     losdo(pairs, lambda tr: fit.fit_nccl_sendrecv(tr.m, tr.seconds),
                           lambda prm, te: nccl_sendrecv_time(te.m, prm))]
        log(f"  nccl {system}: fitted")
    return params, [err.assign(part="collective") for err in errs]


def fit_all(log=print) -> tuple[dict, pd.DataFrame]:
    """Every fit and every out-of-sample check: ``(params, errors)``. ``params``: ``{"gemm": {gpu: …}, "memops":
    {gpu: {kind: …}}, "nccl": {system: {"all_reduce" | "all_reduce_by_n", "send_recv": {"intra", "inter"}}}}``
    fitted to all rows; ``errors``: one row per prediction with ``validation`` ∈ in_sample, lomo, logo, losdo,
    ``predicted_s``, ``seconds`` (measured) and ``rel_err``."""
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
    kern = errors[errors.part.isin(["gemm", "memop"])]
    coll = errors[errors.part == "collective"]
    return {"kernels": summarise(kern, ["part", "gpu", "op", "validation"]),
            "collectives": summarise(coll, ["system", "collective", "num_workers", "devices_per_node", "validation"])}


#: rails (network paths a node's rings spread over) of the two clusters, from their own cross-node send/recv
RAILS = {"a100_dgx": 1, "h100_dgx": 8}
RAILS_SOURCE = {
    "a100_dgx": "ASSUMPTION from the cluster's cross-node send/recv: it moves 7.8 GB/s (64 MiB in 8.6 ms), a third of "
                "one HDR 200 Gb/s NIC, so it does not run on the DGX A100's eight InfiniBand rails; the node's rings "
                "are taken to share that one path (the data do not say how many the node has)",
    "h100_dgx": "ASSUMPTION: the cross-node send/recv reaches 36 GB/s, one NDR 400 Gb/s NIC's rate (46-48 GB/s "
                "achievable: NVIDIA/nccl-tests issue #290), so the cluster runs on NDR rails; a DGX H100 has eight "
                "(one per GPU, DGX H100 datasheet)"}


def network_link(params: dict, system: str) -> dict:
    """The cross-node link of ``system`` from its own send/recv fits: ``hop_s`` = the cross-node send/recv latency
    above the in-node one (what a ring step waits for beyond an NVLink hop), ``bytes_per_s`` = the cross-node
    send/recv bandwidth (one rail), ``rails`` (:data:`RAILS`)."""
    sr = params["nccl"][system]["send_recv"]
    return {"hop_s": max(float(sr["inter"]["latency_s"]) - float(sr["intra"]["latency_s"]), 0.0),
            "bytes_per_s": float(sr["inter"]["bytes_per_s"]), "rails": RAILS[system],
            "source": f"from {system}'s cross-node and in-node send/recv fits ({SOURCE}); rails: "
                      f"{RAILS_SOURCE[system]}"}


def preset_sections(params: dict, preset: str, nccl: dict | None = None, nccl_source: str = "",
                    custom: dict | None = None) -> dict:
    """The ``kernels`` and ``nccl`` sections of GPU preset ``preset`` from :func:`fit_all`'s parameters, each with
    its source: the NCCL model fitted to the system's all-reduces, unless ``nccl`` (another source's kernel model
    of the same GPU, ``nccl_source`` saying which) replaces it; the eager floor (``floors``: ``nccl-eager``, what
    DeepSpeed and eager PyTorch pay), send/recv and the cross-node link (:func:`network_link`) always from the
    system's Vidur rows; ``custom``: the custom all-reduce section (:func:`llmcomm.compare.nccl_data.custom_section`)."""
    gpu, system = PRESET_OF[preset]
    nc = params["nccl"][system]
    own = {key: v for key, v in nc["all_reduce"].items() if key != "floor_s"}
    model = own if nccl is None else {key: v for key, v in nccl.items() if key != "floor_s"}
    section = dict(model, send_recv=nc["send_recv"], net=network_link(params, system),
                   floors={"nccl-eager": {"floor_s": float(nc["all_reduce"]["floor_s"]),
                                          "source": f"fitted to {SOURCE} ({system} all_reduce rows: eager "
                                                    "back-to-back launches whose kernels wait for the other ranks)"}})
    if custom:
        section["custom_allreduce"] = custom
    section["source"] = (nccl_source or f"NCCL model fitted to {SOURCE} ({system} all_reduce rows)") + \
        f"; send_recv, the eager floor and the cross-node link from {system}'s rows ({SOURCE}). " \
        "Cross-node all-reduces are PREDICTIONS: the public data hold none."
    return {"kernels": {"gemm": params["gemm"][gpu], "memops": params["memops"][gpu],
                        "source": f"fitted to {SOURCE} ({gpu} rows; llmcomm calibrate --public-gpu); flops_per_s at "
                                  "fp16"},
            "nccl": section}


#: the cross-node layouts predicted: (ranks, GPUs per node) over 2 and 4 nodes
CROSS_NODE_LAYOUTS = ((2, 1), (4, 2), (8, 4), (16, 8), (4, 1), (8, 2), (16, 4), (32, 8))


def cross_node_predictions(params: dict, system: str = "a100_dgx", layouts=CROSS_NODE_LAYOUTS) -> pd.DataFrame:
    """PREDICTED all-reduce times of ``system``'s cluster across nodes, from its in-node all-reduce fit and its own
    send/recv (:func:`network_link`) only — never fitted to a cross-node all-reduce — at every all-reduce size of its
    rows, with the eager floor of its launches: ``system, collective, num_workers, devices_per_node, num_nodes,
    size_bytes, predicted_s, algorithm, protocol``."""
    nc = dict(params["nccl"][system]["all_reduce"], net=network_link(params, system))
    net = load_network()
    sizes = np.unique(net[(net.system == system) & (net.collective == "all_reduce")].size_bytes).astype(float)
    out = []
    for n, dpn in layouts:
        tau, alg, proto = nccl_time("all_reduce", n, sizes, nc, nodes=n // dpn, floor_s=nc["floor_s"], detail=True)
        out.append(pd.DataFrame({"system": system, "collective": "all_reduce", "num_workers": n,
                                 "devices_per_node": dpn, "num_nodes": n // dpn, "size_bytes": sizes.astype(np.int64),
                                 "predicted_s": tau, "algorithm": alg, "protocol": proto}))
    return pd.concat(out, ignore_index=True)


def cross_node_table(nccl: dict, sizes=(2 ** 20, 16 * 2 ** 20, 64 * 2 ** 20, 256 * 2 ** 20, 2 ** 30),
                     layouts=((8, 1), (16, 2), (32, 4))) -> pd.DataFrame:
    """PREDICTED all-reduce times, busbw and chosen (algorithm, protocol) across nodes (n ranks over ``nodes``
    nodes) of messages of m = ``sizes`` bytes from a preset's ``nccl`` section (kernel times: no eager floor)."""
    rows = []
    for n, nodes in layouts:
        tau, alg, proto = nccl_time("all_reduce", n, np.asarray(sizes, dtype=float), nccl, nodes=nodes, detail=True)
        for m, sec, a_, p_ in zip(sizes, np.atleast_1d(tau), np.atleast_1d(alg), np.atleast_1d(proto)):
            rows.append({"ranks": n, "nodes": nodes, "message_bytes": m, "seconds": float(sec),
                         "busbw_GBps": m / float(sec) * 2 * (n - 1) / n / 1e9, "algorithm": str(a_),
                         "protocol": str(p_)})
    return pd.DataFrame(rows)
