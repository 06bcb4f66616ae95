"""The fast kernels against their naive twins: selections, values and every gradient.

Dense autograd (codes = M ⊙ ReLU(P), x̂ = codes W_dec + b_dec) is the reference. Inputs are
random and continuous, so ties have probability zero and selections are compared as sets.
"""

from __future__ import annotations

import math

import pytest
import torch
from adaptive_sae import kernels

# ----- naive references --------------------------------------------------------------------------


def naive_topk(P, k):
    B, F = P.shape
    cols = P.topk(k, dim=1).indices
    return (cols + torch.arange(B).unsqueeze(1) * F).reshape(-1)


def naive_mutual_choice(P, K):
    return P.reshape(-1).topk(K).indices


def naive_feature_choice(P, caps):
    B, F = P.shape
    out = []
    for j in range(F):
        m = int(caps[j])
        if m:
            out.append(P[:, j].topk(m).indices * F + j)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def as_set(idx):
    return set(idx.tolist())


def make_params(B=48, d=12, F=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, d, generator=g, dtype=dtype)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = (W_dec.t() + 0.3 * torch.randn(d, F, generator=g, dtype=dtype)).contiguous()
    b_enc = -1.0 + 0.5 * torch.randn(F, generator=g, dtype=dtype)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=dtype)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]


def pre_acts(x, W_enc, b_enc, b_dec):
    return (x - b_dec) @ W_enc + b_enc


def dense_reconstruct(x, W_enc, b_enc, W_dec, b_dec, flat_idx, decoder_bias=True):
    P = pre_acts(x, W_enc, b_enc, b_dec)
    mask = torch.zeros(P.numel(), dtype=torch.bool)
    mask[flat_idx] = True
    codes = P.relu() * mask.view(P.shape)
    x_hat = codes @ W_dec + (b_dec if decoder_bias else 0.0)
    return x_hat, codes.reshape(-1)[flat_idx]


def grads_of(fn, params):
    for p in params:
        p.grad = None
    out = fn()
    gens = torch.Generator().manual_seed(123)
    loss = sum(
        (o * torch.randn(o.shape, generator=gens, dtype=o.dtype).to(o.device)).sum() for o in out
    )
    loss.backward()
    return [o.detach().clone() for o in out], [p.grad.clone() for p in params]


def assert_close_all(a, b, rtol=1e-9, atol=1e-10):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


# ----- selection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("B,F,k", [(16, 32, 1), (50, 37, 5), (8, 8, 8)])
def test_select_topk_matches_naive(B, F, k):
    P = torch.randn(B, F)
    idx = kernels.select_topk(P, k)
    assert idx.numel() == B * k and bool((idx[1:] > idx[:-1]).all())
    assert as_set(idx) == as_set(naive_topk(P, k))


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
@pytest.mark.parametrize("B,F,k", [(32, 64, 3.0), (512, 1024, 8.0), (600, 1000, 2.5)])
@pytest.mark.parametrize("block", [1 << 22, 5000])
def test_select_mutual_choice_exact(B, F, k, layout, block, monkeypatch):
    monkeypatch.setattr(kernels, "_MASK_BLOCK", block)  # one block, or many
    torch.manual_seed(B + F)
    P = torch.randn(B, F)
    if layout == "feature_major":
        P = P.t().contiguous().t()
    K = int(k * B)
    idx = kernels.select_mutual_choice(P, K)
    assert idx.numel() == K and bool((idx[1:] > idx[:-1]).all())
    assert as_set(idx) == as_set(naive_mutual_choice(P.contiguous(), K))


