"""Every figure of the suite, drawn from the tables the experiments save (never from training),
so that a figure can be redrawn from ``results/`` without retraining:

    import pandas as pd
    from adaptive_sae import plots
    plots.set_style()
    fig = plots.pareto(pd.read_csv("results/sparsity_allocation/<run>/runs.csv"))
    fig.savefig("pareto.png")

Rules are named, ordered, coloured and marked from the rules registry
(``adaptive_sae.rules``): a newly registered rule, or a variant name the registry does not
know, gets a style of its own without any change here. Tables are told apart by a ``variant``
column (the experiment driver's) or, in older tables, a ``rule`` column.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

AUX_LABELS = {
    "none": "no auxiliary loss",
    "aux_k": "aux_k_loss",
    "aux_zipf": "aux_zipf_loss",
    "resample": "resampling",
}

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
    "effective_features_pct": "effective features (% of F)",
    "count": "count",
    "k": "k (mean matches per token)",
}
"""Axis labels with units, by column name."""

_PALETTE = sns.color_palette("colorblind", 10)
_MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*", "<", ">")
AUX_COLORS = {
    "none": _PALETTE[7],
    "aux_k": _PALETTE[0],
    "aux_zipf": _PALETTE[3],
    "resample": _PALETTE[2],
}
STYLE_COLUMNS = ("variant", "rule")
"""Columns that name what a line of a figure is, in order of preference."""


# ----------------------------------------------------------------------------- style


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


def _registry() -> list[str]:
    """Registered names in legend order: each rule, its aliases right after it."""
    from .rules import rule_names

    return rule_names(aliases=True)


def _style_index(name: str) -> int:
    """Rules take the first colours in registration order, aliases the next ones, so that two
    rules never share a colour; any other name one fixed by a hash of the name."""
    from .rules import rule_names

    ranked = rule_names(aliases=False)
    ranked += [n for n in rule_names(aliases=True) if n not in ranked]
    if name in ranked:
        return ranked.index(name)
    return len(ranked) + zlib.crc32(str(name).encode()) % len(_PALETTE)


def rule_label(name: str) -> str:
    """How legends call a rule or variant: the rule's registered label; an alias reads
    ``alias (= label)``; an unregistered name (a variant) is shown as it is."""
    from .config import ConfigError
    from .rules import get_rule

    try:
        rule = get_rule(name)
    except ConfigError:
        return str(name)
    label = rule.label or rule.name
    return label if name == rule.name else f"{name} (= {label})"


def ordered_rules(names: Sequence[str]) -> list[str]:
    """``names`` in the registry's order; names it does not know (variants) last, in their
    order."""
    present = list(dict.fromkeys(names))
    known = _registry()
    return [r for r in known if r in present] + [r for r in present if r not in known]


def rule_style(name: str) -> dict[str, Any]:
    """Colour, marker and label of a rule or variant. A registered name takes the colour and
    marker of its place in the registry; any other name one fixed by a hash of the name, so
    that it is the same in every figure and every run."""
    i = _style_index(name)
    return {
        "color": _PALETTE[i % len(_PALETTE)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "label": rule_label(name),
    }


def style_column(df: pd.DataFrame) -> str:
    """The column that names the lines of a table: ``variant`` when present, else ``rule``."""
    for col in STYLE_COLUMNS:
        if col in df.columns:
            return col
    raise ValueError(
        f"the table has no {' or '.join(STYLE_COLUMNS)} column (columns: {list(df.columns)}); "
        f"pass a table saved by adaptive_sae.experiments."
    )


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


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} needs the columns {missing}, which the table lacks (it has "
            f"{list(df.columns)}); pass the table the experiment saved under that name."
        )


# ----------------------------------------------------------------------------- building blocks


def mean_std_lines(
    ax,
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    *,
    seed_col: str = "seed",
    logx: bool = False,
    logy: bool = False,
    band: bool = False,
    colors: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    markers: bool = True,
) -> None:
    """One line per ``hue`` value (default: the table's variant or rule column) through the
    mean of ``y`` at each ``x`` across seeds, with error bars (or a band) of ± one std."""
    hue = hue or style_column(df)
    values = list(df[hue].unique())
    by_rule = hue in STYLE_COLUMNS
    for h in ordered_rules(values) if by_rule else values:
        sub = df[df[hue] == h]
        g = sub.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
        std = g["std"].fillna(0.0).to_numpy()
        if by_rule:
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
    ax.legend(fontsize="x-small")


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


def _first_seed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["seed"] == df["seed"].min()] if "seed" in df.columns else df


def _step_hist(ax, values, style) -> None:
    values = np.asarray(values)
    top = int(values.max()) if values.size else 0
    ax.hist(
        values,
        bins=np.arange(0, top + 2) - 0.5,
        histtype="step",
        lw=1.8,
        color=style["color"],
        label=style["label"],
    )


# ----------------------------------------------------------------------------- figures


def allocation_masks(matches: pd.DataFrame, n_tokens: int, n_features: int, budget=None):
    """The match masks of each rule on one small affinity matrix, from a long table
    (rule, token, feature) with one row per matched pair."""
    _require(matches, ["token", "feature"], "allocation_masks")
    hue = style_column(matches)
    names = ordered_rules(matches[hue].unique())
    fig, axes = figure(ncols=len(names), width=3.6, height=3.4)
    for ax, name in zip(np.atleast_1d(axes), names):
        sub = matches[matches[hue] == name]
        mask = np.zeros((n_tokens, n_features))
        mask[sub["token"].to_numpy(), sub["feature"].to_numpy()] = 1
        mask_heatmap(ax, mask, rule_label(name))
    title = f"Matches of each rule on one {n_tokens}×{n_features} affinity matrix"
    fig.suptitle(title + (f" (budget K = {budget})" if budget is not None else ""), y=1.03)
    return fig


def batch_allocation(per_token: pd.DataFrame, per_feature: pd.DataFrame):
    """Per-token L0 histograms and per-feature match counts (rank order, log-log) of each rule
    on one batch (first seed), from the tables (rule, seed, token, matches) and
    (rule, seed, feature, matches)."""
    _require(per_token, ["matches"], "batch_allocation")
    _require(per_feature, ["matches"], "batch_allocation")
    hue = style_column(per_token)
    per_token, per_feature = _first_seed(per_token), _first_seed(per_feature)
    fig, (ax1, ax2) = figure(ncols=2, width=6, height=4.2)
    for name in ordered_rules(per_token[hue].unique()):
        style = rule_style(name)
        _step_hist(ax1, per_token[per_token[hue] == name]["matches"], style)
        counts = np.sort(per_feature[per_feature[hue] == name]["matches"].to_numpy())[::-1]
        ranks = np.arange(1, counts.size + 1)
        ax2.plot(ranks, np.maximum(counts, 0.8), color=style["color"], label=style["label"])
    ax1.set_xlabel("L0 of a token (features matched)")
    ax1.set_yscale("log")
    ax1.set_ylabel("tokens (log scale)")
    ax1.set_title("Per-token matches")
    ax1.legend(fontsize="x-small")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("feature rank (by tokens matched)")
    ax2.set_ylabel("tokens matched in the batch (0 drawn at 0.8)")
    ax2.set_title("Per-feature matches")
    ax2.legend(fontsize="x-small")
    return fig


def pareto(runs: pd.DataFrame, title: str | None = None):
    """NMSE against mean L0, one line per rule or variant through its k values (mean ± std
    across seeds): the training rule on the left, the per-token inference rule on the right
    when the table has it."""
    _require(runs, ["l0_mean", "nmse"], "pareto")
    has_inf = {"l0_mean_inference", "nmse_inference"} <= set(runs.columns)
    fig, axes = figure(ncols=2 if has_inf else 1, width=5.8, height=4.3)
    axes = np.atleast_1d(axes)
    mean_std_lines(axes[0], runs, x="l0_mean", y="nmse")
    label(axes[0], "l0_mean", "nmse", "Training rule")
    if has_inf:
        inf = runs.assign(l0_mean=runs["l0_mean_inference"], nmse=runs["nmse_inference"])
        mean_std_lines(axes[1], inf, x="l0_mean", y="nmse")
        label(axes[1], "l0_mean", "nmse", "Inference rule (per token)")
    for ax in axes:
        ax.set_xscale("log")
        plain_log_ticks(ax, "x")
    if title:
        fig.suptitle(title, y=1.02)
    return fig


def pareto_delta_ce(runs: pd.DataFrame):
    """ΔCE against mean L0 (language-model sources), mean ± std across seeds."""
    _require(runs, ["l0_mean", "delta_ce"], "pareto_delta_ce")
    fig, ax = figure(width=5.8, height=4.3)
    mean_std_lines(ax, runs, x="l0_mean", y="delta_ce")
    label(ax, "l0_mean", "delta_ce", "Downstream loss increase (ΔCE)")
    ax.set_xscale("log")
    return fig


def zipf_curves(
    densities: pd.DataFrame,
    *,
    head_fraction: float = 0.5,
    gamma: float = 0.5,
    tail_fraction: float = 0.1,
    truth: np.ndarray | pd.DataFrame | None = None,
):
    """Left: rank–density curves of each rule (first seed) with the Zipf–Mandelbrot law fitted
    to their head dashed, and the ground-truth frequencies in grey when given. Right: each
    density over the fitted law, with γ (underutilised below) and the low end shaded. From a
    long table (rule, seed, feature, density)."""
    from . import zipf

    _require(densities, ["density"], "zipf_curves")
    hue = style_column(densities)
    densities = _first_seed(densities)
    fig, (ax1, ax2) = figure(ncols=2, width=6, height=4.5)
    if truth is not None:
        p = truth["density"].to_numpy() if isinstance(truth, pd.DataFrame) else np.asarray(truth)
        p = np.sort(p)[::-1]
        ax1.plot(np.arange(1, p.size + 1), p, color="0.6", lw=3, alpha=0.6, label="ground truth")
    n_features = 0
    for name in ordered_rules(densities[hue].unique()):
        rho = densities[densities[hue] == name]["density"].to_numpy(dtype=float)
        n_features = max(n_features, rho.size)
        fit = zipf.fit_zipf(rho, head_fraction)
        style = rule_style(name)
        fit_label = f"fit α={fit.alpha:.2f}, R²={fit.r2:.2f}"
        rank_density(
            ax1, rho, color=style["color"], label=style["label"], fit=fit, fit_label=fit_label
        )
        srt = np.sort(rho)[::-1]
        ranks = np.arange(1, srt.size + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = srt / fit.predict(ranks)
        ax2.plot(ranks[srt > 0], ratio[srt > 0], color=style["color"], label=style["label"])
    ax1.set_title("Rank–density curves")
    ax1.legend(fontsize="x-small")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.axhline(gamma, color="k", lw=0.8, ls=":", label=f"γ = {gamma} (underutilised below)")
    ax2.axvspan(
        (1 - tail_fraction) * n_features,
        n_features,
        color="0.9",
        zorder=0,
        label=f"low end (last {tail_fraction:.0%} of ranks)",
    )
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    label(ax2, "rank", None, "Density relative to the fitted law")
    ax2.set_ylabel("density / fitted Zipf law")
    ax2.legend(fontsize="x-small")
    return fig


def aux_ablation(
    runs: pd.DataFrame, metrics: Sequence[str] = ("dead_pct", "underutilised_pct", "nmse")
):
    """Bars per rule (groups) and auxiliary loss (colours) of each metric, mean ± std across
    seeds."""
    _require(runs, ["aux_loss", *metrics], "aux_ablation")
    hue = style_column(runs)
    names = ordered_rules(runs[hue].unique())
    auxes = list(dict.fromkeys(runs["aux_loss"]))
    long = runs.assign(
        _name=runs[hue].map(rule_label),
        _aux=runs["aux_loss"].map(lambda a: AUX_LABELS.get(a, a)),
    )
    palette = {AUX_LABELS.get(a, a): AUX_COLORS.get(a) for a in auxes}
    if any(c is None for c in palette.values()):
        palette = None
    fig, axes = figure(ncols=len(metrics), width=4.8, height=4.2)
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        order = [rule_label(n) for n in names]
        bar_mean_std(ax, long, x="_name", y=metric, hue="_aux", order=order, palette=palette)
        label(ax, None, metric)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize="x-small", title=None)
    return fig


def dead_curves(history: pd.DataFrame, dead_window_tokens: int | None = None, gamma=None):
    """The trainer's dead and underutilised shares against training tokens (mean ± std band
    across seeds), from the training histories (columns tokens, dead_pct, underutilised_pct;
    older tables with dead_frac / underutilised_frac are read too)."""
    history = history.copy()
    for name in ("dead", "underutilised"):
        if f"{name}_pct" not in history.columns and f"{name}_frac" in history.columns:
            history[f"{name}_pct"] = 100.0 * history[f"{name}_frac"]
    _require(history, ["tokens", "dead_pct", "underutilised_pct"], "dead_curves")
    fig, (ax1, ax2) = figure(ncols=2, width=5.8, height=4.2)
    window = f"no match in {dead_window_tokens:,} tokens" if dead_window_tokens else "trainer"
    mean_std_lines(ax1, history, x="tokens", y="dead_pct", band=True, markers=False)
    label(ax1, "tokens", "dead_pct", f"Dead ({window})")
    mean_std_lines(ax2, history, x="tokens", y="underutilised_pct", band=True, markers=False)
    below = f"below {gamma} × Zipf law" if gamma is not None else "below the Zipf law"
    label(ax2, "tokens", "underutilised_pct", f"Underutilised ({below})")
    return fig


def checkpoint_curves(checkpoints: pd.DataFrame):
    """Held-out NMSE (log), dead % and the effective share of the dictionary against training
    tokens, from the checkpoint evaluations (``experiments.checkpoint_curve`` rows)."""
    cols = ["tokens", "nmse", "dead_pct", "effective_features_pct"]
    _require(checkpoints, cols, "checkpoint_curves")
    fig, axes = figure(ncols=3, width=4.8, height=4.2)
    mean_std_lines(axes[0], checkpoints, x="tokens", y="nmse", logy=True)
    label(axes[0], "tokens", "nmse", "Held-out NMSE (training rule)")
    mean_std_lines(axes[1], checkpoints, x="tokens", y="dead_pct")
    label(axes[1], "tokens", "dead_pct", "No match on held-out tokens")
    mean_std_lines(axes[2], checkpoints, x="tokens", y="effective_features_pct")
    label(axes[2], "tokens", "effective_features_pct", "Effective share of the dictionary used")
    return fig


def early_training(history: pd.DataFrame, until_tokens: float):
    """The first ``until_tokens`` training tokens, every logged step: the spread of L0 across
    the tokens of a batch and the batch NMSE."""
    _require(history, ["tokens", "l0_std", "nmse"], "early_training")
    early = history[history["tokens"] <= until_tokens]
    fig, (ax1, ax2) = figure(ncols=2, width=5.8, height=4.2)
    mean_std_lines(ax1, early, x="tokens", y="l0_std", band=True, markers=False)
    label(ax1, "tokens", "l0_std", "Early training: spread of L0 across tokens")
    mean_std_lines(ax2, early, x="tokens", y="nmse", band=True, markers=False, logy=True)
    label(ax2, "tokens", "nmse", "Early training: NMSE of each batch")
    return fig


def l0_vs_difficulty(by_level: pd.DataFrame, level: str = "n_active", min_tokens: int = 20):
    """Mean L0 (± std band across tokens) against difficulty, one panel per input scaling, from
    ``experiments.l0_by_difficulty``; levels with fewer than ``min_tokens`` tokens are left
    out. On ground-truth difficulty the diagonal L0 = n_active is dotted."""
    _require(by_level, [level, "l0_mean", "l0_std", "tokens"], "l0_vs_difficulty")
    hue = style_column(by_level)
    shown = by_level[by_level["tokens"] >= min_tokens]
    scalings = (
        list(dict.fromkeys(by_level["input_scaling"]))
        if "input_scaling" in by_level.columns
        else [None]
    )
    fig, axes = figure(ncols=len(scalings), width=5.4, height=4.3, sharey=True)
    for ax, scaling in zip(np.atleast_1d(axes), scalings):
        sub = shown if scaling is None else shown[shown["input_scaling"] == scaling]
        for name in ordered_rules(sub[hue].unique()):
            r = sub[sub[hue] == name].sort_values(level)
            style = rule_style(name)
            ax.plot(r[level], r["l0_mean"], **style)
            ax.fill_between(
                r[level],
                r["l0_mean"] - r["l0_std"],
                r["l0_mean"] + r["l0_std"],
                color=style["color"],
                alpha=0.12,
            )
        if level == "n_active" and len(sub):
            top = sub[level].max()
            ax.plot([0, top], [0, top], ls=":", color="0.4", label="L0 = true active features")
            label(ax, level, "l0")
        else:
            label(ax, None, "l0")
            ax.set_xlabel("difficulty decile (language-model loss)")
        if scaling is not None:
            ax.set_title(f"input scaling: {scaling}")
        ax.legend(fontsize="x-small")
    return fig


def l0_distribution(per_token: pd.DataFrame, input_scaling: str | None = None):
    """Histogram of per-token L0 of each rule (first seed; one input scaling, the first by
    default), from the per-token table of ``train_grid(keep_l0=True)``."""
    _require(per_token, ["l0"], "l0_distribution")
    hue = style_column(per_token)
    sub = _first_seed(per_token)
    if "input_scaling" in sub.columns:
        input_scaling = input_scaling or sub["input_scaling"].iloc[0]
        sub = sub[sub["input_scaling"] == input_scaling]
    fig, ax = figure(width=6.5, height=4)
    for name in ordered_rules(sub[hue].unique()):
        _step_hist(ax, sub[sub[hue] == name]["l0"], rule_style(name))
    ax.set_yscale("log")
    suffix = f" ({input_scaling} scaling)" if input_scaling else ""
    label(ax, "l0", None, "Per-token L0" + suffix)
    ax.set_ylabel("tokens (log scale)")
    ax.legend(fontsize="x-small")
    return fig


def thresholds(sensitivity: pd.DataFrame, train_batch_size: int | None = None):
    """NMSE and mean L0 against the evaluation batch size under the training rule (lines), the
    per-token inference rule dashed in the same colour, the training batch size grey; from
    ``experiments.batch_size_sensitivity`` rows (``eval_mode``; older tables: ``eval_rule``)."""
    mode = "eval_mode" if "eval_mode" in sensitivity.columns else "eval_rule"
    _require(sensitivity, [mode, "eval_batch_size", "nmse", "l0_mean"], "thresholds")
    hue = style_column(sensitivity)
    train_rule = sensitivity[sensitivity[mode] == "train"]
    infer = sensitivity[sensitivity[mode] == "inference"].groupby(hue)[["nmse", "l0_mean"]].mean()
    fig, (ax1, ax2) = figure(ncols=2, width=5.8, height=4.3)
    for ax, metric in ((ax1, "nmse"), (ax2, "l0_mean")):
        mean_std_lines(ax, train_rule, x="eval_batch_size", y=metric, logx=True)
        for name in infer.index:
            ax.axhline(infer.loc[name, metric], ls="--", lw=1.2, color=rule_style(name)["color"])
        if train_batch_size:
            ax.axvline(train_batch_size, color="0.6", lw=0.8)
        label(ax, "eval_batch_size", metric)
    ax1.set_title("Reconstruction (dashed: inference rule)")
    ax2.set_title("Sparsity (dashed: inference rule)")
    return fig


def step_time(timings: pd.DataFrame):
    """Left: ms per training step against the width (log-log, the fastest of the repeats per
    rule), the dense encoder product alone dashed. Right: each rule's step over TopK's at the
    same width (when TopK was timed). From ``experiments.step_time_table``."""
    _require(timings, ["n_features", "step_ms", "dense_matmul_ms"], "step_time")
    hue = style_column(timings)
    fig, (ax1, ax2) = figure(ncols=2, width=5.8, height=4.3)
    mean_std_lines(ax1, timings, x="n_features", y="step_ms", logx=True, logy=True)
    dense = timings.groupby("n_features")["dense_matmul_ms"].min()
    ax1.plot(dense.index, dense.values, "k--", label="dense encoder product only")
    ax1.legend(fontsize="x-small")
    widths = sorted(timings["n_features"].unique())
    plain_log_ticks(ax1, "x", widths)
    label(ax1, "n_features", "step_ms", "Step time")
    best = timings.groupby([hue, "n_features"])["step_ms"].min().unstack("n_features")
    if "topk" in best.index:
        for name in ordered_rules(best.index):
            ax2.plot(best.columns, best.loc[name] / best.loc["topk"], **rule_style(name))
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.set_xscale("log")
        plain_log_ticks(ax2, "x", widths)
        ax2.legend(fontsize="x-small")
    label(ax2, "n_features", None, "Relative to TopK")
    ax2.set_ylabel("step time / TopK step time")
    return fig


def nmse_vs_width(runs: pd.DataFrame, title: str | None = None):
    """Held-out NMSE (training rule) against the width F, mean ± std across seeds."""
    _require(runs, ["n_features", "nmse"], "nmse_vs_width")
    fig, ax = figure(width=5.8, height=4.3)
    mean_std_lines(ax, runs, x="n_features", y="nmse", logx=True)
    plain_log_ticks(ax, "x", sorted(runs["n_features"].unique()))
    label(ax, "n_features", "nmse", title or "NMSE against width")
    return fig


def convergence_curve(curve: pd.DataFrame, title: str = "", limits: pd.DataFrame | None = None):
    """The convergence protocol (``adaptive_sae.convergence``): validation NMSE against
    training tokens (log axis), one line per rule at its best learning rate of each budget;
    dotted verticals where the winner changes. With ``limits`` (``extrapolation.limits``), each
    rule's fitted power law is drawn dashed over its fitted budgets and 8× past the last."""
    from .extrapolation import fitted_curve

    fig, ax = figure()
    fits = {} if limits is None else {r["rule"]: r for r in limits.to_dict("records")}
    for rule, g in curve.groupby("rule", sort=False):
        g = g.sort_values("tokens")
        st = rule_style(rule)
        ax.plot(
            g["tokens"], g["nmse_val"], marker=st["marker"], color=st["color"], label=st["label"]
        )
        fit = fits.get(rule)
        if fit is not None and fit["fit_ok"]:
            t = np.geomspace(fit["first_tokens"], 8 * fit["last_tokens"], 50)
            ax.plot(t, fitted_curve(fit, t), ls="--", lw=1, color=st["color"])
    from .convergence import verdict_changes

    for t in verdict_changes(curve)["tokens"]:
        ax.axvline(t, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short spans
    ax.set_xlabel("training tokens")
    ax.set_ylabel("NMSE (validation, best learning rate)")
    ax.set_title(title or "NMSE against the training budget")
    ax.legend()
    return fig


def lr_bracket(lr_trials: pd.DataFrame, tokens: int, title: str = ""):
    """Validation NMSE against learning rate (log axis) at one budget, one line per rule,
    its best marked: the bracket of each rule."""
    fig, ax = figure()
    at = lr_trials[(lr_trials["tokens"] == tokens) & lr_trials["nmse"].map(np.isfinite)]
    for rule, g in at.groupby("variant", sort=False):
        g = g.groupby("lr", as_index=False)["nmse"].mean().sort_values("lr")
        st = rule_style(rule)
        ax.plot(g["lr"], g["nmse"], marker=st["marker"], color=st["color"], label=st["label"])
        best = g.loc[g["nmse"].idxmin()]
        ax.scatter([best["lr"]], [best["nmse"]], s=150, facecolors="none", edgecolors=st["color"])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("learning rate")
    ax.set_ylabel("NMSE (validation)")
    ax.set_title(title or f"Learning-rate bracket at {tokens:,} tokens")
    ax.legend()
    return fig


__all__ = [
    "convergence_curve",
    "lr_bracket",
    "AUX_COLORS",
    "AUX_LABELS",
    "AXIS_LABELS",
    "allocation_masks",
    "aux_ablation",
    "axis_label",
    "bar_mean_std",
    "batch_allocation",
    "checkpoint_curves",
    "close",
    "dead_curves",
    "early_training",
    "figure",
    "l0_distribution",
    "l0_vs_difficulty",
    "label",
    "mask_heatmap",
    "mean_std_lines",
    "nmse_vs_width",
    "ordered_rules",
    "pareto",
    "pareto_delta_ce",
    "plain_log_ticks",
    "rank_density",
    "rule_label",
    "rule_style",
    "set_style",
    "step_time",
    "style_column",
    "thresholds",
    "zipf_curves",
]
