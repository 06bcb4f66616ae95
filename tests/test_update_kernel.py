"""The compiled update (``adaptive_sae.update_kernel``: decoder-gradient projection, clipping,
Adam, decoder renormalisation) against the PyTorch calls it stands for, and training with it
against training without it."""

from __future__ import annotations

import math

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae import selection_kernels, update_kernel
from adaptive_sae.grid import GridTrainer
from adaptive_sae.trainer import NonFiniteError
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
NAMES = update_kernel.NAMES


def _sae_and_opt(d, F, dtype, column_major, seed, lr=1e-2, **adam):
    """An SAE (W_enc column-major as a trained SAE's, or row-major), its fused Adam, random
    gradients in each parameter's layout, and one step taken so Adam's moments exist."""
    cfg = asae.SAEConfig(d_in=d, n_features=F, rule="topk", k=1)
    sae = asae.SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if not column_major:
        sae.W_enc.data = sae.W_enc.data.contiguous()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True, **adam)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):  # the first step creates the moments; the second makes them non-zero
        for p in sae.parameters():
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        opt.step()
        sae.normalize_decoder()
    for p in sae.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return sae, opt


def _torch_update(sae, opt, clip):
    """What a step's update is without the kernel (``Trainer._update``'s other path)."""
    sae.remove_parallel_grad()
    params = list(sae.parameters())
    if clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    opt.step()
    sae.normalize_decoder()
    return float(gnorm)


def _state(sae, opt):
    out = {}
    for name in NAMES:
        p = getattr(sae, name)
        st_ = opt.state[p]
        out.update(
            {
                name: p.detach().clone(),
                f"{name}.grad": p.grad.clone(),
                f"{name}.m": st_["exp_avg"].clone(),
                f"{name}.v": st_["exp_avg_sq"].clone(),
                f"{name}.step": st_["step"].clone(),
            }
        )
    return out


