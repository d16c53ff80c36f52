"""Mixtures of experts: specs from config.json (presets, the Qwen layer rule, refusals), parameter counts against an
instantiated model."""
import json

import pytest

from llmcomm import SpecError, load_model

# (h, L, heads, kv_heads, head_dim, E, k, F_ex, F (dense), L_moe, V, tied) from each model's published config.json
PUBLISHED = {
    "mixtral-8x7b": (4096, 32, 32, 8, 128, 8, 2, 14336, 14336, 32, 32000, False),
    "mixtral-8x22b": (6144, 56, 48, 8, 128, 8, 2, 16384, 16384, 56, 32768, False),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 128, 8, 768, 6144, 48, 151936, False),
    "qwen3-235b-a22b": (4096, 94, 64, 4, 128, 128, 8, 1536, 12288, 94, 151936, False),
    "tiny-mixtral": (64, 2, 4, 2, 16, 8, 2, 96, 96, 2, 256, False),
}
# (total, active) parameters in billions, to the precision the model cards publish them (Mistral: 46.7B/12.9B and
# 141B/39B; Qwen3: 30.5B/3.3B and 235B/22B)
PUBLISHED_PARAMS = {"mixtral-8x7b": ((46.7, 1), (12.9, 1)), "mixtral-8x22b": ((141, 0), (39, 0)),
                    "qwen3-30b-a3b": ((30.5, 1), (3.3, 1)), "qwen3-235b-a22b": ((235, 0), (22, 0))}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_presets_have_published_shapes(name):
    m = load_model(name)
    h, L, heads, kv, d, E, k, f_ex, f, l_moe, V, tied = PUBLISHED[name]
    assert (m.h, m.L, m.heads, m.kv_heads, m.head_dim, m.ffn, m.V, m.tied) == (h, L, heads, kv, d, f, V, tied)
    assert (m.moe.experts, m.moe.top_k, m.moe.expert_ffn, m.L_moe, m.E) == (E, k, f_ex, l_moe, E)
    assert m.moe.layers == tuple(range(L)) and m.moe.shared_ffn == 0 and m.moe.norm_topk and m.is_moe
    assert m.moe.family == ("mixtral" if "mixtral" in name else "qwen3_moe")
    assert m.hf_config["_source"]                      # where the shape comes from
    if name in PUBLISHED_PARAMS:
        (total, nd), (active, na) = PUBLISHED_PARAMS[name]
        # within one unit of the last published digit (Qwen3-30B-A3B: 3.35 B active, published "3.3B")
        assert abs(m.params / 1e9 - total) < 10 ** -nd and abs(m.active_params / 1e9 - active) < 10 ** -na


def test_dense_models_are_unchanged():
    m = load_model("llama-3.1-8b")
    assert m.moe is None and not m.is_moe and m.L_moe == 0 and m.E == 0 and m.active_params == m.params


def _qwen3(**kw):
    cfg = {"model_type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "moe_intermediate_size": 24,
           "num_experts": 6, "num_experts_per_tok": 2, "vocab_size": 128, "decoder_sparse_step": 2,
           "mlp_only_layers": [3], "norm_topk_prob": False, "tie_word_embeddings": False,
           "max_position_embeddings": 64}
    cfg.update(kw)
    return cfg


def test_qwen3_layer_rule():
    # layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0: 1, 5 (3 is listed)
    m = load_model(_qwen3())
    assert m.moe.layers == (1, 5) and m.L_moe == 2 and not m.moe.norm_topk
    assert load_model(_qwen3(decoder_sparse_step=1, mlp_only_layers=[])).moe.layers == tuple(range(6))
    dense = load_model(_qwen3(decoder_sparse_step=7, mlp_only_layers=[]))       # no MoE layer: a dense model
    assert not dense.is_moe and dense.L_moe == 0


def _instantiated_params(spec) -> int:
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = spec.to_hf_config()
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", [
    "tiny-mixtral", "tiny-llama",
    _qwen3(), _qwen3(attention_bias=True, tie_word_embeddings=True),
    # Qwen2-MoE: a shared expert with its gate, q/k/v biases
    dict(_qwen3(), model_type="qwen2_moe", shared_expert_intermediate_size=40),
    dict(_qwen3(), model_type="qwen2_moe", shared_expert_intermediate_size=40, qkv_bias=False),
], ids=["tiny-mixtral", "tiny-llama", "qwen3", "qwen3-bias-tied", "qwen2-shared", "qwen2-shared-nobias"])
def test_params_match_an_instantiated_model(cfg):
    spec = load_model(cfg)
    assert spec.params == _instantiated_params(spec)
    if spec.moe is not None:
        assert spec.to_hf_config().model_type == spec.moe.family
        # active: the k routed experts of each MoE layer instead of E
        per_expert = 3 * spec.h * spec.moe.expert_ffn
        assert spec.params - spec.active_params == spec.L_moe * (spec.moe.experts - spec.moe.top_k) * per_expert


def test_to_hf_config_classes():
    from transformers import LlamaConfig, MixtralConfig

    assert type(load_model("tiny-llama").to_hf_config()) is LlamaConfig
    cfg = load_model("mixtral-8x7b").to_hf_config()
    assert type(cfg) is MixtralConfig and cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.intermediate_size == 14336 and not hasattr(cfg, "_source")


def test_tiny_mixtral_builds_and_runs_a_forward():
    import torch

    from llmcomm.measure.runs.common import build_model

    model = build_model(load_model("tiny-mixtral"))
    assert type(model).__name__ == "MixtralForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == load_model("tiny-mixtral").params
    with torch.no_grad():
        logits = model(input_ids=torch.arange(10).reshape(2, 5)).logits
    assert logits.shape == (2, 5, 256) and torch.isfinite(logits).all()
    again = build_model(load_model("tiny-mixtral"))                   # seeded: identical weights
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("cfg, message", [
    (dict(_qwen3(), num_experts_per_tok=7), "num_experts_per_tok=7 exceeds the 6 experts"),
    (dict(_qwen3(), num_experts_per_tok=0), "num_experts_per_tok=0 must be at least 1"),
    (dict(_qwen3(), num_experts=0), "num_experts=0 must be at least 1 expert"),
    (dict(_qwen3(), decoder_sparse_step=0), "decoder_sparse_step=0 must be at least 1"),
    (dict(_qwen3(), mlp_only_layers=[6]), r"mlp_only_layers=\[6\] must list layer indices in \[0, 6\)"),
    (dict(_qwen3(), num_experts=2.5), "num_experts must be an integer"),
    (dict(_qwen3(), shared_expert_intermediate_size=8), "qwen3_moe has no shared expert"),
    (dict(_qwen3(), model_type="deepseek_v3", kv_lora_rank=512, n_routed_experts=256), "DeepSeek-style"),
    (dict(_qwen3(), q_lora_rank=1536), "multi-head latent attention"),
    (dict(_qwen3(), model_type="llama4_text", interleave_moe_layer_step=1), "Llama 4"),
    ({"model_type": "llama4", "text_config": {}}, "Llama 4"),
    (dict(_qwen3(), model_type="olmoe"), "model_type 'olmoe', a mixture of experts llmcomm does not model"),
    (dict(_qwen3(), moe_intermediate_size=None), "needs a positive moe_intermediate_size"),
])
def test_bad_moe_configs(tmp_path, cfg, message):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match=message):
        load_model(f)


def test_mixtral_k_larger_than_experts():
    cfg = dict(load_model("tiny-mixtral").hf_config, num_experts_per_tok=9)
    with pytest.raises(SpecError, match="num_experts_per_tok=9 exceeds the 8 experts"):
        load_model(cfg)

