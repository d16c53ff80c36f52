"""Mixtures of experts: the expert capacity, the all-to-all of expert parallelism, dropless routing — closed forms
(sympy, in the notation of :mod:`llmcomm.notation`) and the numbers DeepSpeed computes.

The messages themselves are message patterns (:mod:`llmcomm.derive.patterns`: ``deepspeed-ep``,
``deepspeed-ep-dropless``, ``deepspeed-moe-autotp``, ``tp-experts``), so closed forms per phase
(:func:`llmcomm.derive.volumes.volumes`), rows and traffic (:mod:`llmcomm.derive.evaluate`) come from the one
machinery. This module adds what a pattern leaves as the symbol C, the capacity:

* **capacity routing** (DeepSpeed's ``deepspeed.moe.sharded_moe._capacity``, ``drop_tokens=True``): every expert
  gets C = max(⌈(T/E)·γk⌉, C_min) slots on every EP rank, T = b·s/e the tokens of that rank's own sequences. The
  exact-rational form is :data:`CAPACITY`; DeepSpeed computes it in float32 (T/E and γk each rounded, then their
  product), which can give one slot more — with a capacity factor that is not a dyadic fraction (1.2, 1.1, …), or
  with E not a power of two — :func:`capacity` reproduces the float32 arithmetic.
* **dropless routing** (``drop_tokens=False``): C is the largest per-expert count over the experts and the EP ranks
  (one ``all_reduce`` MAX of an int64 scalar per MoE layer agrees on it): :func:`dropless_capacity` of the counts
  κ, the bounds :data:`DROPLESS_BOUNDS`, and the expectation under uniform routing :func:`expected_max_count`.

The all-to-all size m (nccl-tests: the bytes one rank sends in total, its own chunk included — the conventions of
:mod:`llmcomm.derive.conventions`) is the whole [E, C, h] buffer DeepSpeed passes to ``all_to_all_single``:
m = E·C·h·w, of which each peer receives E/e·C·h·w and (e−1)/e·m leaves the rank. The capture records exactly this
(the input tensor of ``all_to_all_single``, :mod:`llmcomm.measure.capture`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import sympy as sp

from ..deployment import ROUTING_MODES, Routing, pattern_of
from ..notation import C, C_min, E, L_moe, b, e, gamma, h, k, s, w
from ..spec import SpecError

__all__ = ["ROUTING_MODES", "Routing", "T_RANK", "CAPACITY", "A2A_BYTES", "DROPLESS_BOUNDS", "capacity", "skew_capacity",
           "dropless_capacity", "dropless_bounds", "expected_max_count", "rank_batch", "forward_capacity",
           "ep_forms", "moe_summary"]

#: Tokens one EP rank routes in one forward: its b/e sequences × s tokens.
T_RANK = b * s / e
#: DeepSpeed's capacity, exact rational form: C = max(⌈(T/E)·γk⌉, C_min) with T = b·s/e (float32 aside: :func:`capacity`).
CAPACITY = sp.Max(sp.ceiling(T_RANK * gamma * k / E), C_min)
#: m of one dispatch or combine all-to-all: the [E, C, h] buffer in the model dtype.
A2A_BYTES = E * C * h * w
#: Dropless C lies between the balanced count ⌈T·k/E⌉ (the mean over experts, rounded up) and T (a token goes to an
#: expert at most once).
DROPLESS_BOUNDS = (sp.ceiling(T_RANK * k / E), T_RANK)


def capacity(T: int, E: int, k: int, cf: float = 1.0, min_cap: int = 4) -> int:
    """DeepSpeed's capacity for ``T`` tokens on a rank, ``E`` experts, top-``k``, capacity factor ``cf``, exactly as
    ``_capacity`` computes it: ``ceil((T / E) * tensor(cf * k))`` in float32 — the quotient T/E (a Python float) is
    rounded to float32, multiplied by float32(cf·k) in float32 — then at least ``min_cap``. (Both roundings
    matter: with E = 7, T = 114, k = 7, cf = 0.5 DeepSpeed gives 58 where the exact form gives 57; multiplying in
    float64 instead, ``ceil(T / E * float32(cf·k))``, gives 30 where DeepSpeed gives 29 for T = 58.)"""
    prod = np.float32(T / E) * np.float32(cf * k)
    return max(int(np.ceil(prod)), int(min_cap))


def dropless_capacity(counts) -> int:
    """Dropless C from the per-expert counts κ: the largest over the experts and the EP ranks. ``counts``: one
    rank's counts (E values) or one row per rank (e × E), as DeepSpeed's ``exp_counts`` before the MAX all-reduce."""
    arr = np.asarray(counts)
    if arr.size == 0 or (arr < 0).any():
        raise SpecError("dropless counts must be a non-empty list of non-negative integers")
    return int(arr.max())


def dropless_bounds(T: int, E: int, k: int) -> tuple[int, int]:
    """(lowest, highest) dropless C for ``T`` tokens per rank: ⌈T·k/E⌉ (perfectly balanced) and T (every token of a
    rank sends one of its routes to the same expert)."""
    return -(-T * k // E), T


def _binom_cdf(c: np.ndarray, T: int, q: float) -> np.ndarray:
    from scipy.stats import binom

    return binom.cdf(c, T, q)


@lru_cache(maxsize=256)
def _rank_max_cdf_exact(T: int, E: int, k: int, max_states: int) -> tuple[float, ...] | None:
    """P(max_j κ_j ≤ c) for c = 0 … T on one rank whose T tokens each pick a uniform k-subset of the E experts, by
    dynamic programming over the sorted count vectors (None when there are more than ``max_states`` of them, or
    more than ``max_states`` k-subsets to step through).

    A token's k-subset only matters through how many experts it takes from each run of equal counts of the sorted
    vector (which ones within a run is symmetric): a step enumerates those splits (k_1 … k_r of runs g_1 … g_r),
    each with weight Π C(g_i, k_i) / C(E, k), instead of all C(E, k) subsets — the same sum, grouped."""
    n_subsets = math.comb(E, k)
    if n_subsets > max_states:
        return None
    states = {(0,) * E: 1.0}
    for _ in range(T):
        nxt: dict[tuple, float] = {}
        for st, pr in states.items():
            runs = []                                  # (start, length) of each run of equal counts
            for j, v in enumerate(st):
                if j and v == st[j - 1]:
                    runs[-1][1] += 1
                else:
                    runs.append([j, 1])
            for split, ways in _splits(tuple(g for _, g in runs), k):
                lst = list(st)
                for (start, _), take in zip(runs, split):
                    for j in range(start, start + take):   # the first ones of a run: stays sorted after +1
                        lst[j] += 1
                key = tuple(sorted(lst, reverse=True))
                nxt[key] = nxt.get(key, 0.0) + pr * ways / n_subsets
            if len(nxt) > max_states:                  # give up as soon as it is too many
                return None
        states = nxt
    cdf = np.zeros(T + 1)
    for st, pr in states.items():
        cdf[st[0]:] += pr
    return tuple(np.minimum(cdf, 1.0))


@lru_cache(maxsize=None)
def _splits(lengths: tuple[int, ...], k: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Every (k_1, …, k_r) with 0 ≤ k_i ≤ g_i and Σ k_i = k over runs of lengths (g_1, …, g_r), with Π C(g_i, k_i)."""
    if not lengths:
        return (((), 1),) if k == 0 else ()
    g = lengths[0]
    return tuple(((take, *rest), math.comb(g, take) * ways)
                 for take in range(min(g, k) + 1) for rest, ways in _splits(lengths[1:], k - take))


