"""The hand-off's time model (:mod:`llmcomm.predict.handoff`) against the public KV-transfer measurements in
``data/external/kv_transfer/`` (its README says where each figure comes from and what is unknown).

**Mooncake** (vLLM v1, MooncakeConnector, Qwen3-8B, 1P1D, t_P = t_D = 8, H800 nodes with 8 × ConnectX-7 RoCE, one
request at a time): nine prompt lengths S, each with the KV size and the "actual transfer time". The bytes are checked
against :func:`llmcomm.derive.disagg.handoff_summary`: the page's sizes are binary units (MiB, GiB) of the KV of
**S + 16** tokens — the chat template adds a few tokens (1 to 16: unknown how many) and whole blocks of vLLM's default
16 tokens move (:func:`moved_tokens`, an inference from the sizes, stated as such). The time model's two parameters of
the ``inter`` level — the per-message floor and one rank's bandwidth — are fitted by non-negative least squares in
relative error (:func:`fit_inter`) and every point is **predicted from the others**: ``loo9`` (each of the nine from
the other eight) and ``loo3`` (the issue's three points, 128, 4,096 and 32,768 tokens: each from the other two, an
exact solve). ``in-sample`` (all nine) is the fit the ``h800-roce`` preset carries, not a check. The per-piece cost is
not identifiable from these points (at fixed layouts the pieces grow with the bytes), so it is held at 0 here.

**NIXL** (vLLM issue #34054, one host, the transfer not over NVLink): one log line — 313 MB in 173.8 ms over 40,064
descriptors, 129.1 ms of it posting them. :func:`nixl_point` splits it into a per-piece cost (post time ÷
descriptors) and a bandwidth (the bytes over the rest): one point, two parameters, reproduced by construction — a
decomposition, not a validation; what that per-piece cost would mean for the Mooncake points is the comparison.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from ..derive.disagg import handoff_summary
from ..derive.disagg import message_pieces
from ..predict.handoff import handoff_time
from ..predict.hardware import Hardware, load_hardware
from ..record import load_frame
from ..spec import Disaggregation, Layout, SpecError, Workload, load_model, read_preset_or_file

__all__ = ["FOLDER", "MOONCAKE_BLOCK", "ISSUE_POINTS", "mooncake_points", "mooncake_setup", "moved_tokens",
           "mooncake_bytes", "fit_inter", "mooncake_comparison", "mooncake_ttft", "nixl_point", "UNITS",
           "calibrate_handoff", "HANDOFF_COMMAND"]

#: the command that writes the hand-off's calibration alone (``make gpu-fits`` writes it with the GPU fits)
HANDOFF_COMMAND = "python -c 'from llmcomm.compare.handoff import calibrate_handoff; calibrate_handoff()'"

#: where the public points live under data/
FOLDER = "external/kv_transfer"
#: vLLM's default KV block size on CUDA (the launch commands set none)
MOONCAKE_BLOCK = 16
#: the three points the issue quotes
ISSUE_POINTS = (128, 4096, 32768)
#: the page's size units, read as binary (the sizes agree with MiB / GiB, not MB / GB: README)
UNITS = {"MB": 2 ** 20, "GB": 2 ** 30}


def mooncake_points() -> tuple[pd.DataFrame, dict]:
    """The Mooncake table and its provenance."""
    return load_frame("mooncake_vllm_v1", FOLDER)


def mooncake_setup(block: int | None = MOONCAKE_BLOCK, calibrated: bool = True):
    """(model, disaggregation, hardware, GPUs per node) of the Mooncake runs: Qwen3-8B, TP 8 → TP 8 on two H800
    nodes (``h800-roce``; ``calibrated=False``: the preset without its calibration file, as the fit that writes it
    needs — the fit gives every parameter it uses)."""
    model = load_model("qwen3-8b")
    dis = Disaggregation(Layout(8, 1), Layout(8, 1), block=block).validate(model)
    if calibrated:
        return model, dis, load_hardware("h800-roce"), 8
    preset, _ = read_preset_or_file("hardware", "h800-roce", "hardware")
    bare = {key: v for key, v in preset.items() if key != "calibrated_in"}
    return model, dis, Hardware.from_dict(bare, name="h800-roce"), 8


def moved_tokens(prompt: int, block: int = MOONCAKE_BLOCK) -> int:
    """The tokens whose KV moves for a random prompt of ``prompt`` tokens sent through the chat endpoint: the prompt
    plus 1 to 16 template tokens, in whole blocks (= prompt + 16 for a prompt that is a multiple of the block)."""
    return -(-(int(prompt) + 1) // block) * block


def mooncake_bytes() -> pd.DataFrame:
    """Per point: the derived KV bytes of S and of the moved tokens beside the reported size (binary units), and the
    gaps (%) — the reported size is printed to 2-3 digits, so a gap under its rounding is agreement."""
    df, _ = mooncake_points()
    model, dis, _, _ = mooncake_setup(calibrated=False)
    rows = []
    for r in df.itertuples():
        reported = float(r.kv_size_reported) * UNITS[r.kv_size_unit]
        plain = handoff_summary(model, dis, Workload(1, int(r.prompt_tokens), 2, "bf16"))["kv_bytes"]
        moved = handoff_summary(model, dis, Workload(1, moved_tokens(r.prompt_tokens), 2, "bf16"))["kv_bytes"]
        rows.append({"prompt_tokens": int(r.prompt_tokens), "moved_tokens": moved_tokens(r.prompt_tokens),
                     "kv_bytes_prompt": plain, "kv_bytes_moved": moved, "kv_bytes_reported": reported,
                     "gap_prompt_pct": 100 * (plain / reported - 1), "gap_moved_pct": 100 * (moved / reported - 1),
                     "gap_moved_decimal_pct": 100 * (moved / (float(r.kv_size_reported) * (
                         1e6 if r.kv_size_unit == "MB" else 1e9)) - 1)})
    return pd.DataFrame(rows)


def _features(model, dis, hw: Hardware, g: int, prompt: int) -> tuple[float, float]:
    """(messages, bytes) on the hand-off's busiest endpoint for one request of ``prompt`` tokens: the model's time
    with unit parameters (floor 1 s, then 1 B/s). Linear in the two parameters when one endpoint is the busiest for
    both, as in a plan of equal messages."""
    wl = Workload(1, moved_tokens(prompt), 2, "bf16")
    unit = lambda floor, rate: {"inter": {"floor_s": floor, "bytes_per_s": rate, "piece_s": 0.0}}  # noqa: E731
    msgs = handoff_time(model, dis, wl, hw, g, params=unit(1.0, 1e300), tokens=False)["seconds"]
    nbytes = handoff_time(model, dis, wl, hw, g, params=unit(0.0, 1.0), tokens=False)["seconds"]
    return msgs, nbytes


def fit_inter(prompts, seconds) -> dict:
    """``{"floor_s", "bytes_per_s", "piece_s": 0}`` of the ``inter`` level fitted to Mooncake points (prompt lengths
    and transfer seconds): non-negative least squares of the relative error (scipy's ``nnls``)."""
    prompts, seconds = list(prompts), np.asarray(seconds, dtype=float)
    if len(prompts) < 2 or len(prompts) != len(seconds):
        raise SpecError("fitting the hand-off needs at least two points, each a prompt length and a time")
    model, dis, hw, g = mooncake_setup(calibrated=False)
    feats = np.array([_features(model, dis, hw, g, x) for x in prompts])
    coef, _ = nnls(feats / seconds[:, None], np.ones(len(prompts)))
    if coef[1] <= 0:
        raise SpecError("the fit gives no bandwidth term: the points do not grow with the bytes")
    return {"floor_s": float(coef[0]), "bytes_per_s": float(1.0 / coef[1]), "piece_s": 0.0}


def _predict(prompt: int, params: dict) -> float:
    model, dis, hw, g = mooncake_setup(calibrated=False)
    wl = Workload(1, moved_tokens(prompt), 2, "bf16")
    return handoff_time(model, dis, wl, hw, g, params={"inter": params}, tokens=False)["seconds"]


def mooncake_comparison() -> pd.DataFrame:
    """Predicted vs reported transfer time for each scheme (``loo9``, ``loo3``: each point from a fit that leaves it
    out; ``in-sample``: all nine, not a check): ``scheme, prompt_tokens, reported_ms, predicted_ms, error_pct,
    floor_s, bytes_per_s, fitted_on``."""
    df, _ = mooncake_points()
    times = dict(zip(df["prompt_tokens"].astype(int), df["transfer_ms"].astype(float) / 1e3))
    rows = []

    def add(scheme, prompt, train):
        par = fit_inter(train, [times[x] for x in train])
        pred = _predict(prompt, par)
        rows.append({"scheme": scheme, "prompt_tokens": prompt, "reported_ms": times[prompt] * 1e3,
                     "predicted_ms": pred * 1e3, "error_pct": 100 * (pred / times[prompt] - 1),
                     "floor_s": par["floor_s"], "bytes_per_s": par["bytes_per_s"],
                     "fitted_on": " ".join(map(str, train))})

    for prompt in times:
        add("loo9", prompt, [x for x in times if x != prompt])
    for prompt in ISSUE_POINTS:
        add("loo3", prompt, [x for x in ISSUE_POINTS if x != prompt])
    for prompt in times:
        add("in-sample", prompt, list(times))
    return pd.DataFrame(rows)


def mooncake_ttft(layerwise: bool = False) -> pd.DataFrame:
    """The share of TTFT the hand-off takes, reported vs predicted, per Mooncake point: ``prompt_tokens,
    reported_ttft_ms, reported_transfer_ms, reported_share, predicted_prefill_ms, predicted_handoff_ms,
    predicted_ttft_ms, predicted_share, ttft_error_pct``. Nothing here is fitted to the TTFTs: the prefill is the
    time model's on ``h800-roce`` (h100-sxm's kernels and NCCL fits, ASSUMPTION), the hand-off the preset's fit on
    the transfer times. The reported TTFT also holds the first decode step, the proxy and HTTP; the prediction is
    the prefill plus the hand-off."""
    from ..predict.handoff import disaggregated_latency

    df, _ = mooncake_points()
    model, dis, hw, g = mooncake_setup()
    rows = []
    for r in df.itertuples():
        res = disaggregated_latency(model, dis, Workload(1, moved_tokens(r.prompt_tokens), 2, "bf16"), hw, g,
                                    layerwise=layerwise)
        rows.append({"prompt_tokens": int(r.prompt_tokens), "reported_ttft_ms": float(r.mean_ttft_ms),
                     "reported_transfer_ms": float(r.transfer_ms),
                     "reported_share": float(r.transfer_ms) / float(r.mean_ttft_ms),
                     "predicted_prefill_ms": res["prefill_s"] * 1e3, "predicted_handoff_ms": res["handoff_s"] * 1e3,
                     "predicted_ttft_ms": res["ttft_s"] * 1e3, "predicted_share": res["handoff_share"],
                     "ttft_error_pct": 100 * (res["ttft_s"] * 1e3 / float(r.mean_ttft_ms) - 1)})
    return pd.DataFrame(rows)


def nixl_point(mb_unit: int = 2 ** 20) -> dict:
    """The NIXL report split into the model's terms (module docs): ``{"bytes", "descriptors", "seconds",
    "piece_s", "bytes_per_s", "piece_share", "predicted_s", "mooncake_32k_pieces_per_rank",
    "mooncake_32k_piece_s_total", "mooncake_32k_reported_s"}`` — the last three: what the Mooncake 32,768-token
    hand-off's pieces (HND blocks of 16, per rank) would cost at this per-piece cost, beside its reported time."""
    df, _ = load_frame("nixl_vllm_issue_34054", FOLDER)
    r = df.iloc[0]
    nbytes = float(r["avg_mb_per_transfer"]) * mb_unit
    seconds, post = float(r["avg_xfer_ms"]) / 1e3, float(r["avg_post_ms"]) / 1e3
    piece_s = post / float(r["avg_descriptors"])
    rate = nbytes / (seconds - post)
    model, dis, _, _ = mooncake_setup(calibrated=False)
    wl = Workload(1, moved_tokens(32768), 2, "bf16")
    per_rank = message_pieces("kv", wl, dis) * model.L           # one KV head per rank: L messages per rank
    moon, _ = mooncake_points()
    return {"bytes": nbytes, "descriptors": float(r["avg_descriptors"]), "seconds": seconds, "piece_s": piece_s,
            "bytes_per_s": rate, "piece_share": post / seconds,
            "predicted_s": float(r["avg_descriptors"]) * piece_s + nbytes / rate,
            "bytes_per_descriptor": nbytes / float(r["avg_descriptors"]),
            "mooncake_32k_pieces_per_rank": per_rank, "mooncake_32k_piece_s_total": per_rank * piece_s,
            "mooncake_32k_reported_s": float(moon.loc[moon["prompt_tokens"] == 32768, "transfer_ms"].iloc[0]) / 1e3}


def calibrate_handoff(command: str | None = None, path=None) -> dict:
    """The ``h800-roce`` preset's ``kv_transfer.inter`` fitted on all nine Mooncake points (:func:`fit_inter`),
    written to its calibration file (:func:`llmcomm.compare.calibration.write_calibration`; ``path`` elsewhere),
    and the leave-one-out comparison (:func:`mooncake_comparison`) to ``data/validation/handoff_mooncake.csv`` with
    its sidecar. Returns the fitted parameters."""
    from ..record import data_dir, save_frame
    from .calibration import write_calibration

    command = command or HANDOFF_COMMAND
    df, _ = mooncake_points()
    fit = fit_inter(df["prompt_tokens"].astype(int), df["transfer_ms"].astype(float) / 1e3)
    note = ("fitted by llmcomm.compare.handoff.fit_inter on all nine Mooncake points (data/external/kv_transfer/"
            "mooncake_vllm_v1.csv): the per-message floor and one rank's bandwidth, non-negative least squares of the "
            "relative error; each point predicted from the others in data/validation/handoff_mooncake.csv")
    overlay = {"kv_transfer": {"inter": fit}, "source": {
        "kv_transfer.inter": note,
        "kv_transfer.inter.piece_s": "ASSUMPTION: 0 (not identifiable from the Mooncake points: at fixed TP degrees "
                                     "the pieces grow with the bytes; the one public per-piece figure, NIXL on one "
                                     "host, is another transport)"}}
    write_calibration("h800-roce", overlay, command, path)
    save_frame(mooncake_comparison(), "handoff_mooncake", command, machine="validation",
               root=data_dir("validation").parent, float_format="%.6g", source="data/external/kv_transfer")
    return fit
