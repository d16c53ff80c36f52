"""Shared pieces of the proofs: the project's tiny Llama with seeded random weights, cut into DeepSpeed
``PipelineModule`` layers that run a *full* forward (DeepSpeed's pipeline engine has no KV cache, so each call must see
the whole sequence), and a single-process reference.

Every proof is a standalone script for ``deepspeed --num_gpus N tools/proofs/<proof>.py`` on CPU; each prints one
``PROVEN:``/``NOT PROVEN:`` line per claim (rank 0) and exits 0 when every claim is proven.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import nn

SEED = 1234


def build_reference(preset: str = "tiny-llama"):
    """The whole HF model, identical on every rank (same seed, random weights, nothing downloaded)."""
    from transformers import LlamaForCausalLM
    from llmcomm.spec import load_model

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(load_model(preset).to_hf_config()).eval()
    return model


def prompt(b: int, s: int, V: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (b, s), generator=g)


class EmbedPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.embed_tokens

    def forward(self, ids):
        return self.embed(ids)


class DecoderPipe(nn.Module):
    """One decoder layer over the whole sequence: positions 0..s-1, causal attention, no cache."""

    def __init__(self, model, i):
        super().__init__()
        self.layer = model.model.layers[i]
        self.rotary = model.model.rotary_emb
        self.calls_tokens = []  # tokens this layer processed per call (evidence for "full forward")

    def forward(self, x):
        self.calls_tokens.append(x.shape[0] * x.shape[1])
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        return self.layer(x, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(x, pos))


class HeadPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, x):
        return self.lm_head(self.norm(x))


def pipe_engine(model, num_stages: int, micro_batch: int, micro_batches: int = 1, dynamic_shape: bool = False):
    """``deepspeed.initialize`` of a ``PipelineModule`` (forward only: no optimizer) as DeepSpeed documents it."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    layers = [EmbedPipe(model)] + [DecoderPipe(model, i) for i in range(model.config.num_hidden_layers)] + \
        [HeadPipe(model)]
    module = PipelineModule(layers=layers, num_stages=num_stages, partition_method="uniform",
                            dynamic_shape=dynamic_shape)
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro_batches,
           "train_batch_size": micro_batch * micro_batches, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, config=cfg)
    return engine, layers


def eval_logits(engine, ids: torch.Tensor):
    """One ``eval_batch`` returning logits; ``total_loss`` is reset as dynamic shapes require (proof shape_trap.py)."""
    engine.total_loss = None
    _, logits = engine.eval_batch(iter([(ids, ids)]), return_logits=True, compute_loss=False, reduce_output=None)
    return logits


def report(claims: list[tuple[bool, str]] | None, src: int = 0) -> None:
    """Rank ``src`` (the one holding the evidence, e.g. the last stage) prints the claims; every rank exits 0 only
    if all are proven."""
    import deepspeed.comm as dist

    ok = torch.tensor([0], dtype=torch.int64)
    if dist.get_rank() == src:
        for good, text in claims:
            print(("PROVEN: " if good else "NOT PROVEN: ") + text, flush=True)
        ok[0] = int(all(good for good, _ in claims))
    dist.broadcast(ok, src)
    sys.exit(0 if ok.item() else 1)


def init(shm: bool = False):
    """gloo process groups. Unless ``shm``, drop ``LOCAL_SIZE`` (set by the deepspeed launcher) first, so DeepSpeed's
    shared-memory all-reduce never maps its 66 MiB /dev/shm buffer, and send ``inference_all_reduce`` to gloo."""
    import deepspeed
    import deepspeed.comm as dist

    if not shm:
        os.environ.pop("LOCAL_SIZE", None)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    if not shm:
        dist.comm.cdb.shm_vector_kernel_level = 0
    torch.set_num_threads(1)
