"""Results with provenance — the one place that writes and reads them.

* :func:`provenance` — where and how a result was made: machine, CPU/GPU, library versions, command, UTC date, git
  commit (``+dirty`` when the tree had uncommitted changes);
* :func:`atomic_write_text`, :func:`write_json` — every file the project writes goes through a temporary file in the
  same folder and ``os.replace``: an interrupted run never leaves a half-written or corrupted result, and an earlier
  result stays until a complete new one replaces it;
* :func:`save_frame` / :func:`load_frame` — ``data/<machine>/<name>.csv`` beside its sidecar ``<name>.json``;
  :func:`save_json` / :func:`load_json` — a JSON result with its provenance inside (benchmarks, calibrations).

One sidecar schema (:func:`write_frame`, :func:`read_sidecar`) for every table the project writes — the chapters'
sweeps, the microbenchmark's ``collectives.csv``, the validation runs, the GPU fits' error tables::

    {"provenance": provenance(...),        # where and how the table was made
     "rows": int, "columns": [str, ...],   # what the CSV holds
     ...}                                  # what else the writer records (a summary, a configuration, a source)
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = ["git_commit", "load_average", "machine_id", "result_names", "cpu_model", "provenance", "data_dir",
           "atomic_write_text", "write_json", "write_frame", "read_sidecar", "save_frame", "load_frame", "save_json",
           "load_json", "repo_root", "writable_dir"]

_VERSIONED = ("llmcomm", "torch", "deepspeed", "transformers", "sympy", "numpy", "pandas")


def repo_root() -> Path:
    """The checkout holding this package (``src/llmcomm`` → two levels up), or the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # provenance must never fail a run
        pass
    return []


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages (how quiet the machine was when a timing was taken), or None."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_id() -> str:
    """A stable label for the machine kind: ``$LLMCOMM_MACHINE``, else e.g. ``h100-80gb-hbm3-x8`` or ``cpu-local``
    (the CPU you run on; its calibration is the ``cpu-local`` hardware preset; provenance names the exact CPU)."""
    if os.environ.get("LLMCOMM_MACHINE"):
        return os.environ["LLMCOMM_MACHINE"]
    gpus = _gpus()
    if gpus:
        slug = re.sub(r"[^a-z0-9]+", "-", gpus[0].lower().replace("nvidia", "")).strip("-")
        return f"{slug}-x{len(gpus)}"
    return "cpu-local"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10)


def _cell_sources(text: str) -> list[str] | None:
    try:
        return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in json.loads(text)["cells"]]
    except (ValueError, KeyError, TypeError):
        return None


def _only_results_changed(path: str) -> bool:
    """A change that cannot have altered how a result was made: files under ``data/`` (results themselves, the
    calibrations included), and a notebook whose cell sources equal the committed ones (re-executing a chapter
    rewrites only its outputs)."""
    if path.startswith("data/"):
        return True
    if path.endswith(".ipynb"):
        head = _git("show", f"HEAD:{path}")
        try:
            now = (repo_root() / path).read_text()
        except OSError:
            return False
        return head.returncode == 0 and _cell_sources(head.stdout) == _cell_sources(now) is not None
    return False


def git_commit() -> str | None:
    """The commit the code that runs now was checked out at, ``+dirty`` when tracked files that make results (code,
    chapters' sources, configuration) differ from it; results being written (``data/``, chapter outputs) do not count.
    None outside a git checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        status = _git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    paths = [ln[3:].split(" -> ")[-1].strip('"') for ln in status if len(ln) > 3]
    dirty = [p for p in paths if not _only_results_changed(p)]
    return head.stdout.strip() + ("+dirty" if dirty else "")


def provenance(command: str | list[str] | None = None, **extra) -> dict:
    """Where and how a result was made: machine, CPU/GPU, library versions, command, UTC date, git commit."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "machine": machine_id(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpus": _gpus(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "command": command if isinstance(command, str) or command is None else " ".join(map(str, command)),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
    }
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["driver"] = _nvidia_driver()
    except Exception:
        pass
    info.update(extra)
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def writable_dir(path: str | Path, what: str) -> Path:
    """``path`` as a folder results can be written to — created if missing — or one :class:`~llmcomm.spec.SpecError`
    naming ``what`` (checked before anything is measured, so that no run's result is lost at the end)."""
    from .spec import SpecError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".llmcomm-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise SpecError(f"{what} {str(path)!r} is not a writable folder ({e.strerror or e})") from None
    return path


def data_dir(machine: str | None = None, root: str | Path | None = None) -> Path:
    """``<root>/<machine>/``: ``root`` defaults to ``$LLMCOMM_DATA``, else ``<repo>/data``."""
    base = Path(root) if root is not None else Path(os.environ.get("LLMCOMM_DATA", repo_root() / "data"))
    return base / (machine or machine_id())


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + ("\n" if indent else ""))


def write_frame(csv_path: str | Path, df, prov: dict, float_format: str | None = None, **extra) -> Path:
    """Write ``df`` to ``csv_path`` and its sidecar (the module's schema: ``provenance`` = ``prov``, ``rows``,
    ``columns``, ``extra``) beside it, both atomically; returns the CSV path."""
    csv_path = Path(csv_path)
    csv = atomic_write_text(csv_path, df.to_csv(index=False, float_format=float_format))
    side = {"provenance": prov, "rows": len(df), "columns": list(map(str, df.columns)), **extra}
    write_json(csv_path.with_suffix(".json"), side, indent=2)
    return csv


def read_sidecar(csv_path: str | Path) -> dict:
    """The sidecar of a table (the module's schema)."""
    return json.loads(Path(csv_path).with_suffix(".json").read_text())


def save_frame(df, name: str, command: str | list[str] | None = None, machine: str | None = None,
               root: str | Path | None = None, float_format: str | None = None, **extra) -> Path:
    """Save ``df`` as ``<root>/<machine>/<name>.csv`` (root: :func:`data_dir`'s) with its sidecar ``<name>.json``
    (:func:`write_frame`; ``extra`` joins it); returns the CSV path."""
    return write_frame(data_dir(machine, root) / f"{name}.csv", df, provenance(command), float_format, **extra)


def load_frame(name: str, machine: str | None = None):
    """(DataFrame, provenance dict) of a saved result (its sidecar's ``provenance``)."""
    import pandas as pd

    path = data_dir(machine) / f"{name}.csv"
    return pd.read_csv(path), read_sidecar(path)["provenance"]


def save_json(result: dict, name: str, command: str | list[str] | None = None, machine: str | None = None,
              **extra) -> Path:
    """Save ``result`` as ``data/<machine>/<name>.json`` with its provenance under the key ``"provenance"``."""
    return write_json(data_dir(machine) / f"{name}.json", dict(result, provenance=provenance(command, **extra)),
                      indent=2)


def result_names(machine: str, suffix: str = ".json") -> list[str]:
    """Names of the results under ``data/<machine>/`` with ``suffix`` (sorted)."""
    folder = data_dir(machine)
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def load_json(name: str, machine: str | None = None) -> dict:
    """A JSON result saved by :func:`save_json` (or any JSON file under ``data/<machine>/``)."""
    return json.loads((data_dir(machine) / f"{name}.json").read_text())
