"""Experiment sweeps the book runs: measure each configuration, put the prediction beside it, save with provenance.

The scale is chosen by ``$LLMCOMM_SCALE``: ``cpu`` (tiny random-weight models, 2–4 ranks, fp32; what CI and the
committed notebooks use) or ``gpu`` (real model shapes in bf16 on a GPU node; default when CUDA is present). A chapter
calls :func:`run_sweep` (the configurations of its kind at this scale, measured, predicted, saved and checked) and
shows the frames it returns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import pandas as pd

from ..deployment import Deployment, Routing
from ..derive.evaluate import rows as predict_rows
from ..derive.phases import order as phase_order
from ..spec import Layout, Workload, load_model

__all__ = ["Config", "scale", "configs", "kinds", "CHAPTER_KINDS", "configs_frame", "compare_rows", "predicted_like",
           "measure_configs", "sweep", "save", "run_sweep", "ROW_COLUMNS", "ROW_VALUES", "row_columns", "setup_rows",
           "measured_by_config", "CONFIG_COLUMNS", "measure_one"]


@dataclass(frozen=True)
class Config:
    """One measured configuration: model, layout (t, p, e), workload (b, S, G, dtype) and how it is deployed (the
    expert layout, the routing mode of expert parallelism, the pipeline's stage-to-stage mode)."""

    model: str
    t: int = 1
    p: int = 1
    b: int = 1
    S: int = 16
    G: int = 4
    dtype: str = "fp32"
    e: int = 1
    experts: str | None = None
    routing: str = "capacity"
    p2p: str = "partitioned"

    @property
    def layout(self) -> Layout:
        return Layout(self.t, self.p, self.e)

    @property
    def workload(self) -> Workload:
        return Workload(self.b, self.S, self.G, self.dtype)

    @property
    def deployment(self) -> Deployment:
        return Deployment(experts=self.experts, routing=Routing(self.routing), p2p=self.p2p)

    @property
    def label(self) -> str:
        extra = "".join(f" {key}={v}" for key, v in (("e", self.e), ("experts", self.experts), ("p2p", self.p2p),
                                                      ("routing", self.routing))
                        if v != Config.__dataclass_fields__[key].default)
        return f"{self.model} t={self.t} p={self.p} b={self.b} S={self.S} G={self.G} {self.dtype}{extra}"

    @property
    def columns(self) -> dict:
        """The configuration as a frame's columns (:data:`CONFIG_COLUMNS`)."""
        return {key: getattr(self, key) for key in CONFIG_COLUMNS}


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


# The sweeps of the book, per scale — the one list each chapter measures and the tests are parametrised over
# (tests/test_measured.py): every configuration is measured once per test session and the chapters' re-execution
# under nbval reuses the results (llmcomm.measure.cache). CPU: tiny models (odd sizes on purpose), every op and phase
# exercised, uneven pipeline splits, b > 1, S = 1 and G = 1 edge cases. GPU: real shapes, bf16, degrees that fit one
# 8-GPU node.
_MOE_WORKLOADS = ((4, 7, 3), (2, 16, 4), (8, 12, 2))            # tiny Mixtral: b, S, G
_ROUTINGS = ("capacity", "dropless")
_SWEEPS = {
    # tiny-llama-tied t=4, b=16, S=384: the prefill all-reduce of [16, 384, 64] fp32 is 1.5 MiB, above DeepSpeed's
    # 1 MiB one-shot threshold: its shm kernel takes the two-phase path (llmcomm.derive.conventions)
    ("tp", "cpu"): [Config("tiny-llama", 2, 1, 1, 8, 4), Config("tiny-llama", 2, 1, 2, 5, 3),
                    Config("tiny-llama", 2, 1, 3, 16, 1), Config("tiny-llama", 2, 1, 1, 1, 6),
                    Config("tiny-llama", 2, 1, 4, 32, 8), Config("tiny-llama-tied", 2, 1, 2, 12, 5),
                    Config("tiny-llama-tied", 4, 1, 1, 8, 4), Config("tiny-llama-tied", 4, 1, 2, 24, 3),
                    Config("tiny-llama-tied", 4, 1, 16, 384, 2)],
    ("tp", "gpu"): [Config(name, t, 1, b, S, 32, "bf16") for name in ("llama-3.2-3b", "llama-3.1-8b")
                    for t in (2, 4, 8) for b, S in ((1, 128), (8, 1024))],
    # Pipelines and hybrids (llmcomm.measure.runs.pipeline, default partitioned stage-to-stage mode). tiny-llama: L=4,
    # KV heads 2 (t ≤ 2); tiny-llama-tied: L=5 (uneven split p=2 → [3, 2]), KV heads 4. Five layouts, one launch each.
    ("pipeline", "cpu"): [Config("tiny-llama", 1, 3, 2, 3, 1),          # uneven [2, 1, 1]; G = 1: no decode
                          Config("tiny-llama", 1, 3, 2, 8, 4),          # the same launch: b > 1, decode
                          Config("tiny-llama", 1, 4, 1, 1, 5),          # one layer per stage; S = 1
                          Config("tiny-llama-tied", 1, 2, 1, 5, 3),     # uneven [3, 2], tied head
                          Config("tiny-llama", 2, 2, 2, 8, 4),          # hybrid 2×2 on an even split, b > 1
                          Config("tiny-llama-tied", 2, 2, 3, 6, 2)],    # hybrid 2×2 on [3, 2], b = 3
    # the last hybrid with every TP rank sending the whole hidden state (p2p 'full'): in the same launch
    ("pipeline-full", "cpu"): [Config("tiny-llama-tied", 2, 2, 3, 6, 2, p2p="full")],
    # Real shapes in bf16; needs a node with t·p ≤ 8 GPUs (NCCL puts one rank on each GPU).
    ("pipeline", "gpu"): [Config(name, t, p, b, S, 32, "bf16") for name in ("llama-3.2-3b", "llama-3.1-8b")
                          for t, p in ((1, 2), (1, 4), (2, 2), (1, 8), (2, 4), (4, 2)) for b, S in ((1, 128), (8, 1024))],
    ("pipeline-full", "gpu"): [Config("llama-3.1-8b", 2, 2, 8, 1024, 32, "bf16", p2p="full")],
    # Time model validation (book: "Time: microbenchmarks and the α-β model"): TP (shm all-reduce), PP (gloo sends,
    # stages in sequence) and the TP×PP hybrid (gloo all-reduce on sub-groups) over several (b, S, G); small-llama
    # (h=512, L=8) so that compute is not lost in launch noise, two tiny-llama points where overheads dominate.
    ("latency", "cpu"): [Config("small-llama", t, p, b, S, G) for t, p in ((2, 1), (1, 2), (2, 2))
                         for b, S, G in ((1, 64, 8), (4, 128, 4), (2, 16, 16))]
                        + [Config("tiny-llama", 2, 1, 1, 16, 8), Config("tiny-llama", 1, 2, 1, 16, 8)],
    # Mixtures of experts (book: "Mixtures of experts"; tiny models at every scale): expert parallelism alone and in
    # pipeline stages under both routings, AutoTP as it is and with sharded experts — one launch per (model, layout),
    # routing and expert layout changing per configuration inside it.
    ("moe-ep", "cpu"): [Config("tiny-mixtral", 1, 1, b, S, G, e=2, routing=r) for r in _ROUTINGS
                        for b, S, G in _MOE_WORKLOADS],
    ("moe-autotp", "cpu"): [Config("tiny-mixtral", 2, 1, *_MOE_WORKLOADS[0], experts="autotp")],
    ("moe-tp-experts", "cpu"): [Config("tiny-mixtral", 2, 1, *_MOE_WORKLOADS[0], experts="tp-experts")],
    ("moe-ep-pp", "cpu"): [Config("tiny-mixtral", 1, 2, *_MOE_WORKLOADS[0], e=2, routing=r) for r in _ROUTINGS],
    ("moe-qwen3-ep", "cpu"): [Config("tiny-qwen3-moe", 1, 1, 4, 5, 3, e=2, routing=r) for r in _ROUTINGS],
    ("moe-qwen3-ep-pp", "cpu"): [Config("tiny-qwen3-moe", 1, 2, 4, 5, 3, e=2, routing=r) for r in _ROUTINGS],
    ("moe-qwen3-tp", "cpu"): [Config("tiny-qwen3-moe", 2, 1, 4, 5, 3, experts=x) for x in ("autotp", "tp-experts")],
    # measured by the tests alone (tests/test_measured.py): AutoTP × PP on a mixture of experts, the MoE pattern's
    # pipeline rows with TP all-reduces inside the stages
    ("moe-autotp-pp", "cpu"): [Config("tiny-mixtral", 2, 2, *_MOE_WORKLOADS[0])],
}
#: kinds measured with tiny models at every scale (their chapter says why)
_TINY_AT_EVERY_SCALE = ("moe-",)
#: kinds the book's chapters measure (the time validation runs in ``make data``, not in a chapter)
CHAPTER_KINDS = ("tp", "pipeline", "pipeline-full", "moe-ep", "moe-autotp", "moe-tp-experts", "moe-ep-pp",
                 "moe-qwen3-ep", "moe-qwen3-ep-pp", "moe-qwen3-tp")


def kinds(which: str | None = None) -> list[str]:
    """The sweep kinds defined at the current (or given) scale."""
    which = which or scale()
    return sorted({kind for kind, sc in _SWEEPS if sc == which or kind.startswith(_TINY_AT_EVERY_SCALE)})


def configs(kind: str, which: str | None = None) -> list[Config]:
    """The configurations of sweep ``kind`` ("tp", "pipeline", "moe-ep", …) at the current (or given) scale."""
    which = "cpu" if kind.startswith(_TINY_AT_EVERY_SCALE) else (which or scale())
    try:
        return list(_SWEEPS[(kind, which)])
    except KeyError:
        raise ValueError(f"no sweep {kind!r} at scale {which!r}") from None


#: the columns that name a configuration in every frame of a sweep
CONFIG_COLUMNS = ["model", "t", "p", "b", "S", "G", "dtype"]


def configs_frame(cfgs: Iterable[Config]) -> pd.DataFrame:
    """The configurations as a table (one row each)."""
    return pd.DataFrame([cfg.columns for cfg in cfgs], columns=CONFIG_COLUMNS)


#: the quantities a row carries and a comparison checks, measured against predicted
ROW_VALUES = ("calls", "bytes", "sent_bytes_per_rank", "link_bytes", "inter_node_bytes")


def compare_rows(measured: Iterable[dict], predicted: Iterable[dict]) -> pd.DataFrame:
    """Outer join of measured and predicted rows on (phase, op, group_size): ``<value>_measured`` and
    ``<value>_predicted`` for every value of :data:`ROW_VALUES` both sides carry, and ``match`` (all equal). Setup
    rows are kept (they have no prediction: setup is reported apart)."""
    key = ["phase", "op", "group_size"]
    measured, predicted = list(measured), list(predicted)
    values = [v for v in ROW_VALUES if all(v in r for r in measured + predicted if r["phase"] != "setup")]
    meas = pd.DataFrame(measured, columns=key + values)
    pred = pd.DataFrame(predicted, columns=key + values)
    both = meas.merge(pred, on=key, how="outer", suffixes=("_measured", "_predicted"))
    match = pd.Series(True, index=both.index)
    for v in values:
        for side in ("measured", "predicted"):
            both[f"{v}_{side}"] = both[f"{v}_{side}"].fillna(0)
            if (both[f"{v}_{side}"] % 1 == 0).all():
                both[f"{v}_{side}"] = both[f"{v}_{side}"].astype("int64")
        match &= both[f"{v}_measured"] == both[f"{v}_predicted"]
    both["match"] = match
    both["_o"] = [phase_order(x) for x in both.phase]
    return both.sort_values(["_o", "op", "group_size"]).drop(columns="_o").reset_index(drop=True)


def predicted_like(model, config_layout, workload, res, pattern: str = "deepspeed", routing=None) -> list[dict]:
    """The predicted rows of a measured configuration, counted as its measurement was: the run's all-reduce
    algorithm and its placement of ranks on hosts (all on one node here: g = the ranks per host)."""
    from ..measure.results import allreduce_algorithm

    hosts = [r.get("hostname") for r in sorted(res.ranks, key=lambda r: r["rank"])]
    per_host = hosts.count(hosts[0]) if hosts else config_layout.ranks
    return predict_rows(model, config_layout, workload, pattern, algorithm=allreduce_algorithm(res.ranks),
                        gpus_per_node=per_host, routing=routing)


def _launch_key(cfg: Config) -> tuple:
    """What the configurations of one launch share: model, layout, dtype (routing, p2p mode and expert layout may
    change from one configuration to the next: :meth:`llmcomm.deployment.Deployment.config_options`)."""
    return cfg.model, cfg.t, cfg.p, cfg.e, cfg.dtype


def measure_configs(cfgs: Iterable[Config], runner: Callable | None = None, progress: bool | None = None,
                    **kw) -> list[tuple[Config, object, object]]:
    """Measure every configuration with as few launches as possible: configurations that share (model, t, p, e,
    dtype) run in **one** launch (:func:`llmcomm.measure.launch.measure_many`: the model built and sharded once),
    in the order the groups first appear (inside a group the ``tp-experts`` configurations after the others: sharding
    the experts is the one change a launch cannot undo). Returns ``(config, ModelSpec, result)`` in the order of
    ``cfgs``. ``runner`` replaces ``measure_many`` (same signature); ``progress``: a bar of configurations done
    (default: :func:`llmcomm.measure.launch.progress_enabled`)."""
    from ..measure.launch import progress as progress_bar

    if runner is None:
        from ..measure.launch import measure_many as runner
    cfgs = list(cfgs)
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(_launch_key(cfg), []).append(i)
    out: list = [None] * len(cfgs)
    bar = progress_bar(len(cfgs), "configurations", enabled=progress)
    try:
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: cfgs[i].experts == "tp-experts")
            model = load_model(cfgs[idx[0]].model)

            def done(j, res, idx=idx, model=model):
                out[idx[j]] = (cfgs[idx[j]], model, res)
                bar.update(cfgs[idx[j]].label)

            results = runner(model, cfgs[idx[0]].layout, [cfgs[i].workload for i in idx],
                             deployment=[cfgs[i].deployment for i in idx], on_result=done, **kw)
            for j, res in enumerate(results):          # a runner that does not call on_result
                if out[idx[j]] is None:
                    done(j, res)
    finally:
        bar.close()
    return out


