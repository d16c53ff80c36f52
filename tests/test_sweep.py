"""Sweeps in one launch: many configurations per set of ranks, each captured on its own, JSON Lines out, results kept
when a sweep fails part-way, ``--resume``; and the JIT op-load lock that keeps a killed run from hanging the next.

Fast tests check the pieces (grid order, file names, the CLI's JSON Lines, the configuration collector, the lock,
the hang messages); the slow ones start real DeepSpeed ranks on CPU."""
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

from llmcomm.cli import main, result_name
from llmcomm.compare.sweeps import Config, measure_configs, predicted_like
from llmcomm.measure import launch, oplock
from llmcomm.measure.launch import RunError, measure_many
from llmcomm.spec import Layout, SpecError, Workload, load_model, workload_grid
from support import core, measured

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


def test_result_name_and_resume_needs_out():
    assert result_name(TINY, Layout(2, 2), Workload(3, 8, 2), "full") == "tiny-llama_t2_p2_b3_S8_G2_fp32_full.json"
    assert result_name(TINY, Layout(2, 1), Workload(1, 8, 4), "full") == "tiny-llama_t2_p1_b1_S8_G4_fp32.json"
    status, _, err = _cli(["measure", "--model", "tiny-llama", "--tp", "2", "--resume"])
    assert status == 2 and "--resume needs --out" in err


def test_measure_many_refuses_mixed_dtypes_and_empty_sweeps():
    with pytest.raises(SpecError, match="one dtype"):
        measure_many(TINY, Layout(2), [Workload(1, 8, 2, "fp32"), Workload(1, 8, 2, "bf16")])
    with pytest.raises(SpecError, match="no workload"):
        measure_many(TINY, Layout(2), [])


def test_rank_spec_lists_every_workload():
    ws = [Workload(1, 8, 4), Workload(2, 1, 1)]
    spec = launch.rank_spec(TINY, Layout(2), ws)
    assert spec["workloads"] == [w.as_dict() for w in ws] and spec["workload"] == ws[0].as_dict()
    assert "workloads" not in launch.rank_spec(TINY, Layout(2), ws[0])


def test_configs_are_handed_over_in_order_once_when_every_rank_has_them(tmp_path):
    got = []
    c = launch._Configs(tmp_path, 2, 3, lambda i, recs, facts: got.append((i, [r["rank"] for r in recs])), {})
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

    def runner(model, layout, workloads, on_result=None, **kw):
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
    _, what = launch._diagnose_hang(tmp_path, [])
    assert what == "every rank had written its result, but the launcher had not exited"
    culprits, what = launch._diagnose_hang(tmp_path, [0, 1])
    assert culprits == [0, 1] and what.startswith("rank 0: no stack")


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


# ------------------------------------------------------------------------------------------ slow: real ranks
from test_tp_exact import SWEEP          # noqa: E402  (the same launch as the TP exactness tests: support.measured)


@pytest.fixture(scope="module")
def tp_sweep():
    return measured("tiny-llama", Layout(2), SWEEP, backend=None, timeout_s=240)


@pytest.mark.slow
def test_tp_sweep_is_exact_per_configuration_in_one_launch(tp_sweep):
    assert len(tp_sweep) == len(SWEEP)
    ports = {r.provenance["master_port"] for r in tp_sweep}
    assert len(ports) == 1                                               # one launch
    assert [r.provenance["launch"]["index"] for r in tp_sweep] == [0, 1, 2, 3]
    for w, res in zip(SWEEP, tp_sweep):
        measured = [r for r in res.rows if r["phase"] != "setup"]
        assert measured == predicted_like(TINY, Layout(2), w, res)      # calls, bytes and traffic, counted alike
        assert res.tokens == res.reference_tokens and len(res.tokens) == w.b and len(res.tokens[0]) == w.G


@pytest.mark.slow
def test_nothing_leaks_from_one_configuration_into_the_next(tp_sweep):
    first, again = tp_sweep[0], tp_sweep[3]                              # the same workload, before and after
    assert first.rows == again.rows and first.tokens == again.tokens and first.traffic == again.traffic
    setups = [core([r for r in res.rows if r["phase"] == "setup"]) for res in tp_sweep]
    assert setups == [[{"phase": "setup", "op": "broadcast", "group_size": 2, "calls": 1, "bytes": 5056}]] * 4
    # G = 1 (configuration 1): no decode row at all; S = 1 prefill is one token per sequence
    assert {r["phase"] for r in tp_sweep[1].rows} == {"setup", "prefill"}
    # the KV cache starts empty in every configuration: per-configuration events are exactly this config's calls
    assert sum(r["calls"] for r in tp_sweep[1].rows if r["phase"] == "prefill") == 2 * TINY.L + 1


