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


def _label(df: pd.DataFrame) -> pd.Series:
    return df["phase"] + " · " + df["op"]


def bytes_by_op(df: pd.DataFrame, x: str, col: str | None = None, title: str = "", log: bool = True):
    """Bars of bytes per (phase · op) across ``x`` (one panel per ``col`` value)."""
    d = df.assign(what=_label(df), MB=df["bytes"] / 1e6)
    g = sns.catplot(data=d, x=x, y="MB", hue="what", col=col, kind="bar", height=3.6, aspect=1.2, errorbar=None)
    if log:
        g.set(yscale="log")
    g.set_axis_labels(x, "MB (nccl-tests size, summed)")
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
