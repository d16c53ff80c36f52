"""Experiment sweeps the book runs: measure each configuration, put the prediction beside it, save with provenance.

The scale is chosen by ``$LLMCOMM_SCALE``: ``cpu`` (tiny random-weight models, 2–4 ranks, fp32; what CI and the
committed notebooks use) or ``gpu`` (real model shapes in bf16 on a GPU node; default when CUDA is present). A chapter
calls :func:`configs` for its scale, :func:`sweep` to run, and :func:`llmcomm.data.save_frame` to keep the result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, asdict
from typing import Callable, Iterable

import pandas as pd

from .spec import Layout, Workload, load_model

__all__ = ["Config", "scale", "configs", "compare_rows", "sweep"]


@dataclass(frozen=True)
class Config:
    model: str
    t: int = 1
    p: int = 1
    b: int = 1
    S: int = 16
    G: int = 4
    dtype: str = "fp32"

    @property
    def layout(self) -> Layout:
        return Layout(self.t, self.p)

    @property
    def workload(self) -> Workload:
        return Workload(self.b, self.S, self.G, self.dtype)

    @property
    def label(self) -> str:
        return f"{self.model} t={self.t} p={self.p} b={self.b} S={self.S} G={self.G} {self.dtype}"


def scale() -> str:
    """``$LLMCOMM_SCALE`` if set, else ``gpu`` when CUDA is available, else ``cpu``."""
    env = os.environ.get("LLMCOMM_SCALE")
    if env:
        if env not in ("cpu", "gpu"):
            raise ValueError(f"LLMCOMM_SCALE={env!r} must be 'cpu' or 'gpu'")
        return env
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# The sweeps of the book, per scale. CPU: tiny models (odd sizes on purpose), every op and phase exercised, uneven
# pipeline splits, b > 1, S = 1 and G = 1 edge cases. GPU: real shapes, bf16, degrees that fit one 8-GPU node.
_SWEEPS = {
    ("tp", "cpu"): [Config("tiny-llama", 2, 1, 1, 8, 4), Config("tiny-llama", 2, 1, 2, 5, 3),
                    Config("tiny-llama", 2, 1, 3, 16, 1), Config("tiny-llama", 2, 1, 1, 1, 6),
                    Config("tiny-llama", 2, 1, 4, 32, 8), Config("tiny-llama-tied", 2, 1, 2, 12, 5),
                    Config("tiny-llama-tied", 4, 1, 1, 8, 4), Config("tiny-llama-tied", 4, 1, 2, 24, 3)],
    ("tp", "gpu"): [Config(m, t, 1, b, S, 32, "bf16") for m in ("llama-3.2-3b", "llama-3.1-8b")
                    for t in (2, 4, 8) for b, S in ((1, 128), (8, 1024))],
}


def configs(kind: str, which: str | None = None) -> list[Config]:
    """The configurations of sweep ``kind`` ("tp", "pipeline", …) at the current (or given) scale."""
    return list(_SWEEPS[(kind, which or scale())])


def compare_rows(measured: Iterable[dict], predicted: Iterable[dict]) -> pd.DataFrame:
    """Outer join of measured and predicted rows on (phase, op, group_size); setup rows are kept but never 'match'
    (setup is reported apart). Columns: calls/bytes _measured and _predicted, and ``match``."""
    key = ["phase", "op", "group_size"]
    m = pd.DataFrame(list(measured), columns=key + ["calls", "bytes"])
    p = pd.DataFrame(list(predicted), columns=key + ["calls", "bytes"])
    d = m.merge(p, on=key, how="outer", suffixes=("_measured", "_predicted"))
    for c in ("calls_measured", "calls_predicted", "bytes_measured", "bytes_predicted"):
        d[c] = d[c].fillna(0).astype("int64")
    d["match"] = (d.calls_measured == d.calls_predicted) & (d.bytes_measured == d.bytes_predicted)
    order = d.phase.map({"setup": 0, "prefill": 1, "decode": 2})
    return d.assign(_o=order).sort_values(["_o", "op", "group_size"]).drop(columns="_o").reset_index(drop=True)


def sweep(cfgs: Iterable[Config], engine: str = "deepspeed", runner: Callable | None = None, progress: bool = True):
    """Run every configuration; return (rows, runs): ``rows`` one line per config × (phase, op, group) with measured
    and predicted calls and bytes; ``runs`` one line per config with TTFT/TPOT/E2E and whether tokens matched."""
    from .volumes import predict_rows

    if runner is None:
        from .launch import measure as runner
    cfgs = list(cfgs)
    it = cfgs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cfgs, desc="runs", leave=False)
    rows, runs = [], []
    for c in it:
        model = load_model(c.model)
        res = runner(model, c.layout, c.workload)
        pred = predict_rows(model, c.layout, c.workload, engine)
        d = compare_rows(res.rows, pred)
        for k, v in asdict(c).items():
            d.insert(0, k, v) if k == "model" else d.insert(len(d.columns), k, v)
        rows.append(d)
        runs.append(dict(asdict(c), ttft_s=res.ttft_s, tpot_s=res.tpot_s, e2e_s=res.e2e_s,
                         tokens_match=bool(getattr(res, "tokens_match", True))))
    return pd.concat(rows, ignore_index=True), pd.DataFrame(runs)


def save(df: pd.DataFrame, name: str, command: str, **extra):
    """Save a sweep's frame with provenance when ``$LLMCOMM_SAVE=1`` (``make book``/``make data`` set it), so that
    re-running notebooks under nbval never rewrites the committed data; returns the path or None."""
    if os.environ.get("LLMCOMM_SAVE") != "1":
        return None
    from .data import save_frame

    return save_frame(df, name, command, scale=scale(), **extra)
