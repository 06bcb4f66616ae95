"""Losses against hand values and the naive oracle (``tests/oracles.py``): NMSE, L1, and the
one auxiliary loss (aux_k, aux_zipf with both allocations) through its sparse and its
dense-subset branch, values and every gradient."""

from types import SimpleNamespace

import oracles
import pytest
import torch
from adaptive_sae import losses
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import make_params


def as_sae(W_enc, b_enc, W_dec, b_dec):
    return SimpleNamespace(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)


# ----- NMSE and L1 ------------------------------------------------------------------------------------


def test_nmse_matches_torch_var():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(50, 7, generator=g)
    expected = (x - x_hat).pow(2).sum() / (x.var(0, unbiased=False).sum() * 50)
    torch.testing.assert_close(losses.normalized_mse(x, x_hat), expected, rtol=1e-6, atol=0)
    assert losses.normalized_mse(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)


def test_nmse_hand_built():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): Σ‖x − x̄‖² = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # Σ‖x − x̂‖² = 1 + 1 = 2
    assert losses.normalized_mse(x, x_hat).item() == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        losses.normalized_mse(x, x_hat[:1])


def test_l1_penalty_weights_by_decoder_norm():
    codes = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert losses.l1_penalty(codes, W).item() == pytest.approx((1 * 2 + 2 * 1 + 1 * 1) / 2)


def test_deficit_capacities_hand_built():
    caps = losses.deficit_capacities(torch.tensor([0.3, 0.6, 0.0, 1.5, 0.25]), 4)
    assert caps.tolist() == [2, 3, 1, 4, 1]  # ⌈4·d⌉ within [1, 4]


# ----- the auxiliary loss by hand -------------------------------------------------------------------


def test_aux_k_hand_built():
    # x_s = I and zero biases make P = W_enc: P = [[3, .5, 1], [-1, 2, .1]]
    P = torch.tensor([[3.0, 0.5, 1.0], [-1.0, 2.0, 0.1]])
    sae = as_sae(P.clone(), torch.zeros(3), torch.eye(3, 2), torch.zeros(2))
    x_s = torch.eye(2)
    resid = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    dead = torch.tensor([True, True, False])
    # top-1 of the dead features per token: token 0 -> f0 (3.0), token 1 -> f1 (2.0)
    e_hat = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    expected = (resid - e_hat).pow(2).sum() / torch.tensor(2.5)  # Σ‖e − ē‖² = 0.5 + 2
    got = losses.aux_k_loss(resid, x_s, P, sae, dead, 1)
    torch.testing.assert_close(got, expected)
    assert got.item() == pytest.approx(4.0 / 2.5)


