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
