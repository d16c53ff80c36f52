"""Specs: presets carry the published shapes; bad input fails with one clear SpecError."""
import json

import pytest

from llmcomm import Layout, SpecError, Workload, load_model, preset_names, stage_layers

# (h, L, heads, kv_heads, ffn, V, tied, params in billions to 2 decimals) from each model's published config.json
PUBLISHED = {
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, False, 6.74),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000, False, 13.02),
    "llama-2-70b": (8192, 80, 64, 8, 28672, 32000, False, 68.98),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True, 1.24),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, True, 3.21),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, False, 8.03),
    "llama-3.1-70b": (8192, 80, 64, 8, 28672, 128256, False, 70.55),
    "llama-3.1-405b": (16384, 126, 128, 8, 53248, 128256, False, 405.85),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_published_shapes(name):
    m = load_model(name)
    h, L, heads, kv, ffn, V, tied, billions = PUBLISHED[name]
    assert (m.h, m.L, m.heads, m.kv_heads, m.ffn, m.V, m.tied) == (h, L, heads, kv, ffn, V, tied)
    assert round(m.params / 1e9, 2) == billions


def test_tiny_models_are_presets():
    assert {"tiny-llama", "tiny-llama-tied"} <= set(preset_names())
    assert load_model("tiny-llama-tied").tied


def test_config_json_path_and_folder(tmp_path):
    cfg = json.loads(json.dumps(load_model("llama-3.1-8b").hf_config))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).h == 4096
    assert load_model(tmp_path / "config.json").V == 128256


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"hidden_size": 64}', "lacks num_hidden_layers"),
    ('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8,'
     ' "vocab_size": -5}', "vocab_size must be a positive integer"),
    ('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,'
     ' "intermediate_size": 8, "vocab_size": 5}', "not a multiple of num_key_value_heads"),
    ("[1, 2]", "is not a JSON object"),
])
def test_malformed_configs(tmp_path, text, message):
    f = tmp_path / "config.json"
    f.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_model(f)


def test_unknown_model():
    with pytest.raises(SpecError, match="unknown model 'nope'"):
        load_model("nope")


@pytest.mark.parametrize("model, t, p, message", [
    ("llama-3.1-8b", 3, 1, "does not divide the 32 attention heads"),
    ("llama-3.1-8b", 16, 1, "does not divide the 8 KV heads"),
    ("tiny-llama", 1, 5, "exceeds the model's L=4 layers"),
])
def test_impossible_layouts(model, t, p, message):
    with pytest.raises(SpecError, match=message):
        Layout(t, p).validate(load_model(model))


@pytest.mark.parametrize("kwargs, message", [
    (dict(b=0), "b=0 must be a positive integer"),
    (dict(S=-1), "S=-1"),
    (dict(dtype="int8"), "dtype 'int8' is not one of"),
])
def test_bad_workloads(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Workload(**kwargs)


def test_workload_longer_than_context():
    with pytest.raises(SpecError, match="exceed max_position_embeddings=512"):
        Workload(S=510, G=3).validate(load_model("tiny-llama"))


def test_bytes_per_element():
    assert [Workload(dtype=d).w for d in ("fp32", "bf16", "fp16")] == [4, 2, 2]


@pytest.mark.parametrize("L, p, split", [(4, 1, [4]), (4, 2, [2, 2]), (5, 2, [3, 2]), (5, 4, [2, 1, 1, 1]),
                                         (80, 3, [27, 27, 26]), (5, 5, [1] * 5)])
def test_stage_layers(L, p, split):
    assert stage_layers(L, p) == split
    assert sum(split) == L
