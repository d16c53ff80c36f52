"""Evaluation once per distinct input (llmcomm.predict.unique) gives what evaluating every point gives."""
import numpy as np
import pytest

from llmcomm.predict import unique
from llmcomm.predict.hardware import load_hardware
from llmcomm.predict.kernels import _smooth_max, gemm_time, gemm_time_parts


def test_factorize_dense_and_hashed():
    for x in (np.array([5, 3, 5, 0, 3, 7]), np.array([2.0, 2.0, 0.5, 1e9, 0.5]), np.array([-1, 4, -1]),
              np.array([3.0, 3.0, 8.0])):
        codes, uniques = unique.factorize(x)
        assert (uniques[codes] == x).all()
        assert len(uniques) == len(set(x.tolist()))
    codes, uniques = unique.factorize(np.array([7, 2, 7, 2, 9]))      # small ints: the dense table, sorted uniques
    assert uniques.tolist() == [2, 7, 9] and codes.tolist() == [1, 0, 1, 0, 2]


def test_on_unique_equals_every_point():
    rng = np.random.default_rng(0)
    n = 50_000
    a = rng.integers(0, 40, n)                              # small ints: dense factorisation
    b = rng.choice([0.5, 1.25, 3.0, -2.0], n)             # fractional and negative: hashed
    c = rng.integers(0, 5_000_000, n) * 1.0             # beyond the dense table's range
    calls = []

    def f(x, y, z):
        calls.append(len(x))
        return np.sin(x) * y + np.sqrt(z) + x * y * z
    got = unique.on_unique(f, a, b, c)
    assert got.shape == (n,)
    assert np.array_equal(got, f(a, b, c))
    assert calls[0] == len({(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())})
    # broadcasting: a column against a row
    col, row = np.arange(100.0)[:, None], np.arange(200) % 7
    assert np.array_equal(unique.on_unique(np.multiply, col, row), col * row)


def test_gemm_time_over_a_grid_equals_pointwise():
    gemm = load_hardware("h100-sxm").kernels(2)["gemm"]
    assert "sm" in gemm                                    # the tiled GPU model: dozens of passes per call
    rng = np.random.default_rng(1)
    M = rng.choice([1, 2, 8, 128, 1024, 8192], 20_000)
    N = rng.choice([1024, 4096, 14336], 20_000)
    K = rng.choice([4096, 512], 20_000)
    grid = gemm_time(M, N, K, 2, gemm)
    for i in rng.choice(20_000, 50, replace=False):
        one = gemm_time(np.array([M[i]]), np.array([N[i]]), np.array([K[i]]), 2, gemm)[0]
        assert grid[i] == one


def test_smooth_max_of_order_four_by_products():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(1e-7, 1e-3, 1000), rng.uniform(1e-7, 1e-3, 1000)
    hi = np.maximum(x, y)
    ref = hi * ((x / hi) ** 4 + (y / hi) ** 4) ** 0.25
    assert _smooth_max(x, y, 4.0) == pytest.approx(ref, rel=1e-13)
    tau_mem, tau_comp = gemm_time_parts(np.array([64.0]), np.array([4096.0]), np.array([4096.0]), 2,
                                        {"flops_per_s": 1e12, "bytes_per_s": 1e9})
    assert _smooth_max(tau_mem, tau_comp, 4.0) > max(tau_mem[0], tau_comp[0])


@pytest.mark.parametrize("framework", ["deepspeed", "vllm"])
def test_latency_grid_beyond_the_direct_size_equals_every_point(framework):
    # 8 192 points: above unique.MIN_POINTS, so the prefill and the decode communication go through on_unique
    from llmcomm.deployment import Deployment
    from llmcomm.predict.latency import predict_latency, predict_latency_grid
    from llmcomm.spec import Layout, Workload, load_model

    m, hw, dep = load_model("llama-3.1-8b"), load_hardware("h100-sxm"), Deployment(framework)
    t, p, b, S, G = np.meshgrid([1, 2, 4, 8], [1, 2, 4, 8, 16, 32, 2, 4], [1, 3, 8, 16, 1, 2, 4, 32],
                                [16, 128, 1000, 4096, 16, 77, 512, 2048], [2, 17, 128, 2], indexing="ij")
    t, p, b, S, G = (x.ravel() for x in (t, p, b, S, G))
    assert t.size > unique.MIN_POINTS
    grid = predict_latency_grid(m, hw, t, p, b, S, G, 2, gpus_per_node=8, deployment=dep)
    for i in np.random.default_rng(3).choice(t.size, 25, replace=False):
        one = predict_latency(m, Layout(int(t[i]), int(p[i])), Workload(int(b[i]), int(S[i]), int(G[i]), "bf16"), hw,
                              deployment=dep, gpus_per_node=8)
        for k in ("ttft_s", "tpot_s", "e2e_s"):
            assert grid[k][i] == pytest.approx(one[k], rel=1e-12), (k, i)
