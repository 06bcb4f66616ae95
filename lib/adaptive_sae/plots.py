"""One plotting style for every notebook: seaborn, fixed colours and names per rule, axis labels
with units, log scales for densities. Figures are drawn from tables (never from training).

    from adaptive_sae import plots
    plots.set_style()
    fig, ax = plots.figure()
    plots.mean_std_lines(ax, df, x="l0_mean", y="nmse", hue="rule")
    plots.label(ax, "l0_mean", "nmse")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

RULE_ORDER = (
    "topk",
    "batch_topk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_zipf",
    "relu_l1",
)
"""The order rules appear in legends and tables."""

RULE_LABELS = {
    "topk": "TopK",
    "batch_topk": "BatchTopK",
    "mutual_choice": "Mutual Choice",
    "feature_choice": "Feature Choice (uniform)",
    "feature_choice_zipf": "Feature Choice (Zipf)",
    "relu_l1": "ReLU + L1",
}
"""Readable names of the allocation rules."""

AUX_LABELS = {"none": "no auxiliary loss", "aux_k": "aux_k_loss", "aux_zipf": "aux_zipf_loss"}

AXIS_LABELS = {
    "nmse": "NMSE (fraction of variance unexplained)",
    "nmse_train": "NMSE, training rule",
    "nmse_inference": "NMSE, inference rule",
    "delta_ce": "ΔCE (nats/token)",
    "l0_mean": "L0 (active features per token)",
    "l0": "L0 (active features per token)",
    "l0_std": "std of L0 across tokens (features)",
    "tokens": "training tokens",
    "dead_pct": "dead features (%)",
    "underutilised_pct": "underutilised features (%)",
    "density": "feature density (fraction of tokens)",
    "rank": "feature rank (by density)",
    "n_active": "true active features per token",
    "step_ms": "time per training step (ms)",
    "n_features": "dictionary width F (features)",
    "eval_batch_size": "evaluation batch size (tokens)",
    "mean_max_cosine": "mean max cosine to true features",
    "fraction_recovered": "true features recovered (cos > 0.9)",
    "l0_rank_correlation": "Spearman ρ (L0, true active features)",
    "count": "count",
    "k": "k (mean matches per token)",
}
"""Axis labels with units, by column name."""

_PALETTE = sns.color_palette("colorblind", 10)
RULE_COLORS = {
    "topk": _PALETTE[0],
    "batch_topk": _PALETTE[9],
    "mutual_choice": _PALETTE[1],
    "feature_choice": _PALETTE[2],
    "feature_choice_zipf": _PALETTE[3],
    "relu_l1": _PALETTE[7],
}
RULE_MARKERS = {
    "topk": "o",
    "batch_topk": "x",
    "mutual_choice": "s",
    "feature_choice": "^",
    "feature_choice_zipf": "v",
    "relu_l1": "D",
}
AUX_COLORS = {"none": _PALETTE[7], "aux_k": _PALETTE[0], "aux_zipf": _PALETTE[3]}


def set_style(context: str = "notebook") -> None:
    """The suite's style: seaborn whitegrid, colourblind palette, readable font sizes."""
    sns.set_theme(context=context, style="whitegrid", palette="colorblind")
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "axes.titlesize": "medium",
            "axes.titleweight": "bold",
            "legend.frameon": True,
            "legend.framealpha": 0.9,
            "legend.fontsize": "small",
            "svg.hashsalt": "adaptive-sae",  # reproducible SVG ids
        }
    )


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.5, height: float = 4.0, **kw: Any):
    """A figure with ``nrows x ncols`` axes of ``width x height`` inches each."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw
    )
    return fig, (axes[0, 0] if axes.size == 1 else axes.ravel())


def rule_label(rule: str) -> str:
    return RULE_LABELS.get(rule, rule)


def axis_label(column: str) -> str:
    return AXIS_LABELS.get(column, column.replace("_", " "))


def label(ax, x: str | None = None, y: str | None = None, title: str | None = None) -> None:
    """Axis labels (with units) from column names, and an optional title."""
    if x is not None:
        ax.set_xlabel(axis_label(x))
    if y is not None:
        ax.set_ylabel(axis_label(y))
    if title:
        ax.set_title(title)


def ordered_rules(rules: Sequence[str]) -> list[str]:
    """``rules`` in the suite's legend order (unknown names last, in their order)."""
    present = list(dict.fromkeys(rules))
    return [r for r in RULE_ORDER if r in present] + [r for r in present if r not in RULE_ORDER]


