"""The nbval sanitisers (tests/nbval_sanitize.cfg) parse the way nbval reads them and do what they say."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

CFG = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


def _patterns():
    # nbval's own parser: a `regex:` line immediately followed by a `replace:` line.
    from nbval.plugin import get_sanitize_patterns
    return get_sanitize_patterns(CFG.read_text(encoding="utf-8"))


def _sanitize(text: str) -> str:
    for regex, replace in _patterns():
        text = re.sub(regex, replace, text)
    return text


def test_every_section_is_read():
    sections = re.findall(r"^\[[^\]]+\]$", CFG.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(_patterns()) == len(sections), "a section's regex:/replace: lines are not adjacent"
    for regex, _ in _patterns():
        re.compile(regex)


@pytest.mark.parametrize("a, b", [
    ("<Foo object at 0x7f3a2b1c4d50>", "<Foo object at 0x55d0c0ffee00>"),
    ("TTFT 12.3 ms, TPOT 4.56 ms", "TTFT 9.87 ms, TPOT 3.21 ms"),
    ("took 1.2e-05 s", "took 3.4e-06 s"),
    ("busbw 1.23 GB/s", "busbw 4.56 GB/s"),
    ("run on 2026-11-26T05:01:02Z", "run on 2027-01-02T10:11:12Z"),
    ("wrote /tmp/tmpab12cd/rank0.json", "wrote /tmp/tmpzz99yy/rank0.json"),
    ("hostname: ci-runner-7", "hostname: laptop"),
    ("pid 12345 done", "pid 678 done"),
])
def test_run_dependent_text_is_equal_after_sanitising(a, b):
    assert _sanitize(a) == _sanitize(b)


@pytest.mark.parametrize("a, b", [
    ("all_reduce bytes 1048576", "all_reduce bytes 2097152"),
    ("calls: 32", "calls: 33"),
    ("t=2 p=2 b=1 S=16 G=4", "t=4 p=2 b=1 S=16 G=4"),
])
def test_results_are_not_sanitised_away(a, b):
    assert _sanitize(a) != _sanitize(b)
