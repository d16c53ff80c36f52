"""How a model is deployed — one value, resolved once at the edge (the command line or a chapter) and passed inward.

A :class:`Deployment` names, in one vocabulary:

* the **framework** that runs the model (:data:`FRAMEWORKS`: ``deepspeed``, measured here; ``vllm``, the seed paper's,
  predicted only);
* the **expert layout** of a mixture of experts (:data:`EXPERT_LAYOUTS`: ``autotp`` — DeepSpeed AutoTP as it is,
  the fused experts whole on every TP rank; ``tp-experts`` — every expert sharded t ways; ``ep`` — expert
  parallelism, E/e experts per rank and data-parallel attention; decided by the layout when left ``None``);
* the **routing** of expert parallelism (:class:`Routing`: DeepSpeed's capacity routing or dropless, γ, C_min, φ);
* the **stage-to-stage mode** of the pipeline runner (:data:`P2P_MODES`: ``partitioned`` or ``full``);
* the **host profile** that prices what the framework adds on the host (``None``: the framework's default on the
  hardware, :func:`llmcomm.predict.profiles.profile_for`).

From these the **message pattern** follows (:meth:`Deployment.pattern`, the one mapping; the patterns themselves are
data in :mod:`llmcomm.derive.patterns`), and so do the options a measurement's ranks read for each configuration
(:meth:`Deployment.config_options`): routing, stage-to-stage mode and expert layout may all change from one
configuration to the next inside one launch — DeepSpeed's MoE gate reads its routing at every forward, the pipeline's
hops are the runner's own sends, and sharding the experts after AutoTP is a local step that sends nothing (proof
``tools/proofs/per_config_options.py``); only sharding cannot be undone, so a launch runs its ``tp-experts``
configurations last.

Words: *framework* (deepspeed, vllm), *pattern* (a message pattern), *profile* (a host profile), *expert layout* —
never "engine" for more than one of them. ``engine`` survives only as the command line's ``--engine`` flag and the
JSON key ``"engine"`` of ``predict``/``measure`` (a framework, or ``tp-experts``), read and written here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .spec import Layout, ModelSpec, SpecError, Workload

__all__ = ["FRAMEWORKS", "EXPERT_LAYOUTS", "P2P_MODES", "ROUTING_MODES", "ENGINE_FLAGS", "Routing", "Deployment",
           "config_header", "pattern_of"]

#: Frameworks: whose messages and host behaviour.
FRAMEWORKS = ("deepspeed", "vllm")
#: Expert layouts of a mixture of experts (the advice's ``scheme`` column uses the same names).
EXPERT_LAYOUTS = {
    "autotp": "DeepSpeed AutoTP as it is: the fused experts whole on every TP rank (one all-reduce per MoE layer)",
    "tp-experts": "every expert's FFN sharded t ways, like a dense MLP (two all-reduces per layer)",
    "ep": "expert parallelism: E/e experts per rank, data-parallel attention on b/e sequences (all-to-all)",
}
#: Stage-to-stage modes of the DeepSpeed pipeline runner.
P2P_MODES = {
    "partitioned": "each TP rank sends 1/t of [b, s, h]; the next stage all-gathers (DeepSpeed's pipe partitioning)",
    "full": "every TP rank sends the whole [b, s, h] to its peer",
}
#: Routing modes of DeepSpeed's MoE layer: ``capacity`` (``drop_tokens=True``, its default) and ``dropless``.
ROUTING_MODES = ("capacity", "dropless")
#: What the command line's ``--engine`` flag (and the JSON key ``"engine"``) may say: a framework, or ``tp-experts``
#: (DeepSpeed with every expert sharded).
ENGINE_FLAGS = (*FRAMEWORKS, "tp-experts")


@dataclass(frozen=True)
class Routing:
    """How the MoE layers route, as DeepSpeed's ``MoE`` is configured: ``mode`` (:data:`ROUTING_MODES`);
    ``capacity_factor`` γ (``eval_capacity_factor``, default 1.0) and ``min_capacity`` C_min (default 4), both
    DeepSpeed's defaults (``deepspeed.moe.layer.MoE``) and ignored by dropless routing.

    ``skew`` φ (dropless only; default None = uniform routing, the expectation): a skewed router whose busiest expert
    receives a share φ of every EP rank's tokens in every MoE layer, so C = ⌈φT⌉
    (:func:`llmcomm.derive.moe.skew_capacity`) — what a prediction at a given skew prices (the all-to-all sizes and
    EP's compute on the e·C rows of the buffer)."""

    mode: str = "capacity"
    capacity_factor: float = 1.0
    min_capacity: int = 4
    skew: float | None = None

    def __post_init__(self):
        if self.skew is not None:
            if self.mode != "dropless":
                raise SpecError(f"a routing skew φ={self.skew!r} needs dropless routing (capacity routing caps C)")
            if isinstance(self.skew, bool) or not isinstance(self.skew, (int, float)) or not 0 < self.skew <= 1:
                raise SpecError(f"routing skew φ={self.skew!r} must be a share in (0, 1]")
        if self.mode not in ROUTING_MODES:
            raise SpecError(f"MoE routing {self.mode!r} is not one of {', '.join(ROUTING_MODES)}")
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not (0 < cf < math.inf):
            raise SpecError(f"capacity factor {cf!r} must be a positive, finite number")
        mc = self.min_capacity
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 0:
            raise SpecError(f"min capacity {mc!r} must be a non-negative integer")

    def as_dict(self) -> dict:
        return asdict(self)


def pattern_of(experts: str | None, framework: str = "deepspeed", p2p: str = "partitioned",
               routing: str = "capacity") -> str:
    """The message pattern of an expert layout (None: a dense model), a framework, a stage-to-stage mode and a
    routing mode — the one table from the deployment's words to :data:`llmcomm.derive.patterns.PATTERNS`."""
    if experts is None:
        if framework == "vllm":
            return "vllm"
        return "deepspeed-full" if p2p == "full" else "deepspeed"
    return {"autotp": "deepspeed-moe-autotp", "tp-experts": "tp-experts",
            "ep": "deepspeed-ep" if routing == "capacity" else "deepspeed-ep-dropless"}[experts]


@dataclass(frozen=True)
class Deployment:
    """How a model is deployed (see the module docs). Frozen and hashable: a key of launches and caches."""

    framework: str = "deepspeed"
    experts: str | None = None
    routing: Routing = field(default_factory=Routing)
    p2p: str = "partitioned"
    profile: str | None = None

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise SpecError(f"framework {self.framework!r} is not one of {', '.join(FRAMEWORKS)}")
        if self.experts is not None and self.experts not in EXPERT_LAYOUTS:
            raise SpecError(f"expert layout {self.experts!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
        if self.p2p not in P2P_MODES:
            raise SpecError(f"p2p mode {self.p2p!r} is not one of {', '.join(P2P_MODES)}")
        if not isinstance(self.routing, Routing):
            raise SpecError(f"routing {self.routing!r} is not a Routing")

    # ------------------------------------------------------------------------------------------------ the edge
    @classmethod
    def from_flags(cls, engine: str = "deepspeed", *, p2p: str = "partitioned", routing: Routing | None = None,
                   profile: str | None = None) -> "Deployment":
        """The deployment the command line's flags name: ``--engine`` (:data:`ENGINE_FLAGS`; ``tp-experts`` is
        DeepSpeed with every expert sharded), ``--p2p``, the MoE routing flags, ``--host-profile``."""
        if engine not in ENGINE_FLAGS:
            raise SpecError(f"engine {engine!r} is not one of {', '.join(ENGINE_FLAGS)}")
        framework, experts = ("deepspeed", "tp-experts") if engine == "tp-experts" else (engine, None)
        return cls(framework, experts, routing or Routing(), p2p, profile)

    @property
    def engine(self) -> str:
        """What the JSON key ``"engine"`` says (the ``--engine`` flag's vocabulary)."""
        return "tp-experts" if self.experts == "tp-experts" else self.framework

    # ------------------------------------------------------------------------------------------------ resolved
    def resolve(self, model: ModelSpec, layout: Layout | None = None) -> "Deployment":
        """This deployment checked against ``model`` and ``layout`` (e > 1 means expert parallelism), with the
        expert layout decided: ``ep`` when e > 1, ``autotp`` for a mixture of experts otherwise, None for a dense
        model. One :class:`SpecError` for a combination no pattern describes."""
        e_ = layout.e if layout is not None else 1
        experts = self.experts
        if not model.is_moe:
            if experts is not None:
                raise SpecError(f"expert layout {experts!r} needs a mixture of experts; {model.name} is dense")
            if self.framework == "vllm" and self.p2p == "full":
                raise SpecError("p2p mode 'full' models the DeepSpeed pipeline runner; vllm has its own")
            return self
        if e_ > 1:
            if experts not in (None, "ep"):
                raise SpecError(f"expert parallelism e={e_} and expert layout {experts!r} exclude each other")
            experts = "ep"
        elif experts == "ep":
            raise SpecError("expert layout 'ep' needs an expert-parallel degree e > 1")
        experts = experts or "autotp"
        if self.p2p == "full":
            raise SpecError("p2p mode 'full' is not modelled for a mixture of experts (use 'partitioned')")
        return replace(self, experts=experts)

    def pattern(self, model: ModelSpec, layout: Layout | None = None) -> str:
        """The message pattern (:data:`llmcomm.derive.patterns.PATTERNS`) of this deployment of ``model`` on
        ``layout`` — the one mapping from deployments to patterns. A mixture of experts takes DeepSpeed's MoE
        patterns whatever the framework (vLLM's MoE messages are not modelled; ``vllm`` then changes the host
        profile only)."""
        d = self.resolve(model, layout)
        return pattern_of(d.experts, d.framework, d.p2p, d.routing.mode)

    # ------------------------------------------------------------------------------------------------ measurements
    def config_options(self, layout: Layout) -> dict:
        """What the ranks need to know of this deployment for one configuration of a launch: the stage-to-stage
        mode of a pipeline, the routing of expert parallelism, sharded experts."""
        out: dict[str, Any] = {}
        if layout.p > 1:
            out["p2p"] = self.p2p
        if layout.e > 1:
            out["routing"] = self.routing.as_dict()
        if self.experts == "tp-experts":
            out["experts"] = "tp-experts"
        return out

    @classmethod
    def from_options(cls, config: Mapping[str, Any] | None) -> "Deployment":
        """The deployment a rank reads back from its configuration's options (:meth:`config_options`)."""
        config = dict(config or {})
        return cls(experts=config.get("experts"), routing=Routing(**config.get("routing", {})),
                   p2p=config.get("p2p", "partitioned"))


def config_header(model: ModelSpec, layout: Layout, workload: Workload, deployment: Deployment) -> dict:
    """The configuration as ``predict`` and ``measure`` print it (the JSON contract's head): ``model``, ``tp``,
    ``pp``, ``batch``, ``prompt``, ``generate``, ``dtype``, ``engine``; ``p2p`` for a DeepSpeed pipeline; ``ep`` and
    ``moe_routing`` under expert parallelism."""
    head = {"model": model.name, "tp": layout.t, "pp": layout.p, "batch": workload.b, "prompt": workload.S,
            "generate": workload.G, "dtype": workload.dtype, "engine": deployment.engine}
    if layout.p > 1 and deployment.engine == "deepspeed":
        head["p2p"] = deployment.p2p
    if layout.e > 1:
        head.update(ep=layout.e, moe_routing=deployment.routing.mode)
    return head


def disaggregated_header(model: ModelSpec, dis, workload: Workload) -> dict:
    """The head of a ``predict``/``measure --disaggregate`` result: ``model``, ``disaggregate``, both sides' degrees
    (``prefill_tp``, ``prefill_pp``, ``decode_tp``, ``decode_pp``), the workload, ``kv_dtype``, ``engine``."""
    return {"model": model.name, "disaggregate": True, "prefill_tp": dis.prefill.t, "prefill_pp": dis.prefill.p,
            "decode_tp": dis.decode.t, "decode_pp": dis.decode.p, "batch": workload.b, "prompt": workload.S,
            "generate": workload.G, "dtype": workload.dtype, "kv_dtype": dis.kv_dtype or workload.dtype,
            "engine": "deepspeed"}
