"""PROOF: how transformers 5.24 computes the experts of Mixtral and Qwen3-MoE — what the TP schemes' expert GEMMs are.

Run: ``deepspeed --num_gpus 2 --master_port 29619 tools/proofs/experts_grouped_mm.py`` (CPU, gloo, ~30 s).

Claims:
1. The HF model classes default to ``experts_implementation="grouped_mm"`` when none is asked for (transformers'
   ``get_correct_experts_implementation``): the project's tiny Mixtral and Qwen3-MoE (``build_model``) and the real
   Mixtral-8x7B and Qwen3-30B-A3B configurations (built on the meta device, no weights).
2. One forward of such a model calls ``aten::_grouped_mm`` exactly twice per MoE layer — gate_up over the T·k routed
   rows [T·k, h] × the whole [E, h, 2F] stack, then down [T·k, F] × [E, F, h] — and no ``aten::linear`` inside the
   experts: one grouped GEMM per projection, however many experts the tokens touch.
3. ``experts_implementation="eager"`` (the Python loop the time model priced before) instead runs one ``linear`` pair
   per expert hit, and computes the same output (grouped vs eager, max |diff| < 1e-5).
4. AutoTP (``init_inference``, t = 2) keeps it: the engine's forward still makes two ``_grouped_mm`` per MoE layer on
   the whole [E, h, 2F] stack (experts replicated: ``autotp``); after ``shard_experts`` (``tp-experts``) the same
   two calls run on the sharded [E, h, 2F/t] stack.
5. On a GPU the grouped path dispatches to ``torch.nn.functional.grouped_mm`` (one kernel) when the device's compute
   capability is at least 8.0 (A100 8.0, H100 9.0), and to transformers' per-expert fallback loop below (V100 7.0):
   transformers' own ``_can_use_grouped_mm`` evaluated with the capability stubbed (no GPU here) — the dispatch rule,
   not a GPU run.
"""
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny  # noqa: E402

import torch  # noqa: E402

_tiny.init()
import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402
from transformers.integrations import moe as hf_moe  # noqa: E402

from llmcomm.measure.moe_adapter import shard_experts  # noqa: E402
from llmcomm.measure.runs.common import build_model  # noqa: E402
from llmcomm.spec import load_model  # noqa: E402

claims = []


def grouped_calls(forward):
    """(shapes of every aten::_grouped_mm, names of the ATen ops run inside any experts module) of one forward."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.no_grad():
        forward()
    grouped = [tuple(tuple(x) for x in ev.input_shapes[:2]) for ev in prof.events() if ev.name == "aten::_grouped_mm"]
    return grouped, [ev.name for ev in prof.events()]


for preset, real in (("tiny-mixtral", "mixtral-8x7b"), ("tiny-qwen3-moe", "qwen3-30b-a3b")):
    spec = load_model(preset)
    hf = build_model(spec, "fp32", "cpu", seed=_tiny.SEED)
    cfg = load_model(real).to_hf_config()
    with torch.device("meta"):
        big = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
    claims.append((hf.config._experts_implementation == "grouped_mm" == big.config._experts_implementation,
                   f"{type(hf).__name__}: experts_implementation defaults to {hf.config._experts_implementation!r} "
                   f"({preset}) and {big.config._experts_implementation!r} ({real}, meta device)"))
    b, s, h, E, k, F = 2, 5, spec.h, spec.E, spec.moe.top_k, spec.moe.expert_ffn
    ids = _tiny.prompt(b, s, spec.V)
    grouped, names = grouped_calls(lambda: hf(input_ids=ids))
    want = [((b * s * k, h), (E, h, 2 * F)), ((b * s * k, F), (E, F, h))] * spec.L_moe
    claims.append((grouped == want,
                   f"{preset}: one forward ran aten::_grouped_mm {len(grouped)} times = 2 per MoE layer × "
                   f"{spec.L_moe} MoE layers, shapes {grouped[:2]} = [T·k, h]×[E, h, 2F] then [T·k, F]×[E, F, h]"))
    block = next(layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts"))
    x = torch.randn(b * s, h, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights, index = block.gate(x)                                   # routed once, outside the traces
        grouped_out = block.experts(x, index, weights)
    g_calls, g_names = grouped_calls(lambda: block.experts(x, index, weights))
    hf.set_experts_implementation("eager")
    e_calls, e_names = grouped_calls(lambda: block.experts(x, index, weights))
    with torch.no_grad():
        eager_out = block.experts(x, index, weights)
    hf.set_experts_implementation("grouped_mm")
    hit = int(torch.unique(index).numel())
    err = float((eager_out - grouped_out).abs().max())
    claims.append((g_names.count("aten::linear") == 0 and len(g_calls) == 2 and not e_calls
                   and e_names.count("aten::linear") == 2 * hit and err < 1e-5,
                   f"{preset}: the experts module alone: grouped_mm = {len(g_calls)} grouped calls, "
                   f"{g_names.count('aten::linear')} linear; eager = {e_names.count('aten::linear')} linear for the "
                   f"{hit} experts hit (2 each), no grouped call; same output (max |diff| {err:.1g})"))

spec = load_model("tiny-mixtral")
model = build_model(spec, "fp32", "cpu", seed=_tiny.SEED)
engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                  replace_with_kernel_inject=False)
ids = _tiny.prompt(2, 5, spec.V)
h, E, F, t = spec.h, spec.E, spec.moe.expert_ffn, 2
auto, _ = grouped_calls(lambda: engine.module(input_ids=ids))
shard_experts(engine.module, engine.mp_group)
sharded, _ = grouped_calls(lambda: engine.module(input_ids=ids))
claims.append((engine.module.config._experts_implementation == "grouped_mm" and len(auto) == 2 * spec.L_moe
               and {w for _, w in auto} == {(E, h, 2 * F), (E, F, h)}
               and len(sharded) == 2 * spec.L_moe and {w for _, w in sharded} == {(E, h, 2 * F // t), (E, F // t, h)},
               f"AutoTP t=2: {len(auto)} grouped calls a forward on weights {sorted({w for _, w in auto})} (whole); "
               f"after shard_experts {len(sharded)} on {sorted({w for _, w in sharded})} (sharded t ways)"))

real_cap = torch.cuda.get_device_capability
verdicts = {}
for name, cap in (("V100", (7, 0)), ("A100", (8, 0)), ("H100", (9, 0))):
    torch.cuda.get_device_capability = lambda device=None, cap=cap: cap
    w = SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=torch.bfloat16)
    verdicts[name] = hf_moe._can_use_grouped_mm(None, w, None)
torch.cuda.get_device_capability = real_cap
claims.append((verdicts == {"V100": False, "A100": True, "H100": True} and hasattr(torch.nn.functional, "grouped_mm"),
               f"on CUDA (capability stubbed) transformers' _can_use_grouped_mm says {verdicts}: "
               f"torch {torch.__version__} has torch.nn.functional.grouped_mm, one kernel per projection on SM80+"))
_tiny.report(claims if dist.get_rank() == 0 else [], src=0)
