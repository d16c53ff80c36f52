"""Specifications: the model (from an HF ``config.json`` or a preset), the layout (t, p) and the workload (b, S, G, dtype).

Symbols as in :mod:`llmcomm.notation` (b, S, G, w; h, L, V, a = ``heads``, a_kv = ``kv_heads``, d = ``head_dim``,
F = ``ffn``; t, p, e; a mixture of experts: E, k, F_ex, F_sh, L_moe in :class:`MoESpec`). Resolve a model once, at
the edge (the command line or a chapter), with :func:`load_model`, and pass the :class:`ModelSpec` inward.

Mixtures of experts: Mixtral, Qwen2-MoE and Qwen3-MoE ``config.json`` files are read (:class:`MoESpec`); families
whose attention or routing the communication model does not describe (DeepSeek-V2/V3's multi-head latent attention,
Llama 4, any other MoE ``model_type``) are refused with one sentence saying why, never approximated.

Every validation failure raises :class:`SpecError` with one sentence that names the offending value; the CLI prints it
and exits with status 2.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, asdict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["SpecError", "ModelSpec", "MoESpec", "MOE_FAMILIES", "Layout", "Workload", "DTYPE_BYTES", "KV_DTYPE_BYTES",
           "Disaggregation", "preset_names", "load_model",
           "stage_layers", "read_preset_or_file", "read_json_file", "resolve", "cpu_threads_per_rank",
           "workload_grid"]


class SpecError(ValueError):
    """A specification that cannot describe a real run (malformed config, impossible layout, bad workload)."""


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: bytes per element a KV cache may be stored (and handed off) in: the model dtypes, and fp8 (e4m3/e5m2), which
#: serving engines offer for the KV cache alone (``--kv-cache-dtype fp8``); the weights stay in the model dtype
KV_DTYPE_BYTES = {**DTYPE_BYTES, "fp8": 1}


@lru_cache(maxsize=None)
def _names(kind: str) -> tuple[str, ...]:
    folder = resources.files("llmcomm.presets") / kind
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


def preset_names(kind: str = "models") -> list[str]:
    """Names of the presets shipped in ``llmcomm/presets/<kind>`` (``models``, ``hardware``, ``profiles``)."""
    return list(_names(kind))


#: Keys of a preset that are not transformers config fields (``_source``: where a preset's shape comes from).
_NOT_HF = ("architectures", "torch_dtype", "transformers_version", "_source")
#: The mixture-of-experts families read from ``config.json`` (``model_type``): the HF config keys of each.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
#: Keys that mark a config as a mixture of experts (any family).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def _refuse_out_of_scope(cfg: Mapping[str, Any], name: str) -> None:
    """One :class:`SpecError` for a family whose communication llmcomm does not model (checked before anything else:
    their config.json files lack or rename the keys a Llama config has)."""
    family = str(cfg.get("model_type"))
    if "kv_lora_rank" in cfg or "q_lora_rank" in cfg or "n_routed_experts" in cfg or family.startswith("deepseek"):
        raise SpecError(f"model config {name!r} is DeepSeek-style (multi-head latent attention kv_lora_rank/"
                        f"q_lora_rank, n_routed_experts): out of scope, its attention moves a compressed latent "
                        f"that the communication model does not describe")
    if family.startswith("llama4") or "text_config" in cfg or "interleave_moe_layer_step" in cfg:
        raise SpecError(f"model config {name!r} is Llama 4 (multimodal wrapper, interleaved MoE layers with a "
                        f"shared expert, chunked attention): out of scope")


@dataclass(frozen=True)
class MoESpec:
    """The mixture-of-experts part of a model: E routed experts per MoE layer (``experts``), top-k routing
    (``top_k``), each expert a SwiGLU FFN of width F_ex (``expert_ffn``), an optional always-on shared expert of width
    F_sh (``shared_ffn``, 0 = none; Qwen2-MoE's, with its sigmoid gate), and the indices of the MoE layers
    (``layers``; the others are dense MLPs of width F = ``ModelSpec.ffn``).

    ``layer_extra``: parameters per decoder layer beyond a Llama layer (Qwen3-MoE's q/k RMSNorms, attention biases),
    so that :attr:`ModelSpec.params` counts what transformers builds. ``norm_topk``: the top-k weights are
    renormalised (Mixtral always; Qwen ``norm_topk_prob``) — it changes the weights, not the communication.
    """

    family: str
    experts: int            # E
    top_k: int              # k
    expert_ffn: int         # F_ex
    layers: tuple[int, ...]
    shared_ffn: int = 0     # F_sh
    norm_topk: bool = True
    layer_extra: int = 0

    @property
    def L_moe(self) -> int:
        """Number of MoE layers."""
        return len(self.layers)

    def layer_params(self, h: int, active: bool = False) -> int:
        """Parameters of one MoE block (router, experts, shared expert and its gate); ``active``: only the k experts
        a token runs through (the router and the shared expert always run)."""
        experts = self.top_k if active else self.experts
        shared = 3 * h * self.shared_ffn + h if self.shared_ffn else 0
        return self.experts * h + experts * 3 * h * self.expert_ffn + shared

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str, L: int, h: int, heads: int, kv_heads: int,
                       head_dim: int) -> "MoESpec | None":
        """The MoE part of ``cfg`` (None for a dense model); a :class:`SpecError` for a family out of scope."""
        family = cfg.get("model_type")
        if not any(k in cfg for k in _MOE_KEYS):
            return None
        if family is None:                       # a bare dict: the keys say which family
            family = "mixtral" if "num_local_experts" in cfg else \
                "qwen2_moe" if "shared_expert_intermediate_size" in cfg else "qwen3_moe"
        if family not in MOE_FAMILIES:
            raise SpecError(f"model config {name!r} has model_type {family!r}, a mixture of experts llmcomm does not "
                            f"model (known: {', '.join(MOE_FAMILIES)})")
        e_key = "num_local_experts" if family == "mixtral" else "num_experts"
        ints = {}
        for k in (e_key, "num_experts_per_tok", "decoder_sparse_step", "moe_intermediate_size",
                  "shared_expert_intermediate_size"):
            v = cfg.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"model config {name!r}: {k} must be an integer, got {v!r}")
            ints[k] = v
        if e_key not in ints or "num_experts_per_tok" not in ints:
            raise SpecError(f"model config {name!r} ({family}) lacks {e_key} or num_experts_per_tok")
        E, k = ints[e_key], ints["num_experts_per_tok"]
        if E < 1:
            raise SpecError(f"model config {name!r}: {e_key}={E} must be at least 1 expert")
        if k < 1:
            raise SpecError(f"model config {name!r}: num_experts_per_tok={k} must be at least 1")
        if k > E:
            raise SpecError(f"model config {name!r}: num_experts_per_tok={k} exceeds the {E} experts ({e_key})")
        if family == "mixtral":                  # every layer MoE; intermediate_size is the expert width
            return cls(family, E, k, cfg["intermediate_size"], tuple(range(L)))
        step = ints.get("decoder_sparse_step", 1)
        if step < 1:
            raise SpecError(f"model config {name!r}: decoder_sparse_step={step} must be at least 1")
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, (list, tuple)) or \
                any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L for i in only):
            raise SpecError(f"model config {name!r}: mlp_only_layers={only!r} must list layer indices in [0, {L})")
        if "moe_intermediate_size" not in ints or ints["moe_intermediate_size"] < 1:
            raise SpecError(f"model config {name!r} ({family}) needs a positive moe_intermediate_size")
        shared = ints.get("shared_expert_intermediate_size", 0)
        if family == "qwen3_moe" and shared:
            raise SpecError(f"model config {name!r}: qwen3_moe has no shared expert in transformers, yet "
                            f"shared_expert_intermediate_size={shared}")
        if shared < 0:
            raise SpecError(f"model config {name!r}: shared_expert_intermediate_size={shared} is negative")
        # transformers (and vLLM) Qwen2/3-MoE decoder layer: MoE iff not listed and (i + 1) divisible by the step
        layers = tuple(i for i in range(L) if i not in only and (i + 1) % step == 0)
        if family == "qwen3_moe":                # q_norm, k_norm over head_dim; biases on q, k, v, o if attention_bias
            extra = 2 * head_dim + ((heads + 2 * kv_heads) * head_dim + h if cfg.get("attention_bias") else 0)
        else:                                    # qwen2_moe: biases on q, k, v (qkv_bias, default true)
            extra = (heads + 2 * kv_heads) * head_dim if cfg.get("qkv_bias", True) else 0
        return cls(family, E, k, ints["moe_intermediate_size"], layers, shared,
                   bool(cfg.get("norm_topk_prob", False)), extra)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (HF Llama family; with ``moe``, a Mixtral/Qwen-MoE mixture of experts) as the
    communication model sees it. ``ffn`` is ``intermediate_size``: the width of the dense MLPs (Mixtral: of each
    expert)."""

    name: str
    h: int                 # hidden_size
    L: int                 # num_hidden_layers
    heads: int             # num_attention_heads
    kv_heads: int          # num_key_value_heads
    ffn: int               # intermediate_size
    V: int                 # vocab_size
    tied: bool             # tie_word_embeddings
    head_dim: int
    moe: MoESpec | None = None
    hf_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "custom") -> "ModelSpec":
        if not isinstance(cfg, Mapping):
            raise SpecError(f"model config {name!r} is not a JSON object")
        _refuse_out_of_scope(cfg, name)
        missing = [k for k in cls.REQUIRED if k not in cfg]
        if missing:
            raise SpecError(f"model config {name!r} lacks {', '.join(missing)} (an HF Llama config.json has them)")
        vals = {}
        for k in cls.REQUIRED + ("num_key_value_heads", "head_dim"):
            v = cfg.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"model config {name!r}: {k} must be a positive integer, got {v!r}")
            vals[k] = v
        heads = vals["num_attention_heads"]
        kv = vals.get("num_key_value_heads", heads)
        if heads % kv:
            raise SpecError(f"model config {name!r}: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv}")
        h = vals["hidden_size"]
        head_dim = vals.get("head_dim", h // heads)
        if "head_dim" not in vals and h % heads:
            raise SpecError(f"model config {name!r}: hidden_size={h} is not a multiple of num_attention_heads={heads}")
        moe = MoESpec.from_hf_config(cfg, name, vals["num_hidden_layers"], h, heads, kv, head_dim)
        return cls(name=name, h=h, L=vals["num_hidden_layers"], heads=heads, kv_heads=kv,
                   ffn=vals["intermediate_size"], V=vals["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                   head_dim=head_dim, moe=moe, hf_config=dict(cfg))

    @property
    def is_moe(self) -> bool:
        """A mixture of experts with at least one MoE layer."""
        return self.moe is not None and self.moe.L_moe > 0

    @property
    def L_moe(self) -> int:
        """Number of MoE layers (0 for a dense model)."""
        return self.moe.L_moe if self.moe is not None else 0

    @property
    def E(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return self.moe.experts if self.moe is not None else 0

    def _count(self, active: bool) -> int:
        h = self.h
        attn = h * self.heads * self.head_dim * 2 + h * self.kv_heads * self.head_dim * 2
        moe_layers = self.L_moe
        layers = self.L * (attn + 2 * h) + (self.L - moe_layers) * 3 * h * self.ffn
        if self.moe is not None:
            layers += self.L * self.moe.layer_extra + moe_layers * self.moe.layer_params(h, active)
        return self.V * h * (1 if self.tied else 2) + layers + h

    @property
    def params(self) -> int:
        """Parameter count (embedding + layers + final norm + untied head); a MoE model's every expert included."""
        return self._count(active=False)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: :attr:`params` with only k of the E routed experts of each MoE layer
        (the router and a shared expert always run); equal to :attr:`params` for a dense model."""
        return self._count(active=True)

    def to_hf_config(self, dtype: str = "fp32"):
        """A transformers config with this shape (random weights are built from it, nothing is downloaded):
        ``LlamaConfig`` for a dense model, ``MixtralConfig``, ``Qwen2MoeConfig`` or ``Qwen3MoeConfig`` for a mixture
        of experts (the routing keys as the config has them, the expert counts and widths as this spec says)."""
        import transformers

        cfg = {k: v for k, v in self.hf_config.items() if k not in _NOT_HF}
        cfg.update(hidden_size=self.h, num_hidden_layers=self.L, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, intermediate_size=self.ffn, vocab_size=self.V,
                   tie_word_embeddings=self.tied, head_dim=self.head_dim)
        if self.moe is None:
            return transformers.LlamaConfig(**cfg)
        moe = self.moe
        cfg["num_experts_per_tok"] = moe.top_k
        if moe.family == "mixtral":
            cfg.update(num_local_experts=moe.experts, intermediate_size=moe.expert_ffn)
            return transformers.MixtralConfig(**cfg)
        cfg.update(num_experts=moe.experts, moe_intermediate_size=moe.expert_ffn)
        if moe.family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = moe.shared_ffn
            return transformers.Qwen2MoeConfig(**cfg)
        return transformers.Qwen3MoeConfig(**cfg)


@lru_cache(maxsize=256)
def _parsed(path: str, stamp: tuple[int, int]) -> Any:
    """The JSON of ``path`` as of ``stamp`` (mtime, size): a file is parsed once until it changes."""
    return json.loads(Path(path).read_text())


def read_json_file(path: str | Path, what: str) -> Any:
    """A JSON file, parsed once and cached until it changes (a deep copy each call: callers may change theirs).
    One clear :class:`SpecError` for a missing file or malformed JSON (``what`` names the thing)."""
    path = Path(path)
    try:
        st = path.stat()
        data = _parsed(str(path.resolve()), (st.st_mtime_ns, st.st_size))
    except OSError as e:
        raise SpecError(f"{what} file {str(path)!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{what} file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return copy.deepcopy(data)


def read_preset_or_file(kind: str, text: str, what: str) -> tuple[Any, str]:
    """(parsed JSON, name) of ``text``: a preset of ``llmcomm/presets/<kind>``, else a JSON file (a folder means its
    ``config.json``) — the one preset resolver every loader goes through (:func:`load_model`,
    :func:`llmcomm.predict.hardware.load_hardware`, :func:`llmcomm.predict.profiles.load_profile`), cached by
    :func:`read_json_file`. One clear :class:`SpecError` for an unknown name or malformed JSON."""
    if text in preset_names(kind):
        return read_json_file(Path(str(resources.files("llmcomm.presets") / kind / f"{text}.json")), what), text
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise SpecError(f"unknown {what} {text!r}: not a preset ({', '.join(preset_names(kind))}) and no such file")
    return read_json_file(path, what), path.parent.name if path.name == "config.json" else path.stem


def resolve(kind: str, value: Any, cls: type, what: str):
    """An object of ``cls`` (a spec class with ``from_dict``/``from_hf_config``) from ``value``: an instance
    already, a dict, a preset name or a JSON path — the three loaders' one body."""
    if isinstance(value, cls):
        return value
    build = getattr(cls, "from_hf_config", None) or getattr(cls, "from_dict")
    if isinstance(value, Mapping):
        return build(value)
    data, name = read_preset_or_file(kind, str(value), what)
    return build(data, name=name)


def load_model(model: str | Path | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, a path to an HF ``config.json`` (or its folder), or a dict."""
    return resolve("models", model, ModelSpec, "model")


def stage_layers(L: int, p: int) -> list[int]:
    """Layers per pipeline stage for ``L`` layers on ``p`` stages: the first ``L mod p`` stages take one more.

    This is DeepSpeed's ``partition_uniform`` split of L items into p parts (and what the pipeline runs use).
    """
    if p < 1:
        raise SpecError(f"pipeline degree p={p} must be at least 1")
    if p > L:
        raise SpecError(f"pipeline degree p={p} exceeds the model's L={L} layers: a stage would hold no layer")
    q, r = divmod(L, p)
    return [q + 1 if i < r else q for i in range(p)]


@dataclass(frozen=True)
class Layout:
    """Tensor-parallel degree t times pipeline degree p; ranks = t·p (TP groups are consecutive ranks). Or, for a
    mixture of experts, expert parallelism of degree e with data-parallel attention: e ranks per pipeline stage,
    each running attention on b/e of the sequences, the experts split e ways (t = 1; ranks = e·p, global rank =
    stage·e + EP rank: the EP group of a stage is its e consecutive ranks)."""

    t: int = 1
    p: int = 1
    e: int = 1

    def __post_init__(self):
        for k in ("t", "p", "e"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"layout {k}={v!r} must be a positive integer")

    @property
    def ranks(self) -> int:
        return self.t * self.p * self.e

    def validate(self, model: ModelSpec) -> "Layout":
        """Check that the model can be laid out this way; return self.

        DeepSpeed AutoTP shards attention by KV heads (``get_shard_size`` over ``num_key_value_heads``): with t not
        dividing the KV heads it would give ranks unequal head counts, and with t > KV heads some ranks none at all.
        We refuse both, like vLLM and the paper's setting, rather than measure a lopsided layout.

        Expert parallelism (e > 1) needs a mixture of experts whose E experts e divides (DeepSpeed's MoE layer asserts
        it: every rank holds E/e experts); it combines with pipeline stages (p > 1), not with TP (DeepSpeed's MoE
        layer without a model-parallel unit would send every TP rank's duplicate tokens through the all-to-all).
        """
        if self.e > 1:
            if not model.is_moe:
                raise SpecError(f"expert parallelism e={self.e} needs a mixture of experts; {model.name} is dense")
            if model.E % self.e:
                raise SpecError(f"e={self.e} does not divide the {model.E} experts of {model.name}")
            if self.t > 1:
                raise SpecError(f"expert parallelism e={self.e} with t={self.t} is not modelled: use e (data-parallel "
                                f"attention), with or without p, or t and p without e")
        if self.t > 1:
            if model.heads % self.t:
                raise SpecError(f"t={self.t} does not divide the {model.heads} attention heads of {model.name}")
            if model.kv_heads % self.t:
                raise SpecError(f"t={self.t} does not divide the {model.kv_heads} KV heads of {model.name} "
                                f"(AutoTP would give ranks unequal KV heads)")
        stage_layers(model.L, self.p)
        return self


@dataclass(frozen=True)
class Workload:
    """b sequences of S prompt tokens, each generating G tokens (1 prefill + G−1 decode forwards)."""

    b: int = 1
    S: int = 16
    G: int = 4
    dtype: str = "fp32"

    def __post_init__(self):
        for k in ("b", "S", "G"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"workload {k}={v!r} must be a positive integer")
        if self.dtype not in DTYPE_BYTES:
            raise SpecError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")

    @property
    def w(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def validate(self, model: ModelSpec) -> "Workload":
        maxpos = model.hf_config.get("max_position_embeddings")
        if isinstance(maxpos, int) and self.S + self.G > maxpos:
            raise SpecError(f"S+G={self.S + self.G} tokens exceed max_position_embeddings={maxpos} of {model.name}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return f"b={self.b} S={self.S} G={self.G} {self.dtype}"


@dataclass(frozen=True)
class Disaggregation:
    """Prefill and decode on different ranks: the prefill side laid out ``prefill`` (t_P × p_P ranks: global ranks
    0 … N_P − 1), the decode side ``decode`` (t_D × p_D ranks: N_P … N_P + N_D − 1); each side's ranks numbered as
    a layout numbers them (stage·t + TP rank). After the prefill the KV cache of the S prompt tokens moves from the
    prefill side to the decode side (:mod:`llmcomm.derive.disagg`), stored in ``kv_dtype`` (None: the workload's
    dtype) and, for the piece count, in pages of ``block`` tokens (None: one contiguous piece per message). Expert
    parallelism on either side is not modelled (e = 1)."""

    prefill: Layout
    decode: Layout
    kv_dtype: str | None = None
    block: int | None = None

    def __post_init__(self):
        for side in ("prefill", "decode"):
            lay = getattr(self, side)
            if not isinstance(lay, Layout):
                raise SpecError(f"the {side} side must be a Layout, got {lay!r}")
            if lay.e > 1:
                raise SpecError(f"expert parallelism on the {side} side (e={lay.e}) is not modelled in a "
                                f"disaggregated layout: use t and p")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPE_BYTES:
            raise SpecError(f"KV dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int)
                                       or self.block < 1):
            raise SpecError(f"KV block size {self.block!r} must be a positive number of tokens")

    @property
    def ranks(self) -> int:
        """N_P + N_D."""
        return self.prefill.ranks + self.decode.ranks

    def validate(self, model: "ModelSpec") -> "Disaggregation":
        """Both sides laid out on ``model`` (t divides the heads and the KV heads, p ≤ L); return self."""
        for side in ("prefill", "decode"):
            try:
                getattr(self, side).validate(model)
            except SpecError as e:
                raise SpecError(f"{side} side: {e}") from None
        return self

    def w_kv(self, workload: "Workload") -> int:
        """Bytes per KV element: the KV dtype's, or the workload's dtype's."""
        return KV_DTYPE_BYTES[self.kv_dtype or workload.dtype]

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "Disaggregation | None":
        """What the command line asks for (``--disaggregate --prefill-tp --prefill-pp --decode-tp --decode-pp
        --kv-dtype [--gpus N]``; a side's degrees default to 1), None without ``--disaggregate``; one
        :class:`SpecError` for a side's flag without ``--disaggregate``, ``--tp``/``--pp``/``--ep`` beside it, or more
        ranks N_P + N_D than the N GPUs given."""
        names = ("prefill_tp", "prefill_pp", "decode_tp", "decode_pp", "kv_dtype", "gpus_given")
        given = [x for x in names if flags.get(x) is not None]
        if not flags.get("disaggregate"):
            if given:
                raise SpecError(f"--{given[0].replace('_given', '').replace('_', '-')} needs --disaggregate")
            return None
        clash = [x for x in ("tp", "pp", "ep") if flags.get(x, 1) != 1]
        if clash:
            raise SpecError(f"--disaggregate lays the sides out with --prefill-tp/--prefill-pp/--decode-tp/"
                            f"--decode-pp, not --{clash[0]}")
        deg = {x: flags.get(x) or 1 for x in names[:4]}
        dis = cls(Layout(deg["prefill_tp"], deg["prefill_pp"]), Layout(deg["decode_tp"], deg["decode_pp"]),
                  flags.get("kv_dtype"))
        if flags.get("gpus_given") is not None and dis.ranks > flags["gpus_given"]:
            raise SpecError(f"prefill {dis.prefill.t}x{dis.prefill.p} + decode {dis.decode.t}x{dis.decode.p} = "
                            f"{dis.ranks} ranks, more than the {flags['gpus_given']} GPUs given (--gpus)")
        return dis

    @property
    def label(self) -> str:
        return (f"prefill t={self.prefill.t} p={self.prefill.p} -> decode t={self.decode.t} p={self.decode.p}"
                + (f" kv {self.kv_dtype}" if self.kv_dtype else ""))


def workload_grid(b: Sequence[int] = (1,), S: Sequence[int] = (16,), G: Sequence[int] = (4,),
                  dtype: Sequence[str] = ("fp32",)) -> list[Workload]:
    """The cross product of the workload options, in the order a sweep runs and prints it: dtype outermost (one
    launch per dtype: the model is built in it), then b, S, G (G fastest). Duplicates are kept once."""
    out: list[Workload] = []
    for d in dict.fromkeys(dtype):
        for bb in dict.fromkeys(b):
            for ss in dict.fromkeys(S):
                for gg in dict.fromkeys(G):
                    out.append(Workload(bb, ss, gg, d))
    return out


def cpu_threads_per_rank(ranks: int, cores: int | None = None) -> int:
    """Threads each rank of a CPU run gets: ``OMP_NUM_THREADS = max(1, cores // ranks)`` — what the launcher sets
    (:func:`llmcomm.measure.supervise.default_env`) and the calibration the time model picks
    (:func:`llmcomm.predict.hardware.for_ranks`)."""
    import os

    cores = int(cores or os.cpu_count() or 1)
    return max(1, cores // int(ranks))