def sweep(cfgs: Iterable[Config], runner: Callable | None = None, progress: bool | None = None):
    """Run every configuration (one launch per model and layout: :func:`measure_configs`); return (rows, runs):
    ``rows`` one line per config × (phase, op, group) with measured and predicted calls, bytes and traffic; ``runs``
    one line per config with TTFT/TPOT/E2E and whether tokens matched."""
    rows, runs = [], []
    for cfg, model, res in measure_configs(cfgs, runner, progress):
        pattern = cfg.deployment.pattern(model, cfg.layout)
        cmp = compare_rows(res.rows, predicted_like(model, cfg.layout, cfg.workload, res, pattern))
        for key, v in cfg.columns.items():
            cmp.insert(0, key, v) if key == "model" else cmp.insert(len(cmp.columns), key, v)
        rows.append(cmp)
        runs.append(dict(cfg.columns, ttft_s=res.ttft_s, tpot_s=res.tpot_s, e2e_s=res.e2e_s,
                         tokens_match=bool(getattr(res, "tokens_match", True))))
    return pd.concat(rows, ignore_index=True), pd.DataFrame(runs)


def save(df: pd.DataFrame, name: str, command: str, **extra):
    """Save a sweep's frame with provenance when ``$LLMCOMM_SAVE=1`` (``make book``/``make data`` set it), so that
    re-running notebooks under nbval never rewrites the committed data; returns the path or None."""
    if os.environ.get("LLMCOMM_SAVE") != "1":
        return None
    from ..record import save_frame

    return save_frame(df, name, command, scale=scale(), **extra)