def expected_max_count(T: int, E: int, k: int, ranks: int = 1, exact: bool | None = None,
                       max_states: int = 20000) -> tuple[float, str]:
    """E[dropless C] under uniform routing: each of the ``T`` tokens of each of ``ranks`` EP ranks picks a uniformly
    random set of ``k`` of the ``E`` experts (independently), C = the largest count over experts and ranks.
    Returns ``(value, method)``:

    * ``"exact"`` — dynamic programming over the sorted count vector of one rank (exact up to float rounding),
      then P(C ≤ c) = P(one rank's max ≤ c)^ranks; used when it has at most ``max_states`` states (small T and E);
    * ``"independent-binomial"`` — an approximation: the E·ranks counts taken as independent Binomial(T, k/E).
      The true counts of a rank are negatively associated (they sum to T·k), so P(max ≤ c) ≤ Π P(κ_j ≤ c): the
      approximation is a **lower bound** of the exact expectation.

    E[C] = Σ_{c=0}^{T−1} (1 − P(C ≤ c)). ``exact``: force one method (True may be slow; False skips the DP)."""
    if T < 1 or E < 1 or not 1 <= k <= E or ranks < 1:
        raise SpecError(f"expected_max_count needs T ≥ 1, 1 ≤ k ≤ E and ranks ≥ 1 (got T={T}, E={E}, k={k}, "
                        f"ranks={ranks})")
    cdf = None
    if exact is not False:
        cdf = _rank_max_cdf_exact(T, E, k, max_states if exact is None else 10 ** 12)
    if cdf is not None:
        p_le = np.asarray(cdf) ** ranks
        method = "exact"
    else:
        c = np.arange(T + 1)
        p_le = _binom_cdf(c, T, k / E) ** (E * ranks)
        method = "independent-binomial"
    return float(np.sum(1.0 - p_le[:T])), method


