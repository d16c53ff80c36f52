"""What every rank-side run shares: the model with seeded random weights, the prompt, the greedy generation loop.

Generation follows the project's phase convention (and what HF ``generate`` does): ONE prefill forward over the
S-token prompt keeping the logits of the last position only (``logits_to_keep=1``) gives token 1; then G−1 decode
forwards of one token each reuse the KV cache. TTFT = prefill incl. the argmax; TPOT = mean decode step; both with the
device synchronised, so they are wall times of finished work.

Nothing is downloaded: the weights are drawn from ``torch.manual_seed(seed)`` on the CPU in fp32 and then cast/moved,
so every rank (and the single-process reference) holds bit-identical weights whatever its device.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from llmcomm.spec import ModelSpec, Workload, SpecError

__all__ = ["TORCH_DTYPES", "pick_device", "synchronize", "build_model", "prompt_ids", "Generation", "generate",
           "keep_stage",
           "reference_generations", "warm_up", "versions"]

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(dtype: str, local_rank: int = 0) -> torch.device:
    """``cuda:{local_rank}`` when CUDA is there (and ``DS_ACCELERATOR`` is not ``cpu``, which keeps DeepSpeed and the
    model on the CPU together), else CPU (fp32 or bf16: CPU fp16 matmuls are not worth measuring). One GPU per rank:
    a local rank without its own visible GPU is an error (NCCL refuses two ranks on one GPU)."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        n = torch.cuda.device_count()
        if not 0 <= local_rank < n:
            raise SpecError(f"local rank {local_rank} has no GPU of its own: {n} visible (one GPU per rank)")
        return torch.device(f"cuda:{local_rank}")
    if dtype == "fp16":
        raise SpecError("dtype fp16 needs a GPU; on CPU use fp32 (or bf16)")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels are asynchronous; CPU ops are not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(model: ModelSpec, dtype: str = "fp32", device: torch.device | str = "cpu", seed: int = 0):
    """The HF causal LM of this shape — ``LlamaForCausalLM`` for a dense model, ``MixtralForCausalLM`` (or the
    Qwen-MoE class) for a mixture of experts: the class transformers maps the spec's config to — with weights drawn
    from ``seed`` (identical on every process), in eval mode, cast to ``dtype`` and moved to ``device``."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = model.to_hf_config()
    torch.manual_seed(seed)
    with torch.device("cpu"):
        m = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
    return m.to(dtype=TORCH_DTYPES[dtype], device=device).eval()


def prompt_ids(workload: Workload, V: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[b, S]`` token ids in ``[0, V)`` drawn from their own generator (independent of the weights' RNG)."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    return torch.randint(0, V, (workload.b, workload.S), generator=g).to(device)


@dataclass
class Generation:
    """Result of :func:`generate`: ``tokens[i]`` are the G ids generated for sequence i."""

    tokens: list[list[int]]
    ttft_s: float
    tpot_s: float                    # mean decode step (0.0 when G = 1)
    e2e_s: float                     # prefill + all decode steps
    decode_steps_s: list[float] = field(default_factory=list)

    @property
    def timings(self) -> dict:
        """The ``timings`` of a rank result."""
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "decode_steps_s": self.decode_steps_s}


def keep_stage(hf, start: int, stop: int, first: bool, last: bool) -> None:
    """Cut the HF causal LM ``hf`` down to one pipeline stage, in place: decoder layers [start, stop) (each keeps
    its global ``layer_idx``, so the KV cache is indexed as in the whole model), the embedding only on the first
    stage, the final norm and ``lm_head`` only on the last."""
    hf.model.layers = torch.nn.ModuleList(list(hf.model.layers)[start:stop])
    if not first:
        hf.model.embed_tokens = None
    if not last:
        hf.model.norm = None
        hf.lm_head = None


def cache_kwarg(fn) -> str:
    """transformers ≥ 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); take whichever ``fn`` has."""
    target = getattr(fn, "forward", fn)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(forward: Callable, hf_model, input_ids: torch.Tensor, G: int,
             phase: Callable[[str], ContextManager] | None = None, beat: Callable[[], None] | None = None) -> Generation:
    """Greedy generation of G tokens: 1 prefill forward (``logits_to_keep=1``) + G−1 one-token decode forwards.

    ``forward`` is what is called (the HF model, or a DeepSpeed ``InferenceEngine`` wrapping it); ``hf_model`` is the
    HF model itself (for its config and forward signature). ``phase(name)`` (e.g. ``Capture.phase``) is entered around
    the prefill and around the decode steps; ``beat()`` (the rank's heartbeat) is called after every forward,
    outside its timing.
    """
    from transformers import DynamicCache

    phase = phase or (lambda name: contextlib.nullcontext())
    device = input_ids.device
    cache = DynamicCache(config=hf_model.config)
    kw = cache_kwarg(hf_model)
    out_tokens = []
    synchronize(device)
    with phase("prefill"):
        t0 = time.perf_counter()
        logits = forward(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        tok = logits[:, -1, :].argmax(dim=-1)
        synchronize(device)
        t1 = time.perf_counter()
    if beat is not None:
        beat()
    out_tokens.append(tok)
    steps = []
    with phase("decode"):
        for _ in range(G - 1):
            s0 = time.perf_counter()
            logits = forward(input_ids=tok[:, None], use_cache=True, **{kw: cache}).logits
            tok = logits[:, -1, :].argmax(dim=-1)
            synchronize(device)
            steps.append(time.perf_counter() - s0)
            out_tokens.append(tok)
            if beat is not None:
                beat()
    tokens = torch.stack(out_tokens, dim=1).cpu().tolist()
    ttft = t1 - t0
    return Generation(tokens=tokens, ttft_s=ttft, tpot_s=sum(steps) / len(steps) if steps else 0.0,
                      e2e_s=ttft + sum(steps), decode_steps_s=steps)


def reference_generations(forward: Callable, prompts: list, workloads: list, on: bool = True,
                          hf_model=None) -> list:
    """The single-process :class:`Generation` of every configuration (``None`` each when not ``on``): ``forward`` is
    the unsharded model (or a recorder around it; then ``hf_model`` is the model itself)."""
    if not on:
        return [None] * len(workloads)
    return [generate(forward, hf_model if hf_model is not None else forward, ids, w.G)
            for ids, w in zip(prompts, workloads)]


def moe_options(routing) -> dict:
    """The keyword arguments of :func:`llmcomm.measure.moe_adapter.adapt` and
    :func:`~llmcomm.measure.moe_adapter.set_routing` for a :class:`llmcomm.deployment.Routing`."""
    return {"dropless": routing.mode == "dropless", "capacity_factor": routing.capacity_factor,
            "min_capacity": routing.min_capacity}


def ep_share(hf, prompts: list, workloads: list, j: int, e: int, routings: list, reference: bool = True):
    """What EP rank ``j`` of ``e`` runs: ``(shares, prompts, references)`` — sequences ``[j·b/e, (j+1)·b/e)`` of each
    configuration, their prompts, and the single-process reference of that share under the configuration's routing
    (``routings``, one :class:`llmcomm.deployment.Routing` each): the same weights adapted with ``ep_size = 1`` (every
    expert local, no collective in the forward; capacity routing drops by the rank's own token count). Collective:
    every rank of the world must call it (the adaptation creates the ep_size_1 groups)."""
    import copy

    from llmcomm.measure.moe_adapter import adapt, set_routing

    shares = [(j * w.b // e, (j + 1) * w.b // e) for w in workloads]
    prompts = [ids[lo:hi] for ids, (lo, hi) in zip(prompts, shares)]
    single = adapt(copy.deepcopy(hf), 1, **moe_options(routings[0]))
    references = []
    for ids, w, routing in zip(prompts, workloads, routings):
        set_routing(single, **moe_options(routing))
        references += reference_generations(single, [ids], [w], on=reference)
    return shares, prompts, references


def warm_up(forward: Callable, hf_model, ids: torch.Tensor, workload: Workload) -> None:
    """One generation of at most 2 tokens, not captured and not timed, before the first configuration is measured:
    the first forward of a process pays one-time costs (allocator, thread pools, kernel selection) that would
    otherwise land on whichever configuration comes first."""
    generate(forward, hf_model, ids, min(workload.G, 2))


def versions() -> dict:
    """Versions of the stack a result was produced with."""
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:                                          # pragma: no cover - optional in some contexts
            out[mod] = None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out