def test_select_mutual_choice_when_sample_misleads(monkeypatch):
    """Entries in the sample are made the largest-but-few; the threshold must be lowered
    (and finally a full top-K taken) and the result still be exact."""
    monkeypatch.setattr(kernels, "_MC_SAMPLE", 1 << 10)
    B, F = 512, 1024
    P = torch.randn(B, F)
    n = B * F
    stride = kernels._coprime_stride(n, 1 << 10, F, B)
    P.view(-1)[::stride] = 10.0  # the sample sees only ties at 10
    K = 20000  # more than the sample size: the sample's threshold cannot give K candidates
    idx = kernels.select_mutual_choice(P, K)
    ref = P.view(-1).topk(K).values
    got = P.view(-1)[idx]
    torch.testing.assert_close(got.sort().values, ref.sort().values)


def test_select_mutual_choice_with_workspace_reuses_buffer():
    ws = kernels.Workspace()
    P = torch.randn(300, 1000)
    a = kernels.select_mutual_choice(P, 2400, ws)
    buf = ws._bufs["ge_mask"]
    b = kernels.select_mutual_choice(P, 2400, ws)
    assert ws._bufs["ge_mask"] is buf and torch.equal(a, b)
    assert as_set(a) == as_set(naive_mutual_choice(P, 2400))


def zipf_like(F, K, B, seed=0):
    w = 1.0 / torch.arange(1, F + 1, dtype=torch.float64)
    caps = torch.clamp((w / w.sum() * K).floor().long(), 0, B)
    caps[F // 2] = 0
    caps[0] = B
    return caps


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "zipf_shuffled", "tiny"])
def test_select_feature_choice_matches_naive(kind, layout):
    torch.manual_seed(1)
    B, F = 64, 96
    P = torch.randn(B, F)
    if layout == "feature_major":
        P = P.t().contiguous().t()
    if kind == "uniform":
        caps = torch.full((F,), 4, dtype=torch.long)
    elif kind == "zipf":
        caps = zipf_like(F, 8 * B, B)
    elif kind == "zipf_shuffled":
        caps = zipf_like(F, 8 * B, B)[torch.randperm(F)]
    else:
        caps = torch.randint(0, 3, (F,))
    idx = kernels.select_feature_choice(P, caps, kernels.Workspace())
    assert idx.numel() == int(caps.sum())
    assert idx.numel() == 0 or bool((idx[1:] > idx[:-1]).all())
    assert as_set(idx) == as_set(naive_feature_choice(P, caps))


@pytest.mark.parametrize("kind", ["uniform", "zipf", "zipf_shuffled", "tiny"])
@pytest.mark.parametrize("misleading", [False, True])
def test_select_feature_choice_threshold_path(kind, misleading, monkeypatch):
    """The candidate path for a large token-major P (forced here on a small one): exact, also
    when the sampled tokens mislead the thresholds (columns then fall back to exact topk)."""
    torch.manual_seed(2)
    B, F = 300, 64
    monkeypatch.setattr(kernels, "_FC_SMALL", 0)
    monkeypatch.setattr(kernels, "_FC_SAMPLE_ROWS", 60)
    monkeypatch.setattr(kernels, "_MASK_BLOCK", 1000)  # several blocks of the threshold pass
    P = torch.randn(B, F)
    if misleading:
        P[:60] += 3.0  # the sample sees only unusually large values
    caps = {
        "uniform": torch.full((F,), 9, dtype=torch.long),
        "zipf": zipf_like(F, 8 * B, B),
        "zipf_shuffled": zipf_like(F, 8 * B, B)[torch.randperm(F)],
        "tiny": torch.randint(0, 3, (F,)),
    }[kind]
    ws = kernels.Workspace()
    idx = kernels.select_feature_choice(P, caps, ws)
    assert idx.numel() == int(caps.sum()) and bool((idx[1:] > idx[:-1]).all())
    assert as_set(idx) == as_set(naive_feature_choice(P, caps))


def test_capacity_buckets_are_log_many_runs():
    caps = zipf_like(4096, 32 * 2048, 2048)
    caps_sorted = caps.sort(descending=True).values
    runs = kernels._capacity_buckets(caps_sorted)
    assert len(runs) <= math.log2(2048) + 2
    assert runs[0][0] == 0 and runs[-1][1] == 4096
    for s, e, hi, lo in runs:
        assert hi == int(caps_sorted[s]) and lo == int(caps_sorted[e - 1])


