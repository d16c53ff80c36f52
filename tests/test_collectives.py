"""nccl-tests conventions, α-β formulas on hand-computed cases, hardware presets, α-β fits, and the microbenchmark."""

import numpy as np
import pytest

from llmcomm.derive.conventions import bus_factor, canonical_op
from llmcomm.derive.traffic import sent_factor
from llmcomm.predict import collectives as C
from llmcomm.predict.fit import fit_alpha_beta, fit_table
from llmcomm.predict.hardware import hardware_names, load_hardware
from llmcomm.spec import SpecError


def ring_time(op, n, m, alpha, beta):
    return C.alpha_beta_time(op, n, m, alpha, beta, "ring")


def tree_time(op, n, m, alpha, beta):
    return C.alpha_beta_time(op, n, m, alpha, beta, "tree")


@pytest.mark.parametrize("op,n,f", [("all_reduce", 2, 1.0), ("all_reduce", 4, 1.5), ("all_reduce", 8, 1.75),
                                    ("all_gather", 4, 0.75), ("reduce_scatter", 8, 0.875), ("gather", 2, 0.5),
                                    ("broadcast", 8, 1.0), ("send_recv", 2, 1.0), ("reduce", 4, 1.0),
                                    ("all_to_all", 4, 0.75)])
def test_busbw_factors(op, n, f):
    assert bus_factor(op, n) == pytest.approx(f, abs=0, rel=1e-15)


def test_busbw_factor_vectorised_and_synonyms():
    np.testing.assert_array_equal(bus_factor("all_reduce", np.array([2, 4, 8])), [1.0, 1.5, 1.75])
    assert canonical_op("inference_all_reduce") == "all_reduce"
    assert canonical_op("isend") == "send_recv"
    with pytest.raises(SpecError, match="unknown collective 'all_to_all_v'"):
        canonical_op("all_to_all_v")


def test_algbw_busbw():
    # 1 MiB all_reduce on 4 ranks in 1 ms: algbw 1.048576 GB/s, busbw ×1.5
    assert C.algbw(1 << 20, 1e-3) == pytest.approx(1.048576e9)
    assert C.busbw("all_reduce", 4, 1 << 20, 1e-3) == pytest.approx(1.572864e9)
    assert C.busbw("all_gather", 4, 1 << 20, 1e-3) == pytest.approx(0.786432e9)


def test_ring_all_reduce_hand_case():
    a, b = 1e-6, 1e-9
    # 2(n−1)α + 2(n−1)/n·S·β with n = 4, S = 1e6: 6 µs + 1.5 ms
    assert ring_time("all_reduce", 4, 1e6, a, b) == pytest.approx(6e-6 + 1.5e-3, rel=1e-14)
    # all_gather: (n−1)α + (n−1)/n·S·β
    assert ring_time("all_gather", 4, 1e6, a, b) == pytest.approx(3e-6 + 0.75e-3, rel=1e-14)
    # broadcast chain: (n−1)α + S·β
    assert ring_time("broadcast", 8, 1e6, a, b) == pytest.approx(7e-6 + 1e-3, rel=1e-14)
    # send_recv: α + S·β
    assert ring_time("send_recv", 2, 1e6, a, b) == pytest.approx(1e-6 + 1e-3, rel=1e-14)


def test_tree_direct_auto():
    a, b = 2e-6, 1e-10
    # tree all_reduce n = 8: 2·log2(8)·α + 1.75·S·β
    assert tree_time("all_reduce", 8, 1e6, a, b) == pytest.approx(12e-6 + 1.75e-4, rel=1e-14)
    # n = 6 → ⌈log2 6⌉ = 3
    assert tree_time("all_gather", 6, 0, a, b) == pytest.approx(3 * a)
    # direct (one-shot): one latency and the bytes one rank sends, (n−1)·m — the traffic model's own count
    assert C.alpha_beta_time("all_reduce", 4, 1e6, a, b, "direct") == pytest.approx(a + 3e-4, rel=1e-14)
    assert C.bytes_factor("all_reduce", 4, "direct") == sent_factor("all_reduce", 4, "direct") == 3
    ring, tree = ring_time("all_reduce", 8, 4, a, b), tree_time("all_reduce", 8, 4, a, b)
    assert C.best_time("all_reduce", 8, 4, a, b) == min(ring, tree) == tree
    assert C.alpha_beta_time("all_reduce", 8, 4, a, b, "auto") == tree


def test_group_of_one_is_free_and_vectorised_equals_scalar():
    assert ring_time("all_reduce", 1, 1e6, 1e-6, 1e-9) == 0.0
    rng = np.random.default_rng(0)
    n = rng.choice([1, 2, 4, 8, 16], 200)
    S = rng.integers(4, 1 << 26, 200).astype(float)
    for op in ("all_reduce", "all_gather", "broadcast", "send_recv"):
        for alg in ("ring", "tree", "direct", "auto"):
            vec = C.alpha_beta_time(op, n, S, 3e-6, 2e-11, alg)
            one = [C.alpha_beta_time(op, int(k), float(s), 3e-6, 2e-11, alg) for k, s in zip(n, S)]
            np.testing.assert_allclose(vec, one, rtol=1e-15)