@settings(max_examples=80, deadline=None)
@given(
    d=st.integers(1, 24),
    F=st.integers(1, 60),
    column_major=st.booleans(),
    clip=st.sampled_from([0.0, 0.05, 1.0, 1e3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_update_equals_the_torch_calls(d, F, column_major, clip, dtype, seed):
    """Parameters, (clipped) gradients, both moments and the step count after the kernel's
    update equal those after remove_parallel_grad, clip_grad_norm_, Adam and
    normalize_decoder, for any size, both layouts of W_enc, both dtypes, with and without
    clipping (0.05: it binds; 1e3: it does not; 0: off)."""
    a_sae, a_opt = _sae_and_opt(d, F, dtype, column_major, seed)
    b_sae, b_opt = _sae_and_opt(d, F, dtype, column_major, seed)
    assert update_kernel.applies(a_sae, a_opt)
    want_norm = _torch_update(b_sae, b_opt, clip)
    plan = update_kernel.plan_for(a_sae, a_opt)
    got_norm = update_kernel.project_and_norm(plan)
    update_kernel.clip_adam_and_renormalize(plan, got_norm, clip)
    assert got_norm == pytest.approx(want_norm, rel=1e-5)
    a, b = _state(a_sae, a_opt), _state(b_sae, b_opt)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for key in a:
        assert a[key].stride() == b[key].stride(), key
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)
    norms = a_sae.W_dec.detach().double().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_hand_built_projection_and_norm():
    """W_dec = I (2×2): the gradient [[3, 4], [5, 12]] loses its component along each row,
    [[0, 4], [5, 0]]; with the other gradients zero the norm is √(16 + 25) exactly."""
    sae, opt = _sae_and_opt(2, 2, torch.float32, True, 0)
    sae.W_dec.data.copy_(torch.eye(2))
    sae.W_dec.grad.copy_(torch.tensor([[3.0, 4.0], [5.0, 12.0]]))
    for name in ("W_enc", "b_enc", "b_dec"):
        getattr(sae, name).grad.zero_()
    plan = update_kernel.plan_for(sae, opt)
    assert update_kernel.project_and_norm(plan) == pytest.approx(math.sqrt(41.0), rel=1e-7)
    assert torch.equal(sae.W_dec.grad, torch.tensor([[0.0, 4.0], [5.0, 0.0]]))


def test_applies_only_where_it_computes_what_adam_would(monkeypatch):
    sae, opt = _sae_and_opt(4, 8, torch.float32, True, 0)
    assert update_kernel.applies(sae, opt)
    for adam in ({"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True}):
        s2, o2 = _sae_and_opt(4, 8, torch.float32, True, 0, **adam)
        assert not update_kernel.applies(s2, o2), adam
    fresh = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    assert not update_kernel.applies(sae, fresh)  # no moments before its first step
    g = sae.W_enc.grad
    sae.W_enc.grad = g.contiguous()  # a gradient in another layout than its parameter
    assert not update_kernel.applies(sae, opt)
    sae.W_enc.grad = g
    with monkeypatch.context() as m:
        m.setattr(selection_kernels, "use_kernels", False)
        assert not update_kernel.applies(sae, opt)
    assert update_kernel.applies(sae, opt)


def test_a_plan_holds_while_its_tensors_are_the_same_and_not_after_any_changes(monkeypatch):
    sae, opt = _sae_and_opt(4, 8, torch.float32, True, 0)
    plan = update_kernel.plan_for(sae, opt)
    assert plan is not None and plan.holds(sae, opt)
    assert update_kernel.plan_for(sae, opt, plan) is plan
    with monkeypatch.context() as m:
        m.setattr(selection_kernels, "use_kernels", False)
        assert not plan.holds(sae, opt) and update_kernel.plan_for(sae, opt, plan) is None
    g = sae.b_enc.grad
    sae.b_enc.grad = g.clone()  # autograd accumulating out of place
    assert not plan.holds(sae, opt)
    assert update_kernel.plan_for(sae, opt, plan).grads[1] is sae.b_enc.grad
    sae.b_enc.grad = g
    opt.load_state_dict(opt.state_dict())  # a restored optimiser: new state tensors
    assert not plan.holds(sae, opt)
    plan = update_kernel.plan_for(sae, opt)
    sae.W_dec.data = sae.W_dec.data.clone()  # the same Parameter, other memory
    assert not plan.holds(sae, opt)
    plan = update_kernel.plan_for(sae, opt)
    opt.param_groups[0]["weight_decay"] = 0.1
    assert not plan.holds(sae, opt) and update_kernel.plan_for(sae, opt, plan) is None


def test_a_training_step_keeps_its_plan_and_its_gradient_buffers():
    """A lone SAE's closed-form step writes its gradients into the same tensors, so the plan
    of one step holds for the next (it is not rebuilt), until the state is restored."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="topk", k=4)
    t = asae.Trainer(cfg, asae.TrainConfig(batch_size=128, total_tokens=128 * 8, seed=0))
    t.init_from_data(x[:128])
    t.step(x[:128])
    t.step(x[128:256])
    plan, grad = t._update_plan, t.sae.W_enc.grad
    assert plan is not None
    snap = t.snapshot()
    t.step(x[256:384])
    assert t._update_plan is plan and t.sae.W_enc.grad is grad
    t.restore(snap)
    t.step(x[256:384])
    assert t._update_plan is not plan and t._update_plan is not None


def test_dense_layouts():
    x = torch.zeros(3, 5)
    assert update_kernel._dense(x) and update_kernel._dense(x.t())
    assert not update_kernel._dense(x[:, :4]) and not update_kernel._dense(x[::2])
    assert update_kernel._dense(torch.zeros(4, 1, 3).transpose(0, 2))


def _run(rule):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
    tcfg = asae.TrainConfig(batch_size=128, total_tokens=128 * 30, lr=3e-3,
                            log_every=5, dead_window_tokens=512, seed=0)  # fmt: skip
    t = asae.Trainer(cfg, tcfg)
    run = t.fit(x)
    return run, t


@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice_zipf", "relu_l1"])
def test_training_with_the_update_kernel_equals_training_without(rule, monkeypatch):
    """30 steps with the kernel (it takes every step after the first) end where 30 without
    it do: weights, Adam's moments and step counts, history."""
    calls = []
    real = update_kernel.clip_adam_and_renormalize
    monkeypatch.setattr(
        update_kernel, "clip_adam_and_renormalize", lambda *a: (calls.append(1), real(*a))
    )
    with_k, tk = _run(rule)
    assert len(calls) == 29
    monkeypatch.setattr(asae.Trainer, "_kernel_plan", lambda self: None)
    without, tw = _run(rule)
    for name in NAMES:
        torch.testing.assert_close(
            getattr(with_k.sae, name), getattr(without.sae, name), rtol=1e-4, atol=1e-4
        )
        pk, pw = getattr(tk.sae, name), getattr(tw.sae, name)
        assert float(tk.opt.state[pk]["step"]) == float(tw.opt.state[pw]["step"]) == 30
        torch.testing.assert_close(
            tk.opt.state[pk]["exp_avg_sq"], tw.opt.state[pw]["exp_avg_sq"], rtol=1e-3, atol=1e-8
        )
    assert with_k.history["nmse"].to_numpy() == pytest.approx(
        without.history["nmse"].to_numpy(), rel=1e-3
    )


def test_a_non_finite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    """The kernel path checks the norm before anything changes: a NaN gradient stops training
    with the state of before the step saved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="topk", k=4)
    tcfg = asae.TrainConfig(batch_size=128, total_tokens=128 * 8, seed=0)
    t = asae.Trainer(cfg, tcfg, tmp_path)
    t.init_from_data(x[:128])
    t.step(x[:128])
    t.step(x[128:256])
    assert t._kernel_plan() is not None
    before = t.sae.W_enc.detach().clone()
    real = update_kernel.project_and_norm

    def poisoned(plan):
        t.sae.b_enc.grad[0] = float("nan")
        return real(plan)

    monkeypatch.setattr(update_kernel, "project_and_norm", poisoned)
    with pytest.raises(NonFiniteError, match="gradient is non-finite"):
        t.step(x[256:384])
    assert torch.equal(t.sae.W_enc.detach(), before)


def _flushes() -> bool:
    """Whether float32 arithmetic on this thread flushes a subnormal result to zero."""
    return float(torch.tensor(1e-38, dtype=torch.float32) * 0.5) == 0.0


@pytest.mark.parametrize("kernels", [True, False])
def test_training_flushes_subnormals_with_the_fast_paths_and_restores_the_mode(
    kernels, monkeypatch
):
    if not torch.set_flush_denormal(False):
        pytest.skip("this processor cannot flush subnormals")
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    seen = []
    cfg = asae.SAEConfig(d_in=8, n_features=16, rule="topk", k=2)
    tcfg = asae.TrainConfig(batch_size=32, total_tokens=32 * 4, seed=0, init_sample_tokens=32)
    data = torch.randn(32 * 6, 8, generator=torch.Generator().manual_seed(0))
    asae.Trainer(cfg, tcfg).fit(data, callback=lambda step, row: seen.append(_flushes()))
    assert seen == [kernels] * 4
    assert not _flushes()  # the mode found on entry, back
    grid = GridTrainer([(cfg, tcfg), (cfg, tcfg)])
    grid.fit(data, callback=lambda step, rows: seen.append(_flushes()))
    assert seen[4:] == [kernels] * 4 and not _flushes()
    with pytest.raises(ValueError, match="data ran out"):  # a failed run restores it too
        asae.Trainer(cfg, tcfg).fit([data[:32], data[32:64]])  # two batches of four
    assert not _flushes()
    torch.set_flush_denormal(True)  # a mode set by the caller survives training
    try:
        asae.Trainer(cfg, tcfg).fit(data)
        assert _flushes()
    finally:
        torch.set_flush_denormal(False)


def test_adam_moments_of_a_parameter_without_gradient_reach_zero_when_flushed(monkeypatch):
    """The moment of an entry whose gradient stays zero: stuck among the subnormals in IEEE
    arithmetic, zero within denormals_flushed (the slow arithmetic this avoids)."""
    monkeypatch.setattr(selection_kernels, "use_kernels", True)
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)

    def steps(n):
        for _ in range(n):
            p.grad = torch.zeros(4)
            opt.step()

    p.grad = torch.ones(4)
    opt.step()
    steps(1200)  # 0.9 ** 1200 · 0.1 is far below the smallest float32
    stuck = float(opt.state[p]["exp_avg"][0])
    assert 0.0 < stuck < 2.0**-126  # subnormal, and stuck there: 0.9 × 4·2⁻¹⁴⁹ rounds back
    steps(10)
    assert float(opt.state[p]["exp_avg"][0]) == stuck
    if not torch.set_flush_denormal(False):
        pytest.skip("this processor cannot flush subnormals")
    with update_kernel.denormals_flushed("cpu"):
        steps(1)
        assert float(opt.state[p]["exp_avg"][0]) == 0.0
    assert not _flushes()
