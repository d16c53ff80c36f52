"""Sweeps in one launch: many configurations per set of ranks, JSON Lines out, the results folder and ``--resume``,
the run cache, the watchdogs; and the JIT op-load lock that keeps a killed run from hanging the next. No rank is
started here (the pieces, each on its own); ``tests/test_launch.py`` starts real ones."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcomm.cli import main
from llmcomm.compare.sweeps import Config, measure_configs
from llmcomm.deployment import Deployment, Routing
from llmcomm.measure import diagnose, launch, oplock, supervise
from llmcomm.measure.cache import RunCache
from llmcomm.measure.launch import measure_many
from llmcomm.measure.results import MeasureResult, ResultsFolder
from llmcomm.spec import Layout, SpecError, Workload, load_model, workload_grid

TINY = load_model("tiny-llama")


def _cli(argv, env=None):
    """(status, stdout, stderr) of ``llmcomm`` run in-process (predict) or as a subprocess (with ``env``)."""
    if env is not None:
        p = subprocess.run([sys.executable, "-m", "llmcomm.cli", *argv], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=600)
        return p.returncode, p.stdout, p.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------------------ fast
def test_workload_grid_order_and_duplicates():
    grid = workload_grid([1, 2], [8, 16, 8], [4], ["fp32", "bf16"])
    assert [(w.dtype, w.b, w.S, w.G) for w in grid] == [
        ("fp32", 1, 8, 4), ("fp32", 1, 16, 4), ("fp32", 2, 8, 4), ("fp32", 2, 16, 4),
        ("bf16", 1, 8, 4), ("bf16", 1, 16, 4), ("bf16", 2, 8, 4), ("bf16", 2, 16, 4)]
    assert workload_grid() == [Workload(1, 16, 4, "fp32")]


def test_predict_lists_print_one_json_line_per_configuration_equal_to_single_runs():
    argv = ["predict", "--model", "tiny-llama", "--tp", "2", "--json"]
    status, out, _ = _cli(argv + ["--batch", "1", "3", "--prompt", "8", "1", "--generate", "4", "1"])
    assert status == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert len(lines) == 8
    for obj, w in zip(lines, workload_grid([1, 3], [8, 1], [4, 1])):
        st, one, _ = _cli(argv + ["--batch", str(w.b), "--prompt", str(w.S), "--generate", str(w.G)])
        assert st == 0 and one.count("\n") == 1 and json.loads(one) == obj
        assert (obj["batch"], obj["prompt"], obj["generate"]) == (w.b, w.S, w.G)


def test_result_names_and_resume_needs_out(tmp_path):
    folder = ResultsFolder(tmp_path, TINY, Layout(2, 2))
    assert folder.name(Workload(3, 8, 2), Deployment(p2p="full")) == "tiny-llama_t2_p2_b3_S8_G2_fp32_full.json"
    assert ResultsFolder(tmp_path, TINY, Layout(2, 1)).name(Workload(1, 8, 4), Deployment(p2p="full")) == \
        "tiny-llama_t2_p1_b1_S8_G4_fp32.json"
    mix = ResultsFolder(tmp_path, load_model("tiny-mixtral"), Layout(1, 1, 2))
    assert mix.name(Workload(4, 7, 3), Deployment(routing=Routing("dropless"))) == \
        "tiny-mixtral_t1_p1_e2_dropless_b4_S7_G3_fp32.json"
    status, _, err = _cli(["measure", "--model", "tiny-llama", "--tp", "2", "--resume"])
    assert status == 2 and "--resume needs --out" in err


def test_stored_results_are_found_only_for_the_same_configuration_and_backend(tmp_path):
    folder, w, d = ResultsFolder(tmp_path, TINY, Layout(2)), Workload(1, 8, 4), Deployment()
    head = {"model": "tiny-llama", "tp": 2, "batch": 1}
    assert folder.stored(w, d, head, None) is None                          # nothing there
    folder.write(w, d, dict(head, ops=[], provenance={"backend_requested": None}))
    assert folder.stored(w, d, head, None)["ops"] == []
    assert folder.stored(w, d, head, "gloo") is None                        # another backend
    assert folder.stored(w, d, dict(head, batch=2), None) is None           # another configuration
    folder.path(w, d).write_text("{half")                                   # not a complete result
    assert folder.stored(w, d, head, None) is None


def test_run_cache_keys_and_round_trip(tmp_path):
    res = MeasureResult(rows=[{"phase": "prefill"}], tokens=[[1, 2]], reference_tokens=[[1, 2]], ttft_s=0.1,
                        tpot_s=0.01, e2e_s=0.2, events=[], provenance={"git": "x"}, ranks=[{"rank": 0}],
                        traffic={"bytes": 4})
    cache = RunCache(tmp_path)
    a = RunCache.key({"model": "tiny-llama", "workload": {"b": 1}})
    assert a == RunCache.key({"workload": {"b": 1}, "model": "tiny-llama"})            # order-free
    assert a != RunCache.key({"model": "tiny-llama", "workload": {"b": 2}})
    assert cache.get(a) is None
    cache.put(a, res)
    assert cache.get(a) == res


def test_the_cache_is_bypassed_where_a_run_must_really_start(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMM_RUN_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMCOMM_TEST_KILL_RANK", raising=False)
    assert launch._cache_for(None, None, None).root == tmp_path
    assert launch._cache_for({"X": "1"}, None, None) is None                 # an explicit environment
    assert launch._cache_for(None, tmp_path, None) is None                   # a kept run folder
    monkeypatch.setenv("LLMCOMM_TEST_KILL_RANK", "1")
    assert launch._cache_for(None, None, None) is None                       # a fault injected
    monkeypatch.delenv("LLMCOMM_RUN_CACHE")
    monkeypatch.delenv("LLMCOMM_TEST_KILL_RANK")
    assert launch._cache_for(None, None, None) is None                       # no cache asked for


def test_cached_configurations_are_handed_over_without_a_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMM_RUN_CACHE", str(tmp_path))
    ws = [Workload(1, 8, 4), Workload(2, 5, 3)]
    started = []
    monkeypatch.setattr(launch, "launch_ranks", lambda *a, **k: started.append(a) or ([], {}))
    fake = MeasureResult([], [[1]], [[1]], 0.1, 0.0, 0.1, [], {}, [], {})
    calls = []
    monkeypatch.setattr(RunCache, "get", lambda self, key: fake)
    got = measure_many(TINY, Layout(2), ws, on_result=lambda i, r: calls.append(i))
    assert got == [fake, fake] and calls == [0, 1] and started == []


def test_measure_many_refuses_before_any_rank_starts():
    with pytest.raises(SpecError, match="one dtype"):
        measure_many(TINY, Layout(2), [Workload(1, 8, 2, "fp32"), Workload(1, 8, 2, "bf16")])
    with pytest.raises(SpecError, match="no workload"):
        measure_many(TINY, Layout(2), [])
    mix = load_model("tiny-mixtral")
    with pytest.raises(SpecError, match="tp-experts configurations come last"):
        measure_many(mix, Layout(2), [Workload(4, 7, 3)] * 2,
                     deployment=[Deployment(experts="tp-experts"), Deployment(experts="autotp")])
    with pytest.raises(SpecError, match="one Deployment per workload"):
        measure_many(mix, Layout(2), [Workload(4, 7, 3)] * 2, deployment=[Deployment()])
    with pytest.raises(SpecError, match="vllm is predicted only"):
        measure_many(TINY, Layout(2), [Workload(1, 8, 2)], deployment=Deployment("vllm"))
    with pytest.raises(SpecError, match="stage would hold no layer"):
        measure_many(TINY, Layout(1, 5), [Workload(1, 4, 2)])
    with pytest.raises(SpecError, match="progress_timeout_s"):
        supervise.launch_ranks("llmcomm.measure.runs.tp", {}, 2, Path("/nonexistent"), progress_timeout_s=0)


def test_rank_spec_lists_every_workload_with_its_options():
    ws = [Workload(1, 8, 4), Workload(2, 1, 1)]
    spec = launch.rank_spec(TINY, Layout(2, 2), ws, deployments=[Deployment(), Deployment(p2p="full")])
    assert spec["workloads"] == [dict(ws[0].as_dict(), options={"p2p": "partitioned"}),
                                 dict(ws[1].as_dict(), options={"p2p": "full"})]
    assert spec["workload"] == ws[0].as_dict()
    assert "workloads" not in launch.rank_spec(TINY, Layout(2), ws[0])


def test_configs_are_handed_over_in_order_once_when_every_rank_has_them(tmp_path):
    got = []
    c = supervise._Configs(tmp_path, 2, 3, lambda i, recs, facts: got.append((i, [r["rank"] for r in recs])), {})
    (tmp_path / "rank0.c0.json").write_text('{"rank": 0}')
    (tmp_path / "rank0.c1.json").write_text('{"rank": 0}')
    assert not c.collect() and got == []                  # rank 1 has not finished configuration 0
    (tmp_path / "rank1.c1.json").write_text('{"rank": 1}')
    assert not c.collect() and got == []                  # 1 is complete, but 0 comes first
    (tmp_path / "rank1.c0.json").write_text('{"rank": 1}')
    assert c.collect() and got == [(0, [0, 1]), (1, [0, 1])]
    assert not c.collect() and c.done == 2                # nothing handed over twice


def test_measure_configs_groups_by_model_and_layout_in_one_launch_each():
    calls = []

    def runner(model, layout, workloads, on_result=None, deployment=None, **kw):
        calls.append((model.name, layout.t, layout.p, [w.label for w in workloads]))
        res = [f"{model.name} {layout.t}x{layout.p} {w.label}" for w in workloads]
        for i, r in enumerate(res):
            on_result(i, r)
        return res

    cfgs = [Config("tiny-llama", 2, 1, 1, 8, 4), Config("tiny-llama", 1, 2, 1, 8, 4),
            Config("tiny-llama", 2, 1, 2, 5, 3), Config("tiny-llama-tied", 2, 1, 1, 8, 4)]
    out = measure_configs(cfgs, runner, progress=False)
    assert calls == [("tiny-llama", 2, 1, ["b=1 S=8 G=4 fp32", "b=2 S=5 G=3 fp32"]),
                     ("tiny-llama", 1, 2, ["b=1 S=8 G=4 fp32"]), ("tiny-llama-tied", 2, 1, ["b=1 S=8 G=4 fp32"])]
    assert [c for c, _, _ in out] == cfgs                  # results in the order of the configurations
    assert [r for _, _, r in out] == [f"{c.model} {c.t}x{c.p} {c.workload.label}" for c in cfgs]
    # inside a launch the tp-experts configurations run last (sharding cannot be undone), handed back in order
    calls.clear()
    mix = [Config("tiny-mixtral", 2, 1, 4, 7, 3, experts="tp-experts"), Config("tiny-mixtral", 2, 1, 2, 5, 3)]
    out = measure_configs(mix, runner, progress=False)
    assert calls == [("tiny-mixtral", 2, 1, ["b=2 S=5 G=3 fp32", "b=4 S=7 G=3 fp32"])]
    assert [c for c, _, _ in out] == mix and out[0][2].endswith("b=4 S=7 G=3 fp32")


def test_watchdog_start_up_then_progress(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(supervise.time, "monotonic", lambda: clock[0])
    dog = supervise._Watchdog(tmp_path, 2, startup_s=100, progress_s=5)
    clock[0] = 50
    assert dog.expired() is None                                   # still starting
    (tmp_path / "rank0.beat").write_text("0")
    clock[0] = 101
    assert "start-up timeout; 1 of 2 ranks" in dog.expired()
    dog = supervise._Watchdog(tmp_path, 2, startup_s=100, progress_s=5)
    (tmp_path / "rank1.beat").write_text("0")
    clock[0] = 102
    assert dog.expired() is None and dog.started                   # both beat once: progress watch from now
    clock[0] = 106
    assert dog.expired() is None
    clock[0] = 108
    assert "no progress for 5 s (progress timeout)" in dog.expired()
    os.utime(tmp_path / "rank1.beat", ns=(10 ** 9, 10 ** 9))       # a new beat
    assert dog.expired() is None


def test_progress_is_off_under_ci_and_when_asked(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("LLMCOMM_PROGRESS", "1")
    assert launch.progress_enabled()
    monkeypatch.setenv("CI", "true")
    assert not launch.progress_enabled()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("LLMCOMM_PROGRESS", "0")
    assert not launch.progress_enabled()
    assert isinstance(launch.progress(5), launch._NoProgress)
    assert isinstance(launch.progress(1, enabled=True), launch._NoProgress)     # one configuration: no bar


def test_hang_message_is_never_empty(tmp_path):
    _, what = diagnose.diagnose_hang(tmp_path, [])
    assert what == "every rank had written its result, but the launcher had not exited"
    culprits, what = diagnose.diagnose_hang(tmp_path, [0, 1])
    assert culprits == [0, 1] and what.startswith("rank 0: no stack")


def test_first_failure_names_the_rank_that_went_first(tmp_path):
    (tmp_path / "rank1.exit.json").write_text(json.dumps({"rank": 1, "returncode": 3, "t": 5.0}))
    (tmp_path / "rank0.exit.json").write_text(json.dumps({"rank": 0, "returncode": -9, "t": 4.0}))
    assert diagnose.first_failure(tmp_path, 2, 1) == (1, "rank 1 exited with status 3 before writing its result")
    # a rank's own error wins over a silent exit ...
    (tmp_path / "rank0.error.json").write_text(json.dumps({"rank": 0, "error": "SpecError: no"}))
    assert diagnose.first_failure(tmp_path, 2, 1) == (0, "rank 0 failed: SpecError: no")
    # ... but a report that only says the peer went away (what gloo raises on the survivors) points at the rank that
    # died without one; the launcher's SIGKILL of the others never makes a culprit
    gone = "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23425"
    (tmp_path / "rank0.error.json").write_text(json.dumps({"rank": 0, "error": gone}))
    assert diagnose.first_failure(tmp_path, 2, 1) == (1, "rank 1 exited with status 3 before writing its result")
    (tmp_path / "rank1.exit.json").write_text(json.dumps({"rank": 1, "returncode": -9, "t": 5.0}))
    assert diagnose.first_failure(tmp_path, 2, 1) == (0, f"rank 0 failed: {gone}")

# -------------------------------------------------------------------------------------------- the op-load lock
def _env(root: Path) -> dict:
    return {"TORCH_EXTENSIONS_DIR": str(root)}


def test_lock_removes_a_stale_torch_baton(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    flock_path, baton = oplock.lock_paths()
    assert (flock_path, baton) == (tmp_path / "deepspeed_shm_comm.flock", tmp_path / "deepspeed_shm_comm" / "lock")
    baton.parent.mkdir()
    baton.write_text("")                                   # what a load killed after FileBaton.try_acquire leaves
    with oplock.op_load_lock() as info:
        assert info["stale_baton_removed"] and not baton.exists()
        assert flock_path.read_text().split()[0] == str(os.getpid())
    with oplock.op_load_lock() as info:
        assert not info["stale_baton_removed"]


def test_lock_dies_with_its_holder(tmp_path, monkeypatch):
    """A holder killed inside the lock does not block the next loader: the kernel releases a flock."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    code = ("import os, sys; from llmcomm.measure import oplock\n"
            "with oplock.op_load_lock():\n"
            "    print('held', flush=True); sys.stdin.readline(); os._exit(9)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert holder.stdout.readline().strip() == "held"
    waiter = ("from llmcomm.measure import oplock\n"
              "with oplock.op_load_lock() as info: print(round(info['waited_s'], 1))\n")
    blocked = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    time.sleep(1.0)
    assert blocked.poll() is None                          # waits while the holder lives ...
    flock_path, _ = oplock.lock_paths()
    frames = [("/x/fcntl.py", "1", "flock"), (str(Path(oplock.__file__)), "70", "op_load_lock")]
    what = oplock.describe_wait(frames)
    assert str(flock_path) in what and f"held by process {holder.pid}" in what
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(timeout=30)                                # ... dies with os._exit inside the lock ...
    out, _ = blocked.communicate(timeout=30)               # ... and the waiter gets it
    assert blocked.returncode == 0 and float(out) >= 0.5


def test_describe_wait_names_torch_baton(tmp_path):
    frames = [("/torch/utils/file_baton.py", "50", "wait"), ("/torch/utils/cpp_extension.py", "2400", "_jit_compile")]
    what = oplock.describe_wait(frames, _env(tmp_path))
    assert str(tmp_path / "deepspeed_shm_comm" / "lock") in what and "189245" in what
    assert oplock.describe_wait([("/x/torch.py", "51", "all_reduce")], _env(tmp_path)) is None