#: the columns a chapter shows of a sweep's rows (the configuration, the row's key, measured beside predicted)
ROW_COLUMNS = ["model", "t", "p", "b", "S", "G", "phase", "op", "group_size", "calls_measured", "calls_predicted",
               "bytes_measured", "bytes_predicted", "sent_bytes_per_rank_measured", "sent_bytes_per_rank_predicted",
               "link_bytes_measured", "link_bytes_predicted", "match"]


def row_columns(df: pd.DataFrame) -> list[str]:
    """:data:`ROW_COLUMNS`, without ``p`` when every row has p = 1 (a TP-only sweep)."""
    return [col for col in ROW_COLUMNS if not (col == "p" and (df["p"] == 1).all())]


def setup_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The distinct setup rows of a sweep (what start-up sends, reported apart from the phases), per model and
    layout."""
    keep = [col for col in ("model", "t", "p") if not (col == "p" and (rows["p"] == 1).all())] + \
        ["op", "group_size", "calls_measured", "bytes_measured"]
    return rows[rows.phase == "setup"][keep].drop_duplicates(keep).reset_index(drop=True)


def measured_by_config(rows: pd.DataFrame, abbreviate: dict[str, str] | None = None) -> pd.DataFrame:
    """A sweep's rows with ``bytes`` = the measured bytes and a ``config`` label per configuration
    (``"<model> t×p b= S= G="``, model names shortened by ``abbreviate``), for per-configuration figures."""
    names = rows.model.replace(abbreviate or {})
    label = (names + " " + rows.t.astype(str) + "×" + rows.p.astype(str) + " b=" + rows.b.astype(str) + " S="
             + rows.S.astype(str) + " G=" + rows.G.astype(str))
    return rows.assign(bytes=rows.bytes_measured, config=label)


def run_sweep(kind: str, command: str, runner: Callable | None = None,
              progress: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep of ``kind`` at this scale (:func:`configs`), measured and predicted (:func:`sweep`), saved as
    ``<kind>_rows`` and ``<kind>_runs`` with provenance (:func:`save`, when ``$LLMCOMM_SAVE=1``; ``command`` names
    what ran it), checked: every run's tokens equal the single-process reference (else ``AssertionError``)."""
    rows, runs = sweep(configs(kind), runner=runner, progress=progress)
    save(rows, f"{kind}_rows", command)
    save(runs, f"{kind}_runs", command)
    bad = runs[~runs.tokens_match]
    assert bad.empty, f"runs generated tokens different from the single-process reference:\n{bad}"
    return rows, runs


def measure_one(config: Config, runner: Callable | None = None):
    """One configuration measured beside the closed forms of its deployment's pattern: ``(result, compare_rows
    frame)``; the tokens must equal the reference."""
    (_, model, res), = measure_configs([config], runner)
    assert res.tokens == res.reference_tokens, f"{config.label}: tokens differ from the single-process reference"
    return res, compare_rows(res.rows, predicted_like(model, config.layout, config.workload, res,
                                                      config.deployment.pattern(model, config.layout)))
