"""Mixtures of experts: specs from config.json (presets, the Qwen layer rule, refusals), parameter counts against an
instantiated model, the closed forms of expert parallelism and of TP with experts, DeepSpeed's capacity, and the
command line's MoE options."""
import json
import math
from fractions import Fraction

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


# ------------------------------------------------------------------------------------------------- closed forms
import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from llmcomm import Layout, Workload  # noqa: E402
from llmcomm.derive import evaluate as ev, moe, volumes as v  # noqa: E402
from llmcomm.notation import C, C_min, E, G, L, L_moe, S, V, b, e, gamma, h, k, s, t, w  # noqa: E402


def test_capacity_closed_form():
    assert moe.CAPACITY == sp.Max(sp.ceiling(b * s * k * gamma / (e * E)), C_min)
    assert moe.A2A_BYTES == E * C * h * w
    assert moe.DROPLESS_BOUNDS == (sp.ceiling(b * s * k / (e * E)), b * s / e)
    vals = {b: 4, s: 7, k: 2, gamma: 1, e: 2, E: 8, C_min: 4}
    assert moe.CAPACITY.subs(vals) == 4 and moe.CAPACITY.subs({**vals, gamma: 3}) == 11


def test_capacity_matches_deepspeed_float32():
    """capacity() against DeepSpeed's own _capacity over a grid, including capacity factors where float32 differs
    from the exact rational form."""
    import torch
    from deepspeed.moe.sharded_moe import _capacity

    differs = 0
    for cf in (0.5, 0.7, 1.0, 1.1, 1.2, 1.25, 1.3, 1.7, 2.0, 2.4):
        for E_ in (1, 2, 3, 4, 6, 7, 8, 16, 60, 128):
            for k_ in range(1, min(E_, 4) + 1):
                for T in range(1, 130):
                    for mc in (0, 4):
                        ds = int(_capacity(torch.empty(T, E_), torch.tensor(cf * k_), torch.tensor(mc)))
                        assert moe.capacity(T, E_, k_, cf, mc) == ds, (T, E_, k_, cf, mc)
                        exact_c = max(math.ceil(Fraction(str(cf)) * T * k_ / E_), mc)     # CAPACITY, exactly
                        differs += ds != exact_c
                        assert ds - exact_c in (0, 1)          # float32 gives at most one slot more
    assert differs > 0                                       # the grid does exercise float32 rounding
    assert moe.capacity(25, 2, 1, 1.2, 0) == 16 and moe.CAPACITY.subs(
        {b: 25, s: 1, e: 1, E: 2, k: 1, gamma: sp.Rational(6, 5), C_min: 0}) == 15
    # the quotient T/E is rounded to float32 too: with E = 7 even a dyadic factor differs from the exact form (and
    # multiplying in float64, math.ceil(T / E * float32(cf·k)), misses it the other way: 30 instead of 29)
    assert moe.capacity(114, 7, 7, 0.5, 0) == 58 and math.ceil(Fraction(114 * 7, 2 * 7)) == 57
    assert moe.capacity(58, 7, 7, 0.5, 0) == 29 == math.ceil(58 / 7 * float(np.float32(0.5 * 7))) - 1


def test_ep_pattern_closed_forms():
    fwd = v.per_forward("deepspeed-ep")
    calls, nbytes = fwd[("all_to_all", e)]
    assert calls.subs(e, 2) == 2 * L_moe and calls.subs(e, 1) == 0
    assert sp.expand(nbytes.subs(e, 4) - 2 * L_moe * E * C * h * w) == 0
    assert ("all_reduce", e) not in fwd
    drop = v.per_forward("deepspeed-ep-dropless")
    assert drop[("all_reduce", e)][0].subs(e, 2) == L_moe and drop[("all_reduce", e)][1].subs(e, 2) == 8 * L_moe
    # capacity routing: C is DeepSpeed's capacity of the forward
    _, cap_bytes = moe.ep_forms("capacity")[("all_to_all", e)]
    assert sp.simplify(cap_bytes.subs(e, 2) - 2 * L_moe * E * h * w * moe.CAPACITY.subs(e, 2)) == 0
    # per phase, a generation: 1 prefill + G−1 decodes, C of the phase's forward
    calls, nbytes = v.volumes("deepspeed-ep")[("decode", "all_to_all", e)]
    assert sp.expand(nbytes.subs(e, 2) - 2 * (G - 1) * L_moe * E * C * h * w) == 0


