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


@pytest.mark.parametrize("method", ["trf", "profile"])
def test_fit_recovers_known_law(method):
    ranks = np.arange(1, 2001, dtype=np.float64)
    dens = 0.3 * (ranks + 4.0) ** -1.2
    rng = np.random.default_rng(0)
    fit = zipf.fit_zipf(torch.from_numpy(rng.permutation(dens)), head_fraction=1.0, method=method)
    assert fit.alpha == pytest.approx(1.2, rel=1e-3)
    assert fit.beta == pytest.approx(4.0, rel=1e-2)
    assert fit.r2 > 0.9999
    # rescaled so the law sums to the total density
    assert fit.predict(ranks).sum() == pytest.approx(dens.sum(), rel=1e-9)


def _log_residual(dens: np.ndarray, fit: zipf.ZipfFit) -> float:
    """The fitted head's sum of squared log residuals with the best log-scale for the fit's
    alpha and beta: the objective both methods minimise."""
    rho = np.sort(dens[dens > 0])[::-1][: fit.n_fit]
    x = -fit.alpha * np.log(np.arange(1, fit.n_fit + 1, dtype=np.float64) + fit.beta)
    res = np.mean(np.log(rho) - x) + x - np.log(rho)
    return float(res @ res)


@settings(max_examples=80, deadline=None)
@given(
    alpha=st.floats(0.0, 3.0),
    beta=st.floats(0.0, 200.0),
    noise=st.floats(0.0, 0.5),
    dead=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_profile_fit_is_at_least_as_good_as_the_trust_region_fit(
    alpha, beta, noise, dead, seed
):
    """Same objective, the same or a lower residual (to 1e-8 of R²: an exact law's β is found to
    the search's tolerance), within the same bounds: laws of any exponent and offset (flat ones
    included), log-normal noise, a share of dead features."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 513, dtype=np.float64)
    dens = 0.1 * (ranks + beta) ** -alpha * np.exp(noise * rng.standard_normal(512))
    dens[rng.random(512) < dead] = 0.0
    trf = zipf.fit_zipf(torch.from_numpy(dens), method="trf")
    prof = zipf.fit_zipf(torch.from_numpy(dens), method="profile")
    assert prof.n_fit == trf.n_fit
    if not math.isfinite(trf.alpha):  # too few live features: no law either way
        assert not math.isfinite(prof.alpha)
        return
    assert 0.0 <= prof.alpha <= 20.0 and 0.0 <= prof.beta <= 10.0 * prof.n_fit
    y = np.log(np.sort(dens[dens > 0])[::-1][: prof.n_fit])
    spread = float(((y - y.mean()) ** 2).sum())  # R² moves by at most 1e-8 either way
    assert _log_residual(dens, prof) <= _log_residual(dens, trf) + 1e-8 * spread + 1e-15
    assert prof.predict(ranks).sum() == pytest.approx(dens.sum(), rel=1e-9)


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


def test_refits_take_the_profile_fit_only_with_the_fast_paths(monkeypatch):
    """With ADAPTIVE_SAE_KERNELS=0 a refit is the trust-region fit, as the committed results
    were computed; with the fast paths on, the profile fit."""
    from adaptive_sae import selection_kernels
    from adaptive_sae.stats import FeatureStats

    rng = np.random.default_rng(0)
    ranks = np.arange(1, 257, dtype=np.float64)
    dens = torch.from_numpy(0.2 * (ranks + 9.0) ** -0.8 * np.exp(0.1 * rng.standard_normal(256)))
    for on, method in ((False, "trf"), (True, "profile")):
        monkeypatch.setattr(selection_kernels, "use_kernels", on)
        stats = FeatureStats(256, 10**6, 10**6)
        stats.density_raw, stats.density_weight = dens.clone(), torch.ones((), dtype=torch.float64)
        stats.refit()
        assert stats.fit == zipf.fit_zipf(dens.float(), method=method)
    # the two differ (in the last digits at least), so the check above tells them apart
    assert zipf.fit_zipf(dens.float(), method="profile") != zipf.fit_zipf(dens.float())
    with pytest.raises(ValueError, match="method='lm'"):
        zipf.fit_zipf(dens, method="lm")