# ----------------------------------------------------------------------------------------------- hardware presets
def test_presets_load_and_label_sources():
    names = hardware_names()
    for required in ("h100-sxm", "h200", "a100-sxm-80gb"):
        assert required in names
    for name in names:
        hw = load_hardware(name)
        assert hw.memory_bytes > 0 and hw.mem_bw > 0 and hw.peak_flops
        assert "source" in hw.raw and hw.raw["source"], f"{name} has no source labels"
    h100 = load_hardware("h100-sxm")
    assert h100.peak_flops["bf16"] == pytest.approx(989e12)
    assert h100.mem_bw == pytest.approx(3.35e12)
    assert h100.links["intra"].beta_s_per_B == pytest.approx(1 / (450e9 * 0.8))
    assert h100.links["inter"].beta_s_per_B == pytest.approx(1 / (50e9 * 0.9))
    h200 = load_hardware("h200")
    assert h200.mem_bw == pytest.approx(4.8e12) and h200.peak_flops == h100.peak_flops
    a100 = load_hardware("a100-sxm-80gb")
    assert a100.peak_flops["bf16"] == pytest.approx(312e12) and a100.mem_bw == pytest.approx(2.039e12)


def test_hardware_collective_time_uses_link_and_fits():
    hw = load_hardware({"name": "x", "memory_gib": 1, "mem_bw_GBps": 1, "peak_tflops": {"fp32": 1},
                        "links": {"intra": {"bw_GBps": 100, "alpha_us": 2, "algorithm": "ring"},
                                  "inter": {"bw_GBps": 10, "alpha_us": 20, "algorithm": "ring"}},
                        "collectives": {"intra": {"all_reduce": {"2": {"alpha_us": 5, "busbw_GBps": 1,
                                                                        "algorithm": "direct"}}}}})
    # fitted entry for n = 2: 5 µs + 1·S/1 GB/s
    assert hw.collective_time("all_reduce", 2, 1e6, "intra") == pytest.approx(5e-6 + 1e-3)
    # n = 4 falls back to the ring on the link: 6·2 µs + 1.5·S/100 GB/s
    assert hw.collective_time("all_reduce", 4, 1e6, "intra") == pytest.approx(12e-6 + 1.5e-5)
    assert hw.collective_time("all_reduce", 4, 1e6, "inter") == pytest.approx(120e-6 + 1.5e-4)
    np.testing.assert_allclose(hw.collective_time("all_reduce", np.array([2, 4]), np.array([1e6, 1e6])),
                               [5e-6 + 1e-3, 12e-6 + 1.5e-5])
    with pytest.raises(SpecError):
        load_hardware("no-such-hardware")


# ----------------------------------------------------------------------------------------------------------- fits
def test_fit_recovers_alpha_beta_exactly():
    S = 4.0 * 2 ** np.arange(0, 25)
    for op, n, alg in (("all_reduce", 4, "ring"), ("all_gather", 2, "ring"), ("all_reduce", 2, "direct")):
        T = C.alpha_beta_time(op, n, S, 7e-6, 1 / 3e9, alg)
        r = fit_alpha_beta(op, n, S, T, alg)
        assert r["alpha_us"] == pytest.approx(7.0, rel=1e-6)
        assert r["busbw_GBps"] == pytest.approx(3.0, rel=1e-6)
        assert r["r2"] == pytest.approx(1.0) and r["median_rel_err"] < 1e-9


def test_fit_pooled_over_group_sizes_and_nonnegative():
    import pandas as pd

    S = 4.0 * 2 ** np.arange(0, 20)
    rows = []
    for n in (2, 4):
        T = ring_time("all_reduce", n, S, 5e-6, 1e-9)
        rows += [{"backend": "gloo", "op": "all_reduce", "group_size": n, "bytes": s, "time_s": t}
                 for s, t in zip(S, T)]
    fits = fit_table(pd.DataFrame(rows))
    assert set(fits["group_size"]) == {"2", "4", "any"}
    anyrow = fits[fits["group_size"] == "any"].iloc[0]
    assert anyrow["alpha_us"] == pytest.approx(5.0, rel=1e-6) and anyrow["busbw_GBps"] == pytest.approx(1.0, rel=1e-6)
    # a pure-bandwidth set: α clamped at 0, never negative
    r = fit_alpha_beta("send_recv", 2, S, S * 1e-9, "ring")
    assert r["alpha_s"] >= 0 and r["busbw_GBps"] == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------------------------------- microbenchmark (slow)
def test_size_parsing():
    from llmcomm.measure.bench import parse_size, size_grid

    assert parse_size("64M") == 64 << 20 and parse_size("4") == 4 and parse_size("1K") == 1024
    assert size_grid(4, 64) == [4, 8, 16, 32, 64]
    for bad in ("12Q", "0", "-4", "", "1.5M"):
        with pytest.raises(SpecError, match="size"):
            parse_size(bad)