def test_tp_moe_closed_forms():
    calls, nbytes = v.volumes("deepspeed-moe-autotp")[("prefill", "all_reduce", t)]
    assert sp.expand(calls.subs(t, 2) - (2 * L - L_moe + 1)) == 0
    assert sp.expand(nbytes.subs(t, 2) - ((2 * L - L_moe) * b * S * h * w + b * V * w)) == 0
    # every layer MoE (Mixtral): one all-reduce per layer; experts sharded: two, like dense
    assert sp.expand(calls.subs({t: 2, L_moe: L}) - (L + 1)) == 0
    assert v.volumes("tp-experts")[("prefill", "all_reduce", t)] == v.volumes("deepspeed")[("prefill", "all_reduce", t)]


def _core(rows):
    return [(r["phase"], r["op"], r["group_size"], r["calls"], r["bytes"]) for r in rows]


def test_ep_rows_tiny_mixtral():
    # the scratch measurement's case: e=2, b=4, S=7, capacity cf=1, min_cap 4: T=14 per rank, C=4 in the prefill
    # and C=4 in decode (T=2: min_capacity dominates): each a2a [8, 4, 64] fp32 = 8192 B, 2 per layer, 2 layers
    model = load_model("tiny-mixtral")
    rows = ev.rows(model, Layout(e=2), Workload(4, 7, 3), "deepspeed-ep")
    assert _core(rows) == [("prefill", "all_to_all", 2, 4, 4 * 8192), ("decode", "all_to_all", 2, 8, 8 * 8192)]
    # pairwise: each rank sends (e−1)/e of m per call, all links carry (e−1)·m
    assert rows[0]["sent_bytes_per_rank"] == 4 * 4096 and rows[0]["link_bytes"] == 4 * 8192
    big = ev.rows(model, Layout(e=2), Workload(4, 7, 3), "deepspeed-ep", routing=moe.Routing(capacity_factor=4.0))
    assert big[0]["bytes"] == 4 * 8 * 14 * 64 * 4                    # γ = E/k: C = T = 14
    # Mixtral-8x7B, e=8, b=8, S=1024 bf16: T=1024, C = 1024·2/8 = 256: m = 8·256·4096·2 per call, 64 calls
    rows = ev.rows(load_model("mixtral-8x7b"), Layout(e=8), Workload(8, 1024, 2, "bf16"), "deepspeed-ep")
    assert _core(rows)[0] == ("prefill", "all_to_all", 8, 64, 64 * 8 * 256 * 4096 * 2)


def test_dropless_form_on_counts():
    # per MoE layer, from the counts κ of each rank (rows) and expert (columns): C = the largest; FINDINGS' dropless
    # prefill on tiny-mixtral gave C = 8 and 14 in the two layers: 2·16384 + 2·28672 B of all_to_all, 2 × 8 B MAX
    layer1 = [[3, 8, 2, 1, 4, 3, 3, 4], [1, 2, 6, 5, 4, 5, 3, 2]]
    layer2 = [[14, 1, 2, 3, 1, 2, 3, 2], [0, 0, 4, 6, 8, 2, 3, 5]]
    sub = {E: 8, h: 64, w: 4, e: 2}
    total = 0
    for counts, c_expected in ((layer1, 8), (layer2, 14)):
        assert moe.dropless_capacity(counts) == c_expected
        forms = moe.ep_forms("dropless", counts=counts, per_layer=True)
        assert forms[("all_reduce", e)][1].subs(sub) == 8
        total += forms[("all_to_all", e)][1].subs(sub)
    assert total == 2 * 16384 + 2 * 28672
    kappa = sp.symbols("kappa1:4", positive=True, integer=True)
    _, sym = moe.ep_forms("dropless", counts=kappa, per_layer=True)[("all_to_all", e)]
    assert sp.simplify(sym.subs(e, 2) - 2 * E * h * w * sp.Max(*kappa)) == 0
    assert moe.dropless_bounds(14, 8, 2) == (4, 14)
    with pytest.raises(SpecError, match="non-negative"):
        moe.dropless_capacity([])


