"""The paper's configurations (issue 17, item 5): the derived preset of the paper's machine, the decode floors that
say which vLLM engine and mode the reported TPOTs imply, and the ±40 % TPOT goal with its reason.

Hand values: Llama-3.2-3B has 3,212,749,824 parameters (its Hugging Face config: 28 layers, h = 3072, tied
embeddings); a TP rank reads 2 bytes × params / t per decode token; the vLLM pattern issues 2L + 1 all-reduces and
one logits gather per decode step; the preset's HBM is 2.4 TB/s; the cheapest published graph all-reduce is 6 µs."""
from __future__ import annotations

import pandas as pd
import pytest

from llmcomm.compare import paper
from llmcomm.predict.hardware import load_hardware
from llmcomm.spec import SpecError

PARAMS = 3_212_749_824
HBM = 2.4e12


@pytest.fixture(scope="module")
def hw():
    return load_hardware("h100-94gb-x4")


@pytest.fixture(scope="module")
def floors(hw):
    return paper.decode_floors(hw, 4)


@pytest.fixture(scope="module")
def side(hw):
    return paper.beside_reported(hw, 4, framework="vllm")


def test_derived_preset_keeps_the_base_calibration(hw):
    """h100-94gb-x4 is h100-sxm plus changes: it must carry h100-sxm's fitted NCCL model and kernels (kept in
    data/calibration/), the kernels' bandwidths scaled by 0.7164 — not fall back to the bare link α-β."""
    base = load_hardware("h100-sxm")
    assert hw.nccl["protocols"] == base.nccl["protocols"] and hw.nccl["ring_bytes_per_s"] == base.nccl["ring_bytes_per_s"]
    assert "nvls" in base.nccl and "nvls" not in hw.nccl              # no NVSwitch: NVLS is not a candidate there
    assert hw.nccl["net"]["rails"] == 4
    assert hw.raw["kernels"]["gemm"]["bytes_per_s"] == pytest.approx(base.raw["kernels"]["gemm"]["bytes_per_s"] * 0.7164)
    for op, params in hw.raw["kernels"]["memops"].items():
        assert params["bytes_per_s"] == pytest.approx(base.raw["kernels"]["memops"][op]["bytes_per_s"] * 0.7164)
    assert hw.mem_bw == HBM
    # the eager path pays the fitted floor, the graph path does not: the two prices differ
    assert float(hw.collective_time("all_reduce", 2, 6144, "intra", floor=True)) == pytest.approx(
        float(base.collective_time("all_reduce", 2, 6144, "intra", floor=True)))
    assert float(hw.collective_time("all_reduce", 2, 6144, "intra", floor=False)) < \
        float(hw.collective_time("all_reduce", 2, 6144, "intra", floor=True))


def test_decode_floors_by_hand(floors):
    f = floors.set_index("layout")
    assert list(f.index) == ["TP2", "TP4"]
    for lay, tp, tpot in (("TP2", 2, 1.17e-3), ("TP4", 4, 0.86e-3)):
        weights = 2 * PARAMS / tp
        r = f.loc[lay]
        assert r["weights GB per rank"] == pytest.approx(weights / 1e9)
        assert r["HBM floor ms"] == pytest.approx(1e3 * weights / HBM)
        assert r["collectives per step"] == 2 * 28 + 2
        assert r["host ms, eager"] == pytest.approx(28 * 84e-3)
        assert r["floor ms, graphs"] == pytest.approx(r["HBM floor ms"] + r["collectives ms, graphs"])
        assert r["floor ms, eager"] == pytest.approx(max(28 * 84e-3, r["HBM floor ms"] + r["collectives ms, eager"]))
        assert r["µs per collective left"] == pytest.approx(1e6 * (tpot - weights / HBM) / 58)
        assert r["HBM TB/s needed, published calls"] == pytest.approx(weights / (tpot - 58 * 6e-6) / 1e12)
        assert r["host µs per layer the report leaves"] == pytest.approx(1e6 * tpot / 28)
    # TP2: the weights alone at peak HBM take longer than the reported step
    assert f.loc["TP2", "µs per collective left"] == pytest.approx(1e6 * (1.17e-3 - PARAMS / HBM) / 58)
    assert f.loc["TP2", "µs per collective left"] < 0 < f.loc["TP4", "µs per collective left"] < 6
    assert f.loc["TP2", "HBM TB/s needed, published calls"] == pytest.approx(3.908, abs=1e-3)


