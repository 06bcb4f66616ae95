r"""Zipf laws over features: Feature Choice capacities and the underutilised set (DESIGN §3, §5).

Capacities.  m_r ∝ (r + 1 + β)^(−α) over ranks r = 0..F−1, scaled so Σ m = K, each clipped to
[min_capacity, B] with the excess re-spread over the unclipped features (water-filling), then
rounded by largest remainder so the integers sum to K exactly.  α = 0 gives uniform capacities.

Feature densities.  ρ*(r) = C·(r + β)^(−α) over ranks r = 1..F (Zipf–Mandelbrot), fitted by
least squares in log–log space over the well-populated head of the sorted densities, then
rescaled so Σ_r ρ*(r) = Σ_j ρ_j (= mean L0).  A feature is underutilised when
ρ_j < γ·ρ*(rank_j); dead features (ρ_j = 0) are always underutilised.

Ranking Zipf capacities (``SAEConfig.capacity_ranking``): under Feature Choice a feature's
density *is* its capacity, so ranking features by their own density never changes the order.
``fixed`` ranks by feature index (training moves the most common direction into the largest
slot); ``demand`` ranks by how often a feature is among a token's top-k affinities (the
default: it gave lower NMSE and better recovery in the quick comparison; see SAEConfig).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import least_squares, minimize_scalar
from torch import Tensor

from .config import ConfigError


def _water_fill(weights: np.ndarray, total: float, lo: float, hi: float) -> np.ndarray:
    """Real targets t = clip(c·w, lo, hi) with Σ t = total (bisection on c; monotone)."""
    c_lo, c_hi = 0.0, 1.0
    while np.clip(c_hi * weights, lo, hi).sum() < total:
        c_hi *= 2.0
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        if np.clip(c * weights, lo, hi).sum() < total:
            c_lo = c
        else:
            c_hi = c
    return np.clip(c_hi * weights, lo, hi)


def _round_to_total(targets: np.ndarray, total: int, hi: int) -> np.ndarray:
    """Largest-remainder rounding: integers within one of the targets, summing to total."""
    base = np.floor(targets).astype(np.int64)
    missing = total - int(base.sum())
    if missing > 0:
        frac = targets - base
        frac[base >= hi] = -1.0  # never push past the upper bound
        order = np.argsort(-frac, kind="stable")
        base[order[:missing]] += 1
    elif missing < 0:  # only from float error in the water-filling
        order = np.argsort(targets - base, kind="stable")
        base[order[:-missing]] -= 1
    return base


def zipf_capacities(
    n_features: int,
    budget: int,
    batch_size: int,
    alpha: float = 1.0,
    beta: float = 0.0,
    min_capacity: int = 1,
) -> Tensor:
    """Feature Choice capacities m (int64, (F,)), sorted descending by rank, Σ m = budget exactly,
    each in [min_capacity, batch_size]."""
    F, K, B = int(n_features), int(budget), int(batch_size)
    if F < 1 or B < 1:
        raise ConfigError(f"n_features={F} and batch_size={B} must be positive.")
    if not 0 <= min_capacity <= B:
        raise ConfigError(f"min_capacity={min_capacity} must lie in [0, batch_size={B}].")
    if K < F * min_capacity:
        raise ConfigError(
            f"budget K={K} cannot give each of the {F} features at least {min_capacity} "
            f"match(es); raise k or the batch size so that K >= {F * min_capacity}."
        )
    if K > F * B:
        raise ConfigError(
            f"budget K={K} exceeds F*B={F * B}: features cannot choose more tokens than the "
            f"batch holds; lower k."
        )
    if alpha < 0 or beta < 0:
        raise ConfigError(f"alpha={alpha} and beta={beta} must be >= 0.")
    ranks = np.arange(F, dtype=np.float64)
    weights = (ranks + 1.0 + beta) ** (-alpha)
    targets = _water_fill(weights, float(K), float(min_capacity), float(B))
    caps = _round_to_total(targets, K, B)
    return torch.from_numpy(caps)


def uniform_capacities(n_features: int, budget: int, batch_size: int) -> Tensor:
    """Uniform capacities K/F, rounded by largest remainder (α = 0)."""
    return zipf_capacities(n_features, budget, batch_size, alpha=0.0, min_capacity=0)


class ZipfFit(NamedTuple):
    """ρ*(r) = scale·(r + beta)^(−alpha) for ranks r = 1..F; r2 in log space on the head."""

    alpha: float
    beta: float
    scale: float
    r2: float
    n_fit: int

    def predict(self, ranks: Tensor | np.ndarray) -> np.ndarray:
        r = np.asarray(ranks, dtype=np.float64)
        if not math.isfinite(self.alpha):
            return np.zeros_like(r)
        return self.scale * (r + self.beta) ** (-self.alpha)


def fit_zipf(
    densities: Tensor | np.ndarray,
    head_fraction: float = 0.5,
    min_points: int = 5,
    method: str = "trf",
) -> ZipfFit:
    """Fit a Zipf–Mandelbrot law to feature densities (any order; zeros are ignored in the fit).

    The fit uses the top ``head_fraction`` of the ranked non-zero densities (at least
    ``min_points``): least squares of log ρ_r against log c − α·log(r + β), α in [0, 20], β in
    [0, 10·n]; the scale is then set so the law sums to Σ densities over all F ranks. With
    fewer than ``min_points`` live features no law can be fitted: alpha is NaN and the
    prediction is 0 everywhere.

    ``method``: "trf", scipy's bounded trust-region least squares over (log c, α, β) from the
    log-log line (what the committed results used); "profile", the same objective with log c
    and α solved in closed form for each β (a line fit, α clipped to its bounds, is exact for a
    fixed β) and β found by a bounded 1-D search: the same or a lower residual in a quarter of
    the time or less (``tests/test_zipf.py``), which training refits take with the fast paths on.
    """
    if method not in ("trf", "profile"):
        raise ValueError(f"method={method!r} is not known; use 'trf' or 'profile'.")
    rho = np.sort(np.asarray(torch.as_tensor(densities).double().cpu()))[::-1]
    if rho.ndim != 1:
        raise ValueError(f"densities must be 1-D (F,), got shape {rho.shape}.")
    if not np.isfinite(rho).all() or (rho < 0).any():
        raise ValueError("densities must be finite and non-negative.")
    F = rho.size
    live = rho[rho > 0]
    n_fit = min(live.size, max(min_points, math.ceil(head_fraction * live.size)))
    if live.size < min_points:
        return ZipfFit(float("nan"), float("nan"), float("nan"), float("nan"), int(live.size))
    y = np.log(live[:n_fit])
    r = np.arange(1, n_fit + 1, dtype=np.float64)
    fit = _fit_profile if method == "profile" else _fit_trust_region
    a, b, ss_res = fit(y, r, 10.0 * n_fit)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    shape = (np.arange(1, F + 1, dtype=np.float64) + b) ** (-a)
    scale = float(rho.sum() / shape.sum())
    return ZipfFit(float(a), float(b), scale, float(r2), int(n_fit))


def _fit_trust_region(y: np.ndarray, r: np.ndarray, upper_b: float) -> tuple[float, float, float]:
    """(α, β, residual sum of squares) of log ρ ≈ log c − α·log(r + β) by scipy's bounded
    trust-region least squares from the log-log line."""

    def resid(p: np.ndarray) -> np.ndarray:
        log_c, a, b = p
        return log_c - a * np.log(r + b) - y

    slope, intercept = np.polyfit(np.log(r), y, 1)
    x0 = np.array([intercept, max(-slope, 1e-3), 0.0])
    sol = least_squares(
        resid, x0, bounds=([-np.inf, 0.0, 0.0], [np.inf, 20.0, upper_b]), method="trf"
    )
    _, a, b = sol.x
    return a, b, float((sol.fun**2).sum())


def _fit_profile(y: np.ndarray, r: np.ndarray, upper_b: float) -> tuple[float, float, float]:
    """(α, β, residual sum of squares) as ``_fit_trust_region``, by variable projection: for
    each β the best α (clipped to [0, 20]) and log c are a line fit's; β by a bounded Brent
    search on [0, upper_b], its ends compared too."""
    y_mean = y.mean()

    def profile(b: float) -> tuple[float, float, float]:
        u = np.log(r + b)
        du = u - u.mean()
        a = min(max(-float(du @ (y - y_mean)) / float(du @ du), 0.0), 20.0) + 0.0  # not -0
        res = (y_mean + a * u.mean()) - a * u - y
        return float(res @ res), a, b

    sol = minimize_scalar(
        lambda b: profile(b)[0], bounds=(0.0, upper_b), method="bounded", options={"xatol": 1e-4}
    )
    ss_res, a, b = min(
        (profile(b) for b in (float(sol.x), 0.0, upper_b)), key=lambda t: (t[0], t[2])
    )
    return a, b, ss_res


def density_ranks(densities: Tensor) -> Tensor:
    """1-based rank of each feature by descending density (ties by index). (F,) int64."""
    order = torch.argsort(-densities.double(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1, device=order.device)
    return ranks


def zipf_deficits(
    densities: Tensor, gamma: float = 0.5, fit: ZipfFit | None = None, head_fraction: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(underutilised mask (F,) bool, deficit γ·ρ*(rank) − ρ ≥ 0 (F,) float)."""
    densities = torch.as_tensor(densities)
    if not 0 < gamma <= 1:
        raise ConfigError(f"gamma={gamma} must be in (0, 1].")
    fit = fit if fit is not None else fit_zipf(densities, head_fraction)
    ranks = density_ranks(densities)
    expected = torch.from_numpy(fit.predict(ranks.cpu().numpy())).to(densities.device)
    target = gamma * expected
    mask = (densities.double() < target) | (densities <= 0)
    deficit = (target - densities.double()).clamp_min(0.0).to(densities.dtype)
    return mask, deficit


def underutilised(
    densities: Tensor, gamma: float = 0.5, fit: ZipfFit | None = None, head_fraction: float = 0.5
) -> Tensor:
    """bool (F,): density below γ × the fitted Zipf law at the feature's rank, or dead."""
    return zipf_deficits(densities, gamma, fit, head_fraction)[0]


__all__ = [
    "zipf_capacities",
    "uniform_capacities",
    "ZipfFit",
    "fit_zipf",
    "density_ranks",
    "zipf_deficits",
    "underutilised",
]
