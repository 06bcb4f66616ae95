"""The sparse operations of the training step against dense autograd (``tests/oracles.py``):
values and every gradient of ``sparse_reconstruct`` and ``subset_reconstruct``, for each
rule's selection; affinities, the workspace and the helpers.

Inputs are random and continuous, so ties have probability zero."""

from __future__ import annotations

import oracles
import pytest
import torch
from adaptive_sae import SAEConfig, SparseAutoencoder, sparse_ops
from adaptive_sae.rules import get_rule
from oracles import grads_of, make_params

SPARSE_RULES = ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"]


def assert_close_all(a, b, rtol=1e-9, atol=1e-10):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


def rule_selection(rule: str, P: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    sae = SparseAutoencoder(SAEConfig(d_in=2, n_features=P.shape[1], rule=rule, k=k))
    return get_rule(rule).select(sae, P)


def affinities_of(params):
    x, W_enc, b_enc, _, b_dec = params
    with torch.no_grad():
        return oracles.pre_acts(x, W_enc, b_enc, b_dec)


# ----- sparse_reconstruct ------------------------------------------------------------------------


@pytest.mark.parametrize("rule", SPARSE_RULES)
@pytest.mark.parametrize("given_P", [True, False])
@pytest.mark.parametrize("decoder_bias", [True, False])
def test_sparse_reconstruct_matches_dense_autograd(rule, given_P, decoder_bias):
    params = make_params()
    P = affinities_of(params)
    idx = rule_selection(rule, P)
    sel = P.reshape(-1)[idx]
    assert bool((sel > 0).any())
    if rule.startswith("feature_choice"):  # covers selected entries with P <= 0 (zero codes)
        assert bool((sel <= 0).any())
    out_d, g_d = grads_of(lambda: oracles.reconstruct(*params, idx, decoder_bias), params)
    out_s, g_s = grads_of(
        lambda: sparse_ops.sparse_reconstruct(*params, idx, P if given_P else None, decoder_bias),
        params,
    )
    assert_close_all(out_s, out_d)
    assert_close_all(g_s, g_d)
    assert all(bool(g.abs().sum() > 0) for g in g_d)  # every gradient is exercised


def test_sparse_reconstruct_any_index_order_and_layout():
    params = make_params(seed=3)
    P = affinities_of(params)
    idx = rule_selection("mutual_choice", P, k=4.0)
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))]
    P_fm = P.t().contiguous().t()  # feature-major layout
    out_d, g_d = grads_of(lambda: oracles.reconstruct(*params, idx), params)
    out_s, g_s = grads_of(lambda: sparse_ops.sparse_reconstruct(*params, idx, P_fm), params)
    assert_close_all(out_s, out_d)  # values come back in the order of idx
    assert_close_all(g_s, g_d)


def test_sparse_reconstruct_hand_built():
    # d = 2, F = 3, one token; identity-like weights so x̂ can be read off
    x = torch.tensor([[1.0, 2.0]])
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    b_enc = torch.tensor([0.0, 0.0, -5.0])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b_dec = torch.tensor([0.5, 0.0])  # x − b_dec = [0.5, 2]: P = [0.5, 2, −2.5]
    out = sparse_ops.sparse_reconstruct(x, W_enc, b_enc, W_dec, b_dec, torch.tensor([1, 2]))
    assert out.values.tolist() == [2.0, 0.0]  # ReLU(−2.5) = 0
    assert out.x_hat.tolist() == [[0.5, 2.0]]  # 2·W_dec[1] + b_dec


def test_sparse_reconstruct_float32_weights_only():
    params = make_params(B=256, d=32, F=512, dtype=torch.float32, seed=5)
    x, W_enc, b_enc, W_dec, b_dec = params
    x.requires_grad_(False)
    P = affinities_of(params)
    idx = rule_selection("topk", P, k=8)
    weights = params[1:]

    def run(fn):
        for p in weights:
            p.grad = None
        x_hat = fn()[0]
        ((x_hat - x) ** 2).sum(1).mean().backward()
        return x_hat.detach(), [p.grad.clone() for p in weights]

    xd, gd = run(lambda: oracles.reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx))
    xs, gs = run(lambda: sparse_ops.sparse_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx, P))
    torch.testing.assert_close(xs, xd, rtol=1e-5, atol=1e-5)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_reconstruct_rejects_a_wrong_shape():
    params = make_params()
    with pytest.raises(ValueError, match=r"expected \(B, F\) = \(48, 40\)"):
        sparse_ops.sparse_reconstruct(*params, torch.tensor([0]), torch.zeros(40, 48))


# ----- subset_reconstruct (dense selections on a column subset) ----------------------------------------


@pytest.mark.parametrize("decoder_bias", [True, False])
def test_subset_reconstruct_matches_dense_autograd(decoder_bias):
    params = make_params(B=30, d=8, F=50, seed=9)
    P = affinities_of(params)
    g = torch.Generator().manual_seed(1)
    feats = torch.randperm(50, generator=g)[:20].sort().values
    mask = torch.rand(30, 20, generator=g) < 0.6
    # the same selection as flat indices of the full matrix
    r, c = mask.nonzero().unbind(1)
    flat = r * 50 + feats[c]

    def dense():
        return oracles.reconstruct(*params, flat, decoder_bias)[0]

    def subset():
        P_sub = P.index_select(1, feats)
        return sparse_ops.subset_reconstruct(*params, P_sub, feats, mask, decoder_bias)

    out_d, g_d = grads_of(dense, params)
    out_s, g_s = grads_of(subset, params)
    assert_close_all(out_s, out_d)
    assert_close_all(g_s, g_d)


