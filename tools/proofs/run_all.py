"""Run every proof in this folder and store what it printed, with provenance, in ``data/proofs/<proof>.json``.

    python tools/proofs/run_all.py [NAME ...]        # default: all of them; ~2 minutes on 2 CPU cores

Each proof runs under DeepSpeed's launcher with the rank count it needs (CPU, ``DS_ACCELERATOR=cpu``) and a free
port; its ``PROVEN:`` / ``NOT PROVEN:`` lines, its exit status and the full output are stored. A proof that needs a
look after the ranks have exited (the shm buffers) gets it here, and its files are removed. The book's appendix
"Dependency facts" shows the stored results.
"""
from __future__ import annotations

import argparse
import glob
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmcomm.record import provenance, write_json  # noqa: E402

#: proof → ranks it needs
PROOFS = {"autotp_pattern": 2, "eval_batch_no_kv_cache": 2, "shape_trap": 2, "return_logits_last_microbatch": 2,
          "init_inference_ignores_tp_group": 2, "shm_allreduce_ignores_subgroups": 4, "shm_buffers_left_behind": 2,
          "moe_layer": 2, "per_config_options": 2, "experts_grouped_mm": 2, "disagg_unequal_tp_broadcast": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _after(name: str, port: int) -> list[str]:
    """Checks that need the ranks gone; returns extra claim lines."""
    if name != "shm_buffers_left_behind":
        return []
    left = sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"))
    for f in left:
        os.unlink(f)
    return [("PROVEN: " if left else "NOT PROVEN: ") + f"after every rank exited, {len(left)} buffers of this run "
            "were still in /dev/shm (removed now)"]


def run(name: str, timeout: float = 600) -> dict:
    port = _free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(PROOFS[name]), "--master_port",
           str(port), str(HERE / f"{name}.py")]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    # the launcher may prefix a rank's lines ("[rank0]: …"): keep each claim from its PROVEN / NOT PROVEN on
    lines = [ln[ln.index("NOT PROVEN: ") if "NOT PROVEN: " in ln else ln.index("PROVEN: "):]
             for ln in res.stdout.splitlines() if "PROVEN: " in ln]
    lines += _after(name, port)
    proven = bool(lines) and res.returncode == 0 and not any(ln.startswith("NOT") for ln in lines)
    return {"proof": f"tools/proofs/{name}.py", "ranks": PROOFS[name], "claims": lines, "all_proven": proven,
            "returncode": res.returncode, "wall_s": round(time.monotonic() - t0, 1),
            "output_tail": (res.stdout + res.stderr).splitlines()[-40:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", choices=[[]] + sorted(PROOFS), default=[])
    args = ap.parse_args(argv)
    ok = True
    for name in args.names or sorted(PROOFS):
        out = run(name)
        out["provenance"] = provenance(f"python tools/proofs/run_all.py {name}")
        write_json(ROOT / "data" / "proofs" / f"{name}.json", out, indent=1)
        ok &= out["all_proven"]
        print(f"{name}: {'all proven' if out['all_proven'] else 'NOT ALL PROVEN'} ({out['wall_s']} s)")
        for ln in out["claims"]:
            print("   ", ln)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
