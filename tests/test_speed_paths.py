"""The fast paths of the lean step against the naive oracles (``tests/oracles.py``): a
selection's shortcut may change its speed, never its result."""

from __future__ import annotations

import oracles
import pytest
import torch
from adaptive_sae import selection_kernels
from adaptive_sae.rules import mutual_choice
from adaptive_sae.rules.mutual_choice import select_mutual_choice
from adaptive_sae.sparse_ops import Workspace, sparse_reconstruct, stacked_reconstruct
from hypothesis import given, settings
from hypothesis import strategies as st


def _as_set(idx: torch.Tensor) -> set[int]:
    return set(idx.tolist())


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("B,F,k", [(256, 512, 8), (1024, 512, 8), (600, 1000, 2.5)])
def test_mutual_choice_with_the_previous_threshold_is_exact(B, F, k, kernels, monkeypatch):
    """Over a drifting sequence of batches the workspace's threshold is reused (the candidate
    pass runs without a sample), and every selection is the exact top K; through the compiled
    kernel and through torch's mask."""
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    g = torch.Generator().manual_seed(B)
    ws = Workspace()
    calls = []
    real = mutual_choice._top_at_least
    # the hint's candidates are capped at 4K (a sampled threshold's at B·F): count those calls
    monkeypatch.setattr(
        mutual_choice, "_top_at_least", lambda *a: calls.append(a[4] == 4 * a[2]) or real(*a)
    )
    K = int(k * B)
    for step in range(6):
        P = torch.randn(B, F, generator=g) + 0.05 * step  # the affinities drift
        idx = select_mutual_choice(P, K, ws)
        assert idx.numel() == K and bool((idx[1:] > idx[:-1]).all())
        assert _as_set(idx) == _as_set(oracles.global_topk_indices(P, K))
    assert "mutual_choice" in ws.hints
    assert sum(calls) >= 5  # the threshold pass ran from the hint on the later steps


@pytest.mark.parametrize("hint", [float("inf"), -float("inf"), 1e9, -1e9])
def test_a_useless_threshold_falls_back_and_stays_exact(hint):
    """A hint leaving fewer than K candidates, or more than 4K, is not used."""
    B, F, K = 512, 1024, 4096
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(1))
    ws = Workspace()
    ws.hints["mutual_choice"] = torch.tensor(hint)
    idx = select_mutual_choice(P, K, ws)
    assert _as_set(idx) == _as_set(oracles.global_topk_indices(P, K))
    assert float(ws.hints["mutual_choice"]) != hint  # replaced by a threshold that holds


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(8, 64),
    F=st.integers(8, 96),
    frac=st.floats(0.01, 0.5),
    shift=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_mutual_choice_any_hint_is_exact(B, F, frac, shift, seed):
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(seed))
    K = max(1, int(frac * B * F))
    ws = Workspace()
    ws.hints["mutual_choice"] = torch.tensor(shift)
    idx = select_mutual_choice(P, K, ws)
    assert _as_set(idx) == _as_set(oracles.global_topk_indices(P, K))


