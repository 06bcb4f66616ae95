"""Figures are drawn from saved tables: a committed table redraws its figure without training,
and a rule registered from outside the library gets a style (and a place) in every figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from adaptive_sae import plots
from adaptive_sae.rules import AllocationRule, get_rule, register_rule, unregister_rule

ROOT = Path(__file__).resolve().parents[1]
RUNS = (
    ROOT
    / "results/sparsity_allocation/sparsity_allocation/input_scaling=global__seeds=0-1-2/runs.csv"
)
HISTORY = ROOT / "results/dead_features/dead_features/seeds=0-1-2/history.csv"
SENSITIVITY = (
    ROOT
    / "results/inference_thresholds/inference_thresholds/seeds=0-1-2/batch_size_sensitivity.csv"
)


def _png_ok(fig, path: Path) -> None:
    from PIL import Image

    fig.savefig(path)
    plots.close(fig)
    assert path.stat().st_size > 10_000, path.stat().st_size
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 5, "the figure is blank"


@pytest.mark.parametrize(
    "table, draw",
    [
        (RUNS, plots.pareto),
        (HISTORY, plots.dead_curves),  # an older table: dead_frac beside dead_pct
        (SENSITIVITY, plots.thresholds),  # an older table: eval_rule instead of eval_mode
    ],
    ids=["pareto", "dead_curves", "thresholds"],
)
def test_a_committed_table_redraws_its_figure(tmp_path, table, draw):
    df = pd.read_csv(table)
    fig = draw(df)
    # one legend entry per rule of the table, in the registry's order
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    names = plots.ordered_rules(df["rule"].unique())
    assert labels[: len(names)] == [plots.rule_label(n) for n in names]
    _png_ok(fig, tmp_path / "figure.png")


def test_rule_styles_come_from_the_registry():
    assert plots.rule_label("topk") == get_rule("topk").label
    assert plots.rule_label("batch_topk") == "batch_topk (= Mutual Choice)"
    names = ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu_l1"]
    colours = {tuple(plots.rule_style(n)["color"]) for n in names}
    assert len(colours) == len(names), "two built-in rules share a colour"


class _EveryOther(AllocationRule):
    name = "every_other_test_rule"
    label = "Every other (test)"

    def select(self, sae, P, ws=None):
        import torch

        return torch.arange(0, P.numel(), 2)


@pytest.fixture
def new_rule():
    rule = register_rule(_EveryOther())
    yield rule.name
    unregister_rule(rule.name)


def test_a_newly_registered_rule_gets_a_style_and_appears(new_rule, tmp_path):
    style = plots.rule_style(new_rule)
    assert style["label"] == "Every other (test)"
    assert style["color"] is not None and style["marker"]
    # registered rules in registration order (the new one after the built-in ones), then others
    order = plots.ordered_rules(["unknown_variant", new_rule, "topk"])
    assert order == ["topk", new_rule, "unknown_variant"]
    runs = pd.DataFrame(
        {
            "variant": ["topk", "topk", new_rule, new_rule, "my_variant", "my_variant"],
            "k": [4, 8] * 3,
            "seed": 0,
            "l0_mean": [4, 8, 4, 8, 4, 8],
            "nmse": [0.5, 0.4, 0.45, 0.35, 0.6, 0.5],
        }
    )
    fig = plots.pareto(runs)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Every other (test)" in labels and "my_variant" in labels
    _png_ok(fig, tmp_path / "pareto.png")


def test_an_unregistered_variant_keeps_its_style():
    a, b = plots.rule_style("topk_lr_high"), plots.rule_style("topk_lr_high")
    assert a == b and a["label"] == "topk_lr_high"


def test_a_table_without_the_needed_columns_is_named():
    with pytest.raises(ValueError, match="pareto needs the columns"):
        plots.pareto(pd.DataFrame({"rule": ["topk"], "nmse": [0.1]}))
    with pytest.raises(ValueError, match="no variant or rule column"):
        plots.style_column(pd.DataFrame({"x": [1]}))


def test_convergence_curve_redraws_from_the_committed_curve_with_its_fits(tmp_path):
    """The committed convergence curve redraws; with its fitted limits every rule gains one
    dashed line that starts at its first fitted budget and runs 8× past its last."""
    from adaptive_sae import extrapolation

    curve = pd.read_csv(
        ROOT / "results/convergence/convergence/source=synthetic__seeds=0-1-2/curve.csv"
    )
    plain = plots.convergence_curve(curve)
    limits = extrapolation.limits(curve)
    fig = plots.convergence_curve(curve, limits=limits)
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == curve["rule"].nunique() == len(limits)
    assert not [ln for ln in plain.axes[0].get_lines() if ln.get_linestyle() == "--"]
    for ln, row in zip(dashed, limits.to_dict("records")):
        x = ln.get_xdata()
        assert x[0] == pytest.approx(row["first_tokens"])
        assert x[-1] == pytest.approx(8 * row["last_tokens"])
    _png_ok(fig, tmp_path / "curve.png")
