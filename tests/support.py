"""Small helpers shared by the tests (names resolved to specs at the test's edge, as the CLI and chapters do)."""
from llmcomm import load_model
from llmcomm.derive import evaluate


def predicted(model: str, layout, workload, pattern: str = "deepspeed") -> list[dict]:
    """Predicted rows of a preset model (``llmcomm.derive.evaluate.rows`` on its ModelSpec) for message
    ``pattern``."""
    return evaluate.rows(load_model(model), layout, workload, pattern)


COUNTS = ("phase", "op", "group_size", "calls", "bytes")


def core(rows: list[dict]) -> list[dict]:
    """Rows reduced to what the nccl-tests counting gives (phase, op, group, calls, bytes), traffic apart."""
    return [{k: r[k] for k in COUNTS} for r in rows]


_LAUNCHES: dict = {}


def measured(model: str, layout, workloads, **kw) -> list:
    """``measure_many`` of a preset model, one launch per distinct (model, layout, workloads, options) in a test
    session: test files that need the same sweep share it (starting ranks costs seconds per launch on CPU)."""
    from llmcomm.measure.launch import measure_many

    key = (model, layout, tuple(workloads), repr(sorted(kw.items())))
    if key not in _LAUNCHES:
        _LAUNCHES[key] = measure_many(load_model(model), layout, list(workloads), **kw)
    return _LAUNCHES[key]


#: a CPU kernel model with round numbers (llmcomm.compare.cpu_calibration's entry), the truth of synthetic timings
CPU_TRUTH = {"kernels": {"dtype": "fp32",
                         "gemm": {"flops_per_s": 6e10, "bytes_per_s": 8e9, "gemv_bytes_per_s": 1.4e10, "t0": 4e-6,
                                  "norm_order": 1.5},
                         "memops": {k: {"bytes_per_s": 3e9, "t0": 0.0}
                                    for k in ("rmsnorm", "rope", "silu_mul", "add", "emb")}},
             "layer_overhead_us": 350.0,
             "host_us": {"prefill": {"layer": 420.0, "forward": 120.0}, "decode": {"layer": 350.0, "forward": 60.0}}}


def synthetic_cpu_timings(truth=CPU_TRUTH) -> dict:
    """What :func:`llmcomm.measure.calibrate.time_cpu_kernels` would return on a machine that follows ``truth``
    exactly (its rows computed by the model itself: what a fit must recover)."""
    from llmcomm.compare.cpu_calibration import _forward_s
    from llmcomm.measure.calibrate import CPU_GEMM_ROWS, CPU_GEMM_SHAPES, CPU_LAYER_SHAPES
    from llmcomm.predict.kernels import gemm_time

    gemm = [{"M": M, "K": K, "N": N, "seconds": float(gemm_time(M, N, K, 4, truth["kernels"]["gemm"]))}
            for K, N in CPU_GEMM_SHAPES for M in CPU_GEMM_ROWS]
    forwards = []
    for h, heads, kv_heads, ffn in CPU_LAYER_SHAPES:
        for layers in (1, 3):
            shape = {"h": h, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "layers": layers, "b": 1}
            for phase, S in (("prefill", 16), ("prefill", 64), ("prefill", 256), ("decode", 64)):
                row = dict(shape, phase=phase, S=S)
                forwards.append(dict(row, seconds=_forward_s(truth, row)))
    return {"threads": 1, "gemm": gemm, "forwards": forwards, "stream_bytes": 96 << 20}