# ----- the reconstruction kernel -----------------------------------------------------------------


def selections(P):
    B, F = P.shape
    return {
        "topk": kernels.select_topk(P, 5),
        "mutual_choice": kernels.select_mutual_choice(P, 5 * B),
        "feature_choice": kernels.select_feature_choice(P, torch.full((F,), 5 * B // F)),
        "feature_choice_zipf": kernels.select_feature_choice(P, zipf_like(F, 5 * B, B)),
    }


@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"])
@pytest.mark.parametrize("given_P", [True, False])
@pytest.mark.parametrize("decoder_bias", [True, False])
def test_sparse_reconstruct_matches_dense_autograd(rule, given_P, decoder_bias):
    params = make_params()
    x, W_enc, b_enc, W_dec, b_dec = params
    with torch.no_grad():
        P = pre_acts(x, W_enc, b_enc, b_dec)
    idx = selections(P)[rule]
    sel = P.reshape(-1)[idx]
    assert bool((sel > 0).any())
    if rule.startswith("feature_choice"):  # covers selected entries with P <= 0 (zero codes)
        assert bool((sel <= 0).any())
    out_d, g_d = grads_of(lambda: dense_reconstruct(*params, idx, decoder_bias), params)
    out_s, g_s = grads_of(
        lambda: tuple(
            kernels.sparse_reconstruct(*params, idx, P if given_P else None, decoder_bias)
        ),
        params,
    )
    assert_close_all(out_s, out_d)
    assert_close_all(g_s, g_d)


def test_sparse_reconstruct_any_index_order_and_layout():
    params = make_params(seed=3)
    x, W_enc, b_enc, W_dec, b_dec = params
    with torch.no_grad():
        P = pre_acts(x, W_enc, b_enc, b_dec)
    idx = kernels.select_mutual_choice(P, 4 * x.shape[0])
    idx = idx[torch.randperm(idx.numel())]
    P_fm = P.t().contiguous().t()  # feature-major layout
    out_d, g_d = grads_of(lambda: dense_reconstruct(*params, idx), params)
    out_s, g_s = grads_of(lambda: tuple(kernels.sparse_reconstruct(*params, idx, P_fm)), params)
    assert_close_all(out_s, out_d)
    assert_close_all(g_s, g_d)


def test_sparse_reconstruct_float32_and_weights_only():
    params = make_params(B=256, d=32, F=512, dtype=torch.float32, seed=5)
    x, W_enc, b_enc, W_dec, b_dec = params
    x.requires_grad_(False)
    with torch.no_grad():
        P = pre_acts(x, W_enc, b_enc, b_dec)
    idx = kernels.select_topk(P, 8)
    ws = params[1:]

    def run(fn):
        for p in ws:
            p.grad = None
        x_hat = fn()[0]
        ((x_hat - x) ** 2).sum(1).mean().backward()
        return x_hat.detach(), [p.grad.clone() for p in ws]

    xd, gd = run(lambda: dense_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx))
    xs, gs = run(lambda: kernels.sparse_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx, P))
    torch.testing.assert_close(xs, xd, rtol=1e-5, atol=1e-5)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampled_dots_gather_fallback_matches_sddmm():
    g = torch.Generator().manual_seed(0)
    gx, W = torch.randn(20, 7, generator=g), torch.randn(30, 7, generator=g)
    idx = kernels.select_topk(torch.randn(20, 30, generator=g), 4)
    rows, cols = idx // 30, idx % 30
    counts = torch.bincount(rows, minlength=20)
    ref = (gx[rows] * W[cols]).sum(1)
    torch.testing.assert_close(kernels._sampled_dots(gx, W, rows, cols, counts), ref)
    torch.testing.assert_close(
        kernels._sampled_dots(gx.bfloat16(), W.bfloat16(), rows, cols, counts).float(),
        ref,
        rtol=0.05,
        atol=0.05,
    )


