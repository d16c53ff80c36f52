"""Evaluate an elementwise function once per distinct input, over a broadcast grid.

A map over layouts × workloads (:func:`llmcomm.predict.latency.predict_latency_grid`) has millions of points but few
distinct kernel shapes and messages: a GEMM's time depends on its rows (b·s) and the shard (t) only, a collective's
on (n, m). The GPU GEMM model tries every tile shape and split-K (:func:`llmcomm.predict.kernels.gemm_time_parts`),
dozens of array passes per call, so :func:`on_unique` evaluates such a function on the distinct input tuples and
scatters the results back. Factorising is linear in the points (a dense table when the inputs are small integers,
as grid values are) — ``np.unique`` would sort every array, which costs more than the model it saves. pandas'
``factorize`` (hashing) is the well-kept general tool and is used when the dense table does not apply.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["on_unique", "factorize"]

#: largest value range a dense table is built for (a 4 M-entry int32 table: 16 MB)
DENSE_LIMIT = 1 << 22
#: below this many points the function is simply evaluated
MIN_POINTS = 4096


def factorize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques) of a 1-D array, ``uniques[codes] == x``: a dense table for non-negative integer values of
    small range, else :func:`pandas.factorize`."""
    if x.dtype.kind in "iu" or (x.dtype.kind == "f" and x.size):
        lo, hi = x.min(), x.max()
        if np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi < DENSE_LIMIT:
            xi = x.astype(np.int64)
            if x.dtype.kind in "iu" or np.array_equal(xi, x):
                seen = np.zeros(int(hi) + 1, dtype=bool)
                seen[xi] = True
                uniques = np.flatnonzero(seen)
                table = np.empty(int(hi) + 1, dtype=np.int64)
                table[uniques] = np.arange(uniques.size)
                return table[xi], uniques.astype(x.dtype)
    import pandas as pd

    codes, uniques = pd.factorize(x, sort=False)
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques)


def on_unique(f: Callable[..., np.ndarray], *arrays) -> np.ndarray:
    """``f(*arrays)`` elementwise, evaluated once per distinct tuple of the broadcast ``arrays`` (``f`` must be
    elementwise and return an array of their broadcast shape, or a tuple of such arrays)."""
    arrs = np.broadcast_arrays(*(np.asarray(x) for x in arrays))
    shape = arrs[0].shape
    if arrs[0].size < MIN_POINTS:
        values = f(*arrs)
        return tuple(np.broadcast_to(v, shape) for v in values) if isinstance(values, tuple) else values
    # factorise each input, then the tuple of codes as one mixed-radix integer (factorised again if it grows large)
    key, radix = np.zeros(arrs[0].size, dtype=np.int64), 1
    for arr in arrs:
        codes, uniques = factorize(arr.ravel())
        if radix * len(uniques) >= (1 << 62):
            key, _ = factorize(key)
            radix = int(key.max()) + 1
        key = key + codes * radix
        radix *= len(uniques)
    rows, uniques = factorize(key)
    # the inputs of each distinct tuple, read back at one of its points (any: they are equal)
    at = np.empty(len(uniques), dtype=np.int64)
    at[rows] = np.arange(rows.size)
    values = f(*(arr.ravel()[at] for arr in arrs))
    if isinstance(values, tuple):
        return tuple(np.asarray(v)[rows].reshape(shape) for v in values)
    return np.asarray(values)[rows].reshape(shape)
