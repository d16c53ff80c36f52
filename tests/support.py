"""Small helpers shared by the tests (names resolved to specs at the test's edge, as the CLI and chapters do)."""
from llmcomm import load_model
from llmcomm.derive import evaluate


def predicted(model: str, layout, workload, engine: str = "deepspeed") -> list[dict]:
    """Predicted rows of a preset model (``llmcomm.derive.evaluate.rows`` on its ModelSpec)."""
    return evaluate.rows(load_model(model), layout, workload, engine)


COUNTS = ("phase", "op", "group_size", "calls", "bytes")


def core(rows: list[dict]) -> list[dict]:
    """Rows reduced to what the nccl-tests counting gives (phase, op, group, calls, bytes), traffic apart."""
    return [{k: r[k] for k in COUNTS} for r in rows]