def test_aux_zipf_deficit_allocation_hand_built():
    P = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])
    sae = as_sae(P.clone(), torch.zeros(2), torch.eye(2, 4), torch.zeros(4))
    x_s = torch.eye(4)  # P = x_s W_enc
    resid = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    # deficits 0.3 and 0.6 of B = 4 tokens: capacities ⌈1.2⌉ = 2 and ⌈2.4⌉ = 3
    deficits = torch.tensor([0.3, 0.6])
    codes = torch.tensor([[4.0, 0.0], [3.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    e_hat = codes @ sae.W_dec
    expected = (resid - e_hat).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    mask = torch.tensor([True, True])
    got = losses.aux_zipf_loss(resid, x_s, P, sae, mask, "deficit", deficits=deficits)
    torch.testing.assert_close(got, expected)


def test_aux_loss_zero_without_features_and_residual_detached():
    params = make_params(B=8, d=4, F=6)
    x, *weights = params
    P = oracles.pre_acts(x, weights[0], weights[1], weights[3]).detach()
    sae = as_sae(*weights)
    resid = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    none = torch.zeros(6, dtype=torch.bool)
    assert losses.aux_k_loss(resid, x, P, sae, none, 2).item() == 0.0
    loss = losses.aux_k_loss(resid, x, P, sae, torch.ones(6, dtype=torch.bool), 2)
    loss.backward()
    assert resid.grad is None  # e = x − x̂ is detached
    assert all(w.grad is not None and bool(w.grad.abs().sum() > 0) for w in weights)


def test_aux_loss_errors():
    x, W_enc, b_enc, W_dec, b_dec = make_params(B=4, d=3, F=5)
    P = oracles.pre_acts(x, W_enc, b_enc, b_dec).detach()
    sae = as_sae(W_enc, b_enc, W_dec, b_dec)
    mask = torch.tensor([True, False, True, True, False])
    with pytest.raises(ValueError, match="deficits"):
        losses.aux_zipf_loss(x, x, P, sae, mask, "deficit")
    with pytest.raises(ValueError, match="bool"):
        losses.aux_zipf_loss(x, x, P, sae, mask.long(), "topk", k_aux=1)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        losses.aux_zipf_loss(x, x, P, sae, mask[:3], "topk", k_aux=1)
    with pytest.raises(ValueError, match="allocation"):
        losses.aux_zipf_loss(x, x, P, sae, mask, "nope", k_aux=1)
    with pytest.raises(ValueError, match="k_aux"):
        losses.aux_zipf_loss(x, x, P, sae, mask, "topk")


# ----- the auxiliary loss against the oracle: value and every gradient ------------------------------------


def lib_and_oracle(params, e, mask, allocation, k_aux=None, deficits=None, threshold=None):
    """(loss, grads) of the library's aux_loss and of the oracle, gradients w.r.t. all of
    x_s, W_enc, b_enc, W_dec, b_dec."""
    x, W_enc, b_enc, W_dec, b_dec = params
    sae = as_sae(W_enc, b_enc, W_dec, b_dec)

    def lib():
        with torch.no_grad():
            P = oracles.pre_acts(x, W_enc, b_enc, b_dec)
        return losses.aux_loss(e, x, P, sae, mask, allocation, k_aux, deficits, threshold)

    def oracle():
        P = oracles.pre_acts(x, W_enc, b_enc, b_dec)
        return oracles.aux_loss(e, P, W_dec, mask, allocation, k_aux, deficits)

    out = []
    for fn in (lib, oracle):
        for p in params:
            p.grad = None
        loss = fn()
        if loss.requires_grad:  # an empty feature set gives a constant 0
            loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        out.append((loss.detach(), grads))
    return out


def assert_same(out, rtol=1e-9, atol=1e-11):
    (l_lib, g_lib), (l_ref, g_ref) = out
    torch.testing.assert_close(l_lib, l_ref, rtol=rtol, atol=atol)
    for a, b in zip(g_lib, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("allocation", ["topk", "deficit"])
@pytest.mark.parametrize("branch", ["sparse", "dense_subset", "auto"])
def test_aux_loss_matches_oracle(allocation, branch, monkeypatch):
    params = make_params(B=40, d=10, F=60, seed=7)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(60, generator=g) < 0.4
    deficits = torch.rand(60, generator=g) * 0.2
    e = torch.randn(40, 10, generator=g, dtype=torch.float64)
    # density_threshold 2 forces the sparse kernel, 0 the dense product on the column subset
    threshold = {"sparse": 2.0, "dense_subset": 0.0, "auto": None}[branch]
    calls = []

    def counted(name):
        fn = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, **kw: calls.append(name) or fn(*a, **kw))

    counted("sparse_reconstruct")
    counted("subset_reconstruct")
    out = lib_and_oracle(params, e, mask, allocation, 3, deficits, threshold)
    assert_same(out)
    assert bool(out[1][0] > 0) and all(bool(gr.abs().sum() > 0) for gr in out[1][1])
    if branch == "sparse":
        assert calls == ["sparse_reconstruct"]
    elif branch == "dense_subset":
        assert calls == ["subset_reconstruct"]


@settings(max_examples=40)
@given(
    st.integers(1, 16),
    st.integers(1, 20),
    st.integers(1, 6),
    st.integers(1, 10),
    st.sampled_from(["topk", "deficit"]),
    st.sampled_from([0.0, 2.0, None]),
    st.integers(0, 999),
)
def test_aux_loss_property(B, F, d, k_aux, allocation, threshold, seed):
    params = make_params(B=B, d=d, F=F, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(F, generator=g) < 0.5
    deficits = torch.rand(F, generator=g) * 0.5
    e = torch.randn(B, d, generator=g, dtype=torch.float64)
    assert_same(lib_and_oracle(params, e, mask, allocation, k_aux, deficits, threshold))


@settings(max_examples=40)
@given(
    st.integers(1, 16),
    st.integers(1, 20),
    st.integers(1, 8),
    st.integers(1, 10),
    st.integers(0, 999),
)
def test_aux_zipf_topk_on_the_dead_set_is_aux_k(B, F, d, k_aux, seed):
    """aux_zipf with topk allocation and U = D is aux_k: both library names against the
    oracle's aux_k (top-k_aux of the dead features per token)."""
    x, W_enc, b_enc, W_dec, b_dec = make_params(B=B, d=d, F=F, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dead = torch.rand(F, generator=g) < 0.4
    e = torch.randn(B, d, generator=g, dtype=torch.float64)
    P = oracles.pre_acts(x, W_enc, b_enc, b_dec)
    ref = oracles.aux_loss(e, P, W_dec, dead, "topk", k_aux=k_aux).detach()
    sae = as_sae(W_enc, b_enc, W_dec, b_dec)
    zipf = losses.aux_zipf_loss(e, x, P.detach(), sae, dead, "topk", k_aux=k_aux)
    auxk = losses.aux_k_loss(e, x, P.detach(), sae, dead, k_aux)
    torch.testing.assert_close(zipf.detach(), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(auxk.detach(), ref, rtol=1e-9, atol=1e-12)
