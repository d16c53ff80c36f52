"""The argparse pieces of the ``llmcomm`` command (:mod:`llmcomm.cli`) that are not commands: a parser whose errors are
one line (a :class:`~llmcomm.spec.SpecError`, exit status 2), and the number types that refuse a bad value with one
line naming it (not a number, below the bound, infinite or NaN).
"""
from __future__ import annotations

import argparse

from .spec import SpecError

__all__ = ["Parser", "positive_int", "non_negative_int", "repetitions", "positive_float"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        raise SpecError(f"{self.prog}: {message}")


def _number(kind, low: float, strict: bool, what: str, high: float = float("inf")):
    """argparse type: a finite ``kind`` (int or float) above ``low`` (``strict``) or at least ``low``; ≤ ``high``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ((v > low) if strict else (v >= low)) or v != v or v == float("inf") or v > high:
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return v
    return parse


positive_int, non_negative_int = _number(int, 1, False, "at least 1"), _number(int, 0, False, "at least 0")
repetitions = _number(int, 1, False, "between 1 and 1000", high=1000)     # of a point or of a whole sweep
positive_float = _number(float, 0, True, "a positive, finite number")