@pytest.mark.parametrize("T, E_, k_, ranks", [(14, 8, 2, 2), (7, 8, 2, 1), (5, 4, 1, 3), (10, 6, 3, 2)])
def test_expected_dropless_capacity_against_monte_carlo(T, E_, k_, ranks):
    value, method = moe.expected_max_count(T, E_, k_, ranks)
    assert method == "exact"
    rng = np.random.default_rng(7)
    n = 20000
    picks = np.argsort(rng.random((n, ranks, T, E_)), axis=-1)[..., :k_]            # a uniform k-subset per token
    counts = np.zeros((n, ranks, E_), dtype=int)
    for j in range(k_):
        np.add.at(counts, (np.arange(n)[:, None, None], np.arange(ranks)[None, :, None], picks[..., j]), 1)
    mx = counts.max(axis=(1, 2))
    assert abs(mx.mean() - value) < 4 * mx.std() / np.sqrt(n) + 1e-9
    lo, hi = moe.dropless_bounds(T, E_, k_)
    assert lo <= value <= hi
    # the independent-binomial approximation is a lower bound (negatively associated counts)
    approx, how = moe.expected_max_count(T, E_, k_, ranks, exact=False)
    assert how == "independent-binomial" and approx <= value + 1e-9


def test_expected_dropless_capacity_large_case_is_labelled():
    value, method = moe.expected_max_count(4096, 128, 8, 8)
    assert method == "independent-binomial" and 4096 * 8 / 128 < value < 4096


def test_dropless_rows_are_expectations():
    rows = ev.rows(load_model("tiny-mixtral"), Layout(e=2), Workload(4, 7, 3), "deepspeed-ep-dropless",
                   routing=moe.Routing("dropless"))
    exp_c, _ = moe.expected_max_count(14, 8, 2, 2)
    prefill = [r for r in rows if r["phase"] == "prefill"]
    assert _core(prefill) == [("prefill", "all_reduce", 2, 2, 16),
                              ("prefill", "all_to_all", 2, 4, pytest.approx(4 * 8 * exp_c * 64 * 4))]


def test_autotp_moe_rows():
    model = load_model("tiny-mixtral")
    wl = Workload(1, 8, 2)
    assert _core(ev.rows(model, Layout(2), wl, "deepspeed-moe-autotp")) == [
        ("prefill", "all_reduce", 2, 3, 2 * 8 * 64 * 4 + 256 * 4), ("decode", "all_reduce", 2, 3, 2 * 64 * 4 + 256 * 4)]
    assert _core(ev.rows(model, Layout(2), wl, "tp-experts"))[0] == ("prefill", "all_reduce", 2, 5,
                                                                     4 * 8 * 64 * 4 + 256 * 4)
    qwen = load_model(_qwen3())                       # 6 layers, 2 MoE: 6 o_proj + 4 dense down_proj + head
    assert _core(ev.rows(qwen, Layout(2), wl, "deepspeed-moe-autotp"))[0][3] == 11


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="top1"), "MoE routing 'top1' is not one of"),
    (dict(capacity_factor=0), "capacity factor 0 must be a positive"),
    (dict(capacity_factor=float("nan")), "capacity factor nan"),
    (dict(min_capacity=-1), "min capacity -1"),
])
def test_bad_routing(kwargs, message):
    with pytest.raises(SpecError, match=message):
        moe.Routing(**kwargs)


@pytest.mark.parametrize("layout, model, message", [
    (Layout(e=3), "tiny-mixtral", "e=3 does not divide the 8 experts of tiny-mixtral"),
    (Layout(e=2), "tiny-llama", "needs a mixture of experts; tiny-llama is dense"),
    (Layout(t=2, e=2), "tiny-mixtral", "is not modelled"),
])
def test_bad_ep_layouts(layout, model, message):
    with pytest.raises(SpecError, match=message):
        layout.validate(load_model(model))


def test_ep_needs_e_to_divide_the_batch():
    with pytest.raises(SpecError, match="e=2 does not divide the batch b=3"):
        ev.rows(load_model("tiny-mixtral"), Layout(e=2), Workload(3, 7, 2), "deepspeed-ep")


# ---------------------------------------------------------------------------------------------------------- CLI
from llmcomm.cli import main  # noqa: E402


