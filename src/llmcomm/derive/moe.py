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

* **dropped routes** (capacity routing only): an expert keeps min(κ_j, C) of its κ_j routes — DeepSpeed's top-2
  gating by position, its top-k gating by gate value, both keep exactly C of an over-full expert's routes — so a rank
  drops Σ_j (κ_j − C)⁺ of its T·k routes. Under uniform routing κ_j ~ Binomial(T, k/E) exactly (a token's k-subset
  contains expert j with probability k/E, independently of the other tokens), so by linearity of expectation the
  expected dropped share is :data:`DROPPED_FRACTION`; :func:`dropped_fraction` evaluates it, and the same under a
  skewed router (one hot expert in a share φ of the tokens). Capacity routing *provably* drops nothing only when
  C ≥ T (an expert receives at most one route per token): :func:`lossless`.

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
from ..notation import C, C_min, E, L_moe, b, e, gamma, h, k, kappa, s, w
from ..spec import SpecError

__all__ = ["ROUTING_MODES", "Routing", "T_RANK", "CAPACITY", "A2A_BYTES", "DROPLESS_BOUNDS", "DROPPED_FRACTION",
           "capacity", "skew_capacity", "dropless_capacity", "dropless_bounds", "expected_max_count", "dropped_fraction",
           "dropped_routes", "lossless", "generation_dropped", "rank_batch", "forward_capacity", "ep_forms", "moe_summary"]

#: Tokens one EP rank routes in one forward: its b/e sequences × s tokens.
T_RANK = b * s / e
#: DeepSpeed's capacity, exact rational form: C = max(⌈(T/E)·γk⌉, C_min) with T = b·s/e (float32 aside: :func:`capacity`).
CAPACITY = sp.Max(sp.ceiling(T_RANK * gamma * k / E), C_min)
#: m of one dispatch or combine all-to-all: the [E, C, h] buffer in the model dtype.
A2A_BYTES = E * C * h * w
#: Dropless C lies between the balanced count ⌈T·k/E⌉ (the mean over experts, rounded up) and T (a token goes to an
#: expert at most once).
DROPLESS_BOUNDS = (sp.ceiling(T_RANK * k / E), T_RANK)
#: Expected share of a rank's T·k routes capacity routing drops under uniform routing (C slots per expert; each
#: expert's count κ ~ Binomial(T, k/E)): E/(T·k) · Σ_{κ=C+1}^{T} (κ − C)·P(κ).
DROPPED_FRACTION = E / (T_RANK * k) * sp.Sum((kappa - C) * sp.binomial(T_RANK, kappa) * (k / E) ** kappa
                                             * (1 - k / E) ** (T_RANK - kappa), (kappa, C + 1, T_RANK))


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


def _excess(T: int, q: float, C_: int) -> float:
    """E[(X − C)⁺] for X ~ Binomial(T, q): the routes one expert receives beyond its C slots, in expectation."""
    from scipy.stats import binom

    if C_ >= T or q <= 0:
        return 0.0
    x = np.arange(C_ + 1, T + 1)
    return float(np.sum((x - C_) * binom.pmf(x, T, min(q, 1.0))))


def dropped_fraction(T: int, E_: int, k_: int, C_: int, phi: float | None = None) -> float:
    """Expected share of one EP rank's T·k routes that capacity routing drops with ``C_`` slots per expert — exact
    (linearity of expectation over the experts; module docs):

    * uniform routing (``phi`` None): every expert's count is Binomial(T, k/E), E[dropped] = E·E[(κ − C)⁺];
    * skewed routing ``phi`` = φ: each token includes one hot expert with probability φ (its other choices, and all
      k choices of the tokens without it, uniform over the other E − 1 experts), so the hot expert's count is
      Binomial(T, φ) and every other expert's Binomial(T, (k − φ)/(E − 1)); φ = k/E is uniform routing. The same φ
      as :class:`Routing`'s ``skew`` (the busiest expert's share of the tokens), here an expectation.

    Returns E[dropped]/(T·k), between 0 and 1."""
    if T < 1 or E_ < 1 or not 1 <= k_ <= E_ or C_ < 0:
        raise SpecError(f"dropped_fraction needs T ≥ 1, 1 ≤ k ≤ E and C ≥ 0 (got T={T}, E={E_}, k={k_}, C={C_})")
    if phi is None:
        dropped = E_ * _excess(T, k_ / E_, C_)
    else:
        rest = (k_ - phi) / (E_ - 1) if E_ > 1 else 0.0
        if not 0 < phi <= 1 or not 0 <= rest <= 1 or (E_ == 1 and phi != 1):
            raise SpecError(f"skew φ={phi!r} must be in (0, 1] with (k − φ)/(E − 1) in [0, 1] (k={k_}, E={E_})")
        dropped = _excess(T, phi, C_) + (E_ - 1) * _excess(T, rest, C_)
    return dropped / (T * k_)


def dropped_routes(counts, C_: int) -> int:
    """Routes capacity routing dropped, from a routing log: Σ_j (κ_j − C)⁺ over the per-expert counts ``counts``
    (one rank's E values, or one row per rank) and the capacity C the layer used."""
    arr = np.asarray(counts)
    if arr.size == 0 or (arr < 0).any() or C_ < 0:
        raise SpecError("dropped_routes needs non-negative counts and capacity")
    return int(np.maximum(arr - int(C_), 0).sum())


def lossless(routing: Routing, T: int, E_: int, k_: int) -> bool:
    """Whether ``routing`` provably drops no route of a rank's ``T`` tokens: dropless routing always; capacity
    routing when its C (:func:`capacity`) is at least T — no expert can receive more than one route per token."""
    if routing.mode == "dropless":
        return True
    return capacity(T, E_, k_, routing.capacity_factor, routing.min_capacity) >= T


def generation_dropped(routing: Routing, E_: int, k_: int, b_: int, S_: int, G_: int, e_: int,
                       phi: float | None = None) -> dict:
    """What capacity routing drops in one generation (b sequences on e EP ranks, S prompt and G generated tokens),
    predicted (:func:`dropped_fraction`, uniform routing or skew ``phi``): ``{"prefill", "decode"}`` — the expected
    dropped share of each phase's routes (T = b/e·S, then b/e per decode step) — ``"generation"`` — of all routes
    (the prefill's and the G − 1 decode steps', weighted by their routes) — and ``"lossless"`` (:func:`lossless` in
    both phases). Dropless routing: zeros, lossless."""
    out = {"prefill": 0.0, "decode": 0.0, "generation": 0.0, "lossless": True}
    if routing.mode == "dropless":
        return out
    T_pre, T_dec = rank_batch(b_, e_) * S_, rank_batch(b_, e_)
    for phase, T in (("prefill", T_pre), ("decode", T_dec)):
        C_ = capacity(T, E_, k_, routing.capacity_factor, routing.min_capacity)
        out[phase] = dropped_fraction(T, E_, k_, C_, phi)
        out["lossless"] &= C_ >= T
    steps = G_ - 1
    out["generation"] = (out["prefill"] * T_pre + out["decode"] * T_dec * steps) / (T_pre + T_dec * steps)
    return out


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
            row["dropped_fraction_expected"] = dropped_fraction(T, model.E, model.moe.top_k, row["capacity"])
            row["lossless"] = row["capacity"] >= T
        else:
            value, method = expected_max_count(T, model.E, model.moe.top_k, layout.e)
            row.update(capacity_expected=value, method=method,
                       capacity_bounds=dropless_bounds(T, model.E, model.moe.top_k))
        out["phases"][phase] = row
    return out
