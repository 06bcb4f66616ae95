"""Zipf capacities, the Zipf–Mandelbrot fit, and the underutilised set."""

import math

import numpy as np
import pytest
import torch
from adaptive_sae import zipf
from adaptive_sae.config import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 64),
    st.floats(0.0, 3.0),
    st.floats(0.0, 20.0),
    st.data(),
)
def test_capacities_sum_and_bounds(F, B, alpha, beta, data):
    K = data.draw(st.integers(F, F * B))
    caps = zipf.zipf_capacities(F, K, B, alpha, beta)
    assert caps.dtype == torch.int64 and caps.shape == (F,)
    assert int(caps.sum()) == K
    assert int(caps.min()) >= 1 and int(caps.max()) <= B
    # non-increasing in rank (the profile is monotone and rounding moves by at most one)
    assert bool((caps[:-1] >= caps[1:] - 1).all())


def test_capacities_hand_built():
    # weights 1, 1/2, 1/3, 1/4 scaled to 25 -> 12, 6, 4, 3
    assert zipf.zipf_capacities(4, 25, 100, alpha=1.0).tolist() == [12, 6, 4, 3]
    # clipping at B = 10 re-spreads the excess (water-filling)
    caps = zipf.zipf_capacities(4, 25, 10, alpha=1.0)
    assert caps.tolist()[0] == 10 and int(caps.sum()) == 25
    assert zipf.uniform_capacities(4, 10, 100).tolist() == [3, 3, 2, 2]


def test_capacity_errors():
    with pytest.raises(ConfigError, match="at least 1"):
        zipf.zipf_capacities(10, 5, 100)
    with pytest.raises(ConfigError, match="exceeds F\\*B"):
        zipf.zipf_capacities(10, 1001, 100)


def test_fit_recovers_known_law():
    ranks = np.arange(1, 2001, dtype=np.float64)
    dens = 0.3 * (ranks + 4.0) ** -1.2
    rng = np.random.default_rng(0)
    fit = zipf.fit_zipf(torch.from_numpy(rng.permutation(dens)), head_fraction=1.0)
    assert fit.alpha == pytest.approx(1.2, rel=1e-3)
    assert fit.beta == pytest.approx(4.0, rel=1e-2)
    assert fit.r2 > 0.9999
    # rescaled so the law sums to the total density
    assert fit.predict(ranks).sum() == pytest.approx(dens.sum(), rel=1e-9)


def _log_cost(dens: np.ndarray, fit: zipf.ZipfFit) -> float:
    """The fitted head's sum of squared log residuals (what the fit minimises, up to scale)."""
    rho = np.sort(dens[dens > 0])[::-1][: fit.n_fit]
    r = np.arange(1, fit.n_fit + 1, dtype=np.float64)
    x = -fit.alpha * np.log(r + fit.beta)
    c = np.mean(np.log(rho) - x)  # the best log-scale for this alpha and beta
    return float(((c + x - np.log(rho)) ** 2).sum())


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.floats(0.2, 2.5),
    beta=st.floats(0.0, 50.0),
    noise=st.floats(0.0, 0.3),
    drift=st.floats(-0.3, 0.3),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_warm_started_fit_is_as_good_as_a_cold_one(alpha, beta, noise, drift, seed):
    """A refit from the last fit (``start``: where training refits) reaches the cold fit's
    quality on the densities of a law that moved since (alpha off by ``drift``), with noise."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 513, dtype=np.float64)
    dens = 0.1 * (ranks + beta) ** -alpha * np.exp(noise * rng.standard_normal(512))
    earlier = zipf.fit_zipf(torch.from_numpy(0.1 * (ranks + beta) ** -(alpha * (1 + drift))))
    cold = zipf.fit_zipf(torch.from_numpy(dens))
    warm = zipf.fit_zipf(torch.from_numpy(dens), start=earlier)
    assert warm.n_fit == cold.n_fit
    c_cold, c_warm = _log_cost(dens, cold), _log_cost(dens, warm)
    assert c_warm <= c_cold * (1 + 1e-3) + 1e-9
    assert warm.r2 == pytest.approx(cold.r2, abs=1e-3)


def test_fit_with_too_few_live_features():
    fit = zipf.fit_zipf(torch.tensor([0.5, 0.0, 0.0]))
    assert math.isnan(fit.alpha)
    assert zipf.underutilised(torch.tensor([0.5, 0.0, 0.0])).tolist() == [False, True, True]


def test_underutilised_flags_low_tail_and_dead():
    ranks = np.arange(1, 101, dtype=np.float64)
    dens = 0.1 * ranks**-1.0
    dens[90:] *= 0.1  # the tail falls far below the law
    dens[99] = 0.0  # and one feature is dead
    mask, deficit = zipf.zipf_deficits(torch.from_numpy(dens), gamma=0.5, head_fraction=0.5)
    assert mask[:80].sum() == 0
    assert bool(mask[90:].all())
    assert bool((deficit[mask] > 0).all()) and bool((deficit[~mask] == 0).all())


def test_density_ranks():
    assert zipf.density_ranks(torch.tensor([0.1, 0.5, 0.1, 0.0])).tolist() == [2, 1, 3, 4]


def test_refits_start_from_the_last_fit_only_with_the_fast_paths(monkeypatch):
    """With ADAPTIVE_SAE_KERNELS=0 a refit is the cold fit, as the committed results were
    computed; with the fast paths on it starts from the last fit."""
    from adaptive_sae import selection_kernels
    from adaptive_sae.stats import FeatureStats

    rng = np.random.default_rng(0)
    ranks = np.arange(1, 257, dtype=np.float64)
    first = torch.from_numpy(0.2 * (ranks + 3.0) ** -1.1)
    second = torch.from_numpy(0.2 * (ranks + 9.0) ** -0.8 * np.exp(0.1 * rng.standard_normal(256)))
    for on in (False, True):
        monkeypatch.setattr(selection_kernels, "use_kernels", on)
        stats = FeatureStats(256, 10**6, 10**6)
        stats.density_raw, stats.density_weight = first.clone(), torch.ones((), dtype=torch.float64)
        stats.refit()
        previous = stats.fit
        stats.density_raw = second.clone()
        stats.refit()
        want = zipf.fit_zipf(second.float(), start=previous if on else None)
        assert stats.fit == want
    # the two differ (in the last digits), so the check above tells them apart
    assert zipf.fit_zipf(second.float(), start=previous) != zipf.fit_zipf(second.float())
