"""Real DeepSpeed AutoTP runs on CPU: every measured row equals the prediction, tokens equal the reference, and a
dead or hung rank ends the run with one error naming it. Slow (starts ranks): ``pytest -m slow``."""
import os
import time
from pathlib import Path

import pytest

from llmcomm.measure.launch import RunError, measure, SHM_PREFIX
from llmcomm.spec import Layout, Workload, load_model
from llmcomm.compare.sweeps import predicted_like
from support import measured

pytestmark = pytest.mark.slow

# (model, t, b, S, G, backend): both all-reduce paths (DeepSpeed's shm kernel, gloo), untied and tied embeddings.
# The tiny-llama t=2 shm cases are the sweep of tests/test_sweep.py (one launch, shared through support.measured).
SWEEP = [Workload(1, 8, 4), Workload(2, 1, 1), Workload(3, 16, 1), Workload(1, 8, 4)]
CASES = [
    ("tiny-llama", 2, 1, 8, 4, None),
    ("tiny-llama", 2, 2, 5, 3, "gloo"),
    ("tiny-llama", 2, 3, 16, 1, None),
    ("tiny-llama-tied", 2, 1, 6, 3, None),
    ("tiny-llama-tied", 4, 2, 4, 2, None),
]


def launch_of(model, t, b, S, G, backend):
    """(workloads, index) of a case: the shared sweep for tiny-llama t=2 on the default path, else its own launch."""
    w = Workload(b=b, S=S, G=G)
    if (model, t, backend) == ("tiny-llama", 2, None):
        return SWEEP, SWEEP.index(w)
    return [w], 0
RNG_STATE_BYTES = 5056          # CPU generator state (mt19937) that init_inference broadcasts from rank 0


def _ids(case):
    return "{}-t{}-b{}-S{}-G{}-{}".format(*case[:5], case[5] or "default")


@pytest.fixture(scope="module", params=CASES, ids=_ids)
def run(request):
    model, t, b, S, G, backend = request.param
    workloads, i = launch_of(*request.param)
    return model, Layout(t=t), workloads[i], backend, measured(model, Layout(t=t), workloads, backend=backend,
                                                               timeout_s=240)[i]


def test_rows_equal_prediction(run):
    model, layout, workload, _, res = run
    # calls and bytes, and the traffic derived from the captured calls under the run's all-reduce algorithm (shm:
    # direct; gloo: ring) and placement (one host)
    assert [r for r in res.rows if r["phase"] != "setup"] == predicted_like(load_model(model), layout, workload, res)


def test_setup_is_one_rng_state_broadcast_on_the_world(run):
    _, layout, _, _, res = run
    n = layout.ranks
    assert [r for r in res.rows if r["phase"] == "setup"] == [
        {"phase": "setup", "op": "broadcast", "group_size": n, "calls": 1, "bytes": RNG_STATE_BYTES,
         "algorithm": "chain", "sent_bytes_per_rank": RNG_STATE_BYTES, "link_bytes": (n - 1) * RNG_STATE_BYTES,
         "inter_node_bytes": 0}]


def test_tokens_equal_single_process_reference(run):
    _, _, workload, _, res = run
    assert res.reference_tokens is not None
    assert res.tokens == res.reference_tokens
    assert len(res.tokens) == workload.b and all(len(t) == workload.G for t in res.tokens)


def test_events_and_provenance(run):
    _, layout, workload, backend, res = run
    assert {e["rank"] for e in res.events} == set(range(layout.ranks))
    ar = [e for e in res.events if e["op"] == "all_reduce"]
    assert {e["api"] for e in ar} == {"deepspeed.comm.inference_all_reduce"}
    assert {e["dtype"] for e in ar} == {"float32"}
    assert res.provenance["comm"]["allreduce_path"] == ("process_group" if backend == "gloo" else "shm")
    assert res.provenance["versions"]["deepspeed"]
    assert res.ttft_s > 0 and (res.tpot_s > 0) == (workload.G > 1) and res.e2e_s >= res.ttft_s


def _our_buffers(port):
    return sorted(p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"))


@pytest.mark.parametrize("mode,timeout_s,expect", [
    ("exit", 120, "rank 1 exited with status 3 before writing its result"),
    ("hang", 30, "rank 1 hung outside any collective"),
])
def test_dead_or_hung_rank_is_named_and_cleaned_up(tmp_path, mode, timeout_s, expect):
    env = {"LLMCOMM_TEST_KILL_RANK": "1", "LLMCOMM_TEST_KILL_PHASE": "prefill", "LLMCOMM_TEST_KILL_MODE": mode}
    t0 = time.monotonic()
    with pytest.raises(RunError) as err:
        measure(load_model("tiny-llama"), Layout(t=2), Workload(b=1, S=4, G=2), timeout_s=timeout_s, env=env,
                out_dir=tmp_path / "run")
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert expect in msg, msg
    assert err.value.rank == 1
    if mode == "hang":
        assert "rank 0 waited in a collective" in msg, msg
    assert elapsed < timeout_s + 15
    assert _our_buffers(err.value.master_port) == []
    # nothing of the run is left running
    pids = [int(p.read_text()) for p in (tmp_path / "run").glob("rank*.pid")]
    assert pids and not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids)


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
