"""What a launch gives back: one :class:`MeasureResult` per configuration, assembled from the ranks' records and
checked; and the results folder of ``llmcomm measure --out`` (one JSON file per configuration, ``--resume``).

* :func:`assemble` — the rows of configuration i (every rank's captured calls, counted once per group,
  :mod:`llmcomm.measure.capture`), its traffic under the run's all-reduce algorithm and placement, its tokens
  (equal on every rank that holds them, equal to the single-process reference), timings and provenance;
* :class:`ResultsFolder` — ``<out>/<name>.json`` per configuration, written atomically as each finishes (a file that
  exists is complete), and the ones a ``--resume`` may skip (same configuration, same backend).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from llmcomm.deployment import Deployment
from llmcomm.measure.supervise import RunError
from llmcomm.record import provenance as record_provenance, write_json
from llmcomm.spec import Layout, ModelSpec, Workload

__all__ = ["MeasureResult", "assemble", "provenance", "node_of_records", "allreduce_algorithm", "ResultsFolder"]


@dataclass
class MeasureResult:
    """What a measurement gives: aggregated rows, tokens, timings (max over ranks, seconds), raw events, provenance."""

    rows: list[dict]
    tokens: list[list[int]]
    reference_tokens: list[list[int]] | None
    ttft_s: float
    tpot_s: float
    e2e_s: float
    events: list[dict]
    provenance: dict
    ranks: list[dict] = field(default_factory=list, repr=False)   # the per-rank records (rankio format)
    traffic: dict = field(default_factory=dict)                   # llmcomm.derive.traffic.summary of the run

    @property
    def tokens_match(self) -> bool | None:
        return None if self.reference_tokens is None else self.tokens == self.reference_tokens

    @property
    def phase_spans(self) -> list[dict]:
        return [s for r in self.ranks for s in r.get("phase_spans", [])]

    def as_dict(self, events: bool = False) -> dict:
        """JSON-ready summary (``{"ops": rows, ...}``, the CLI's output); raw events only when asked."""
        d = {"ops": self.rows, "traffic": self.traffic, "tokens": self.tokens, "reference_tokens": self.reference_tokens,
             "tokens_match": self.tokens_match, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
             "provenance": self.provenance}
        if events:
            d["events"] = self.events
        return d

    def to_record(self) -> dict:
        """Every field, JSON-ready (what the run cache stores; :meth:`from_record` reads it back)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "MeasureResult":
        return cls(**record)


def provenance(records: list[dict], facts: Mapping[str, Any], started: datetime) -> dict:
    """Where and with what a run was made (:func:`llmcomm.record.provenance`), plus what the ranks reported: their
    device, communication path and library versions, and the launch facts (command, port, wall time)."""
    r0 = records[0]
    return record_provenance(facts.get("command"), started=started.isoformat(timespec="seconds"),
                             device=r0.get("device"), rank_versions=r0.get("versions"), comm=r0.get("comm"),
                             **{k: v for k, v in facts.items() if k != "command"})


def node_of_records(records: list[dict]):
    """Rank → the host it ran on (what its result recorded): the placement the measured traffic is counted on."""
    host = {r["rank"]: r.get("hostname") for r in records}
    return lambda rank: host.get(rank)


def allreduce_algorithm(records: list[dict]) -> str:
    """How the run's all-reduces moved bytes: ``shm`` on DeepSpeed's shared-memory kernel (one-shot below 1 MiB,
    two-phase above: :mod:`llmcomm.derive.conventions`), else ``ring`` (gloo, NCCL)."""
    paths = {(r.get("comm") or {}).get("allreduce_path") for r in records}
    return "shm" if paths == {"shm"} else "ring"


def joined_shares(records) -> tuple[list, list | None]:
    """(tokens, reference) of a run whose ranks generated disjoint shares of the batch (``"share": [lo, hi)``),
    joined in sequence order; a gap or overlap between the shares is a :class:`RunError`."""
    parts = sorted(records, key=lambda r: r["share"][0])
    expect = 0
    for r in parts:
        lo, hi = r["share"]
        if lo != expect or r.get("tokens") is None or len(r["tokens"]) != hi - lo:
            raise RunError(f"rank {r['rank']} reported sequences [{lo}, {hi}) and {len(r.get('tokens') or [])} "
                           f"generations where sequence {expect} was due")
        expect = hi
    tokens = [seq for r in parts for seq in r["tokens"]]
    refs = [r.get("reference_tokens") for r in parts]
    return tokens, (None if any(x is None for x in refs) else [seq for x in refs for seq in x])


def assemble(records, model, layout, workload, facts, started, entry, backend, check_tokens,
             sweep: dict | None = None, deployment: Deployment | None = None) -> MeasureResult:
    """Configuration ``workload`` of a launch from its ranks' ``records`` (rankio format); a :class:`RunError` when
    the ranks' captures disagree or the tokens differ from the single-process reference (fp32; a warning in
    bf16/fp16, where rounding may flip near-ties)."""
    from llmcomm.derive.traffic import summary
    from llmcomm.measure.capture import CaptureError, aggregate, calls_of, check_consistent

    events = [e for r in records for e in r["events"]]
    try:
        check_consistent(events)
    except CaptureError as e:
        raise RunError(f"the ranks' captures disagree: {e}") from None
    shared = [r for r in records if r.get("share") is not None]
    if shared:                               # expert parallelism: each (stage-0) rank generated its own sequences
        tokens, reference = joined_shares(shared)
    else:
        seen = [(r["rank"], r["tokens"]) for r in records if r.get("tokens") is not None]
        if not seen:
            raise RunError("no rank reported generated tokens")
        tokens = seen[-1][1]                  # TP: all equal; pipeline: the last stage holds the logits
        for rank, tk in seen:
            if tk != tokens:
                raise RunError(f"rank {rank} generated {tk}, rank {seen[-1][0]} generated {tokens}")
        reference = next((r["reference_tokens"] for r in records if r.get("reference_tokens") is not None), None)
    if check_tokens and reference is not None and tokens != reference:
        msg = f"generated tokens {tokens} differ from the single-process reference {reference}"
        if workload.dtype == "fp32":
            raise RunError(msg)
        warnings.warn(msg + f" ({workload.dtype}: rounding may flip near-ties)", RuntimeWarning, stacklevel=3)
    timing = lambda k: max(float(r.get("timings", {}).get(k, 0.0)) for r in records)  # noqa: E731
    prov = provenance(records, facts, started)
    prov.update(entry=entry, backend_requested=backend, model=model.name,
                layout={"t": layout.t, "p": layout.p, **({"e": layout.e} if layout.e > 1 else {})},
                workload=workload.as_dict())
    if deployment is not None:
        prov["deployment"] = {"experts": deployment.experts, **deployment.config_options(layout)}
    if sweep is not None:
        prov["launch"] = dict(sweep, setup="once per launch, shared by its configurations; one untimed warm-up "
                                           "generation before the first")
    node_of, algorithm = node_of_records(records), allreduce_algorithm(records)
    return MeasureResult(rows=aggregate(events, node_of=node_of, algorithm=algorithm),
                         traffic=summary(calls_of(events), node_of, algorithm), tokens=tokens,
                         reference_tokens=reference, ttft_s=timing("ttft_s"), tpot_s=timing("tpot_s"),
                         e2e_s=timing("e2e_s"), events=events, provenance=prov, ranks=records)




class ResultsFolder:
    """``llmcomm measure --out``: one JSON file per configuration (``{header, "ops", "traffic", "tokens", "ttft_s",
    "tpot_s", "e2e_s", "provenance"}``), named after the configuration (:meth:`name`), written atomically as each
    finishes; the ranks' own files and logs of each launch in ``ranks-<dtype>/``. :meth:`stored` is what a
    ``--resume`` may skip: a complete file of exactly this configuration (same header) and backend."""

    def __init__(self, root: str | Path, model: ModelSpec, layout: Layout):
        self.root, self.model, self.layout = Path(root), model, layout

    def name(self, workload: Workload, deployment: Deployment) -> str:
        """``<model>_t<t>_p<p>[_e<e>_<routing>]_b<b>_S<S>_G<G>_<dtype>[_<p2p>][_tp-experts].json``."""
        lay = self.layout
        model = re.sub(r"[^A-Za-z0-9.-]+", "-", self.model.name).strip("-")
        ep = f"_e{lay.e}_{deployment.routing.mode}" if lay.e > 1 else ""
        tail = (f"_{deployment.p2p}" if lay.p > 1 else "") + \
            ("_tp-experts" if deployment.experts == "tp-experts" else "")
        return (f"{model}_t{lay.t}_p{lay.p}{ep}_b{workload.b}_S{workload.S}_G{workload.G}_{workload.dtype}"
                f"{tail}.json")

    def path(self, workload: Workload, deployment: Deployment) -> Path:
        return self.root / self.name(workload, deployment)

    def ranks_dir(self, dtype: str) -> Path:
        return self.root / f"ranks-{dtype}"

    def stored(self, workload: Workload, deployment: Deployment, head: Mapping[str, Any],
               backend: str | None) -> dict | None:
        """The result written before for exactly this configuration (``head``) and backend, else None."""
        try:
            obj = json.loads(self.path(workload, deployment).read_text())
        except (OSError, ValueError):
            return None
        same = isinstance(obj, dict) and all(obj.get(k) == v for k, v in head.items()) and \
            (obj.get("provenance") or {}).get("backend_requested") == backend
        return obj if same and "ops" in obj else None

    def write(self, workload: Workload, deployment: Deployment, obj: Mapping[str, Any]) -> Path:
        return write_json(self.path(workload, deployment), obj, indent=1)