# ----- auxiliary losses ----------------------------------------------------------------------------


def naive_aux_loss(e, P, W_dec, mask, allocation, k_aux=None, deficits=None):
    feats = mask.nonzero().squeeze(1)
    B = P.shape[0]
    sub = P[:, feats]
    if allocation == "topk":
        local = naive_topk(sub.detach(), min(k_aux, feats.numel()))
    else:
        caps = torch.ceil(B * deficits[feats].double()).long().clamp(1, B)
        local = naive_feature_choice(sub.detach(), caps)
    m = torch.zeros(sub.numel(), dtype=torch.bool)
    m[local] = True
    e_hat = (sub.relu() * m.view(sub.shape)) @ W_dec[feats]
    e = e.detach()
    return (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum()


@pytest.mark.parametrize("allocation", ["topk", "deficit"])
@pytest.mark.parametrize("path", ["sparse", "dense_subset", "auto"])
def test_sparse_aux_loss_matches_naive(allocation, path):
    params = make_params(B=40, d=10, F=60, seed=7)
    x, W_enc, b_enc, W_dec, b_dec = params
    x.requires_grad_(False)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(60, generator=g) < 0.4
    deficits = torch.rand(60, generator=g) * 0.2
    k_aux = 3
    thr = {"sparse": 2.0, "dense_subset": 0.0, "auto": None}[path]
    e = torch.randn(40, 10, generator=g, dtype=torch.float64)

    def naive():
        P = pre_acts(x, W_enc, b_enc, b_dec)
        return naive_aux_loss(e, P, W_dec, mask, allocation, k_aux, deficits)

    def fast():
        with torch.no_grad():
            P = pre_acts(x, W_enc, b_enc, b_dec)
        return kernels.sparse_aux_loss(
            e, x, P, W_enc, b_enc, W_dec, b_dec, mask, allocation, k_aux, deficits, thr
        )

    wp = params[1:]
    out = []
    for fn in (naive, fast):
        for p in wp:
            p.grad = None
        loss = fn()
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in wp]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-12)
    assert_close_all(out[1][1], out[0][1])


def test_sparse_aux_loss_empty_set_is_zero():
    params = make_params()
    x, W_enc, b_enc, W_dec, b_dec = params
    with torch.no_grad():
        P = pre_acts(x, W_enc, b_enc, b_dec)
    mask = torch.zeros(W_dec.shape[0], dtype=torch.bool)
    loss = kernels.sparse_aux_loss(x, x, P, W_enc, b_enc, W_dec, b_dec, mask, "topk", 4)
    assert float(loss) == 0.0


def test_sparse_aux_loss_matches_core_losses_module():
    losses = pytest.importorskip("adaptive_sae.losses")
    params = make_params(B=32, d=8, F=50, seed=11)
    x, W_enc, b_enc, W_dec, b_dec = params
    mask = torch.arange(50) % 3 == 0
    P = pre_acts(x, W_enc, b_enc, b_dec)
    e = torch.randn(32, 8, dtype=torch.float64)
    ref = losses.aux_reconstruction_loss(e, P, W_dec, mask, "topk", k_aux=4)
    got = kernels.sparse_aux_loss(e, x, P.detach(), W_enc, b_enc, W_dec, b_dec, mask, "topk", 4)
    torch.testing.assert_close(got, ref)


