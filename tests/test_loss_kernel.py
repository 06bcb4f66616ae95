"""The compiled reconstruction loss and gradient (``adaptive_sae.loss_kernel``) against dense
autograd (``oracles.reconstruct`` + ``oracles.nmse``), and training with it against training
without it."""

from __future__ import annotations

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae import loss_kernel, selection_kernels
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import make_params, nmse, reconstruct

pytest.importorskip("numba")
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _oracle(x, W_enc, b_enc, W_dec, b_dec, idx, target=None):
    """(x̂, NMSE, gradients by name) by dense autograd; with a target, the auxiliary losses'
    form (the target reconstructed without b_dec)."""
    params = [p.detach().clone().requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    x_hat, _ = reconstruct(x.detach(), *params, idx, decoder_bias=target is None)
    loss = nmse(x.detach() if target is None else target, x_hat)
    loss.backward()
    return x_hat.detach(), loss.detach(), {n: p.grad for n, p in zip(NAMES, params)}


def _kernel(x, W_enc, b_enc, W_dec, b_dec, idx, target=None):
    P = ((x - b_dec) @ W_enc + b_enc).detach().contiguous()
    return loss_kernel.nmse_and_grads(
        x, P, idx, W_enc.detach(), W_dec.detach(), b_dec.detach(),
        target=target, decoder_bias=target is None,
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    B=st.integers(2, 40),
    d=st.integers(1, 20),
    F=st.integers(1, 50),
    share=st.floats(0.0, 1.0),
    shuffled=st.booleans(),
    column_major=st.booleans(),
    aux_form=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_loss_and_gradients_equal_dense_autograd(
    B, d, F, share, shuffled, column_major, aux_form, dtype, seed
):
    """Any selection (empty to all entries, ascending or shuffled, with inactive entries P <= 0:
    b_enc < 0 in make_params), any d, both dtypes; W_enc row- or column-major (an SAE's is a
    transposed copy of W_dec), its gradient in the same layout (the fused Adam needs it); the
    main loss's form and the auxiliary losses' (a residual target, no decoder bias)."""
    x, W_enc, b_enc, W_dec, b_dec = make_params(B, d, F, dtype, seed)
    if column_major:
        W_enc = W_enc.detach().t().contiguous().t().requires_grad_()
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand(B * F, generator=g) < share).nonzero().squeeze(1)
    if shuffled:
        idx = idx[torch.randperm(idx.numel(), generator=g)]
    target = torch.randn(B, d, generator=g, dtype=dtype) if aux_form else None  # a residual
    want_x_hat, want_loss, want = _oracle(x, W_enc, b_enc, W_dec, b_dec, idx, target)
    x_hat, loss, got = _kernel(x, W_enc, b_enc, W_dec, b_dec, idx, target)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(x_hat, want_x_hat, **tol)
    torch.testing.assert_close(loss, want_loss, **tol)
    assert got["W_enc"].stride() == W_enc.stride()
    for name in NAMES:
        torch.testing.assert_close(got[name], want[name], **tol)


def test_exact_small_case():
    """B=2, d=1, F=2: x = (1, 3), one active entry per token and one inactive one.

    x̂ = b_dec + v·W_dec = (0 + 2·1, 0) → errors (-1, 3), Σe² = 10, Σ(x − x̄)² = 2, NMSE = 5;
    ∂L/∂x̂ = −2e/2 = (1, −3); ∂b_dec = Σ ∂L/∂x̂ − W_enc·∂b_enc."""
    x = torch.tensor([[1.0], [3.0]])
    W_enc = torch.tensor([[1.0, 1.0]])
    W_dec = torch.tensor([[1.0], [0.5]])
    b_dec = torch.zeros(1)
    P = torch.tensor([[2.0, 5.0], [-1.0, 0.5]])
    idx = torch.tensor([0, 2])  # token 0: feature 0 (P = 2); token 1: feature 0 (P = -1)
    x_hat, loss, g = loss_kernel.nmse_and_grads(x, P, idx, W_enc, W_dec, b_dec)
    assert x_hat.tolist() == [[2.0], [0.0]]
    assert float(loss) == 5.0
    # feature 0: ∂L/∂v = ⟨(1), W_dec[0]⟩ = 1 at token 0; token 1 inactive
    assert g["b_enc"].tolist() == [1.0, 0.0]
    assert g["W_dec"].tolist() == [[2.0], [0.0]]  # v · ∂L/∂x̂ at token 0
    assert g["W_enc"].tolist() == [[1.0, 0.0]]  # ∂b_enc · x at token 0
    assert g["b_dec"].tolist() == [1.0 - 3.0 - 1.0]


def test_nan_affinity_reaches_the_loss():
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in make_params(8, 4, 6, torch.float32))
    P = ((x - b_dec) @ W_enc + b_enc).contiguous()
    P[3, 2] = float("nan")
    idx = torch.arange(P.numel())
    _, loss, _ = loss_kernel.nmse_and_grads(x, P, idx, W_enc, W_dec, b_dec)
    assert torch.isnan(loss)


