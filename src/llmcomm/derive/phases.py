"""The one phase convention of the project, and the one order of phases.

Generating G tokens for b sequences with S-token prompts is **one prefill** forward over the S prompt tokens (it
yields token 1) plus **G − 1 decode** forwards of one token each (reusing the KV cache). Anything that happens once
at start-up (sharding, RNG-state broadcast) is **setup**, reported apart from both. A disaggregated layout
(:mod:`llmcomm.derive.disagg`) has one more phase between the two: the **kv_transfer** of the KV cache from the
prefill ranks to the decode ranks.
"""
from __future__ import annotations

import sympy as sp

from ..notation import G, S

__all__ = ["SETUP", "PHASES", "ALL_PHASES", "KV_TRANSFER", "forwards", "order"]

SETUP = "setup"
#: the phases of generating tokens, in order
PHASES = ("prefill", "decode")
#: every phase a measurement reports, in the order every table and row list uses
ALL_PHASES = (SETUP, *PHASES)
#: the phase of a disaggregated layout's KV hand-off, and where it sorts (after the prefill, before the decode)
KV_TRANSFER = "kv_transfer"
_ORDER = (SETUP, "prefill", KV_TRANSFER, "decode")


def forwards(phase: str) -> tuple[sp.Expr, sp.Expr]:
    """(tokens ``s`` one forward carries per sequence, number of forwards) of ``phase``: prefill (S, 1), decode
    (1, G − 1)."""
    if phase == "prefill":
        return S, sp.Integer(1)
    if phase == "decode":
        return sp.Integer(1), G - 1
    raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")


def order(phase: str) -> tuple[int, str]:
    """Sort key: setup, prefill, kv_transfer, decode, then any other phase by name."""
    return (_ORDER.index(phase), "") if phase in _ORDER else (len(_ORDER), phase)
