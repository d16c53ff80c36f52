"""Counting rules of llmcomm.measure.capture on synthetic events (exact values), and the wrapping on a 1-process gloo group."""
import json

import pytest

from llmcomm.measure.capture import Capture, CaptureError, Event, aggregate, check_consistent, write_chrome_trace


def ev(rank, op, nbytes, group=(0, 1), phase="prefill", peer=None, seq=0):
    return Event(rank=rank, seq=seq, phase=phase, op=op, api=f"test.{op}", dtype="float32", shape=[nbytes // 4],
                 bytes=nbytes, group=list(group), peer=peer)


def row(phase, op, n, calls, nbytes, algorithm, sent, link, **more):
    return dict({"phase": phase, "op": op, "group_size": n, "calls": calls, "bytes": nbytes, "algorithm": algorithm,
                 "sent_bytes_per_rank": sent, "link_bytes": link}, **more)


def test_collective_counts_once_per_group_not_per_rank():
    events = [ev(r, "all_reduce", 2048, seq=i) for r in (0, 1) for i in range(3)]
    # ring on 2 ranks: each rank sends 2(n−1)/n·m = m per call; both links together 2(n−1)·m = 2m
    assert aggregate(events) == [row("prefill", "all_reduce", 2, 3, 6144, "ring", 6144, 12288)]
    # DeepSpeed's shm kernel (direct): every rank sends its buffer to the n−1 others: the same for n = 2
    assert aggregate(events, algorithm="direct") == [row("prefill", "all_reduce", 2, 3, 6144, "direct", 6144, 12288)]


def test_direct_and_ring_differ_from_four_ranks_on():
    events = [ev(r, "all_reduce", 1000, group=(0, 1, 2, 3)) for r in range(4)]
    assert aggregate(events) == [row("prefill", "all_reduce", 4, 1, 1000, "ring", 1500, 6000)]     # 1.5 m, 6 m
    assert aggregate(events, algorithm="direct") == [row("prefill", "all_reduce", 4, 1, 1000, "direct", 3000, 12000)]


def test_events_of_one_rank_alone_give_the_same_rows():
    events = [ev(r, "all_reduce", 2048, seq=i) for r in (0, 1) for i in range(3)]
    both = aggregate(events)
    assert aggregate([e for e in events if e.rank == 1]) == both
    assert aggregate([e for e in events if e.rank == 0]) == both


def test_two_disjoint_groups_are_two_calls():
    # hybrid TP2 x 2: groups (0,1) and (2,3) each all-reduce once -> 2 calls of group size 2
    events = [ev(r, "all_reduce", 100, group=(0, 1)) for r in (0, 1)] + \
             [ev(r, "all_reduce", 100, group=(2, 3)) for r in (2, 3)]
    assert aggregate(events) == [row("prefill", "all_reduce", 2, 2, 200, "ring", 100, 400)]
    # the busiest rank is in one group only; placed 2 per node nothing crosses, 1 per node every ring link does
    assert aggregate(events, node_of=lambda r: r // 2)[0]["inter_node_bytes"] == 0
    assert aggregate(events, node_of=lambda r: r)[0]["inter_node_bytes"] == 400


def test_send_recv_pair_counts_once_from_either_side():
    send = ev(0, "send", 4096, group=(0, 1), peer=1)
    recv = ev(1, "recv", 4096, group=(0, 1), peer=0)
    rows = [row("prefill", "send_recv", 2, 1, 4096, "p2p", 4096, 4096)]
    assert aggregate([send, recv]) == rows
    assert aggregate([send]) == rows
    assert aggregate([recv]) == rows
    assert aggregate([send], node_of={0: "a", 1: "b"}.get)[0]["inter_node_bytes"] == 4096


def test_barrier_has_zero_bytes_and_rows_are_sorted():
    events = [ev(r, "barrier", 0, phase="decode") for r in (0, 1)] + \
             [ev(r, "broadcast", 5056, phase="setup") for r in (0, 1)] + \
             [ev(r, "all_reduce", 8, phase="decode") for r in (0, 1)] + \
             [ev(r, "all_gather", 64, phase="prefill", group=(0, 1, 2, 3)) for r in range(4)] + \
             [ev(r, "all_gather", 32, phase="prefill") for r in (0, 1)]
    assert aggregate(events) == [
        row("setup", "broadcast", 2, 1, 5056, "chain", 5056, 5056),
        row("prefill", "all_gather", 2, 1, 32, "ring", 16, 32),
        row("prefill", "all_gather", 4, 1, 64, "ring", 48, 192),           # (n−1)/n·m each, (n−1)·m in all
        row("decode", "all_reduce", 2, 1, 8, "ring", 8, 16),
        row("decode", "barrier", 2, 1, 0, "-", 0, 0),
    ]


def test_aggregate_accepts_dicts():
    events = [ev(r, "all_reduce", 12).as_dict() for r in (0, 1)]
    assert aggregate(json.loads(json.dumps(events)))[0]["calls"] == 1


def test_check_consistent_catches_disagreeing_ranks():
    ok = [ev(r, "all_reduce", 16) for r in (0, 1)]
    check_consistent(ok)
    with pytest.raises(CaptureError, match="disagree"):
        check_consistent([ev(0, "all_reduce", 16), ev(1, "all_reduce", 32)])
    with pytest.raises(CaptureError, match="recorded no call"):
        check_consistent([ev(0, "all_reduce", 16), ev(1, "broadcast", 16, group=(1,))])
    with pytest.raises(CaptureError, match="sent 1"):
        check_consistent([ev(0, "send", 8, peer=1), ev(1, "recv", 4, peer=0)])


def test_chrome_trace(tmp_path):
    events = [ev(r, "all_reduce", 16) for r in (0, 1)]
    for i, e in enumerate(events):
        e.t_start, e.t_end = 10.0 + i, 10.5 + i
    spans = [{"rank": 0, "phase": "prefill", "t_start": 9.0, "t_end": 12.0}]
    p = write_chrome_trace(events, tmp_path / "t.json", spans)
    trace = json.loads(p.read_text())["traceEvents"]
    slices = [t for t in trace if t["ph"] == "X"]
    assert {t["pid"] for t in slices} == {0, 1}
    assert min(t["ts"] for t in slices) == 0.0
    comm = [t for t in slices if t["tid"] == 1]
    assert [t["dur"] for t in comm] == [5e5, 5e5]


# ---------------------------------------------------------------------------------- wrapping, on a real process group
@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """A 1-process gloo group (collectives run, instantly), torch.distributed only."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = tmp_path_factory.mktemp("store") / "s"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_capture_records_sizes_phases_and_restores(world1):
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    before = (dist.all_reduce, c10d.all_reduce, dist.isend)
    x = torch.ones(2, 3)
    with Capture() as cap:
        assert dist.all_reduce is c10d.all_reduce is not before[0]
        dist.all_reduce(x)                                            # 24 B
        with cap.phase("prefill"):
            dist.all_gather([torch.empty(5)], torch.ones(5))          # output 20 B
            dist.all_gather_into_tensor(torch.empty(7), torch.ones(7))
            dist.broadcast_object_list([{"a": 1}], src=0)             # transparent: 2 inner broadcasts
            with cap.phase("decode"):
                dist.barrier()
                dist.reduce_scatter_tensor(torch.empty(3), torch.ones(3))
        # P2POp checks `op in [isend, irecv]` by identity: must hold for the wrapped names too
        dist.P2POp(dist.isend, x, 0)
    assert (dist.all_reduce, c10d.all_reduce, dist.isend) == before
    rows = aggregate(cap.events)
    by = {(r["phase"], r["op"]): (r["calls"], r["bytes"]) for r in rows}
    assert by[("setup", "all_reduce")] == (1, 24)
    assert by[("prefill", "all_gather")] == (2, 20 + 28)
    assert by[("prefill", "broadcast")][0] == 2                        # sizes tensor, then the pickled bytes
    assert by[("decode", "barrier")] == (1, 0)
    assert by[("decode", "reduce_scatter")] == (1, 12)
    e0 = cap.events[0]
    assert (e0.op, e0.api, e0.dtype, e0.shape, e0.group) == ("all_reduce", "torch.distributed.all_reduce",
                                                             "float32", [2, 3], [0])
    assert e0.t_end >= e0.t_start > 1e9
    assert [s["phase"] for s in cap.phase_spans] == ["setup", "prefill", "decode", "prefill", "setup"]


def test_nested_capture_is_refused(world1):
    with Capture():
        with pytest.raises(CaptureError, match="already active"):
            with Capture():
                pass


def test_deepspeed_comm_is_counted_once(world1):
    """deepspeed.comm.all_reduce -> TorchBackend -> torch.distributed.all_reduce: one event, at the outer call."""
    import os
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds = pytest.importorskip("deepspeed")
    import deepspeed.comm as dsc

    ds.init_distributed(verbose=False)
    expected = [("deepspeed.comm.all_reduce", "all_reduce", 16),
                ("deepspeed.comm.inference_all_reduce", "all_reduce", 16),
                ("deepspeed.comm.barrier", "barrier", 0)]
    for logger_on in (False, True):          # DeepSpeed's comms logger (timed_op) in between: still once
        dsc.configure(enabled=logger_on, prof_all=logger_on, verbose=False)
        try:
            with Capture() as cap:
                dsc.all_reduce(torch.ones(4))
                dsc.inference_all_reduce(torch.ones(4))     # world size 1: returns at once, still one call
                dsc.barrier()
        finally:
            dsc.configure(enabled=False, prof_all=False)
        assert [(e.api, e.op, e.bytes) for e in cap.events] == expected


def test_all_to_all_records_the_bytes_sent_to_each_peer(world1):
    import torch
    import torch.distributed as dist

    from llmcomm.measure.capture import _a2a_splits, _positions

    x = torch.ones(6, 4)                                   # 6 rows of 16 B
    single = _a2a_splits("all_to_all_single", _positions(dist.all_to_all_single))
    assert single((torch.empty(6, 4), x), {}, 3) == [32, 32, 32]                              # equal split
    assert single((torch.empty(6, 4), x, [1, 1, 1], [1, 2, 3]), {}, 3) == [16, 32, 48]        # input_split_sizes
    assert single((torch.empty(6, 4),), {"input": x, "input_split_sizes": [4, 0, 2]}, 3) == [64, 0, 32]
    listed = _a2a_splits("all_to_all", _positions(dist.all_to_all))
    assert listed(([torch.empty(1)] * 2, [torch.ones(3), torch.ones(5)]), {}, 2) == [12, 20]
    with Capture() as cap:
        dist.all_to_all_single(torch.empty(6, 4), x)
    (ev,) = cap.events
    assert (ev.op, ev.bytes, ev.splits) == ("all_to_all", 96, [96])
