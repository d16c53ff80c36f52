"""Seaborn figures used by the book. Each takes a tidy DataFrame (one row per phase × op × configuration) and returns
the matplotlib Figure; the data logic lives in volumes/launch/timing, not here."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=False)  # headless by default (book builds, CI); notebooks still display inline
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
PHASE_ORDER = ["setup", "prefill", "decode"]


def show(fig, dpi: int = 110):
    """Display ``fig`` as a PNG in a notebook and close it.

    Independent of the matplotlib backend: `make` runs kernels with ``MPLBACKEND=Agg`` (headless, no inline
    backend), where a bare Figure would print as text. The PNG is embedded, so the book shows it; nbval never
    compares PNGs, and the text/plain part of the output is a fixed string."""
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def _label(df: pd.DataFrame) -> pd.Series:
    return df["phase"] + " · " + df["op"]


def _hue_order(d: pd.DataFrame) -> list[str]:
    """setup, prefill, decode; ops alphabetically within a phase."""
    keys = d[["phase", "op"]].drop_duplicates()
    keys = keys.assign(o=keys.phase.map({p: i for i, p in enumerate(PHASE_ORDER)})).sort_values(["o", "op"])
    return list(keys.phase + " · " + keys.op)


def bytes_by_op(df: pd.DataFrame, x: str, col: str | None = None, title: str = "", log: bool = True,
                horizontal: bool = False):
    """Bars of bytes per (phase · op) across ``x`` (one panel per ``col`` value); ``horizontal`` for long labels."""
    d = df.assign(what=_label(df), MB=df["bytes"] / 1e6)
    xy = dict(y=x, x="MB") if horizontal else dict(x=x, y="MB")
    size = dict(height=0.45 * d[x].nunique() + 1.5, aspect=2.2) if horizontal else dict(height=3.6, aspect=1.2)
    g = sns.catplot(data=d, **xy, hue="what", hue_order=_hue_order(d), col=col, kind="bar", errorbar=None,
                    orient="h" if horizontal else "v", **size)
    if log:
        g.set(xscale="log") if horizontal else g.set(yscale="log")
    label = "MB (nccl-tests size, summed)"
    g.set_axis_labels(*((label, x) if horizontal else (x, label)))
    g.legend.set_title("")
    if title:
        g.figure.suptitle(title, y=1.03)
    return g.figure


def _log_diagonal(d: pd.DataFrame, x: str, y: str, hue: str, style: str, xlabel: str, ylabel: str, title: str,
                  line: str, figsize=(5.2, 4.6), pad: float = 2.0, floor: float = 1.0, legend_size: float = 8):
    """``y`` against ``x``, one point per row (colour ``hue``, marker ``style``), log–log, with the line y = x
    (labelled ``line``) from ``floor`` or the data's minimum / ``pad`` to its maximum × ``pad``."""
    fig, ax = plt.subplots(figsize=figsize)
    sns.scatterplot(data=d, x=x, y=y, hue=hue, style=style, s=70, ax=ax)
    lo = max(floor, min(d[x].min(), d[y].min()) / pad)
    hi = max(d[x].max(), d[y].max()) * pad
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", zorder=0, label=line)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=legend_size, loc="upper left")
    fig.tight_layout()
    return fig


def measured_vs_predicted(df: pd.DataFrame, title: str = ""):
    """Measured bytes against predicted bytes, one point per (configuration, phase, op); the diagonal is y = x.

    Expects columns ``bytes_predicted``, ``bytes_measured``, ``phase``, ``op``."""
    return _log_diagonal(df.assign(what=_label(df)), "bytes_predicted", "bytes_measured", "what", "what",
                         "predicted bytes", "measured bytes", title, "measured = predicted")


