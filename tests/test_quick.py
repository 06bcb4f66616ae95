"""The quick comparison on a tiny scale: every table is produced and the learning rate is the
validation-best of the grid."""

import pandas as pd
from adaptive_sae import quick


def test_quick_comparison_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_SAE_RESULTS", str(tmp_path))
    q = quick.QuickConfig(
        variants=("topk", "feature_choice"),
        aux_losses=("none", "aux_zipf"),
        seeds=(0, 1),
        lr_grid=(1e-3, 1e-2),
        d_in=16,
        n_true_features=64,
        k_true=3.0,
        n_features=64,
        k=3.0,
        batch_size=128,
        total_tokens=128 * 12,
        eval_tokens=512,
    )
    tables = quick.quick_comparison(q, n_jobs=1)
    runs, summary, grid = tables["runs"], tables["summary"], tables["lr_grid"]
    assert len(grid) >= 4 and len(runs) == 2 * 2 * 2 and len(summary) == 4  # grid: bracketed
    for variant, g in grid.groupby("variant"):
        chosen = summary.loc[summary["variant"] == variant, "lr"].iloc[0]
        assert chosen == g.loc[g["nmse"].idxmin(), "lr"]
    assert (summary["n"] == 2).all()
    fc = runs[runs["variant"] == "feature_choice"]
    assert (fc["dead_pct"] == 0).all()  # every feature chooses tokens
    assert (runs.loc[runs["variant"] == "topk", "l0_mean"] <= 3.0 + 1e-9).all()
    out = quick.write_tables(tables, q, "test")
    for name in (
        "runs.csv",
        "summary.csv",
        "lr_grid.csv",
        "summary.md",
        "metrics.json",
        "provenance.json",
    ):
        assert (out.path / name).exists(), name
    assert pd.read_csv(out.path / "summary.csv").shape[0] == 4


def test_quick_rejects_bad_input_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_SAE_RESULTS", str(tmp_path))
    import pytest
    from adaptive_sae.config import ConfigError

    with pytest.raises(ConfigError, match="bogus"):
        quick.check_quick(quick.QuickConfig(aux_losses=("none", "bogus")))
    with pytest.raises(ConfigError, match="nope"):
        quick.check_quick(quick.QuickConfig(variants=("topk", "nope")))
    with pytest.raises(ValueError, match="run"):
        quick.check_quick(quick.QuickConfig(), run_name="has space")
