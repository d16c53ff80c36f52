"""Placement: which links a layout's groups cross when its N = t·p ranks are placed in order, g per node.

Rank r sits on node ⌊r/g⌋; stage i holds ranks i·t … i·t + t − 1 (TP groups are consecutive ranks); TP rank j of
stage i sends to TP rank j of stage i + 1; the last stage hands tokens back to stage 0. A TP group that spans nodes
pays the inter-node link for its collectives (a ring is as slow as its slowest hop); a stage boundary whose sends
cross nodes pays it for the hop; the hand-back crosses nodes whenever the layout spans more than one node.
"""
from __future__ import annotations

import numpy as np

from ..spec import stage_layers

__all__ = ["placement_reference", "tp_inter_fraction", "pp_inter_fraction", "placement_fractions",
           "wrap_inter_fraction"]


def placement_reference(L: int, t: int, p: int, g: int) -> tuple[float, float]:
    """(layer-weighted fraction of TP groups spanning nodes, fraction of stage boundaries crossing nodes), by
    enumerating ranks. The reference the closed forms below are tested against."""
    layers = stage_layers(L, p)
    node = lambda r: r // g  # noqa: E731
    span = [len({node(i * t + j) for j in range(t)}) > 1 for i in range(p)]
    f_tp = sum(n_layers for n_layers, spans in zip(layers, span) if spans) / L
    if p == 1:
        return f_tp, 0.0
    cross = [any(node(i * t + j) != node((i + 1) * t + j) for j in range(t)) for i in range(p - 1)]
    return f_tp, sum(cross) / (p - 1)


def _grid(t, p, g):
    t, p, g = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (t, p, g)))
    return t.shape, *(np.atleast_1d(x) for x in (t, p, g))


def _enumerate_mixed(f, which: int, L: int, t, p, g):
    mixed = (g % t != 0) & (t % g != 0)
    if mixed.any():
        for idx in zip(*np.nonzero(mixed)):
            f[idx] = placement_reference(L, int(t[idx]), int(p[idx]), int(g[idx]))[which]
    return f


def tp_inter_fraction(L: int, t, p, g):
    """Vectorised layer-weighted fraction of TP groups spanning nodes: 0 when t | g, 1 when g | t (t ≥ g, t > 1),
    else enumerated (TP groups straddling node boundaries unevenly)."""
    shape, t, p, g = _grid(t, p, g)
    f = np.where(t % g == 0, (t > 1) & (t >= g), 0).astype(float)
    f = np.where((g % t == 0) & (t <= g), 0.0, f)
    return _enumerate_mixed(f, 0, L, t, p, g).reshape(shape)


def pp_inter_fraction(L: int, t, p, g):
    """Vectorised fraction of the p−1 stage boundaries whose sends cross nodes: ⌊(p−1)·t/g⌋/(p−1) when t | g,
    1 when g | t, else enumerated; 0 when p = 1."""
    shape, t, p, g = _grid(t, p, g)
    pm1 = np.maximum(p - 1, 1)
    f = np.where(g % t == 0, ((p - 1) * t // g) / pm1, 0.0)
    f = np.where((t % g == 0) & (t >= g), 1.0, f)
    f = _enumerate_mixed(f, 1, L, t, p, g)
    return np.where(p > 1, f, 0.0).reshape(shape)


def wrap_inter_fraction(t, p, g):
    """1 where the last stage's hand-back to stage 0 crosses nodes (the t·p ranks span more than one node)."""
    t, p, g = np.broadcast_arrays(*(np.asarray(x) for x in (t, p, g)))
    return (t * p > g).astype(float)


def placement_fractions(L: int, t, p, g):
    """(f_tp, f_pp) arrays for a grid: exact (from :func:`placement_reference`) for every distinct (t, p, g),
    tabulated once and gathered (the closed forms above for a very sparse code space)."""
    t, p, g = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (t, p, g)))
    tmax, pmax, gmax = int(t.max()), int(p.max()), int(g.max())
    space = (tmax + 1) * (pmax + 1) * (gmax + 1)
    if space > 20_000_000:
        return tp_inter_fraction(L, t, p, g), pp_inter_fraction(L, t, p, g)
    code = (t * (pmax + 1) + p) * (gmax + 1) + g
    present = np.flatnonzero(np.bincount(code.ravel(), minlength=1))
    tab_tp = np.zeros(space)
    tab_pp = np.zeros(space)
    for cell in present:
        tk, gg = divmod(int(cell), gmax + 1)
        tt, pp = divmod(tk, pmax + 1)
        if tt * pp > 1_000_000:                        # enumeration too long: closed forms
            tab_tp[cell] = float(tp_inter_fraction(L, tt, pp, gg))
            tab_pp[cell] = float(pp_inter_fraction(L, tt, pp, gg))
        else:
            tab_tp[cell], tab_pp[cell] = placement_reference(L, tt, pp, gg)
    return tab_tp[code], tab_pp[code]
