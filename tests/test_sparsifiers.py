"""Allocation rules: exact hand-built cases and properties over random shapes."""

import pytest
import torch
from adaptive_sae import sparsifiers
from adaptive_sae.config import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st

P = torch.tensor(
    [
        [5.0, 4.0, -1.0, 0.5],
        [0.1, 0.2, 0.3, 9.0],
        [-2.0, -3.0, 1.0, -4.0],
    ]
)


def test_topk_hand_built():
    z = sparsifiers.topk(P, 2)
    expected = torch.tensor(
        [
            [5.0, 4.0, 0.0, 0.0],
            [0.0, 0.0, 0.3, 9.0],
            [0.0, 0.0, 1.0, 0.0],  # the second pick (-2.0) is selected but ReLU makes it 0
        ]
    )
    assert torch.equal(z, expected)


def test_mutual_choice_hand_built():
    # k = 2 per token on average: budget 6 of the 12 entries, allocated unevenly
    z = sparsifiers.mutual_choice(P, 2)
    expected = torch.tensor(
        [
            [5.0, 4.0, 0.0, 0.5],
            [0.0, 0.0, 0.3, 9.0],
            [0.0, 0.0, 1.0, 0.0],
        ]
    )
    assert torch.equal(z, expected)
    assert (z > 0).sum(1).tolist() == [3, 2, 1]


def test_feature_choice_hand_built():
    caps = torch.tensor([1, 0, 2, 3])
    z = sparsifiers.feature_choice(P, caps)
    expected = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.5],
            [0.0, 0.0, 0.3, 9.0],
            [0.0, 0.0, 1.0, 0.0],  # column 3 picks row 2 too, but -4 -> 0
        ]
    )
    assert torch.equal(z, expected)


def test_threshold_rule():
    z = sparsifiers.threshold(P, torch.tensor([1.0, 4.5, 0.0, 0.4]))
    assert torch.equal(
        z,
        torch.tensor([[5.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.3, 9.0], [0.0, 0.0, 1.0, 0.0]]),
    )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        sparsifiers.topk(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ConfigError, match="k=5"):
        sparsifiers.topk(P, 5)
    with pytest.raises(ConfigError, match="shape"):
        sparsifiers.feature_choice(P, torch.tensor([1, 1]))
    with pytest.raises(ConfigError, match=r"\[0, B=3\]"):
        sparsifiers.feature_choice(P, torch.tensor([4, 0, 0, 0]))
    with pytest.raises(ConfigError, match="integers"):
        sparsifiers.feature_choice(P, torch.tensor([1.0, 0, 0, 0]))


matrices = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))


def _rand(B: int, F: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, generator=g)


@settings(max_examples=60, deadline=None)
@given(matrices, st.data())
def test_topk_property(shape, data):
    B, F, seed = shape
    k = data.draw(st.integers(1, F))
    p = _rand(B, F, seed)
    z = sparsifiers.topk(p, k)
    pos = (p > 0).sum(1)
    assert torch.equal((z > 0).sum(1), torch.clamp(pos, max=k))
    # the chosen entries are the row's largest
    kth = p.topk(k, dim=1).values[:, -1:]
    assert bool(((z > 0) <= (p >= kth)).all())


@settings(max_examples=60, deadline=None)
@given(matrices, st.data())
def test_mutual_choice_property(shape, data):
    B, F, seed = shape
    k = data.draw(st.floats(0.5, F))
    p = _rand(B, F, seed)
    K = int(k * B)
    if K < 1:
        return
    idx = sparsifiers.select_mutual_choice(p, K)
    assert idx.numel() == K and idx.unique().numel() == K
    z = sparsifiers.mutual_choice(p, k)
    # spends exactly the positive part of the budget and picks the largest entries
    assert int((z > 0).sum()) == min(K, int((p > 0).sum()))
    chosen = p.reshape(-1)[idx]
    mask = torch.zeros(B * F, dtype=torch.bool)
    mask[idx] = True
    rest = p.reshape(-1)[~mask]
    if rest.numel():
        assert chosen.min() >= rest.max()


@settings(max_examples=60, deadline=None)
@given(matrices, st.data())
def test_feature_choice_property(shape, data):
    B, F, seed = shape
    caps = torch.tensor(data.draw(st.lists(st.integers(0, B), min_size=F, max_size=F)))
    p = _rand(B, F, seed)
    z = sparsifiers.feature_choice(p, caps)
    used = (z > 0).sum(0)
    assert bool((used <= caps).all())
    assert torch.equal(used, torch.minimum(caps, (p > 0).sum(0)))
    # each column picks its largest entries
    for j in range(F):
        if 0 < caps[j] < B:
            kth = p[:, j].topk(int(caps[j])).values[-1]
            assert bool(((z[:, j] > 0) <= (p[:, j] >= kth)).all())


def test_codes_are_differentiable_at_selected_entries():
    p = P.clone().requires_grad_(True)
    sparsifiers.mutual_choice(p, 2).sum().backward()
    expected = (sparsifiers.mutual_choice(P, 2) > 0).float()
    assert torch.equal(p.grad, expected)
