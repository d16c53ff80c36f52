"""The run cache: a measured configuration kept for reuse by later calls that ask for exactly the same run.

``make test`` sets ``$LLMCOMM_RUN_CACHE`` to a folder of its own for one pytest session (``tests/conftest.py``), so
that the unit tests and nbval's re-execution of the chapters share their launches: a chapter that measures what a
test measured before gets that result instead of starting the same ranks again. Without the variable nothing is
cached.

A result is found only under the key of everything that decides what the ranks do and what the result says: the
model (name and ``config.json``), the layout, the launch options, the configuration's own options (routing, p2p
mode), the workload, the backend, the seed, whether tokens are checked and calls synchronised, the rank entry — and
the code: a hash of every file of the ``llmcomm`` package and the versions of Python, torch, DeepSpeed and
transformers (:func:`code_hash`). A stale result is therefore impossible: any change to the code or the stack is a
new key. Runs that must really start (a test's fault injection through ``LLMCOMM_TEST_*``, an explicit environment,
a kept run folder, several nodes) bypass the cache (:func:`llmcomm.measure.launch.measure_many` decides).

One file per configuration, ``<key>.json`` = :meth:`llmcomm.measure.results.MeasureResult.to_record`, written
atomically. Concurrent callers do not coordinate: two of them may both run a configuration, the later write wins
(both results are valid).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from llmcomm.measure.results import MeasureResult
from llmcomm.record import write_json

__all__ = ["ENV", "RunCache", "code_hash"]

#: the environment variable that names the cache folder
ENV = "LLMCOMM_RUN_CACHE"


@lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 of every ``.py`` and ``.json`` file of the installed ``llmcomm`` package (path and content) and of the
    versions of Python, torch, DeepSpeed and transformers."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    versions = [sys.version]
    for name in ("torch", "deepspeed", "transformers"):
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=None")
    h.update("\n".join(versions).encode())
    return h.hexdigest()


class RunCache:
    """Results by key in one folder (see the module docs)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def from_env(cls) -> "RunCache | None":
        """The cache ``$LLMCOMM_RUN_CACHE`` names, or None."""
        root = os.environ.get(ENV)
        return cls(root) if root else None

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        """The key of one configuration: ``parts`` (every input of the run, JSON-able) and :func:`code_hash`."""
        text = json.dumps({"run": parts, "code": code_hash()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> MeasureResult | None:
        try:
            record = json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return MeasureResult.from_record(record)

    def put(self, key: str, result: MeasureResult) -> None:
        write_json(self.root / f"{key}.json", result.to_record())
