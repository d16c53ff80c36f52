"""Session-wide test plumbing.

* ``slow`` marks a test that starts DeepSpeed ranks or loads DeepSpeed's JIT op (seconds each). ``make test-fast``
  runs the others (``-m "not slow"``); a test that is not marked ``slow`` and still tries to start ranks fails at once,
  so the fast suite can never silently turn slow.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ranks_unless_slow(request, monkeypatch):
    """Tests not marked ``slow`` may not start ranks: the one place that starts a launcher process refuses."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from llmcomm.measure import supervise

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts DeepSpeed ranks: mark it @pytest.mark.slow")

    monkeypatch.setattr(supervise, "_start_launcher", refuse)