# ----- affinities, helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
def test_affinities_layouts_and_workspace(layout):
    x, W_enc, b_enc, W_dec, b_dec = make_params(dtype=torch.float32)
    ws = sparse_ops.Workspace()
    P = sparse_ops.affinities(x, W_enc, b_enc, b_dec, ws, layout)
    ref = oracles.pre_acts(x, W_enc, b_enc, b_dec).detach()
    assert P.shape == ref.shape and not P.requires_grad
    assert P.is_contiguous() == (layout == "token_major")
    torch.testing.assert_close(P, ref, rtol=1e-5, atol=1e-5)
    P2 = sparse_ops.affinities(x, W_enc, b_enc, b_dec, ws, layout)
    assert P2.data_ptr() == P.data_ptr()  # the buffer is reused
    idx = torch.tensor([0, 5, 77, 48 * 40 - 1])
    torch.testing.assert_close(sparse_ops.values_at(P, idx), ref.reshape(-1)[idx])
    with pytest.raises(ValueError, match="layout"):
        sparse_ops.affinities(x, W_enc, b_enc, b_dec, ws, "diagonal")


def test_workspace_reallocates_on_a_new_shape():
    ws = sparse_ops.Workspace()
    a = ws.get("P", (4, 5), torch.float32, "cpu")
    assert ws.get("P", (4, 5), torch.float32, "cpu") is a
    b = ws.get("P", (5, 4), torch.float32, "cpu")
    assert b.shape == (5, 4) and b is not a
    assert ws.get("P", (5, 4), torch.float64, "cpu").dtype == torch.float64
    ws.clear()
    assert ws._bufs == {}


@pytest.mark.parametrize("block", [1 << 22, 7])
def test_entries_at_least_matches_nonzero(block, monkeypatch):
    monkeypatch.setattr(sparse_ops, "_MASK_BLOCK", block)  # one block, or one row per block
    X = torch.randn(13, 6, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(-1, 1, 6)
    assert torch.equal(sparse_ops.entries_at_least(X, t, None), (X >= t).view(-1).nonzero()[:, 0])
    ws = sparse_ops.Workspace()
    got = sparse_ops.entries_at_least(X, torch.tensor(0.5), ws)
    assert torch.equal(got, (X >= 0.5).view(-1).nonzero()[:, 0])


def test_small_helpers_by_hand():
    assert sparse_ops.exclusive_cumsum(torch.tensor([2, 0, 3, 1])).tolist() == [0, 2, 2, 5]
    assert sparse_ops.sorted_indices(torch.tensor([3, 1, 2])).tolist() == [1, 2, 3]
    already = torch.tensor([1, 4, 9])
    assert sparse_ops.sorted_indices(already) is already


def test_sampled_dots_gather_fallback_matches_sddmm():
    g = torch.Generator().manual_seed(0)
    gx, W = torch.randn(20, 7, generator=g), torch.randn(30, 7, generator=g)
    idx = oracles.topk_indices(torch.randn(20, 30, generator=g), 4).sort().values
    rows, cols = idx // 30, idx % 30
    counts = torch.bincount(rows, minlength=20)
    ref = (gx[rows] * W[cols]).sum(1)
    torch.testing.assert_close(sparse_ops.sampled_dots(gx, W, rows, cols, counts), ref)
    torch.testing.assert_close(
        sparse_ops.sampled_dots(gx.bfloat16(), W.bfloat16(), rows, cols, counts).float(),
        ref,
        rtol=0.05,
        atol=0.05,
    )


def test_bf16_autocast_runs_and_is_close():
    x, W_enc, b_enc, W_dec, b_dec = make_params(B=64, d=16, F=128, dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        P = sparse_ops.affinities(x, W_enc, b_enc, b_dec)
        assert P.dtype == torch.bfloat16
        idx = get_rule("topk").select(SparseAutoencoder(SAEConfig(d_in=16, n_features=128, k=4)), P)
        out = sparse_ops.sparse_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx, P)
    assert out.x_hat.dtype == torch.float32
    out.x_hat.pow(2).sum().backward()
    ref = oracles.reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx)[0]
    torch.testing.assert_close(out.x_hat, ref, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    params = make_params(B=256, d=32, F=512, dtype=torch.float32)
    P = affinities_of(params)
    sae = SparseAutoencoder(SAEConfig(d_in=32, n_features=512, rule="mutual_choice", k=8))
    idx = get_rule("mutual_choice").select(sae, P)
    out_c, g_c = grads_of(lambda: sparse_ops.sparse_reconstruct(*params, idx, P), params)
    cuda = [p.detach().cuda().requires_grad_() for p in params]
    Pc = P.cuda()
    idx_c = get_rule("mutual_choice").select(sae.cuda(), Pc)
    assert oracles.as_set(idx_c.cpu()) == oracles.as_set(idx)
    out_g, g_g = grads_of(lambda: sparse_ops.sparse_reconstruct(*cuda, idx_c, Pc), cuda)
    for a, b in zip(out_g + g_g, out_c + g_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_cols", [512, (1 << 16) + 5])
def test_column_order_groups_row_ordered_entries_by_column_then_row(n_cols):
    """The radix path (under 2^16 columns) and the comparison sort (above) give the (col, row)
    order of entries stored in row order: the order the backward's per-feature sums need."""
    from adaptive_sae.sparse_ops import column_order

    g = torch.Generator().manual_seed(0)
    B, per_row = 300, 7
    rows = torch.arange(B).repeat_interleave(per_row)
    cols = torch.stack(
        [torch.randperm(n_cols, generator=g)[:per_row].sort().values for _ in range(B)]
    )
    cols = cols.reshape(-1)
    perm = column_order(cols, n_cols)
    assert torch.equal(perm, torch.argsort(cols * B + rows))
    assert column_order(cols[:0], n_cols).numel() == 0