def rule_style(rule: str) -> dict[str, Any]:
    return {
        "color": RULE_COLORS.get(rule),
        "marker": RULE_MARKERS.get(rule, "o"),
        "label": rule_label(rule),
    }


def mean_std_lines(
    ax,
    df,
    x: str,
    y: str,
    hue: str = "rule",
    *,
    seed_col: str = "seed",
    logx: bool = False,
    logy: bool = False,
    band: bool = False,
    colors: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    markers: bool = True,
) -> None:
    """One line per ``hue`` value through the mean of ``y`` at each ``x`` across seeds, with
    error bars (or a band) of ± one standard deviation."""
    values = df[hue].unique()
    order = ordered_rules(values) if hue == "rule" else list(values)
    for h in order:
        sub = df[df[hue] == h]
        g = sub.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
        std = g["std"].fillna(0.0).to_numpy()
        if hue == "rule":
            style = rule_style(h)
        else:
            style = {"color": (colors or {}).get(h), "marker": "o", "label": str(h)}
        if labels and h in labels:
            style["label"] = labels[h]
        if not markers:
            style["marker"] = None
        if band:
            ax.plot(g[x], g["mean"], **style)
            ax.fill_between(g[x], g["mean"] - std, g["mean"] + std, alpha=0.2, color=style["color"])
        else:
            ax.errorbar(g[x], g["mean"], yerr=std, capsize=3, **style)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend()


def bar_mean_std(ax, df, x: str, y: str, hue: str | None = None, *, order=None, palette=None):
    """Bars of the mean of ``y`` with ± std error bars across seeds (seaborn barplot)."""
    sns.barplot(
        data=df,
        x=x,
        y=y,
        hue=hue,
        order=order,
        errorbar="sd",
        capsize=0.1,
        palette=palette,
        ax=ax,
    )


def rank_density(
    ax,
    densities: np.ndarray,
    *,
    color=None,
    label: str | None = None,
    fit=None,
    fit_label: str | None = None,
) -> None:
    """Feature density against rank on log-log axes; the fitted Zipf–Mandelbrot law dashed.
    Dead features (density 0) cannot be drawn on a log axis and are noted in the legend."""
    rho = np.sort(np.asarray(densities, dtype=float))[::-1]
    ranks = np.arange(1, rho.size + 1)
    live = rho > 0
    n_dead = int((~live).sum())
    text = label or ""
    if n_dead:
        text += f" ({n_dead} dead)"
    ax.plot(ranks[live], rho[live], color=color, label=text or None, lw=1.8)
    if fit is not None and np.isfinite(fit.alpha):
        ax.plot(
            ranks,
            fit.predict(ranks),
            color=color,
            ls="--",
            lw=1,
            label=fit_label or f"Zipf fit α={fit.alpha:.2f}, β={fit.beta:.1f}, R²={fit.r2:.2f}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(axis_label("rank"))
    ax.set_ylabel(axis_label("density"))


def mask_heatmap(ax, mask: np.ndarray, title: str, cmap: str = "Blues") -> None:
    """A 0/1 (token x feature) match matrix, tokens as rows."""
    sns.heatmap(
        np.asarray(mask, dtype=float),
        ax=ax,
        cmap=cmap,
        cbar=False,
        vmin=0,
        vmax=1,
        linewidths=0.5,
        linecolor="white",
        square=False,
        xticklabels=2,
        yticklabels=2,
    )
    ax.tick_params(labelsize="small")
    ax.set_xlabel("feature")
    ax.set_ylabel("token")
    ax.set_title(title)


def plain_log_ticks(ax, axis: str = "x", ticks: Sequence[float] | None = None) -> None:
    """Plain numbers (4, 8, 16) instead of powers of ten on a log axis; ``ticks`` picks them."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    if ticks is not None:
        (ax.set_xticks if axis == "x" else ax.set_yticks)(list(ticks))
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    target.set_major_formatter(formatter)
    target.set_minor_formatter(NullFormatter())


def close(fig) -> None:
    plt.close(fig)


__all__ = [
    "AUX_COLORS",
    "AUX_LABELS",
    "AXIS_LABELS",
    "RULE_COLORS",
    "RULE_LABELS",
    "RULE_ORDER",
    "axis_label",
    "bar_mean_std",
    "close",
    "figure",
    "label",
    "mask_heatmap",
    "mean_std_lines",
    "ordered_rules",
    "plain_log_ticks",
    "rank_density",
    "rule_label",
    "rule_style",
    "set_style",
]