def rank_batch(b_: int, e_: int) -> int:
    """Sequences one EP rank runs attention on: b/e (data-parallel attention; e must divide b)."""
    if b_ % e_:
        raise SpecError(f"e={e_} does not divide the batch b={b_}: with data-parallel attention every EP rank "
                        f"runs b/e whole sequences")
    return b_ // e_


def skew_capacity(T: int, E_: int, k_: int, phi: float) -> int:
    """Dropless C when the busiest expert receives a share ``phi`` of a rank's ``T`` tokens (each token routed to
    ``k_`` distinct experts): ⌈φ·T⌉, at least the balanced ⌈T·k/E⌉ and at most T — the largest count of a count
    vector κ, i.e. :func:`dropless_capacity`."""
    if not 0 < phi <= 1:
        raise ValueError(f"share phi={phi!r} must be in (0, 1]")
    return min(T, max(math.ceil(round(phi * T, 9)), math.ceil(round(T * k_ / E_, 9))))


def forward_capacity(routing: Routing, E_: int, k_: int, b_: int, s_: int, e_: int) -> float:
    """The C of one forward over ``s_`` tokens per sequence with b/e sequences per EP rank: DeepSpeed's float32
    capacity (capacity routing), the dropless C of a router with skew φ (:func:`skew_capacity`), or the
    uniform-routing expectation of the dropless C (a float: an expectation)."""
    T = rank_batch(b_, e_) * s_
    if routing.mode == "capacity":
        return capacity(T, E_, k_, routing.capacity_factor, routing.min_capacity)
    if routing.skew is not None:
        return skew_capacity(T, E_, k_, routing.skew)
    return expected_max_count(T, E_, k_, e_)[0]


def ep_forms(mode: str = "capacity", counts: Sequence | None = None, per_layer: bool = False) -> dict:
    """Closed forms of one forward of expert parallelism: ``{(op, group): (calls, bytes)}`` of the pattern
    (:func:`llmcomm.derive.volumes.per_forward`), with C replaced by :data:`CAPACITY` (capacity routing) or, for
    dropless routing, by the largest of ``counts`` (κ values of every rank and expert, numbers or symbols) when
    given, else left as C. ``per_layer``: one MoE layer (L_moe = 1) — dropless C differs from layer to layer, so a
    forward's bytes are the sum of the per-layer forms over its MoE layers."""
    from .volumes import per_forward, tidy

    forms = per_forward(pattern_of("ep", routing=mode))
    if per_layer:
        forms = {key: (calls.subs(L_moe, 1), nbytes.subs(L_moe, 1)) for key, (calls, nbytes) in forms.items()}
    if mode == "capacity":
        value = CAPACITY
    elif counts is not None:
        value = sp.Max(*[sp.sympify(x) for x in np.asarray(counts, dtype=object).ravel()])
    else:
        return forms
    return {key: (calls, tidy(nbytes.subs(C, value))) for key, (calls, nbytes) in forms.items()}


def moe_summary(model, layout, workload, routing: Routing | None = None) -> dict | None:
    """What a MoE model's rows rest on, per phase (None for a dense model): ``{"E", "k", "L_moe", "layout",
    "routing", "phases": {phase: {...}}}``. With expert parallelism each phase gives T (tokens per EP rank), C and,
    for dropless routing, the bounds and how the expectation was computed; without it, the TP layout's expert
    placement (``replicated``: AutoTP; ``sharded``: tp-experts)."""
    from .phases import PHASES, forwards

    if not model.is_moe:
        return None
    routing = routing or Routing()
    out = {"E": model.E, "k": model.moe.top_k, "L_moe": model.L_moe, "e": layout.e}
    if layout.e == 1:
        return out
    out["routing"] = {"mode": routing.mode, "capacity_factor": routing.capacity_factor,
                      "min_capacity": routing.min_capacity}
    out["phases"] = {}
    for phase in PHASES:
        tokens, _ = forwards(phase)
        s_ = int(tokens.subs({sym: getattr(workload, sym.name) for sym in tokens.free_symbols}))
        T = rank_batch(workload.b, layout.e) * s_
        row = {"tokens_per_rank": T}
        if routing.mode == "capacity":
            row["capacity"] = capacity(T, model.E, model.moe.top_k, routing.capacity_factor, routing.min_capacity)
        else:
            value, method = expected_max_count(T, model.E, model.moe.top_k, layout.e)
            row.update(capacity_expected=value, method=method,
                       capacity_bounds=dropless_bounds(T, model.E, model.moe.top_k))
        out["phases"][phase] = row
    return out
