"""Synthetic ground-truth source, its metrics, and the source registry (DESIGN §7.1, §8)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from adaptive_sae.config import ConfigError
from adaptive_sae.data import activation_source, register_source, source_names
from adaptive_sae.data import synthetic as syn
from adaptive_sae.data.synthetic import (
    CHUNK_TOKENS,
    SyntheticConfig,
    SyntheticSource,
    fraction_recovered,
    l0_rank_correlation,
    max_cosine_per_feature,
    mean_max_cosine,
    recovery_metrics,
    zipf_probabilities,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SMALL = dict(d_in=16, n_true_features=64, k_true=4.0)


def take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_differs():
    a = take(SyntheticSource(SyntheticConfig(**SMALL, seed=3)).batches(100), 4)
    b = take(SyntheticSource(SyntheticConfig(**SMALL, seed=3)).batches(100), 4)
    c = take(SyntheticSource(SyntheticConfig(**SMALL, seed=4)).batches(100), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    s3, s4 = (SyntheticSource(SyntheticConfig(**SMALL, seed=s)) for s in (3, 4))
    assert not torch.equal(s3.true_features, s4.true_features)


@pytest.mark.parametrize("batch_size", [1, 100, CHUNK_TOKENS, 3 * CHUNK_TOKENS + 7])
def test_start_batch_equals_iterating_to_it(batch_size):
    src = SyntheticSource(SyntheticConfig(**SMALL, busyness_sigma=0.5, noise_std=0.1))
    walked = take(src.batches(batch_size), 6)
    for s in (0, 1, 5):
        assert torch.equal(next(src.batches(batch_size, start_batch=s)), walked[s])


def test_bad_batch_arguments_raise_at_once():
    src = SyntheticSource(SyntheticConfig(**SMALL))
    with pytest.raises(ValueError, match="batch_size"):
        src.batches(0)
    with pytest.raises(ValueError, match="start_batch"):
        src.batches(10, start_batch=-1)


def test_stream_is_the_same_whatever_the_batch_size():
    src = SyntheticSource(SyntheticConfig(**SMALL))
    a = torch.cat(take(src.batches(100), 6))  # 600 tokens
    b = torch.cat(take(src.batches(300), 2))
    assert torch.equal(a, b)
    assert torch.equal(src.sample_with_truth(600, split="train").x, a)


def test_held_out_is_a_separate_stream():
    # With noise, so that tokens with no active feature (x = 0) do not repeat across streams.
    src = SyntheticSource(SyntheticConfig(**SMALL, noise_std=0.01))
    train = torch.cat(take(src.batches(500), 4))  # (2000, d)
    val = src.held_out(500)
    assert val.shape == (500, SMALL["d_in"]) and val.dtype == torch.float32
    assert torch.equal(val, src.held_out(500))
    assert torch.equal(val, src.sample_with_truth(500, split="val").x)
    # No held-out token equals any training token.
    assert torch.cdist(val, train).min() > 0


# ------------------------------------------------------------------------------- statistics


def test_zipf_probabilities_sum_to_k_and_are_clipped():
    for n, k, a in [(1024, 8.0, 1.0), (64, 32.0, 2.0), (50, 50.0, 1.0), (100, 5.0, 0.0)]:
        p = zipf_probabilities(n, k, a)
        assert p.sum() == pytest.approx(k, rel=1e-9)
        assert p.max() <= 1.0 and p.min() > 0
        assert np.all(np.diff(p) <= 1e-15)  # non-increasing
    assert np.allclose(zipf_probabilities(100, 5.0, 0.0), 0.05)


def test_mean_active_count_is_k_true():
    cfg = SyntheticConfig(d_in=32, n_true_features=512, k_true=8.0)
    sample = SyntheticSource(cfg).sample_with_truth(20_000)
    # Var(n_active) <= k_true, so the standard error of the mean is <= 0.02: 0.1 is 5 s.e.
    assert sample.n_active.float().mean().item() == pytest.approx(8.0, abs=0.1)
    assert sample.n_active.float().std() > 1.0  # the count varies from token to token


def test_busyness_increases_variance_of_active_count():
    var = {}
    for sigma in (0.0, 1.0):
        src = SyntheticSource(SyntheticConfig(d_in=32, n_true_features=512, busyness_sigma=sigma))
        var[sigma] = src.sample_with_truth(8192).n_active.float().var().item()
    assert var[1.0] > 3 * var[0.0]


def test_true_features_unit_norm_and_codes_explain_x():
    cfg = SyntheticConfig(**SMALL, magnitude_min=0.25, magnitude_max=2.0)
    src = SyntheticSource(cfg)
    norms = src.true_features.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    s = src.sample_with_truth(300)
    codes = s.codes.to_dense()  # (n, F_true)
    assert torch.allclose(codes @ src.true_features, s.x, atol=1e-5)
    assert torch.equal((codes > 0).sum(1), s.n_active)
    nz = codes[codes > 0]
    assert nz.min() > 0.25 and nz.max() <= 2.0


def test_describe_is_json_and_names_the_source():
    src = SyntheticSource(SyntheticConfig(**SMALL, seed=7))
    d = json.loads(json.dumps(src.describe()))
    assert d["name"] == "synthetic" and d["seed"] == 7 and d["k_true"] == 4.0
    assert SyntheticConfig.from_json(SyntheticConfig(**SMALL).to_json()) == SyntheticConfig(**SMALL)


@settings(max_examples=20, deadline=None)
@given(
    d_in=st.integers(1, 12),
    n_true=st.integers(1, 40),
    k_frac=st.floats(0.05, 1.0),
    zipf=st.floats(0.0, 3.0),
    sigma=st.floats(0.0, 2.0),
    noise=st.sampled_from([0.0, 0.3]),
    batch_size=st.integers(1, 300),
    seed=st.integers(0, 2**32),
)
def test_batches_shapes_dtype_finite(d_in, n_true, k_frac, zipf, sigma, noise, batch_size, seed):
    cfg = SyntheticConfig(
        d_in=d_in,
        n_true_features=n_true,
        k_true=k_frac * n_true,
        zipf_exponent=zipf,
        busyness_sigma=sigma,
        noise_std=noise,
        seed=seed,
    )
    src = SyntheticSource(cfg)
    for x in take(src.batches(batch_size, start_batch=seed % 5), 2):
        assert x.shape == (batch_size, d_in) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    s = src.sample_with_truth(batch_size, split="train")
    assert s.n_active.shape == (batch_size,) and s.n_active.dtype == torch.int64
    assert s.codes.shape == (batch_size, n_true)
    assert int(s.n_active.max()) <= n_true
    assert src.feature_probabilities.sum().item() == pytest.approx(cfg.k_true, rel=1e-4)


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_in", 0),
        ("n_true_features", 2.5),
        ("k_true", 0.0),
        ("k_true", 2000.0),
        ("zipf_exponent", -1.0),
        ("busyness_sigma", float("nan")),
        ("magnitude_min", -0.1),
        ("magnitude_max", 0.1),
        ("noise_std", -1.0),
        ("seed", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SyntheticConfig(**{field: value})


# ------------------------------------------------------------------------------- metrics


def test_recovery_metrics_on_hand_built_cases():
    eye = torch.eye(8)
    true = eye[:4]  # (4, 8): true features e_0..e_3
    assert mean_max_cosine(true, true) == pytest.approx(1.0, abs=1e-6)
    assert fraction_recovered(true, true) == 1.0
    assert mean_max_cosine(eye[4:], true) == 0.0  # orthogonal decoder
    assert fraction_recovered(eye[4:], true) == 0.0
    assert mean_max_cosine(-true[:1], true[:1]) == pytest.approx(-1.0)  # signed cosine
    assert mean_max_cosine(-true, true) == 0.0  # -e_j is no match for e_j; e_j is orthogonal
    half = torch.cat([eye[:2], eye[6:]])  # recovers e_0, e_1 only
    assert fraction_recovered(half, true) == 0.5
    assert mean_max_cosine(half, true) == pytest.approx(0.5)
    # Scale does not matter; a threshold between two cosines splits them.
    w = torch.stack([3 * eye[0], 0.8 * eye[1] + 0.6 * eye[5]])  # cosines 1.0 and 0.8
    assert fraction_recovered(w, eye[:2], threshold=0.9) == 0.5
    assert fraction_recovered(w, eye[:2], threshold=0.7) == 1.0


def test_recovery_metrics_on_a_source():
    src = SyntheticSource(SyntheticConfig(**SMALL))
    m = recovery_metrics(src.true_features, src)
    assert m["mean_max_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["fraction_recovered"] == 1.0
    rand = torch.linalg.qr(torch.randn(SMALL["d_in"], SMALL["d_in"]))[0]  # random orthonormal
    low = recovery_metrics(rand, src, l0=torch.arange(5), n_active=torch.arange(5))
    assert low["fraction_recovered"] < 0.2 and low["mean_max_cosine"] < 0.8
    assert low["l0_rank_correlation"] == pytest.approx(1.0)


def test_chunked_cosine_matches_dense(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W, T = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g)
    dense = torch.nn.functional.normalize(T, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    monkeypatch.setattr(syn, "_COSINE_BLOCK", 40)  # one true feature per block
    assert torch.allclose(max_cosine_per_feature(W, T), dense.amax(1), atol=1e-6)


def test_l0_rank_correlation():
    n = torch.tensor([1, 2, 3, 5, 8, 13])
    assert l0_rank_correlation(n * 2 + 1, n) == pytest.approx(1.0)
    assert l0_rank_correlation(np.log(n.numpy()), n) == pytest.approx(1.0)  # monotone, not linear
    assert l0_rank_correlation(-n, n) == pytest.approx(-1.0)
    # undefined (NaN) when a side is constant, e.g. TopK's L0, or for a single token
    assert math.isnan(l0_rank_correlation(torch.full((6,), 8), n))
    assert math.isnan(l0_rank_correlation(n, torch.ones(6)))
    assert math.isnan(l0_rank_correlation(torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError):
        l0_rank_correlation(n, n[:3])


# ------------------------------------------------------------------------------- registry


def test_activation_source_builds_synthetic():
    src = activation_source("synthetic", **SMALL, seed=1)
    assert isinstance(src, SyntheticSource) and src.d_in == SMALL["d_in"]
    assert torch.equal(next(src.batches(10)), next(SyntheticSource(src.cfg).batches(10)))


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        activation_source("nope")
    for name in ("synthetic", "tiny", "gpt2"):
        assert name in str(err.value)


def test_register_source():
    name = "test_constant"
    register_source(name, lambda **p: SyntheticSource(SyntheticConfig(**SMALL, **p)))
    try:
        assert name in source_names()
        assert activation_source(name, seed=2).cfg.seed == 2
        with pytest.raises(ConfigError, match=name):
            register_source(name, SyntheticSource)
    finally:
        from adaptive_sae import data

        data._SOURCES.pop(name)


def test_data_import_does_not_import_transformer_lens():
    code = "import sys, adaptive_sae.data; print('transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
