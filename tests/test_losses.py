"""Losses: the NMSE definition, aux_k, aux_zipf and the reduction property."""

import pytest
import torch
from adaptive_sae import losses, sparsifiers
from hypothesis import given, settings
from hypothesis import strategies as st


def _case(B, F, d, seed):
    g = torch.Generator().manual_seed(seed)
    resid = torch.randn(B, d, generator=g)
    pre = torch.randn(B, F, generator=g)
    W = torch.randn(F, d, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    mask = torch.rand(F, generator=g) < 0.4
    return resid, pre, W, mask


def test_nmse_matches_torch_var():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(50, 7, generator=g)
    expected = (x - x_hat).pow(2).sum() / (x.var(0, unbiased=False).sum() * 50)
    assert torch.allclose(losses.normalized_mse(x, x_hat), expected, rtol=1e-6)
    assert losses.normalized_mse(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 16),
    st.integers(1, 20),
    st.integers(1, 8),
    st.integers(1, 10),
    st.integers(0, 999),
)
def test_aux_zipf_topk_on_dead_mask_equals_aux_k(B, F, d, k_aux, seed):
    resid, pre, W, dead = _case(B, F, d, seed)
    a = losses.aux_k_loss(resid, pre, W, dead, k_aux)
    b = losses.aux_zipf_loss(resid, pre, W, dead, allocation="topk", k_aux=k_aux)
    assert torch.equal(a, b)


def test_aux_k_hand_built():
    resid = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pre = torch.tensor([[3.0, 0.5, 1.0], [-1.0, 2.0, 0.1]])
    W = torch.eye(3, 2)  # feature 2 has a zero decoder row
    dead = torch.tensor([True, True, False])
    # top-1 of dead features per token: token0 -> f0 (3.0), token1 -> f1 (2.0)
    e_hat = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    num = (resid - e_hat).pow(2).sum()
    den = (resid - resid.mean(0)).pow(2).sum()
    assert torch.allclose(losses.aux_k_loss(resid, pre, W, dead, 1), num / den)


def test_aux_loss_zero_without_features_and_residual_detached():
    resid, pre, W, _ = _case(4, 5, 3, 0)
    none = torch.zeros(5, dtype=torch.bool)
    assert losses.aux_k_loss(resid, pre, W, none, 2).item() == 0.0
    resid = resid.requires_grad_(True)
    pre = pre.requires_grad_(True)
    loss = losses.aux_k_loss(resid, pre, W, torch.ones(5, dtype=torch.bool), 2)
    loss.backward()
    assert resid.grad is None  # e = x - x_hat is detached
    assert pre.grad is not None and pre.grad.abs().sum() > 0


def test_aux_zipf_deficit_allocation_hand_built():
    resid = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    pre = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])
    W = torch.eye(2, 3)
    mask = torch.tensor([True, True])
    # deficits 0.3 and 0.6 of B = 4 tokens -> capacities ceil(1.2) = 2 and ceil(2.4) = 3
    deficits = torch.tensor([0.3, 0.6])
    codes = sparsifiers.feature_choice(pre, torch.tensor([2, 3]))
    assert (codes > 0).sum(0).tolist() == [2, 3]
    e_hat = codes @ W
    expected = (resid - e_hat).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    got = losses.aux_zipf_loss(resid, pre, W, mask, "deficit", deficits=deficits)
    assert torch.allclose(got, expected)


def test_aux_zipf_errors():
    resid, pre, W, mask = _case(4, 5, 3, 0)
    with pytest.raises(ValueError, match="deficits"):
        losses.aux_zipf_loss(resid, pre, W, mask, "deficit")
    with pytest.raises(ValueError, match="bool"):
        losses.aux_zipf_loss(resid, pre, W, mask.long(), "topk", k_aux=1)
    with pytest.raises(ValueError, match="allocation"):
        losses.aux_zipf_loss(resid, pre, W, mask, "nope", k_aux=1)


def test_l1_penalty_weights_by_decoder_norm():
    codes = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert losses.l1_penalty(codes, W).item() == pytest.approx((1 * 2 + 2 * 1 + 1 * 1) / 2)
