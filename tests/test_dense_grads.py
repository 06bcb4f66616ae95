"""A dense-code rule's gradient in closed form (``Trainer._dense_grads``, the losses'
``*_and_grad(s)``) against autograd. Whole runs with and without it:
``tests/test_loss_kernel.py::test_training_in_closed_form_equals_autograd``."""

from __future__ import annotations

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae import losses, selection_kernels
from adaptive_sae.rules import register_rule, unregister_rule
from adaptive_sae.rules.relu_l1 import ReluL1
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(B=st.integers(2, 30), d=st.integers(1, 12), F=st.integers(1, 40), seed=st.integers(0, 9999))
def test_loss_gradients_equal_autograd(B, d, F, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    x_hat = torch.randn(B, d, generator=g, dtype=torch.float64).requires_grad_()
    value, grad = losses.normalized_mse_and_grad(x, x_hat.detach())
    want = losses.normalized_mse(x, x_hat)
    want.backward()
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(grad, x_hat.grad)

    codes = torch.randn(B, F, generator=g, dtype=torch.float64).relu().requires_grad_()
    W_dec = torch.randn(F, d, generator=g, dtype=torch.float64).requires_grad_()
    value, d_codes, d_W = losses.l1_penalty_and_grads(codes.detach().sum(0), B, W_dec.detach())
    want = losses.l1_penalty(codes, W_dec)
    want.backward()
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(d_codes.expand(B, F), codes.grad)
    torch.testing.assert_close(d_W, W_dec.grad)


def test_l1_gradient_by_hand():
    """Two tokens, W_dec rows of norm 2 and 1: ∂/∂z = ‖W_j‖ / B, ∂/∂W_j = Σ_b z_bj / B · W_j/‖W_j‖."""
    codes = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    value, d_codes, d_W = losses.l1_penalty_and_grads(codes.sum(0), 2, W_dec)
    assert float(value) == (1 * 2 + 3 * 2 + 2 * 1) / 2
    assert d_codes.tolist() == [1.0, 0.5]
    assert d_W.tolist() == [[2.0, 0.0], [0.0, 1.0]]  # (4/2)·(1, 0) and (2/2)·(0, 1)


@pytest.mark.parametrize("share", [1, 10**9])  # the matches as indices (few) / as the mask
def test_step_gradients_equal_autograd(share, monkeypatch):
    """One ReLU+L1 step's gradients (NMSE + the L1 penalty) in closed form and by autograd,
    from the same state; W_enc column-major as an SAE's, its gradient in the same layout.
    With the matches as indices (few active codes) the loss kernel takes them
    (``_few_codes_grads``), with the mask the dense products (``_dense_grads``)."""
    from adaptive_sae import trainer as T

    monkeypatch.setattr(T, "DENSE_MASK_SHARE", share)
    g = torch.Generator().manual_seed(0)
    cfg = asae.SAEConfig(d_in=12, n_features=40, rule="relu_l1", k=4)
    t = asae.Trainer(cfg, asae.TrainConfig(batch_size=64, total_tokens=64 * 4, l1_coefficient=0.3))
    x = torch.randn(256, 12, generator=g)
    t.init_from_data(x)
    with torch.no_grad():
        t.sae.b_enc.copy_(torch.randn(40, generator=g))  # some affinities <= 0
    x_s = t.sae.scale_input(x[:64])
    x_hat, _, _, loss, recon, _, grads = t._forward_closed_form(x_s)
    assert (t._kernel_counts is not None) == (share == 1)  # the loss kernel counted the matches
    if share == 1:
        assert int(t._kernel_counts[:40].sum()) == int((t._forward(x_s)[1] > 0).sum())

    t.opt.zero_grad(set_to_none=True)
    want_x_hat, P, _, codes = t._forward(x_s)
    want_loss, want_recon, _ = t._losses(x_s, want_x_hat, P, codes)
    want_loss.backward()
    assert bool((P <= 0).any()) and bool((P > 0).any())
    torch.testing.assert_close(x_hat, want_x_hat.detach())
    torch.testing.assert_close(loss, want_loss.detach())
    torch.testing.assert_close(recon, want_recon.detach())
    for name, got in grads.items():
        param = getattr(t.sae, name)
        assert got.stride() == param.stride(), name
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_a_penalty_without_its_gradients_trains_through_autograd(monkeypatch):
    """A dense-code rule with a penalty but no ``penalty_and_grads`` has no closed form."""

    class Squared(ReluL1):
        name = "relu_l2_test"
        penalty_and_grads = asae.rules.AllocationRule.penalty_and_grads

        def penalty(self, sae, codes, state):
            return state["l1_coef"] * codes.pow(2).sum(-1).mean()

    register_rule(Squared())
    try:
        cfg = asae.SAEConfig(d_in=8, n_features=32, rule="relu_l2_test", k=4)
        t = asae.Trainer(cfg, asae.TrainConfig(batch_size=64, total_tokens=64 * 3))
        assert not t._closed_form_applies()
        run = asae.train(cfg, t.tcfg, torch.randn(512, 8))
        assert run.history["step"].iloc[-1] == 3
        relu = asae.Trainer(asae.SAEConfig(d_in=8, n_features=32, rule="relu_l1"), t.tcfg)
        assert relu._closed_form_applies()
        monkeypatch.setattr(selection_kernels, "use_kernels", False)  # ADAPTIVE_SAE_KERNELS=0
        assert not relu._closed_form_applies()  # autograd, as the committed results
    finally:
        unregister_rule("relu_l2_test")


@pytest.mark.parametrize("aux", ["none", "aux_k", "aux_zipf"])
def test_training_on_few_active_codes_equals_autograd(aux, monkeypatch):
    """Whole ReLU+L1 runs with every step's matches taken as indices (as once few codes are
    active), so the loss kernel takes each step with the L1 penalty's gradient per code,
    against the same runs through autograd: weights, λ and history to tolerance."""
    from adaptive_sae import trainer as T

    monkeypatch.setattr(T, "DENSE_MASK_SHARE", 1)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(128 * 12, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="relu_l1", k=4)
    tcfg = asae.TrainConfig(batch_size=128, total_tokens=128 * 10, seed=0, aux_loss=aux,
                            log_every=1, dead_window_tokens=128, init_sample_tokens=128)  # fmt: skip
    calls = []
    real = T.Trainer._few_codes_grads
    monkeypatch.setattr(T.Trainer, "_few_codes_grads", lambda *a: (calls.append(1), real(*a))[1])
    closed = asae.train(cfg, tcfg, data)
    assert len(calls) == 10
    monkeypatch.setattr(asae.Trainer, "_closed_form_applies", lambda self: False)
    by_autograd = asae.train(cfg, tcfg, data)
    a, b = closed.sae.state_dict(), by_autograd.sae.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for col in ["loss", "nmse", "aux_loss", "l0_mean", "l1_coef"]:
        torch.testing.assert_close(
            torch.tensor(closed.history[col].values),
            torch.tensor(by_autograd.history[col].values),
            rtol=1e-4,
            atol=1e-6,
        )