def test_engine_verdict_from_the_floors(floors):
    verdict = paper.engine_verdict(floors)
    assert verdict["mode"] == "CUDA graphs" and verdict["engine"] == "V0" and verdict["transcribed_engine"] == "V0"
    assert verdict["torch_compile_off"] is True
    assert verdict["below_every_floor"] == ["TP2", "TP4"]
    assert verdict["eager_excess"] == pytest.approx(list(floors["floor ms, eager"] / floors["TPOT ms reported"]))
    text = paper.engine_text(floors)
    assert "**vLLM V0**" in text and "`vllm-v0`" in text and "6 µs" in text and "3.9 TB/s, 3.1 TB/s" in text


def test_engine_undetermined_when_an_eager_step_fits(floors):
    """A reported step slower than every eager floor says nothing about the mode (and so nothing about the engine)."""
    slow = floors.copy()
    slow["reported / floor, eager"] = [1.3, 0.8]
    verdict = paper.engine_verdict(slow)
    assert verdict["mode"] == "undetermined" and verdict["engine"] == "undetermined"
    assert "So the decode steps" not in paper.engine_text(slow)


def test_decode_floors_needs_an_eager_phase(hw):
    graphs_only = {"name": "graphs-only", "framework": "vllm",
                   "prefill": {"cuda_graphs": True, "layer_overhead_us": 0, "forward_overhead_us": 0},
                   "decode": {"cuda_graphs": True, "layer_overhead_us": 0, "forward_overhead_us": 0}}
    with pytest.raises(SpecError, match="no eager phase"):
        paper.decode_floors(hw, 4, profile=graphs_only)


def test_tpot_goal_and_its_reason(side, floors):
    goal = paper.tpot_goal(side, floors).set_index("layout")
    s = side.set_index("layout")
    for lay, tpot in (("TP2", 1.17), ("TP4", 0.86)):
        hbm = 1e3 * 2 * PARAMS / int(lay[2:]) / HBM
        assert goal.loc[lay, "TPOT ms reported"] == tpot
        assert goal.loc[lay, "error"] == pytest.approx(s.loc[lay, "TPOT ms predicted"] / tpot - 1)
        assert goal.loc[lay, "within ±40%"] == (abs(s.loc[lay, "TPOT ms predicted"] / tpot - 1) <= 0.40)
        assert goal.loc[lay, "below HBM floor"] == (tpot < hbm)
        assert goal.loc[lay, "µs per call the goal allows"] == pytest.approx(1e3 * (1.4 * tpot - hbm) / 58)
        assert goal.loc[lay, "µs per call predicted"] == pytest.approx(1e3 * s.loc[lay, "TPOT comm ms predicted"] / 58)
        kern = s.loc[lay, "TPOT ms predicted"] - s.loc[lay, "TPOT comm ms predicted"]
        assert goal.loc[lay, "weights TB/s predicted"] == pytest.approx(2 * PARAMS / int(lay[2:]) / 1e9 / kern)
    assert goal.loc["TP2", "below HBM floor"] and not goal.loc["TP4", "below HBM floor"]   # 1.17 < 1.339; 0.86 > 0.669
    assert goal.loc["TP2", "µs per call the goal allows"] == pytest.approx(5.161, abs=1e-3)  # (1.638 − 1.3386) / 58
    assert goal.loc["TP4", "µs per call the goal allows"] == pytest.approx(9.219, abs=1e-3)  # (1.204 − 0.6693) / 58
    text = paper.goal_text(goal.reset_index(), floors)
    assert "not met" in text and "TP2's reported 1.17 ms lies below its weights' floor (1.34 ms)" in text
    assert "at most 5.2 µs (TP2), 9.2 µs (TP4)" in text
    met = goal.reset_index().assign(**{"within ±40%": True, "below HBM floor": False})
    assert "— met." in paper.goal_text(met, floors) and "at most" not in paper.goal_text(met, floors)


def test_tpot_goal_error_sign():
    """A prediction under the report gives a negative error, and the tolerance is two-sided."""
    side = pd.DataFrame({"model": ["llama-3.2-3b"], "layout": ["TP2"], "nodes": [1], "TPOT ms reported": [2.0],
                         "TPOT ms predicted": [1.0], "TPOT comm ms predicted": [0.2]})
    fl = pd.DataFrame({"layout": ["TP2"], "HBM floor ms": [0.5], "collectives per step": [10],
                       "weights GB per rank": [1.0]})
    goal = paper.tpot_goal(side, fl)
    assert goal["error"][0] == pytest.approx(-0.5) and not goal["within ±40%"][0]
    assert goal["µs per call the goal allows"][0] == pytest.approx(1e3 * (2.8 - 0.5) / 10)
    assert goal["weights TB/s predicted"][0] == pytest.approx(1.0 / 0.8) and not goal["below HBM floor"][0]
