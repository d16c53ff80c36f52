"""The profiler's split of a generation (llmcomm.measure.opprofile): categories of op names, GEMM calls counted per
linear layer, the categories adding up to each phase's wall time, a communication call's wait counted as
communication (not host), other libraries' labels host — on a single process, no ranks."""
from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from llmcomm.measure.opprofile import ORDER, category, profile_generation  # noqa: E402


@pytest.mark.parametrize("name, cat", [
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::linear", "gemm"), ("aten::bmm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_softmax", "attention"),
    ("c10d::allreduce_", "communication"), ("gloo:all_reduce", "communication"), ("c10d::recv_", "communication"),
    ("deepspeed::inference_all_reduce_", "communication"), ("llmcomm::comm::send", "communication"),
    ("aten::rsqrt", "elementwise"), ("aten::silu", "elementwise"), ("aten::copy_", "elementwise"),
    ("aten::cat", "elementwise"), ("aten::index_select", "elementwise"), ("aten::argmax", "elementwise"),
    ("aten::view", "views_alloc"), ("aten::t", "views_alloc"), ("aten::empty", "views_alloc"),
    ("aten::mmx", "elementwise"), ("my_library::thing", "other"), ("RowParallel", "host"), ("send", "communication"),
])
def test_category(name, cat):
    assert category(name) == cat


def test_tiny_llama_generation_split():
    from llmcomm.measure.runs.common import build_model, prompt_ids
    from llmcomm.spec import Workload, load_model

    model = load_model("tiny-llama")
    hf = build_model(model)
    w = Workload(b=1, S=8, G=3)
    res = profile_generation(hf, hf, prompt_ids(w, model.V), w.G)
    phases = res["phases"]
    assert set(phases) == {"prefill", "decode"}
    linears = 7 * model.L + 1                     # q, k, v, o, gate, up, down per layer, and the LM head
    for name, forwards in (("prefill", 1), ("decode", w.G - 1)):
        ph = phases[name]
        assert ph["forwards"] == forwards
        assert ph["calls"] == {"gemm": linears * forwards, "communication": 0}
        assert set(ph["seconds"]) == set(ORDER)
        assert all(s >= 0 for s in ph["seconds"].values())
        assert sum(ph["seconds"].values()) == pytest.approx(ph["wall_s"], rel=1e-6)
        assert ph["seconds"]["gemm"] > 0 and ph["seconds"]["attention"] > 0 and ph["seconds"]["host"] > 0
        assert ph["seconds"]["communication"] == 0
        mm = next(o for o in ph["top_ops"] if o["name"] == "aten::mm")
        assert mm["count"] == linears * forwards and mm["category"] == "gemm"
    # the phases are inside the generation, which the generation's own clock timed
    total = phases["prefill"]["wall_s"] + phases["decode"]["wall_s"]
    assert total <= res["timings"]["e2e_s"] * 1.05 + 1e-3


def test_communication_wait_is_communication(monkeypatch):
    """A collective that waits 50 ms outside any op (as gloo's Work.wait does) is communication, not host."""
    import torch.distributed as dist

    from llmcomm.measure.capture import Capture
    from llmcomm.measure.opprofile import phase_labels, summarize

    def slow_all_reduce(tensor, op=None, group=None, async_op=False):
        torch.add(tensor, 1)                      # one ATen op inside the call
        time.sleep(0.05)                          # the wait for a slower peer: no op at all

    monkeypatch.setattr(dist, "all_reduce", slow_all_reduce)
    monkeypatch.setattr(dist.distributed_c10d, "all_reduce", slow_all_reduce)
    x = torch.ones(4)
    with Capture(rank=0, annotate=True) as cap, \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase_labels(cap.phase)("decode"):
            torch.mul(x, 2)
            dist.all_reduce(x)
            time.sleep(0.02)                      # host time: outside every op and call
            with torch.autograd.profiler.record_function("RowParallel"):    # another library's label: host too
                time.sleep(0.01)
                torch.mul(x, 3)
    ph = summarize(prof.events())["decode"]
    assert [e.op for e in cap.events] == ["all_reduce"]
    assert ph["calls"]["communication"] == 1
    assert 0.05 <= ph["seconds"]["communication"] < 0.05 + 0.5 * ph["wall_s"]
    assert 0.03 <= ph["seconds"]["host"] < 0.05
    assert ph["seconds"]["elementwise"] > 0       # the mul, outside the call
    assert sum(ph["seconds"].values()) == pytest.approx(ph["wall_s"], rel=1e-6)


def test_time_breakdown_table():
    from llmcomm.report.tables import time_breakdown

    ph = {"wall_s": 0.07, "forwards": 7, "seconds": {"gemm": 0.0175, "communication": 0.035, "host": 0.0175},
          "top_ops": [{"name": "llmcomm::comm::all_reduce", "self_s": 0.021, "count": 14}]}
    obj = {"runs": [{"layout": {"t": 2, "p": 2},
                     "ranks": [{"rank": 2, "stage": 1, "phases": {"decode": ph}}]}]}
    row = time_breakdown(obj).iloc[0]
    assert (row["layout"], row["rank"], row["stage"], row["phase"]) == ("t=2×p=2", 2, 1, "decode")
    assert row["ms per forward"] == 10.0
    assert (row["gemm %"], row["communication %"], row["host %"]) == (25.0, 50.0, 25.0)
    assert row["top op"] == "llmcomm::comm::all_reduce (30 %)"
    own = time_breakdown(obj, without=("communication",)).iloc[0]
    assert "communication %" not in own and (own["gemm %"], own["host %"]) == (50.0, 50.0)