# ----- affinities, selection parity with the core --------------------------------------------------


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
def test_affinities_layouts_and_workspace(layout):
    x, W_enc, b_enc, W_dec, b_dec = make_params(dtype=torch.float32)
    ws = kernels.Workspace()
    P = kernels.affinities(x, W_enc, b_enc, b_dec, ws, layout)
    ref = pre_acts(x, W_enc, b_enc, b_dec)
    assert P.shape == ref.shape and not P.requires_grad
    torch.testing.assert_close(P, ref.detach(), rtol=1e-5, atol=1e-5)
    P2 = kernels.affinities(x, W_enc, b_enc, b_dec, ws, layout)
    assert P2.data_ptr() == P.data_ptr()  # the buffer is reused
    torch.testing.assert_close(
        kernels.values_at(P, torch.tensor([0, 5, 77])), ref.reshape(-1)[[0, 5, 77]].detach()
    )


def test_selectors_agree_with_core_sparsifiers():
    sp = pytest.importorskip("adaptive_sae.sparsifiers")
    torch.manual_seed(4)
    P = torch.randn(128, 256)
    assert as_set(kernels.select_topk(P, 6)) == as_set(sp.select_topk(P, 6))
    assert as_set(kernels.select_mutual_choice(P, 700)) == as_set(sp.select_mutual_choice(P, 700))
    caps = zipf_like(256, 6 * 128, 128)
    assert as_set(kernels.select_feature_choice(P, caps)) == as_set(
        sp.select_feature_choice(P, caps)
    )


def test_bf16_autocast_runs_and_is_close():
    x, W_enc, b_enc, W_dec, b_dec = make_params(B=64, d=16, F=128, dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        P = kernels.affinities(x, W_enc, b_enc, b_dec)
        assert P.dtype == torch.bfloat16
        idx = kernels.select_topk(P, 4)
        out = kernels.sparse_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx, P)
    assert out.x_hat.dtype == torch.float32
    out.x_hat.pow(2).sum().backward()
    ref = dense_reconstruct(x, W_enc, b_enc, W_dec, b_dec, idx)[0]
    torch.testing.assert_close(out.x_hat, ref, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    params = make_params(B=256, d=32, F=512, dtype=torch.float32)
    x, W_enc, b_enc, W_dec, b_dec = params
    with torch.no_grad():
        P = pre_acts(x, W_enc, b_enc, b_dec)
    idx = kernels.select_mutual_choice(P, 8 * 256)
    out_c, g_c = grads_of(lambda: tuple(kernels.sparse_reconstruct(*params, idx, P)), params)
    cuda = [p.detach().cuda().requires_grad_() for p in params]
    Pc = P.cuda()
    idx_c = kernels.select_mutual_choice(Pc, 8 * 256)
    assert as_set(idx_c.cpu()) == as_set(idx)
    out_g, g_g = grads_of(lambda: tuple(kernels.sparse_reconstruct(*cuda, idx_c, Pc)), cuda)
    for a, b in zip(out_g + g_g, out_c + g_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


# ----- the training step: fast path against the naive path ----------------------------------------


@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"])
@pytest.mark.parametrize("aux", ["none", "aux_k", "aux_zipf"])
def test_training_fast_path_equals_naive_path(rule, aux):
    import adaptive_sae as asae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, sparsifier=rule, k=4)
    hist = []
    for fast in (False, True):
        tcfg = asae.TrainConfig(
            batch_size=128,
            total_tokens=128 * 6,
            aux_loss=aux,
            k_aux=8,
            dead_window_tokens=128,  # features die after one step without a match
            zipf_refit_every=1,
            log_every=1,
            lr=1e-3,
            fast_path=fast,
        )
        run = asae.train(cfg, tcfg, x)
        assert run.info["fast_path"] is fast
        hist.append(run.history)
    naive, fast = hist
    for col in ("loss", "nmse", "aux_loss", "l0_mean", "dead_frac"):
        torch.testing.assert_close(
            torch.tensor(fast[col].values), torch.tensor(naive[col].values), rtol=1e-3, atol=1e-5
        )
    if aux != "none" and not rule.startswith("feature_choice"):
        # (Feature Choice gives every feature its capacity: no dead, rarely underutilised)
        assert (naive["aux_loss"] > 0).any(), "the auxiliary loss should be active in this test"