def test_cli_predict_ep(capsys):
    assert main(["predict", "--model", "tiny-mixtral", "--ep", "2", "--batch", "4", "--prompt", "7", "--generate",
                 "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ep"] == 2 and out["moe_routing"] == "capacity" and out["moe"]["pattern"] == "deepspeed-ep"
    assert _core(out["ops"]) == [("prefill", "all_to_all", 2, 4, 4 * 8192), ("decode", "all_to_all", 2, 8, 8 * 8192)]
    assert out["moe"]["phases"]["prefill"] == {"tokens_per_rank": 14, "capacity": 4, "lossless": False,
                                               "dropped_fraction_expected": moe.dropped_fraction(14, 8, 2, 4)}
    assert out["moe"]["phases"]["decode"]["lossless"] is True                   # T = 2 ≤ C = 4: nothing dropped
    assert main(["predict", "--model", "tiny-mixtral", "--ep", "2", "--batch", "4", "--prompt", "7"]) == 0
    text = capsys.readouterr().out
    assert f"capacity C=4, drops an expected {100 * moe.dropped_fraction(14, 8, 2, 4):.3g} % of the routes" in text
    assert "capacity C=4, drops nothing (C ≥ T)" in text
    assert main(["predict", "--model", "tiny-mixtral", "--ep", "2", "--batch", "4", "--prompt", "7",
                 "--moe-routing", "dropless"]) == 0
    text = capsys.readouterr().out
    assert "all_to_all" in text and "dropless C between 4 and 14" in text and "(exact)" in text
    assert main(["predict", "--model", "tiny-mixtral", "--tp", "2", "--capacity-factor", "1.2",
                 "--min-capacity", "0"]) == 0
    assert "DeepSpeed AutoTP leaves the fused experts whole" in capsys.readouterr().out
    assert main(["predict", "--model", "tiny-mixtral", "--tp", "2", "--engine", "tp-experts"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-mixtral", "--ep", "3"], "e=3 does not divide the 8 experts of tiny-mixtral"),
    (["--model", "tiny-llama", "--ep", "2"], "tiny-llama is dense"),
    (["--model", "tiny-mixtral", "--ep", "2", "--capacity-factor", "0"], "--capacity-factor: 0 must be a positive"),
    (["--model", "tiny-mixtral", "--ep", "2", "--capacity-factor", "-1.5"], "-1.5 must be a positive"),
    (["--model", "tiny-mixtral", "--ep", "2", "--batch", "3"], "e=2 does not divide the batch b=3"),
    (["--model", "tiny-mixtral", "--ep", "2", "--min-capacity", "-1"], "-1 must be at least 0"),
    (["--model", "tiny-mixtral", "--ep", "2", "--moe-routing", "top1"], "invalid choice: 'top1'"),
    (["--model", "tiny-mixtral", "--ep", "2", "--engine", "tp-experts"], "exclude each other"),
    (["--model", "tiny-llama", "--tp", "2", "--engine", "tp-experts"], "needs a mixture of experts"),
    (["--model", "tiny-mixtral", "--ep", "2", "--batch", "3", "--hardware", "h100-sxm"],
     "e=2 does not divide the batch b=3"),
    (["--model", "K_TOO_BIG"], "num_experts_per_tok=9 exceeds the 8 experts"),
])
def test_cli_bad_moe_input(tmp_path, capsys, argv, message):
    if "K_TOO_BIG" in argv:
        f = tmp_path / "config.json"
        f.write_text(json.dumps(dict(load_model("tiny-mixtral").hf_config, num_experts_per_tok=9)))
        argv = [str(f) if a == "K_TOO_BIG" else a for a in argv]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("T, E_, k_", [(3, 4, 2), (4, 5, 2), (2, 6, 3), (5, 3, 1)])
def test_expected_dropless_capacity_equals_full_enumeration(T, E_, k_):
    """The grouped dynamic programme against every one of the C(E, k)^T equally likely routings of one rank."""
    from itertools import combinations, product

    subsets = list(combinations(range(E_), k_))
    maxima = []
    for routing in product(subsets, repeat=T):
        counts = np.zeros(E_, dtype=int)
        for sub in routing:
            counts[list(sub)] += 1
        maxima.append(counts.max())
    value, method = moe.expected_max_count(T, E_, k_, 1)
    assert method == "exact" and value == pytest.approx(np.mean(maxima), rel=1e-12)
