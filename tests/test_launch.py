"""The launcher with real ranks when things go wrong: a hung rank is named in seconds (the progress watchdog), a rank
killed in the middle of a sweep keeps what finished and ``--resume`` completes it, a rank killed inside the JIT load of
DeepSpeed's op does not hang the next run (which is the microbenchmark here, whose table is checked too), a rank's
own error reaches the caller as one line naming it — and nothing of a run is left behind (processes, shm buffers), not
even when the fork server that forked it is stopped under it.

Slow: each test starts DeepSpeed ranks on CPU (the cheapest runner that exercises the path: the microbenchmark's
rank side imports no transformers)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmcomm.deployment import Deployment
from llmcomm.measure import oplock, supervise
from llmcomm.measure.launch import RunError, measure, rank_spec
from llmcomm.measure.results import ResultsFolder
from llmcomm.measure.supervise import SHM_PREFIX, launch_ranks
from llmcomm.spec import Layout, Workload, load_model

pytestmark = pytest.mark.slow
TINY = load_model("tiny-llama")


def _our_buffers(port):
    return sorted(p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"))


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def _nothing_left(run_dir: Path, port: int) -> None:
    pids = [int(p.read_text()) for p in run_dir.glob("rank*.pid")]
    assert pids and not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids)
    assert _our_buffers(port) == []


def test_a_hung_rank_is_named_within_the_progress_timeout(tmp_path):
    env = {"LLMCOMM_TEST_KILL_RANK": "1", "LLMCOMM_TEST_KILL_PHASE": "prefill", "LLMCOMM_TEST_KILL_MODE": "hang"}
    t0 = time.monotonic()
    with pytest.raises(RunError) as err:
        measure(TINY, Layout(t=2), Workload(b=1, S=4, G=2), progress_timeout_s=3, env=env, out_dir=tmp_path / "run")
    msg = str(err.value)
    assert "no progress for 3 s (progress timeout)" in msg and "rank 1 hung outside any collective" in msg, msg
    assert "rank 0 waited in a collective" in msg and err.value.rank == 1
    started = max(p.stat().st_mtime for p in (tmp_path / "run").glob("rank*.beat"))
    assert time.time() - started < 3 + 8          # stopped seconds after the last heartbeat, not minutes
    assert time.monotonic() - t0 < 120
    _nothing_left(tmp_path / "run", err.value.master_port)


def _cli(argv, env):
    p = subprocess.run([sys.executable, "-m", "llmcomm.cli", *argv], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_killed_rank_mid_sweep_keeps_earlier_results_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    argv = ["measure", "--model", "tiny-llama", "--tp", "2", "--batch", "1", "2", "3", "--prompt", "8",
            "--generate", "3", "--json", "--out", str(out)]
    kill = {"LLMCOMM_TEST_KILL_RANK": "1", "LLMCOMM_TEST_KILL_CONFIG": "1", "LLMCOMM_TEST_KILL_PHASE": "decode"}
    status, stdout, stderr = _cli(argv, kill)
    assert status == 1
    assert "rank 1 exited with status 3 before writing its result" in stderr
    assert "configuration 2 of 3 (b=2 S=8 G=3 fp32; 1 finished before it)" in stderr
    assert "1 of 3 configurations to run finished before the failure" in stderr
    folder = ResultsFolder(out, TINY, Layout(2))
    names = [folder.name(Workload(b, 8, 3), Deployment()) for b in (1, 2, 3)]
    assert sorted(p.name for p in out.glob("*.json")) == [names[0]]      # the finished one, complete
    kept = json.loads((out / names[0]).read_text())
    assert json.loads(stdout.splitlines()[0]) == kept and kept["tokens"] and len(stdout.splitlines()) == 1
    _nothing_left(out / "ranks-fp32", kept["provenance"]["master_port"])
    # the same sweep again, with --resume: configuration 1 is not measured again, the others are, in one launch
    status, stdout, stderr = _cli(argv + ["--resume"], {})
    assert status == 0, stderr
    lines = [json.loads(ln) for ln in stdout.splitlines()]
    assert [o["batch"] for o in lines] == [1, 2, 3] and lines[0] == kept
    assert [o["provenance"]["launch"] for o in lines[1:]] == [
        dict(lines[1]["provenance"]["launch"], index=0, configs=2), dict(lines[2]["provenance"]["launch"], index=1,
                                                                        configs=2)]
    assert all(json.loads((out / n).read_text()) == o for n, o in zip(names, lines))
    # the natural check: predict with the same lists prints the same rows (setup apart; CPU: DeepSpeed's shm
    # all-reduce, both ranks on one host)
    err = io.StringIO()
    from llmcomm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        assert main(["predict", *argv[1:argv.index("--out")], "--algorithm", "shm", "--gpus-per-node", "2"]) == 0
    assert [json.loads(ln)["ops"] for ln in buf.getvalue().splitlines()] == [
        [r for r in o["ops"] if r["phase"] != "setup"] for o in lines]


def test_a_rank_killed_inside_the_op_load_does_not_hang_the_next_run(tmp_path):
    """pytorch/pytorch#189245: a rank killed inside torch's JIT load leaves torch's baton behind, and without the
    lock every later run waited on it forever. Here rank 0 dies right after torch took the baton (the real one);
    the next run — the collectives microbenchmark, its table checked — must succeed."""
    import pandas as pd

    from llmcomm.measure.bench import CSV_COLUMNS, run_bench

    spec = {"model": None, "layout": None, "workload": None, "seed": 0, "backend": None, "reference": False,
            "sync": False, "capture": False, "options": {}}
    env = {"LLMCOMM_TEST_KILL_RANK": "0", "LLMCOMM_TEST_KILL_MODE": "in_op_load"}
    with pytest.raises(RunError, match="rank 0 exited with status 3") as err:
        launch_ranks("llmcomm.measure.runs.bench", spec, 2, tmp_path / "killed", progress_timeout_s=60, env=env)
    assert err.value.rank == 0
    # torch's baton is left behind, unless rank 1 took the lock after rank 0 died (then it removed it): put it back,
    # the state a killed load leaves, for the next run to meet.
    _, baton = oplock.lock_paths(env=supervise.default_env(2))
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()
    df, folder = run_bench(sizes=[4, 4096, 2 ** 20 + 4096], ranks=[2], out=tmp_path / "bench", machine="test",
                           point_s=0.02, min_reps=3, max_reps=5, warmup=1, progress=False, timeout_s=240)
    assert not baton.exists()
    assert folder == tmp_path / "bench" and list(pd.read_csv(folder / "collectives.csv").columns) == CSV_COLUMNS
    # shm: all_reduce only; gloo: the four ops; 3 sizes each
    assert len(df) == (1 + 4) * 3 and set(df["backend"]) == {"shm", "gloo"} and set(df["group_size"]) == {2}
    assert (df["time_p10_s"] <= df["time_s"]).all() and (df["time_s"] <= df["time_p90_s"]).all()
    ar = df[df["op"] == "all_reduce"]
    np.testing.assert_allclose(ar["busbw_GBps"], ar["algbw_GBps"] * 1.0)     # f = 2(n−1)/n = 1 for n = 2
    ag = df[df["op"] == "all_gather"]
    np.testing.assert_allclose(ag["busbw_GBps"], ag["algbw_GBps"] * 0.5)
    np.testing.assert_allclose(df["algbw_GBps"], df["bytes"] / df["time_s"] / 1e9)
    side = json.loads((folder / "collectives.json").read_text())
    assert side["columns"] == CSV_COLUMNS and side["rows"] == len(df)
    prov = side["provenance"]
    assert all(prov[k] for k in ("machine", "cpu", "versions", "command", "date"))
    assert prov["versions"]["torch"] and prov["versions"]["deepspeed"]
    assert _our_buffers(side["ranks_meta"]["2"]["master_port"]) == []


def test_a_rank_error_is_one_line_naming_the_rank(tmp_path):
    """What a rank raises reaches the caller: the rank's own report (rankio) names it, the launch stops at once."""
    spec = rank_spec(TINY, Layout(1, 3), Workload(1, 4, 2))        # a 3-stage pipeline started on 2 ranks
    with pytest.raises(RunError) as err:
        launch_ranks("llmcomm.measure.runs.pipeline", spec, 2, tmp_path / "run", progress_timeout_s=60)
    text = str(err.value)
    assert "SpecError" in text and "needs 3 ranks, but 2 were launched" in text, text
    assert err.value.rank == 0 and (tmp_path / "run" / "rank0.error.json").exists()