def layout_lines(df: pd.DataFrame, x: str = "S", y: str = "bytes", hue: str = "layout", col: str | None = "model",
                 row: str | None = None, style: str | None = "kind", title: str = "", ylabel: str | None = None):
    """Lines of ``y`` (bytes, or any positive quantity) against ``x`` per layout, log–log; one panel per ``col`` ×
    ``row`` value. Expects a tidy frame such as :func:`llmcomm.report.tables.layouts_frame` (one phase selected)."""
    g = sns.relplot(data=df, x=x, y=y, hue=hue, style=style, col=col, row=row, kind="line", marker="o",
                    height=3.3, aspect=1.2, facet_kws={"sharey": False})
    g.set(xscale="log", yscale="log")
    g.set_axis_labels(x, ylabel or f"{y} (nccl-tests size, summed)")
    if title:
        g.figure.suptitle(title, y=1.03)
    return g.figure


def phase_bars(df: pd.DataFrame, x: str = "layout", y: str = "bytes", hue: str = "phase", col: str | None = "model",
               row: str | None = None, title: str = "", log: bool = True):
    """Grouped bars of ``y`` per ``x`` (e.g. layouts) split by ``hue`` (e.g. prefill / decode), in MB."""
    d = df.assign(MB=df[y] / 1e6)
    g = sns.catplot(data=d, x=x, y="MB", hue=hue, col=col, row=row, kind="bar", height=3.3, aspect=1.2,
                    errorbar=None, sharex=False, sharey=False)
    if log:
        g.set(yscale="log")
    g.set_axis_labels(x, f"MB ({y.replace('_', ' ')})")
    if g.legend is not None:
        g.legend.set_title("")
    if title:
        g.figure.suptitle(title, y=1.03)
    return g.figure


# ---- time model (book: time_model, advice) ---------------------------------------------------------------------------
def busbw_vs_size(df: pd.DataFrame, title: str = ""):
    """Bus bandwidth vs message size of a bench-collectives table, one panel per op, hue = backend, style = group
    size (log-log; nccl-tests' busbw, comparable across group sizes)."""
    d = df.assign(group=df["group_size"].astype(str), MiB=df["bytes"] / 2 ** 20)
    g = sns.relplot(data=d, x="bytes", y="busbw_GBps", col="op", hue="backend", style="group", kind="line",
                    marker="o", col_wrap=2, height=2.8, aspect=1.4, facet_kws={"sharey": True})
    g.set(xscale="log", yscale="log", xlabel="message size m (bytes)", ylabel="busbw (GB/s)")
    if title:
        g.figure.suptitle(title, y=1.02)
    return g.figure