def test_stacked_reconstruction_equals_each_sae_alone():
    """Three SAEs of one width through one stacked call: outputs and every gradient equal the
    lone kernel's (one slot empty: x̂ = b_dec, zero gradients)."""
    g = torch.Generator().manual_seed(0)
    n, B, d, F = 3, 32, 8, 24
    W_enc = torch.randn(n, d, F, generator=g, requires_grad=True)
    b_enc = torch.randn(n, F, generator=g, requires_grad=True)
    W_dec = torch.randn(n, F, d, generator=g, requires_grad=True)
    b_dec = torch.randn(n, d, generator=g, requires_grad=True)
    x = torch.randn(n, B, d, generator=g)
    slots, idxs, pres = [0, 2], [], []
    for s in slots:
        P = ((x[s] - b_dec[s]) @ W_enc[s] + b_enc[s]).detach()
        idx = P.topk(3, dim=1).indices.sort(1).values + torch.arange(B).unsqueeze(1) * F
        idxs.append(idx.reshape(-1))
        pres.append(P.reshape(-1)[idxs[-1]])
    target = torch.randn(n, B, d, generator=g)
    out = stacked_reconstruct(x, W_enc, b_enc, W_dec, b_dec, slots, idxs, pres)
    (out[slots] - target[slots]).pow(2).sum().backward()  # slot 1's x̂ unused
    stacked = [p.grad.clone() for p in (W_enc, b_enc, W_dec, b_dec)]
    torch.testing.assert_close(out[1], b_dec[1].expand(B, d))
    for p in (W_enc, b_enc, W_dec, b_dec):
        assert torch.count_nonzero(p.grad[1]) == 0  # slot 1 has no entry
    for s, idx in zip(slots, idxs):
        leaves = [p[s].detach().clone().requires_grad_(True) for p in (W_enc, b_enc, W_dec, b_dec)]
        We, be, Wd, bd = leaves
        P = ((x[s] - bd) @ We + be).detach()
        alone = sparse_reconstruct(x[s], We, be, Wd, bd, idx, P).x_hat
        torch.testing.assert_close(out[s], alone, rtol=1e-6, atol=1e-6)
        (alone - target[s]).pow(2).sum().backward()
        for got, leaf in zip(stacked, leaves):
            torch.testing.assert_close(got[s], leaf.grad, rtol=1e-5, atol=1e-5)


# ----- non-finite checks read every few steps -------------------------------------------------------
def _cfgs(rule="topk", **train):
    import adaptive_sae as asae

    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
    tcfg = asae.TrainConfig(
        batch_size=128, total_tokens=128 * 20, init_sample_tokens=256, log_every=3, **train
    )
    return cfg, tcfg


def _x(n=4096):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, 16, generator=g)


def _fit(cfg, tcfg, data, every, ckpt=None):
    import adaptive_sae as asae

    t = asae.Trainer(cfg, tcfg, ckpt)
    t.check_every = every
    return t.fit(data)


@pytest.mark.parametrize("rule", ["mutual_choice", "feature_choice_zipf"])
def test_checks_every_few_steps_train_bit_for_bit_as_every_step(rule):
    cfg, tcfg = _cfgs(rule, aux_loss="aux_zipf")
    a, b = _fit(cfg, tcfg, _x(), 1), _fit(cfg, tcfg, _x(), 7)
    for k, v in a.sae.state_dict().items():
        assert torch.equal(v.nan_to_num(), b.sae.state_dict()[k].nan_to_num()), k
    assert a.history.equals(b.history)


@pytest.mark.parametrize("every", [1, 4, 32])
def test_a_nan_found_late_stops_at_its_step_with_the_last_good_checkpoint(every, tmp_path):
    """The batch of step 7 holds a NaN; read back at step 8 (every=4) or at the end (32), the
    failure is the same as when checked at once: step 7 named, step 7's good state saved."""
    import json

    import adaptive_sae as asae

    x = _x()
    x[128 * 7 + 3, 2] = float("nan")
    cfg, tcfg = _cfgs(checkpoint_every=5)
    batches = [x[i * 128 : (i + 1) * 128] for i in range(tcfg.n_steps)]
    with pytest.raises(asae.NonFiniteError, match="step 7: the batch holds non-finite"):
        _fit(cfg, tcfg, batches, every, tmp_path / str(every))
    state = json.loads((tmp_path / str(every) / "step_00000007" / "trainer_state.json").read_text())
    assert state["step"] == 7
    sae = asae.SparseAutoencoder.load(tmp_path / str(every) / "step_00000007")
    with pytest.raises(asae.NonFiniteError):
        _fit(cfg, tcfg, batches, 1, tmp_path / "ref")  # checked at every step
    ref = asae.SparseAutoencoder.load(tmp_path / "ref" / "step_00000007")
    for k, v in sae.state_dict().items():
        assert torch.equal(v.nan_to_num(), ref.state_dict()[k].nan_to_num()), k
    assert (tmp_path / str(every) / "step_00000005").exists()  # checked before it was saved


def test_a_diverging_loss_found_late_is_named():
    import adaptive_sae as asae

    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="topk", k=4, input_scaling="none")
    _, tcfg = _cfgs()
    with pytest.raises(asae.NonFiniteError, match=r"step 0: the loss is (inf|nan)"):
        _fit(cfg, tcfg, _x() * 1e25, 8)
