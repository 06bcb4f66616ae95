"""The budget-curve fit (``adaptive_sae.extrapolation``): it recovers a known power law with a
floor, its budget-to-tolerance solves the protocol's own change criterion, flat and short curves
are handled, and the verdict at the limits follows the standard errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from adaptive_sae import extrapolation as ex
from hypothesis import example, given
from hypothesis import strategies as st

BUDGETS = [2**17 * 2**i for i in range(8)]


def law(limit, b, c, tokens, last=BUDGETS[-1]):
    return [limit + b * (t / last) ** (-c) for t in tokens]


@given(
    limit=st.floats(0.02, 0.5),
    b=st.floats(0.002, 0.3),
    c=st.floats(0.2, 1.5),
)
@example(limit=0.023846087997842498, b=0.002, c=0.203125)  # little decay: stopped early once
def test_fit_recovers_an_exact_power_law(limit, b, c):
    fit = ex.fit_limit(BUDGETS, law(limit, b, c, BUDGETS))
    assert fit["fit_ok"], fit["why"]
    assert fit["limit"] == pytest.approx(limit, rel=1e-4, abs=1e-6)
    assert fit["exponent"] == pytest.approx(c, rel=1e-3)
    assert fit["b"] == pytest.approx(b, rel=1e-3)
    assert fit["rmse"] < 1e-6


@given(
    limit=st.floats(0.05, 0.5),
    b=st.floats(0.01, 0.3),
    c=st.floats(0.2, 1.5),
    tol=st.sampled_from([0.005, 0.01, 0.02]),
)
def test_tokens_to_tolerance_solves_the_protocols_change(limit, b, c, tol):
    """At the returned budget T, |NMSE(T) − NMSE(T/2)| / NMSE(T/2) equals the tolerance."""
    last = BUDGETS[-1]
    T = ex.tokens_to_tolerance(limit, b, c, last, tol)
    now, before = law(limit, b, c, [T, T / 2], last)
    assert (before - now) / before == pytest.approx(tol, rel=1e-6)


def test_hand_built_case():
    """NMSE = 0.1 + 0.1·(T/T_last)^(−1), u = T_last / T: a doubling to T moves NMSE by
    b·u·(2 − 1) / (limit + 2·b·u), which is 0.01 at u = 1/98, i.e. T = 98·T_last."""
    fit = ex.fit_limit(BUDGETS, law(0.1, 0.1, 1.0, BUDGETS))
    assert fit["tokens_to_tolerance"] == pytest.approx(98 * BUDGETS[-1], rel=1e-4)


def test_flat_curve_has_no_distance_left():
    fit = ex.fit_limit(BUDGETS, [0.2] * len(BUDGETS))
    assert fit["fit_ok"]
    # a flat curve leaves limit and b·x^(−c) interchangeable: the limit lies within its error
    assert abs(fit["limit"] - 0.2) <= max(2 * fit["limit_se"], 1e-6)
    assert fit["rmse"] < 1e-4
    assert fit["tokens_to_tolerance"] <= BUDGETS[0]  # every doubling is already within 1 %


def test_short_or_broken_curves_say_why():
    fit = ex.fit_limit(BUDGETS[:4], [0.3, 0.2, 0.15, 0.14])
    assert not fit["fit_ok"] and "needs 5" in fit["why"] and math.isnan(fit["limit"])
    fit = ex.fit_limit(BUDGETS[:6], [0.3, float("nan"), 0.2, float("inf"), 0.15, 0.14])
    assert not fit["fit_ok"]


def curve_of(laws: dict[str, tuple[float, float, float]], noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for rule, (limit, b, c) in laws.items():
        for t, y in zip(BUDGETS, law(limit, b, c, BUDGETS)):
            rows.append({"rule": rule, "tokens": t, "nmse_val": y * (1 + noise * rng.normal())})
    return pd.DataFrame(rows)


def test_limits_use_the_last_window_and_report_what_remains():
    curve = curve_of({"topk": (0.15, 0.05, 0.5), "mutual_choice": (0.12, 0.08, 0.5)})
    table = ex.limits(curve, window=5)
    assert list(table["rule"]) == ["topk", "mutual_choice"]
    assert (table["budgets_fitted"] == 5).all()
    assert (table["first_tokens"] == BUDGETS[-5]).all()
    t = table.set_index("rule")
    assert t.loc["topk", "limit"] == pytest.approx(0.15, rel=1e-4)
    assert t.loc["topk", "remaining"] == pytest.approx(1 - 0.15 / 0.2, rel=1e-4)


def test_limit_verdicts_follow_the_standard_errors():
    curve = curve_of(
        {
            "topk": (0.15, 0.05, 0.5),
            "mutual_choice": (0.12, 0.05, 0.5),  # clearly below
            "feature_choice_zipf": (0.18, 0.05, 0.5),  # clearly above
            "batch_topk": (0.1505, 0.05, 0.5),  # within noise
        },
        noise=0.002,
    )
    v = ex.limit_verdicts(ex.limits(curve)).set_index("rule")["verdict"]
    assert v["mutual_choice"] == "below topk"
    assert v["feature_choice_zipf"] == "above topk"
    assert v["batch_topk"] == "not settled"


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="nmse_val"):
        ex.limits(pd.DataFrame({"rule": ["topk"], "tokens": [1]}))
    with pytest.raises(ValueError, match="window"):
        ex.limits(curve_of({"topk": (0.1, 0.1, 1.0)}), window=4)
    with pytest.raises(ValueError, match="reference"):
        ex.limit_verdicts(ex.limits(curve_of({"mutual_choice": (0.1, 0.1, 1.0)})))


def test_fitted_curve_passes_through_the_data():
    curve = curve_of({"topk": (0.15, 0.05, 0.5)})
    row = ex.limits(curve).iloc[0]
    got = ex.fitted_curve(row, BUDGETS[-6:])
    np.testing.assert_allclose(got, law(0.15, 0.05, 0.5, BUDGETS[-6:]), rtol=1e-4)


def test_jackknife_widens_the_error_of_a_curve_with_a_plateau():
    """A measured curve (Mutual Choice, synthetic source, 2^19-2^24 tokens) that flattens and
    drops again: leaving one budget out moves the limit more than the fit's covariance says, and
    the reported error is the larger (jackknife) one. On an exact power law the jackknife adds
    nothing."""
    tokens = [2**19 * 2**i for i in range(6)]
    nmse = [0.225574, 0.198813, 0.190931, 0.184094, 0.182155, 0.178713]
    fit = ex.fit_limit(tokens, nmse)
    assert fit["limit_se_jackknife"] > 2 * fit["limit_se_fit"]
    assert fit["limit_se"] == fit["limit_se_jackknife"]
    exact = ex.fit_limit(BUDGETS, law(0.1, 0.1, 0.7, BUDGETS))
    assert exact["limit_se_jackknife"] < 1e-5 and exact["limit_se"] < 1e-5


def test_jackknife_needs_one_budget_to_spare():
    fit = ex.fit_limit(BUDGETS[:5], law(0.1, 0.1, 0.7, BUDGETS[:5], last=BUDGETS[4]))
    assert fit["fit_ok"] and math.isnan(fit["limit_se_jackknife"])
    assert fit["limit_se"] == fit["limit_se_fit"]
