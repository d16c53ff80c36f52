"""Session-wide test plumbing.

* ``slow`` marks a test that starts DeepSpeed ranks or loads DeepSpeed's JIT op (seconds each). ``make test-fast``
  runs the others (``-m "not slow"``); a test that is not marked ``slow`` and still tries to start ranks fails at once,
  so the fast suite can never silently turn slow.
* One run cache for the whole pytest run (:mod:`llmcomm.measure.cache`): ``$LLMCOMM_RUN_CACHE`` points at a fresh
  folder, so a configuration measured by a unit test is not launched again when nbval re-executes the chapter that
  measures it (the chapters' kernels inherit the environment). The folder is removed at the end; a cache the caller
  set already is used as it is.
* One fork server for the whole pytest run on CPU (:mod:`llmcomm.measure.forkserver`), when a selected test may start
  ranks: launches start DeepSpeed's launcher and the ranks from a process that imported torch, transformers and
  DeepSpeed once, so a launch costs seconds; ``LLMCOMM_FORK_SERVER=`` (empty) turns it off.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from llmcomm.measure.cache import ENV as RUN_CACHE
from llmcomm.measure.forkserver import running


def pytest_configure(config):
    if not os.environ.get(RUN_CACHE):
        os.environ[RUN_CACHE] = config._llmcomm_run_cache = tempfile.mkdtemp(prefix="llmcomm-run-cache-")


def pytest_collection_finish(session):
    """The fork server only when something selected may start ranks (a slow test, a chapter): it takes seconds to
    import what it preloads, which the fast suite does not need."""
    if any(item.get_closest_marker("slow") is not None or str(item.fspath).endswith(".ipynb")
           for item in session.items):
        session.config._llmcomm_fork_server = running()
        session.config._llmcomm_fork_server.__enter__()


def pytest_unconfigure(config):
    server = getattr(config, "_llmcomm_fork_server", None)
    if server is not None:
        server.__exit__(None, None, None)
    folder = getattr(config, "_llmcomm_run_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(RUN_CACHE, None)


@pytest.fixture(autouse=True)
def _no_ranks_unless_slow(request, monkeypatch):
    """Tests not marked ``slow`` may not start ranks: the one place that starts a launcher process refuses."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from llmcomm.measure import supervise

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts DeepSpeed ranks: mark it @pytest.mark.slow")

    monkeypatch.setattr(supervise, "_start_launcher", refuse)
