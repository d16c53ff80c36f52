"""Specifications: the model (from an HF ``config.json`` or a preset), the layout (t, p) and the workload (b, S, G, dtype).

Symbols as in :mod:`llmcomm.notation` (b, S, G, w; h, L, V, a = ``heads``, a_kv = ``kv_heads``, d = ``head_dim``,
F = ``ffn``; t, p). Resolve a model once, at the edge (the command line or a chapter), with :func:`load_model`, and
pass the :class:`ModelSpec` inward.

Every validation failure raises :class:`SpecError` with one sentence that names the offending value; the CLI prints it
and exits with status 2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["SpecError", "ModelSpec", "Layout", "Workload", "DTYPE_BYTES", "preset_names", "load_model",
           "stage_layers", "read_preset_or_file", "cpu_threads_per_rank", "workload_grid"]


class SpecError(ValueError):
    """A specification that cannot describe a real run (malformed config, impossible layout, bad workload)."""


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def preset_names(kind: str = "models") -> list[str]:
    """Names of the presets shipped in ``llmcomm/presets/<kind>`` (``models`` or ``hardware``)."""
    folder = resources.files("llmcomm.presets") / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer (HF Llama family) as the communication model sees it."""

    name: str
    h: int                 # hidden_size
    L: int                 # num_hidden_layers
    heads: int             # num_attention_heads
    kv_heads: int          # num_key_value_heads
    ffn: int               # intermediate_size
    V: int                 # vocab_size
    tied: bool             # tie_word_embeddings
    head_dim: int
    hf_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "custom") -> "ModelSpec":
        if not isinstance(cfg, Mapping):
            raise SpecError(f"model config {name!r} is not a JSON object")
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
        return cls(name=name, h=h, L=vals["num_hidden_layers"], heads=heads, kv_heads=kv,
                   ffn=vals["intermediate_size"], V=vals["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                   head_dim=head_dim, hf_config=dict(cfg))

    @property
    def params(self) -> int:
        """Parameter count (embedding + layers + final norm + untied head)."""
        h, f = self.h, self.ffn
        attn = h * self.heads * self.head_dim * 2 + h * self.kv_heads * self.head_dim * 2
        layer = attn + 3 * h * f + 2 * h
        return self.V * h * (1 if self.tied else 2) + self.L * layer + h

    def to_hf_config(self, dtype: str = "fp32"):
        """A ``transformers.LlamaConfig`` with this shape (random weights are built from it, nothing is downloaded)."""
        from transformers import LlamaConfig

        cfg = {k: v for k, v in self.hf_config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
        cfg.update(hidden_size=self.h, num_hidden_layers=self.L, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, intermediate_size=self.ffn, vocab_size=self.V,
                   tie_word_embeddings=self.tied, head_dim=self.head_dim)
        return LlamaConfig(**cfg)


def read_preset_or_file(kind: str, text: str, what: str) -> tuple[Any, str]:
    """(parsed JSON, name) of ``text``: a preset of ``llmcomm/presets/<kind>``, else a JSON file (a folder means its
    ``config.json``). One clear :class:`SpecError` for an unknown name or malformed JSON (``what`` names the thing)."""
    if text in preset_names(kind):
        return json.loads((resources.files("llmcomm.presets") / kind / f"{text}.json").read_text()), text
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise SpecError(f"unknown {what} {text!r}: not a preset ({', '.join(preset_names(kind))}) and no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{what} file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return data, path.parent.name if path.name == "config.json" else path.stem


def load_model(model: str | Path | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, a path to an HF ``config.json`` (or its folder), or a dict."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return ModelSpec.from_hf_config(model)
    cfg, name = read_preset_or_file("models", str(model), "model")
    return ModelSpec.from_hf_config(cfg, name=name)


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
    """Tensor-parallel degree t times pipeline degree p; ranks = t·p (TP groups are consecutive ranks)."""

    t: int = 1
    p: int = 1

    def __post_init__(self):
        for k in ("t", "p"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"layout {k}={v!r} must be a positive integer")

    @property
    def ranks(self) -> int:
        return self.t * self.p

    def validate(self, model: ModelSpec) -> "Layout":
        """Check that the model can be laid out this way; return self.

        DeepSpeed AutoTP shards attention by KV heads (``get_shard_size`` over ``num_key_value_heads``): with t not
        dividing the KV heads it would give ranks unequal head counts, and with t > KV heads some ranks none at all.
        We refuse both, like vLLM and the paper's setting, rather than measure a lopsided layout.
        """
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
    (:func:`llmcomm.measure.launch.default_env`) and the calibration the time model picks
    (:func:`llmcomm.predict.hardware.for_ranks`)."""
    import os

    cores = int(cores or os.cpu_count() or 1)
    return max(1, cores // int(ranks))