@pytest.mark.slow
@pytest.mark.parametrize("layout,workloads", [
    (Layout(1, 2), [Workload(2, 8, 4), Workload(1, 1, 1), Workload(3, 3, 2)]),
    (Layout(2, 2), [Workload(1, 6, 3), Workload(3, 4, 2)]),
], ids=["pp2", "tp2xpp2"])
def test_pipeline_sweeps_are_exact_per_configuration(layout, workloads):
    results = measure_many(TINY, layout, workloads, timeout_s=300, options={"p2p": "partitioned"})
    assert len({r.provenance["master_port"] for r in results}) == 1
    for w, res in zip(workloads, results):
        assert [r for r in res.rows if r["phase"] != "setup"] == predicted_like(TINY, layout, w, res)
        assert res.tokens == res.reference_tokens
        diffs = [r["pipeline"]["logits_max_abs_diff"] for r in res.ranks if r["pipeline"]["logits_max_abs_diff"]
                 is not None]
        assert diffs and max(diffs) < 1e-4


@pytest.mark.slow
def test_killed_rank_mid_sweep_keeps_earlier_results_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    argv = ["measure", "--model", "tiny-llama", "--tp", "2", "--batch", "1", "2", "3", "--prompt", "8",
            "--generate", "3", "--json", "--out", str(out), "--timeout", "120"]
    kill = {"LLMCOMM_TEST_KILL_RANK": "1", "LLMCOMM_TEST_KILL_CONFIG": "1", "LLMCOMM_TEST_KILL_PHASE": "decode"}
    status, stdout, stderr = _cli(argv, env=kill)
    assert status == 1
    assert "rank 1" in stderr and "configuration 2 of 3 (b=2 S=8 G=3 fp32; 1 finished before it)" in stderr
    assert "1 of 3 configurations to run finished before the failure" in stderr
    names = [result_name(TINY, Layout(2), Workload(b, 8, 3), "partitioned") for b in (1, 2, 3)]
    assert sorted(p.name for p in out.glob("*.json")) == [names[0]]      # the finished one, complete
    kept = json.loads((out / names[0]).read_text())
    assert json.loads(stdout.splitlines()[0]) == kept and kept["tokens"] and len(stdout.splitlines()) == 1
    # the same sweep again, with --resume: configuration 1 is not measured again, the others are, in one launch
    status, stdout, stderr = _cli(argv + ["--resume"], env={})
    assert status == 0, stderr
    lines = [json.loads(ln) for ln in stdout.splitlines()]
    assert [o["batch"] for o in lines] == [1, 2, 3] and lines[0] == kept
    assert [o["provenance"]["launch"] for o in lines[1:]] == [
        dict(lines[1]["provenance"]["launch"], index=0, configs=2), dict(lines[2]["provenance"]["launch"], index=1,
                                                                        configs=2)]
    assert all(json.loads((out / n).read_text()) == o for n, o in zip(names, lines))
    # the natural check: predict with the same lists prints the same rows (setup apart; CPU: one-shot shm
    # all-reduce, both ranks on one host)
    st, pred, _ = _cli(["predict", *argv[1:argv.index("--out")], "--algorithm", "direct", "--gpus-per-node", "2"])
    assert st == 0
    assert [json.loads(ln)["ops"] for ln in pred.splitlines()] == [
        [r for r in o["ops"] if r["phase"] != "setup"] for o in lines]


@pytest.mark.slow
def test_rank_killed_inside_the_op_load_does_not_hang_the_next_run():
    """pytorch/pytorch#189245: a rank killed inside torch's JIT load leaves torch's baton behind, and without the
    lock every later run waited on it forever. Here rank 0 dies right after torch took the baton (the real one);
    the next run must succeed."""
    env = {"LLMCOMM_TEST_KILL_RANK": "0", "LLMCOMM_TEST_KILL_MODE": "in_op_load"}
    with pytest.raises(RunError, match="rank 0 exited with status 3") as err:
        measure_many(TINY, Layout(2), [Workload(1, 4, 2)], timeout_s=60, env=env)
    assert err.value.rank == 0
    # torch's baton is left behind, unless rank 1 took the lock after rank 0 died (then it removed it): put it back,
    # the state a killed load leaves, for the next run to meet.
    _, baton = oplock.lock_paths(env=launch.default_env(2))
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()
    res = measure_many(TINY, Layout(2), [Workload(1, 4, 2)], timeout_s=120)[0]
    assert res.tokens == res.reference_tokens and not baton.exists()
