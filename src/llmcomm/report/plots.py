"""Seaborn figures used by the book. Each takes a tidy DataFrame (one row per phase × op × configuration) and returns
the matplotlib Figure; the data logic lives in volumes/launch/timing, not here."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)  # headless by default (book builds, CI); notebooks still display inline
import matplotlib.pyplot as plt  # noqa: E402
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


def measured_vs_predicted(df: pd.DataFrame, title: str = ""):
    """Measured bytes against predicted bytes, one point per (configuration, phase, op); the diagonal is y = x.

    Expects columns ``bytes_predicted``, ``bytes_measured``, ``phase``, ``op``."""
    d = df.assign(what=_label(df))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    sns.scatterplot(data=d, x="bytes_predicted", y="bytes_measured", hue="what", style="what", s=70, ax=ax)
    lo = max(1.0, min(d.bytes_predicted.min(), d.bytes_measured.min()) / 2)
    hi = max(d.bytes_predicted.max(), d.bytes_measured.max()) * 2
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", zorder=0, label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlabel="predicted bytes", ylabel="measured bytes", title=title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def bytes_sweep(df: pd.DataFrame, x: str, hue: str = "what", col: str | None = None, style: str | None = None,
                title: str = ""):
    """Lines of bytes against ``x`` — measured as markers, predicted as lines when both columns are present."""
    d = df.assign(what=_label(df))
    g = sns.relplot(data=d, x=x, y="bytes_predicted", hue=hue, col=col, kind="line", height=3.4, aspect=1.15,
                    facet_kws={"sharey": False})
    if "bytes_measured" in d:
        for ax, (_, sub) in zip(g.axes.flat, d.groupby(col) if col else [(None, d)]):
            sns.scatterplot(data=sub, x=x, y="bytes_measured", hue=hue, ax=ax, legend=False, s=45, marker="o")
    g.set_axis_labels(x, "bytes (lines: predicted, dots: measured)")
    if title:
        g.figure.suptitle(title, y=1.03)
    return g.figure


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
    g.set(xscale="log", yscale="log", xlabel="message size S (bytes)", ylabel="busbw (GB/s)")
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
    for ax, (m, name) in zip(axes, metrics):
        d = df.assign(layout=lay)
        if m == "tpot_s":
            d = d[d["G"] > 1]
        sns.scatterplot(data=d, x=f"{m}_measured", y=f"{m}_predicted", hue="layout", style="model", ax=ax, s=50,
                        legend=(m == "e2e_s"))
        lo = float(np.nanmin(d[[f"{m}_measured", f"{m}_predicted"]].values)) * 0.7
        hi = float(np.nanmax(d[[f"{m}_measured", f"{m}_predicted"]].values)) * 1.4
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title=name, xlabel="measured (s)",
               ylabel="predicted (s)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def advice_heatmaps(maps: dict, value: str = "e2e_s", title: str = ""):
    """One heatmap per model: rows b, columns S, cell text = the winning layout, colour = its predicted ``value``
    (ms, log colour). ``maps``: {title: frame from :func:`llmcomm.predict.advise.advice_map`}."""
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        val = m.pivot(index="b", columns="S", values=value) * 1e3
        lab = m.pivot(index="b", columns="S", values="best")
        sns.heatmap(val, annot=lab.values, fmt="", cmap="viridis", norm=LogNorm(), cbar=True, ax=ax,
                    annot_kws={"fontsize": 8}, cbar_kws={"label": f"{value[:-2].upper()} (ms)"})
        ax.set(title=name, xlabel="prompt length S", ylabel="batch b")
        ax.invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto(rows, latency: str = "e2e_s", title: str = ""):
    """Latency vs communication bytes of every layout (rows from :func:`llmcomm.predict.advise.advise`), the Pareto front
    joined; infeasible layouts hollow."""
    d = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for fits, g in d.groupby("fits"):
        ax.scatter(g["bytes"], g[latency] * 1e3, s=45, facecolors=("C0" if fits else "none"), edgecolors="C0",
                   label="fits" if fits else "does not fit")
    front = d[d["pareto"]].sort_values("bytes")
    ax.plot(front["bytes"], front[latency] * 1e3, color="C3", lw=1.5, label="Pareto front")
    for _, r in d.iterrows():
        ax.annotate(f"{r['tp']}×{r['pp']}", (r["bytes"], r[latency] * 1e3), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="communication bytes of the generation",
           ylabel=f"predicted {latency[:-2].upper()} (ms)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
