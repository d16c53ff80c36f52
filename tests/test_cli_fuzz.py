"""The command line under fire: thousands of generated argument vectors against every subcommand.

Each must end with exit status 0, 1 or 2, never a traceback, one line on stderr for a bad input (status 2), and
nothing written outside the folder the vector names for output (``--out``, or ``--write`` for ``calibrate``). Runs
are not started: the launcher is replaced by one that fails as a dead rank would (status 1), and the compute timing
of ``calibrate --compute`` by canned numbers — what is under test is the command line's handling, not DeepSpeed.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llmcomm.cli import main
from support import synthetic_cpu_timings

CPU_TIMINGS = synthetic_cpu_timings()

EXAMPLES = 2000
#: the fuzz's own time limit on the 2-core development machine (the issue's target), asserted
TIME_LIMIT_S = 60

MODELS = ["tiny-llama", "llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "tiny-mixtral", "mixtral-8x7b",
          "qwen3-30b-a3b", "no-such-model", "", "cfg.json", "bad.json", "folder", "/dev/null"]
INTS = ["1", "2", "3", "4", "8", "16", "0", "-1", "1.5", "abc", "", "999999", "64"]
FLOATS = ["1", "0.5", "1.25", "0", "-3", "nan", "inf", "x"]
HW = ["h100-sxm", "cpu-local", "a100-sxm-80gb", "h200", "no-such-gpu", "hw.json", "bad.json"]
SIZES = ["4", "64K", "1M", "12Q", "0", "-4", "1.5M", ""]
OPS = ["all_reduce", "all_gather", "broadcast", "send_recv", "allredcue", "gather", "all_to_all", ""]
#: folders a command may write to: the sandbox's OUT (removed after each vector), one that cannot be created, a file
WRITE_DIRS = ["OUT", "/proc/nope", "/dev/null/x", "cfg.json"]

COMMON = {"--model": MODELS, "--tp": INTS, "--pp": INTS, "--batch": INTS, "--prompt": INTS, "--generate": INTS,
          "--dtype": ["fp32", "bf16", "fp16", "int8"], "--p2p": ["partitioned", "full", "ring"]}
MOE = {"--ep": INTS, "--moe-routing": ["capacity", "dropless", "random"], "--capacity-factor": FLOATS,
       "--min-capacity": INTS}
OPTIONS = {
    "predict": {**COMMON, **MOE, "--engine": ["deepspeed", "vllm", "tp-experts", "megatron"], "--hardware": HW,
                "--gpus-per-node": INTS, "--host-profile": ["vllm-v0", "deepspeed-cpu", "nope", "hw.json"],
                "--algorithm": ["ring", "direct", "shm", "tree"], "--json": None},
    "measure": {**COMMON, **MOE, "--engine": ["deepspeed", "tp-experts", "vllm"], "--timeout": FLOATS,
                "--startup-timeout": FLOATS, "--out": WRITE_DIRS, "--resume": None,
                "--backend": ["auto", "gloo", "nccl", "mpi"], "--hostfile": ["hosts", "badhosts", "missing-hosts"],
                "--json": None},
    "cost": {"--hardware": HW, "--model": MODELS, "--tp": INTS, "--tokens": INTS, "--context": INTS,
             "--dtype": ["bf16", "fp32", "x"], "--engine": ["deepspeed", "tp-experts", "vllm"],
             "--collective": OPS, "--ranks": INTS, "--gpus-per-node": INTS, "--bytes": SIZES, "--json": None},
    "advise": {"--model": MODELS, "--gpus": INTS, **{k: v for k, v in MOE.items() if k != "--ep"},
               "--gpus-per-node": INTS, "--hardware": HW, "--prompt": INTS,
               "--generate": INTS, "--batch": INTS, "--dtype": ["bf16", "fp32", "x"],
               "--objective": ["ttft", "tpot", "e2e", "link_bytes", "bytes", "speed"],
               "--engine": ["deepspeed", "vllm", "x"], "--json": None},
    "bench-collectives": {"--ops": OPS, "--sizes": SIZES, "--min-bytes": SIZES, "--max-bytes": SIZES,
                          "--ranks": INTS, "--backend": ["shm", "gloo", "nccl", "mpi"], "--out": WRITE_DIRS,
                          "--machine": ["m", ""], "--dtype": ["fp32", "bf16", "float32"], "--warmup": INTS,
                          "--min-reps": INTS, "--max-reps": INTS, "--point-seconds": FLOATS,
                          "--sample-seconds": FLOATS, "--timeout": FLOATS, "--append": None, "--no-progress": None},
    "calibrate": {"--csv": ["coll.csv", "bad.csv", "missing.csv", "folder"],
                  "--write": ["OUT/preset.json", "/proc/nope/p.json", "/dev/null/p.json"], "--compute": None,
                  "--threads": INTS, "--json": None, "--in-run": None, "--reps": INTS, "--public-gpu": None},
    "validate-time": {"--hardware": HW, "--runs": INTS, "--reps": INTS, "--out": WRITE_DIRS,
                      "--reuse-calibration": None},
}
NARGS = {"--ops", "--sizes", "--ranks", "--backend", "--threads", "--tokens", "--bytes", "--batch", "--prompt",
         "--generate", "--dtype"}
OPTIONAL_VALUE = {"--write"}           # a flag that may stand without its value


@st.composite
def argvs(draw):
    cmd = draw(st.sampled_from([*OPTIONS, "nope", "--help", ""]))
    if cmd not in OPTIONS:
        return [cmd] if cmd else []
    opts = OPTIONS[cmd]
    argv = [cmd]
    for flag in draw(st.lists(st.sampled_from([*opts, "--unknown"]), max_size=7)):
        argv.append(flag)
        values = opts.get(flag)
        if values is None:
            continue
        count = draw(st.integers(1, 3)) if flag in NARGS else draw(st.sampled_from([1, 1, 1, 1, 0])) \
            if flag not in OPTIONAL_VALUE else draw(st.sampled_from([0, 1, 1]))
        argv += [draw(st.sampled_from(values)) for _ in range(count)]
    return argv


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working folder with the files the vectors name: configs, hardware, hostfiles, CSVs."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "cfg.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
                                   '"num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}')
    (root / "bad.json").write_text("{not json")
    (root / "folder").mkdir()
    (root / "hw.json").write_text('{"name": "hw", "memory_gib": 80, "mem_bw_GBps": 2000, "peak_tflops": {"bf16": 300},'
                                  ' "links": {"intra": {"bw_GBps": 100, "alpha_us": 3}}}')
    (root / "hosts").write_text("node1 slots=2\nnode2 slots=2\n")
    (root / "badhosts").write_text("node1 2\n")
    rows = ["backend,op,group_size,bytes,time_s"] + [f"gloo,all_reduce,2,{4 << k},{1e-4 + (4 << k) * 1e-9}"
                                                      for k in range(12)]
    rows += [f"shm,all_reduce,2,{4 << k},{1e-5 + (4 << k) * 5e-10}" for k in range(12)]
    (root / "coll.csv").write_text("\n".join(rows) + "\n")
    (root / "bad.csv").write_text("a,b\n1\n")
    return root


@pytest.fixture(scope="module")
def no_runs(sandbox):
    """Launches fail as a dead rank would; compute timing returns canned numbers; calibrations are read from and
    written to a copy of the repository's (``OUTcal``, outside the comparison of the sandbox's files)."""
    import shutil

    from llmcomm.compare import calibration
    from llmcomm.measure import bench, forkserver, launch, supervise
    from llmcomm.predict.hardware import CALIBRATION_ENV, calibration_path

    def dead(entry, spec, nranks, out, **kw):
        raise launch.RunError(f"{entry} with {nranks} ranks: rank 1 exited with status 3 (fuzz)", rank=1)

    canned = {"threads": 1, "peak_flops_fp32": 5e10, "peak_flops_bf16": None, "mem_bw_Bps": 1e10,
              "layer_prefill_s": 0.05, "layer_decode_s": 0.002,
              "shape": {"h": 512, "heads": 8, "kv_heads": 8, "ffn": 1376, "S": 128}, "raw_times_s": {}}
    mp = pytest.MonkeyPatch()
    shutil.copytree(calibration_path("cpu-local").parent, sandbox / "OUTcal")
    mp.setenv(CALIBRATION_ENV, str(sandbox / "OUTcal"))
    mp.setenv("LLMCOMM_DATA", str(sandbox / "OUTdata"))      # results a command writes by default (bench --machine)
    mp.setattr(launch, "launch_ranks", dead)
    mp.setattr(supervise, "launch_ranks", dead)
    mp.setattr(bench, "launch_ranks", dead)
    mp.setattr(calibration, "time_compute", lambda threads=1, **kw: dict(canned, threads=threads))
    mp.setattr(calibration, "time_cpu_kernels", lambda threads=1, **kw: dict(CPU_TIMINGS, threads=threads))
    mp.setattr(forkserver, "running", contextlib.nullcontext)          # validate-time's calibration: no server
    # the public-GPU fits take minutes: their command line is under test, not the fits
    import pandas as pd

    table = pd.DataFrame({"validation": ["lomo", "logo"], "median_abs_err": [0.1, 0.2]})
    mp.setattr(calibration, "calibrate_public_gpu", lambda command, log=None: {"kernels": table,
                                                                                 "collectives": table})
    yield
    mp.undo()


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cli_fuzz(sandbox, no_runs):
    before = {k: v for k, v in _tree(sandbox).items() if not k.startswith("OUT")}
    repo_data = _tree(Path(__file__).resolve().parents[1] / "data")
    seen = {"status": set(), "count": 0, "commands": set()}
    t0 = time.monotonic()
    cwd = os.getcwd()
    os.chdir(sandbox)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(argvs())
    def one(argv):
        out_dir = sandbox / "OUT"
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(list(argv))
        lines = [ln for ln in re.split(r"[\r\n]", err.getvalue()) if ln.strip() and "%|" not in ln]  # no bars
        text = "\n".join(lines)
        assert status in (0, 1, 2), (argv, status, text)
        assert "Traceback" not in text, (argv, text)
        if status == 2:
            assert len(text.strip().splitlines()) == 1, (argv, text)
            assert text.startswith("llmcomm: error: "), (argv, text)
        if status == 1:                       # progress lines may come first; the failure is one line naming the rank
            failed = [ln for ln in text.splitlines() if ln.startswith("llmcomm: run failed: ")]
            assert failed and "rank 1" in failed[0], (argv, text)
        after = {k: v for k, v in _tree(sandbox).items() if not k.startswith("OUT")}
        assert after == before, (argv, set(after) ^ set(before))
        assert _tree(Path(__file__).resolve().parents[1] / "data") == repo_data, argv    # the repository's data
        seen["status"].add(status)
        seen["count"] += 1
        if argv and argv[0] in OPTIONS:
            seen["commands"].add(argv[0])
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)

    try:
        one()
    finally:
        os.chdir(cwd)
    elapsed = time.monotonic() - t0
    assert seen["count"] >= EXAMPLES, seen["count"]
    assert seen["status"] == {0, 1, 2}, seen["status"]           # the vocabulary reaches every outcome
    assert seen["commands"] == set(OPTIONS), seen["commands"]    # every subcommand ran to an outcome
    print(f"\nCLI fuzz: {seen['count']} argument vectors in {elapsed:.1f} s")
    assert elapsed < TIME_LIMIT_S, f"{seen['count']} vectors took {elapsed:.0f} s, over {TIME_LIMIT_S} s"