def test_applies_only_where_it_can(monkeypatch):
    W, small = torch.zeros(4, 8), 1000
    assert loss_kernel.applies(W, small)
    assert not loss_kernel.applies(W, loss_kernel.MAX_WORK + 1)  # torch's threads win there
    assert not loss_kernel.applies(W.to(torch.bfloat16), small)
    with torch.autocast("cpu", torch.bfloat16):
        assert not loss_kernel.applies(W, small)
    monkeypatch.setattr(selection_kernels, "use_kernels", False)
    assert not loss_kernel.applies(W, small)


def test_trainer_takes_it_for_small_steps_only():
    small = asae.Trainer(asae.SAEConfig(d_in=64, n_features=512, k=8), asae.TrainConfig(1024))
    assert small._closed_form_applies()  # K·d = 8 · 1024 · 64
    big = asae.Trainer(asae.SAEConfig(d_in=256, n_features=512, k=32), asae.TrainConfig(4096))
    assert not big._closed_form_applies()  # K·d = 32 · 4096 · 256
    dense = asae.Trainer(
        asae.SAEConfig(d_in=64, n_features=512, rule="relu_l1"), asae.TrainConfig(1024)
    )
    assert dense._closed_form_applies()  # no kernel: dense products (tests/test_dense_grads.py)


@pytest.mark.parametrize(
    "rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu_l1"]
)
@pytest.mark.parametrize("aux", ["none", "aux_k", "aux_zipf"])
def test_training_in_closed_form_equals_autograd(rule, aux, monkeypatch):
    """A whole run with the main loss's gradient in closed form (the loss kernel; ReLU+L1's
    dense products, ``tests/test_dense_grads.py``), the auxiliary losses' autograd gradients
    added to it, against the same run through autograd: weights and history to tolerance."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(128 * 12, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
    tcfg = asae.TrainConfig(
        batch_size=128, total_tokens=128 * 10, seed=0, aux_loss=aux, log_every=1,
        dead_window_tokens=128, zipf_refit_every=1, init_sample_tokens=128, gamma=1.0,
    )  # fmt: skip
    closed = asae.train(cfg, tcfg, data)
    with monkeypatch.context() as m:
        m.setattr(asae.Trainer, "_closed_form_applies", lambda self: False)
        by_autograd = asae.train(cfg, tcfg, data)
    a, b = closed.sae.state_dict(), by_autograd.sae.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True)
    cols = ["loss", "nmse", "aux_loss", "l0_mean", "dead_pct"]
    for col in cols + (["l1_coef"] if rule == "relu_l1" else []):
        torch.testing.assert_close(
            torch.tensor(closed.history[col].values),
            torch.tensor(by_autograd.history[col].values),
            rtol=1e-4,
            atol=1e-6,
        )
    # the auxiliary loss took part (aux_k needs dead features; Feature Choice has none here;
    # aux_zipf needs features below the fitted law; uniform Feature Choice's is flat)
    zipf_active = aux == "aux_zipf" and rule != "feature_choice"
    if zipf_active or (aux == "aux_k" and rule in ("topk", "mutual_choice")):
        assert (closed.history["aux_loss"] > 0).any()