def test_a_forked_launch_measures_what_a_fresh_one_does(tmp_path):
    """The fork server (tests/conftest.py starts one) changes how processes start, not what they measure: a
    configuration launched through it and the same launched fresh give the same rows and tokens."""
    from llmcomm.measure.forkserver import ENV

    if not os.environ.get(ENV):
        pytest.skip("no fork server in this session")
    w = Workload(2, 5, 3)
    forked = measure(TINY, Layout(2), w, out_dir=tmp_path / "forked")
    fresh = measure(TINY, Layout(2), w, out_dir=tmp_path / "fresh", env={ENV: ""})
    assert sorted(p.name for p in (tmp_path / "forked").glob("rank*.forked")) == ["rank0.forked", "rank1.forked"]
    assert (tmp_path / "forked" / "launcher.exit.json").exists()              # the launcher was forked too
    assert not list((tmp_path / "fresh").glob("rank*.forked"))
    assert forked.rows == fresh.rows and forked.tokens == fresh.tokens == fresh.reference_tokens
    assert forked.provenance["comm"] == fresh.provenance["comm"]


def _server_pid(socket_path: str) -> int:
    """The fork server of ``socket_path`` (its forked children carry the same command line; the server is ours)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError):
            if socket_path.encode() in (proc / "cmdline").read_bytes() and \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                return int(proc.name)
    raise AssertionError("fork server not found")


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_nothing_a_fork_server_started_outlives_it(tmp_path, how):
    """A fork server that stops (SIGTERM from :func:`running`, or its requester gone) kills what it forked, process
    group included, and reaps it: the requester reads SIGKILL. One killed outright (SIGKILL) takes its children with
    it (``PR_SET_PDEATHSIG``), and a requester still polling gets a status instead of waiting forever for an exit
    file no server will write."""
    import signal

    from llmcomm.measure.forkserver import ENV as FORK_SERVER, UNKNOWN_EXIT, running, spawn

    env = {k: v for k, v in os.environ.items() if k != FORK_SERVER}
    env["DS_ACCELERATOR"] = "cpu"
    with running(env) as server:
        assert server is not None
        proc = spawn("timeit", ["-n", "1", "import time; time.sleep(300)"], env, tmp_path, tmp_path / "sleep.log",
                     tmp_path / "sleep.exit.json", setsid=True)
        assert proc is not None and proc.poll() is None
        if how == "killed":
            os.kill(_server_pid(server), signal.SIGKILL)
    assert proc.wait(timeout=15) == (-signal.SIGKILL if how == "stopped" else UNKNOWN_EXIT)
    assert _state(proc.pid) == "Z"                     # gone (or a zombie waiting for init to reap it)
