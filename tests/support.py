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
