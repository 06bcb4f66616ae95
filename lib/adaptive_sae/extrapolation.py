"""Where a comparison is heading when its budget ran out (DESIGN §11).

The convergence protocol doubles the budget until no rule's validation NMSE moves by more than
``tolerance``; on a small machine that can take more tokens than a run affords. The curve it
leaves (each rule's NMSE at its best learning rate of each budget) still says where each rule
is heading. Over the last ``window`` budgets it is fitted by a power law with a floor,

    NMSE(T) = limit + b · (T / T_last)^(−c),

the form of the data term of language-model scaling laws (Kaplan et al. 2020, Hoffmann et al.
2022). The fit gives each rule's limit with its standard error, the exponent, and the budget at
which one doubling would move NMSE by no more than ``tolerance``. The standard error is the
larger of the fit's own (from its covariance) and a jackknife over the budgets (the spread of
the limit when each budget in turn is left out): a curve with a plateau or a late drop, where the
power law fits less well than its residuals suggest, moves the limit when one budget goes. A verdict whose margin at the
limits exceeds ``z`` standard errors is likely to survive longer training; one inside them is
not settled by the runs. The curve is the search seed's validation NMSE (one seed), so these
are estimates, reported beside the measured table and never in place of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

MIN_BUDGETS = 5
"""The fewest budgets a fit uses: three parameters, and two degrees of freedom left for their
standard errors (four budgets fit any smooth curve and leave the errors meaningless)."""


def _model(x, limit, b, c):
    return limit + b * x ** (-c)


def tokens_to_tolerance(limit: float, b: float, c: float, last_tokens: int, tolerance: float):
    """The budget T at which doubling from T/2 to T moves the fitted NMSE by ``tolerance``
    (relative to NMSE(T/2), as the protocol measures it); ``last_tokens`` is the T_last of the
    fit. NaN when the fit cannot say (no decay, or an exponent too small to ever get there)."""
    if not (math.isfinite(b) and math.isfinite(c)) or c <= 0:
        return float("nan")
    if b <= 0:
        return 0.0  # a flat curve: every doubling is within tolerance
    # change(u) = b·u·(2^c − 1) / (limit + b·u·2^c) with u = (T / T_last)^(−c); solve = tol
    denom = b * (2.0**c * (1 - tolerance) - 1)
    if denom <= 0 or limit <= 0:
        return float("nan")
    u = tolerance * limit / denom
    return float(last_tokens * u ** (-1.0 / c))


def fit_limit(tokens: Sequence[float], nmse: Sequence[float], tolerance: float = 0.01) -> dict:
    """Fit ``NMSE(T) = limit + b·(T/T_last)^(−c)`` to one rule's budget curve (at least
    :data:`MIN_BUDGETS` budgets); returns limit, limit_se (the larger of limit_se_fit, from
    the fit's covariance, and limit_se_jackknife, over budgets), b, exponent, exponent_se, rmse
    and tokens_to_tolerance (``fit_ok`` False, with ``why``, when the curve is too short or the
    fit fails)."""
    T = np.asarray(tokens, dtype=float)
    y = np.asarray(nmse, dtype=float)
    order = np.argsort(T)
    T, y = T[order], y[order]
    keep = np.isfinite(y) & (T > 0)
    T, y = T[keep], y[keep]
    empty = dict(
        limit=float("nan"), limit_se=float("nan"), limit_se_fit=float("nan"),
        limit_se_jackknife=float("nan"), b=float("nan"), exponent=float("nan"),
        exponent_se=float("nan"), rmse=float("nan"), tokens_to_tolerance=float("nan"),
    )  # fmt: skip
    if len(T) < MIN_BUDGETS:
        return {
            **empty,
            "fit_ok": False,
            "why": f"{len(T)} finite budgets; the fit needs {MIN_BUDGETS}",
        }
    try:
        p, cov = _fit(T, y)
    except (RuntimeError, ValueError) as err:
        return {**empty, "fit_ok": False, "why": f"the fit failed: {err}"}
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else [np.nan] * 3
    limit, b, c = (float(v) for v in p)
    resid = y - _model(T / T[-1], *p)
    jack = _jackknife_limit_se(T, y)
    return dict(
        limit=limit,
        limit_se=float(np.nanmax([se[0], jack])) if np.isfinite([se[0], jack]).any() else jack,
        limit_se_fit=float(se[0]),
        limit_se_jackknife=jack,
        b=b,
        exponent=c,
        exponent_se=float(se[2]),
        rmse=float(np.sqrt(np.mean(resid**2))),
        tokens_to_tolerance=tokens_to_tolerance(limit, b, c, int(T[-1]), tolerance),
        fit_ok=True,
        why="",
    )


def _fit(T: np.ndarray, y: np.ndarray):
    """(parameters, covariance) of the power law with a floor, at x = T / T[-1]."""
    from scipy.optimize import curve_fit

    x = T / T[-1]
    p0 = [0.9 * y[-1], max(y[0] - 0.9 * y[-1], 1e-6) * x[0] ** 0.5, 0.5]
    return curve_fit(
        _model,
        x,
        y,
        p0=p0,
        bounds=([0.0, 0.0, 0.05], [float(y.max()), np.inf, 4.0]),
        maxfev=20_000,
        # tight: where the decay over the budgets is small, the default tolerances stop early
        ftol=1e-14,
        xtol=1e-14,
        gtol=1e-14,
    )


def _jackknife_limit_se(T: np.ndarray, y: np.ndarray) -> float:
    """The jackknife standard error of the limit over budgets (each left out in turn); NaN
    when leaving one out leaves fewer than :data:`MIN_BUDGETS` or a fit fails."""
    n = len(T)
    if n - 1 < MIN_BUDGETS:
        return float("nan")
    values = []
    for i in range(n):
        keep = np.arange(n) != i
        try:
            values.append(float(_fit(T[keep], y[keep])[0][0]))
        except (RuntimeError, ValueError):
            return float("nan")
    v = np.asarray(values)
    return float(np.sqrt((n - 1) / n * ((v - v.mean()) ** 2).sum()))


def limits(
    curve: pd.DataFrame, *, window: int = 6, tolerance: float = 0.01, metric: str = "nmse_val"
) -> pd.DataFrame:
    """One row per rule of a convergence curve (``converge(...).curve`` or its ``curve.csv``):
    the power-law fit over the last ``window`` budgets (at least :data:`MIN_BUDGETS`; the
    earliest budgets, where
    the learning-rate schedule and initialisation dominate, are left out), NMSE at the last
    budget, the fitted limit ± its standard error, how much of the last NMSE is still to go
    (``remaining``), the exponent and the budget at which a doubling would move NMSE by no more
    than ``tolerance`` (``tokens_to_tolerance``)."""
    need = [c for c in ("rule", "tokens", metric) if c not in curve.columns]
    if need:
        raise ValueError(
            f"the curve lacks columns {need}; pass converge(...).curve or its curve.csv "
            f"(columns rule, tokens, {metric})."
        )
    if window < MIN_BUDGETS:
        raise ValueError(
            f"window={window}: the fit has 3 parameters and needs >= {MIN_BUDGETS} budgets."
        )
    rows = []
    for rule, g in curve.groupby("rule", sort=False):
        g = g.sort_values("tokens").tail(window)
        fit = fit_limit(g["tokens"], g[metric], tolerance)
        last = float(g[metric].iloc[-1])
        rows.append(
            {
                "rule": rule,
                "budgets_fitted": len(g),
                "first_tokens": int(g["tokens"].iloc[0]),
                "last_tokens": int(g["tokens"].iloc[-1]),
                "nmse_last": last,
                **fit,
                "remaining": 1 - fit["limit"] / last if last > 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def limit_verdicts(table: pd.DataFrame, reference: str = "topk", z: float = 2.0) -> pd.DataFrame:
    """Each rule's fitted limit against the ``reference`` rule's (rows of :func:`limits`):
    the relative difference, its standard error, and ``verdict`` — "below <reference>" or
    "above <reference>" when the limits differ by more than ``z`` combined standard errors,
    else "not settled"."""
    t = table.set_index("rule")
    if reference not in t.index:
        raise ValueError(f"no {reference!r} row among {list(t.index)}; pass reference=<a rule>.")
    ref, ref_se = float(t.loc[reference, "limit"]), float(t.loc[reference, "limit_se"])
    rows = []
    for rule, r in t.drop(index=reference).iterrows():
        diff = float(r["limit"]) - ref
        se = math.hypot(float(r["limit_se"]), ref_se)
        if not (math.isfinite(diff) and math.isfinite(se)):
            verdict = "not settled"
        elif diff < -z * se:
            verdict = f"below {reference}"
        elif diff > z * se:
            verdict = f"above {reference}"
        else:
            verdict = "not settled"
        rows.append(
            {
                "rule": rule,
                "limit": float(r["limit"]),
                f"{reference}_limit": ref,
                "difference": diff / ref if ref else float("nan"),
                "difference_se": se / ref if ref else float("nan"),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def fitted_curve(row, tokens: Sequence[float]) -> np.ndarray:
    """The fitted NMSE of one :func:`limits` row at the given budgets (for plots)."""
    x = np.asarray(tokens, dtype=float) / float(row["last_tokens"])
    return _model(x, float(row["limit"]), float(row["b"]), float(row["exponent"]))


__all__ = [
    "MIN_BUDGETS",
    "fit_limit",
    "fitted_curve",
    "limit_verdicts",
    "limits",
    "tokens_to_tolerance",
]