def predicted_vs_measured_latency(df: pd.DataFrame, title: str = ""):
    """Measured vs predicted TTFT, TPOT, E2E (one panel each, log-log, the diagonal = perfect prediction); colour =
    layout (t×p), marker = model. ``df`` as from :func:`llmcomm.compare.validate.validate_latency`."""
    import numpy as np

    metrics = [("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    lay = "t=" + df["t"].astype(str) + "×p=" + df["p"].astype(str)
    for ax, (metric, name) in zip(axes, metrics):
        d = df.assign(layout=lay)
        if metric == "tpot_s":
            d = d[d["G"] > 1]
        sns.scatterplot(data=d, x=f"{metric}_measured", y=f"{metric}_predicted", hue="layout", style="model", ax=ax,
                        s=50, legend=(metric == "e2e_s"))
        lo = float(np.nanmin(d[[f"{metric}_measured", f"{metric}_predicted"]].values)) * 0.7
        hi = float(np.nanmax(d[[f"{metric}_measured", f"{metric}_predicted"]].values)) * 1.4
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title=name, xlabel="measured (s)",
               ylabel="predicted (s)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def advice_heatmaps(maps: dict, value: str = "e2e_s", title: str = "", ncols: int | None = None):
    """One heatmap per model: rows b, columns S, cell text = the winning layout, colour = its predicted ``value``
    (ms, log colour). ``maps``: {title: frame from :func:`llmcomm.predict.advise.advice_map`}; ``ncols`` panels per
    row (default: all in one row)."""
    from matplotlib.colors import LogNorm

    ncols = ncols or len(maps)
    nrows = -(-len(maps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(maps):]:
        ax.set_visible(False)
    for ax, (name, grid) in zip(axes.flat, maps.items()):
        val = grid.pivot(index="b", columns="S", values=value) * 1e3
        lab = grid.pivot(index="b", columns="S", values="best")
        sns.heatmap(val, annot=lab.values, fmt="", cmap="viridis", norm=LogNorm(), cbar=True, ax=ax,
                    annot_kws={"fontsize": 8}, cbar_kws={"label": f"{value[:-2].upper()} (ms)"})
        ax.set(title=name, xlabel="prompt length S", ylabel="batch b")
        ax.invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def equal_within(values, rel_tol: float):
    """``values`` with each replaced by the smallest of its group, where sorted values within ``rel_tol`` of their
    group's smallest count as equal — how a figure shows what :func:`llmcomm.predict.advise.pareto_front` treats as
    equal (a layout 0.04 % lighter on the network is drawn at the same x, not beside it)."""
    v = np.asarray(values, dtype=float)
    out = v.copy()
    first = None
    for i in np.argsort(v, kind="stable"):
        if first is None or v[i] > first * (1 + rel_tol):
            first = v[i]
        out[i] = first
    return out


def _readable_axis(ax, which: str, values, formatter, max_ratio: float = 30.0):
    """A log axis when ``values`` span more than ``max_ratio``, else a linear one from 0 (equal values look equal;
    differences of a fraction of a per cent do not become the whole axis); few ticks, formatted by ``formatter``."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    v = np.asarray(values, dtype=float)
    v = v[v > 0]
    axis = ax.xaxis if which == "x" else ax.yaxis
    if v.size and v.max() / v.min() > max_ratio:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        lo, hi = 10.0 ** np.floor(np.log10(v.min())), 10.0 ** np.ceil(np.log10(v.max()))
        (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)          # whole decades: every decade labelled
    else:
        (ax.set_xlim if which == "x" else ax.set_ylim)(0, 1.15 * (v.max() if v.size else 1.0))
        axis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    axis.set_major_formatter(FuncFormatter(lambda x, _: formatter(x)))


def _bytes_text(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def pareto(rows, latency: str = "e2e_s", title: str = "",
           panels=(("inter_node_bytes", "bytes across nodes (the Pareto front's axis)"),
                   ("sent_bytes_busiest_rank", "bytes the busiest rank sends")), equal_tol: float | None = None):
    """Latency vs traffic of every layout (rows from :func:`llmcomm.predict.advise.advise`), one panel per traffic
    metric; the Pareto front (latency vs inter-node bytes, as ``advise`` marks it) in red; infeasible layouts
    hollow. On the front's axis (``inter_node_bytes``) values within ``equal_tol`` (default
    :data:`llmcomm.predict.advise.PARETO_REL_TOL`) are drawn as one, as the front counts them; each axis is linear
    from 0 unless its values span more than 30×, with a few readable ticks."""
    from ..predict.advise import PARETO_REL_TOL

    tol = PARETO_REL_TOL if equal_tol is None else equal_tol
    d = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.8), squeeze=False)
    y = d[latency] * 1e3
    for ax, (key, label) in zip(axes[0], panels):
        x = pd.Series(equal_within(d[key], tol) if key == "inter_node_bytes" else d[key].to_numpy(dtype=float),
                      index=d.index)
        if key == "inter_node_bytes" and x.nunique() < d[key].nunique():
            label += f"\n(values within {tol:.0%} drawn as one)"
        for fits, g in d.groupby("fits"):
            ax.scatter(x[g.index], y[g.index], s=45, facecolors=("C0" if fits else "none"), edgecolors="C0",
                       label="fits" if fits else "does not fit")
        front = d[d["pareto"]]
        ax.scatter(x[front.index], y[front.index], s=90, facecolors="none", edgecolors="C3", lw=1.8,
                   label="on the Pareto front")
        points = d.assign(_x=x, _y=y.round(6)).groupby(["_x", "_y"], sort=False)
        for i, ((xv, yv), g) in enumerate(sorted(points, key=lambda kv: kv[0])):
            left = i % 2 == 1 and (x == xv).sum() > 1       # points drawn at one x: labels alternate sides
            ax.annotate(", ".join(f"{r.tp}×{r.pp}" for r in g.itertuples()), (xv, yv), fontsize=7,
                        xytext=(-5 if left else 5, 2), textcoords="offset points", ha="right" if left else "left")
        _readable_axis(ax, "x", x, _bytes_text)
        _readable_axis(ax, "y", y, lambda v: f"{v:,.0f}")
        ax.set(xlabel=label, ylabel=f"predicted {latency[:-2].upper()} (ms)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- mechanism (book: the closed forms of TP, time) ------------------------------------------------------------------
def tp_layer_diagram(t: int = 2):
    """One Llama decoder layer under t-way tensor parallelism, as AutoTP (and Megatron-style engines) shard it: the
    activation [b, s, h] is whole on every rank; q/k/v and gate/up are column-parallel (each rank computes its share
    of the heads and of the FFN width, no communication); o_proj and down_proj are row-parallel, so each rank holds a
    partial sum of the full [b, s, h] output, and an all-reduce adds the t partial sums — twice per layer."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11, 1.9 + 1.15 * t))
    ax.set_xlim(-0.9, 11.9)
    ax.set_ylim(-0.7, 1.35 * t + 0.6)
    ax.axis("off")
    steps = [("x [b, s, h]\n(whole on every rank)", 0.2, "0.92"),
             ("q, k, v\ncolumn-parallel\n(a/t heads, a_kv/t KV)", 1.75, "#cfe2f3"),
             ("attention\n(local heads,\nlocal KV cache)", 3.3, "#cfe2f3"),
             ("o_proj\nrow-parallel\n→ partial sum", 4.85, "#f4cccc"),
             ("gate, up\ncolumn-parallel\n(F/t each)", 6.75, "#cfe2f3"),
             ("SiLU · mul\n(local)", 8.3, "#cfe2f3"),
             ("down_proj\nrow-parallel\n→ partial sum", 9.7, "#f4cccc")]
    for r in range(t):
        y = 1.35 * (t - 1 - r) + 0.2
        ax.text(-0.05, y + 0.45, f"rank {r}", ha="right", va="center", fontsize=9)
        for i, (text, x, color) in enumerate(steps):
            ax.add_patch(FancyBboxPatch((x, y), 1.35, 0.9, boxstyle="round,pad=0.02", fc=color, ec="0.4", lw=0.8))
            ax.text(x + 0.675, y + 0.45, text, ha="center", va="center", fontsize=7.2)
            if i:
                prev = steps[i - 1][1] + 1.35
                ax.add_patch(FancyArrowPatch((prev, y + 0.45), (x, y + 0.45), arrowstyle="->", mutation_scale=8,
                                             color="0.3"))
    top = 1.35 * (t - 1) + 1.1
    for x, label in ((6.2, "all-reduce 1\n[b, s, h] (+ residual)"), (11.05, "all-reduce 2\n[b, s, h] (+ residual)")):
        ax.plot([x, x], [0.1, top], color="#cc0000", lw=2.2)
        ax.text(x, top + 0.25, label, ha="center", va="bottom", fontsize=8, color="#cc0000")
    ax.text(5.6, -0.5, f"one decoder layer on t = {t} ranks: two all-reduces of the full activation per layer; "
            "the message does not shrink with t", ha="center", fontsize=9)
    fig.tight_layout()
    return fig


def alpha_beta_curve(links: dict, marks: dict, title: str = ""):
    """Time of one message against its size on each link of ``links`` ({label: (α s, β s/B)}), log–log, with the
    half-performance size m½ = α/β (Hockney's n½: below it latency dominates, above it bandwidth) marked on each
    curve, and the sizes in ``marks`` ({label: bytes}) as vertical lines."""
    import numpy as np

    m = np.logspace(2, 9, 200)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for i, (label, (alpha, beta)) in enumerate(links.items()):
        line, = ax.plot(m, (alpha + m * beta) * 1e6, lw=2, label=f"{label}: α = {alpha * 1e6:.1f} µs, "
                        f"1/β = {1e-9 / beta:.0f} GB/s")
        half = alpha / beta
        ax.plot([half], [2 * alpha * 1e6], "o", color=line.get_color())
        ax.annotate(f"m½ = {half / 1024:.0f} KiB", (half, 2 * alpha * 1e6), xytext=(-78, 6),
                    textcoords="offset points", fontsize=8, color=line.get_color())
    ax.set(xscale="log", yscale="log")
    low = ax.get_ylim()[0]
    for label, size in marks.items():
        ax.axvline(size, color="0.5", ls="--", lw=1)
        ax.text(size * 1.15, low * 1.3, label, fontsize=8, color="0.3", rotation=90, va="bottom")
    ax.set( xlabel="message bytes m", ylabel="time of one transfer, α + m·β (µs)",
           title=title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def latency_stack(df: pd.DataFrame, x: str = "S", title: str = ""):
    """Predicted TTFT and TPOT per layout against ``x``, compute and communication stacked (one panel per metric;
    bars grouped by layout). ``df``: columns layout, ``x``, metric ("TTFT"/"TPOT"), compute_ms, comm_ms."""
    metrics = list(dict.fromkeys(df["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics), 3.8), squeeze=False)
    layouts = list(dict.fromkeys(df["layout"]))
    xs = list(dict.fromkeys(df[x]))
    width = 0.8 / len(layouts)
    for ax, metric in zip(axes[0], metrics):
        d = df[df.metric == metric]
        for i, lay in enumerate(layouts):
            sub = d[d.layout == lay].set_index(x).reindex(xs)
            pos = [j + (i - (len(layouts) - 1) / 2) * width for j in range(len(xs))]
            ax.bar(pos, sub.compute_ms, width, color=f"C{i}", alpha=0.55, edgecolor="0.3", lw=0.5,
                   label=f"{lay} compute")
            ax.bar(pos, sub.comm_ms, width, bottom=sub.compute_ms, color=f"C{i}", edgecolor="0.3", lw=0.5,
                   hatch="//", label=f"{lay} communication")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set(xlabel=x, ylabel=f"predicted {metric} (ms)", title=metric)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def kernel_times(df: pd.DataFrame, title: str = "", source: str = ""):
    """Measured (points) and predicted (lines) kernel seconds over tokens, log-log, one panel per op, one colour per
    TP shard. ``df``: ``op, tp, M, seconds, predicted_s``."""
    ops = list(dict.fromkeys(df.op))
    fig, axes = plt.subplots(1, len(ops), figsize=(3.4 * len(ops), 3.4), sharey=False, squeeze=False)
    pal = sns.color_palette("viridis", n_colors=df.tp.nunique())
    for ax, op in zip(axes[0], ops):
        d = df[df.op == op]
        for colour, (tp, g) in zip(pal, d.groupby("tp")):
            g = g.sort_values("M")
            ax.scatter(g.M, g.seconds * 1e6, s=6, color=colour, alpha=0.5)
            ax.plot(g.M, g.predicted_s * 1e6, color=colour, lw=1.2, label=f"t = {tp}")
        ax.set(xscale="log", yscale="log", title=op, xlabel="tokens (GEMM rows M_g)")
    axes[0][0].set_ylabel("kernel µs")
    axes[0][-1].legend(fontsize=8, title="shard", title_fontsize=8)
    fig.suptitle(title + (f"\npoints: measured ({source}); lines: predicted" if source else ""), fontsize=10)
    fig.tight_layout()
    return fig


def collective_sizes(df: pd.DataFrame, title: str = "", source: str = ""):
    """Measured (points) and predicted (lines) all-reduce time and busbw over size per system and group size.
    ``df``: ``system, num_workers, m, seconds, predicted_s`` (m: message bytes)."""
    systems = list(dict.fromkeys(df.system))
    fig, axes = plt.subplots(2, len(systems), figsize=(3.6 * len(systems), 6.2), squeeze=False)
    for j, system in enumerate(systems):
        d = df[df.system == system]
        pal = sns.color_palette("rocket", n_colors=d.num_workers.nunique() + 1)
        for colour, (n, g) in zip(pal, d.groupby("num_workers")):
            g = g.sort_values("m")
            f = 2 * (n - 1) / n
            axes[0][j].scatter(g.m, g.seconds * 1e6, s=6, color=colour, alpha=0.6)
            axes[0][j].plot(g.m, g.predicted_s * 1e6, color=colour, lw=1.2, label=f"n = {n}")
            axes[1][j].scatter(g.m, g.m / g.seconds * f / 1e9, s=6, color=colour, alpha=0.6)
            axes[1][j].plot(g.m, g.m / g.predicted_s * f / 1e9, color=colour, lw=1.2)
        axes[0][j].set(xscale="log", yscale="log", title=system, ylabel="µs" if j == 0 else "")
        axes[1][j].set(xscale="log", xlabel="message bytes m (nccl-tests size)", ylabel="busbw GB/s" if j == 0 else "")
        axes[0][j].legend(fontsize=8)
    fig.suptitle(title + (f"\npoints: measured ({source}); lines: predicted" if source else ""), fontsize=10)
    fig.tight_layout()
    return fig


def moe_calls(exact: pd.DataFrame, title: str = ""):
    """Every all-to-all of expert-parallel runs: measured size against the closed form's (one point per call, both
    axes log; the diagonal is exactness), coloured by routing mode, marker by phase."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    sns.scatterplot(data=exact, x="bytes_predicted", y="bytes_measured", hue="routing", style="phase", s=55,
                    alpha=0.8, ax=ax)
    lo, hi = exact[["bytes_predicted", "bytes_measured"]].min().min(), exact[["bytes_predicted",
                                                                               "bytes_measured"]].max().max()
    ax.plot([lo / 1.3, hi * 1.3], [lo / 1.3, hi * 1.3], color="grey", lw=1, ls="--", zorder=0)
    ax.set(xscale="log", yscale="log", xlabel="predicted m = E·C·h·w (B)", ylabel="measured m (B)", title=title)
    fig.tight_layout()
    return fig


def moe_capacity(counts: pd.DataFrame, title: str = ""):
    """Measured dropless capacity C (the largest per-expert count over the EP ranks) of every MoE layer forward,
    against the expectation under uniform routing, per phase."""
    d = counts.melt(id_vars=["phase", "tokens_per_rank"], value_vars=["C_measured", "C_uniform_expected"],
                    var_name="what", value_name="C")
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    sns.stripplot(data=d, x="phase", y="C", hue="what", dodge=True, alpha=0.75, ax=ax)
    ax.set(title=title, ylabel="capacity C (slots per expert)")
    fig.tight_layout()
    return fig


def moe_layouts(traffic: pd.DataFrame, y: str = "busiest rank sends (B)", title: str = ""):
    """Bytes of a generation against the batch, one line per layout, one panel per model (log–log)."""
    g = sns.relplot(data=traffic, x="b", y=y, hue="layout", col="model", kind="line", marker="o", height=3.4,
                    aspect=1.15, facet_kws={"sharey": False})
    g.set(xscale="log", yscale="log")
    if title:
        g.figure.suptitle(title, y=1.03)
    return g.figure


def moe_skew(df: pd.DataFrame, title: str = ""):
    """Dropless all-to-all bytes per MoE layer forward against the share φ of a rank's tokens its busiest expert
    receives, relative to balanced routing, one line per phase."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    sns.lineplot(data=df, x="phi", y="relative", hue="phase", marker="o", ax=ax)
    ax.set(xlabel="share φ of a rank's tokens routed to the busiest expert", ylabel="all-to-all bytes ÷ balanced",
           title=title)
    fig.tight_layout()
    return fig


def handoff_diagram(kv_heads: int, pairs: list, t_prefill: int, t_decode: int, title: str = ""):
    """The hand-off's re-layout between a prefill side of TP degree ``t_prefill`` and a decode side of ``t_decode``:
    each side's ranks as columns of the a_kv KV heads they hold, one arrow per (sender, receiver) pair with the heads
    it carries (``pairs``: the kv rows of :func:`llmcomm.derive.disagg.rank_split`, global ranks; the decode side
    numbered after the prefill's ranks)."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, ax = plt.subplots(figsize=(7.2, 0.55 * kv_heads + 1.6))
    ax.set_xlim(-0.6, 6.6)
    ax.set_ylim(-0.9, kv_heads + 0.7)
    ax.axis("off")
    colors = sns.color_palette("pastel", max(t_prefill, t_decode))
    sides = ((0.0, t_prefill, "prefill"), (5.0, t_decode, "decode"))
    first_decode = min(r["dst"] for r in pairs) if pairs else 0
    for x, t, name in sides:
        q = kv_heads // t
        for i in range(t):
            ax.add_patch(Rectangle((x, kv_heads - (i + 1) * q), 1.0, q, fc=colors[i], ec="0.3", lw=1))
            ax.text(x + 0.5, kv_heads - (i + 0.5) * q, f"{name}\nTP rank {i}", ha="center", va="center", fontsize=8)
        ax.text(x + 0.5, kv_heads + 0.35, f"{name}, t = {t}", ha="center", fontsize=9, weight="bold")
    for r in pairs:
        lo, hi = r["heads"][0][0], r["heads"][-1][1]
        mid = kv_heads - (lo + hi) / 2
        ax.add_patch(FancyArrowPatch((1.05, mid), (4.95, mid), arrowstyle="->", mutation_scale=12, color="0.25",
                                     lw=1.2))
        ax.text(3.0, mid + 0.12, f"rank {r['src']} → rank {r['dst']}: KV heads {lo}–{hi - 1}", ha="center",
                va="bottom", fontsize=8)
    ax.text(3.0, -0.6, f"a_kv = {kv_heads} KV heads; t_P + t_D − gcd(t_P, t_D) = "
            f"{t_prefill + t_decode - math.gcd(t_prefill, t_decode)} pairs per layer "
            f"(decode ranks from global rank {first_decode})", ha="center", fontsize=8.5)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def pairs_diagonal(df: pd.DataFrame, title: str = ""):
    """Measured against predicted bytes of every (sender, receiver) pair of every hand-off (columns
    ``bytes_predicted``, ``bytes_measured``, ``config``, ``kind``); the diagonal is y = x."""
    return _log_diagonal(df, "bytes_predicted", "bytes_measured", "config", "kind", "predicted bytes (derive.disagg)",
                         "measured bytes (capture)", title, "measured = predicted", (5.6, 4.6), legend_size=7.5)


def handoff_times(df: pd.DataFrame, title: str = ""):
    """Predicted against reported hand-off times (columns ``reported_ms``, ``predicted_ms``, ``scheme``: how the
    prediction's parameters were fitted), log–log, with the diagonal."""
    return _log_diagonal(df, "reported_ms", "predicted_ms", "scheme", "scheme", "reported (ms)", "predicted (ms)", title,
                         "predicted = reported", (5.6, 4.4), pad=1.5, floor=0.0)


def handoff_share(df: pd.DataFrame, title: str = ""):
    """The share of TTFT the hand-off takes against the prompt length S, one line per batch b (columns ``S``, ``b``,
    ``handoff_share``)."""
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    sns.lineplot(data=df, x="S", y="handoff_share", hue="b", marker="o", palette="viridis", ax=ax)
    ax.set(xscale="log", xlabel="prompt length S (tokens)", ylabel="hand-off / TTFT", title=title)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    fig.tight_layout()
    return fig
