"""Resampling of dead features (adaptive_sae.resample)."""

from __future__ import annotations

import adaptive_sae as asae
import torch
from adaptive_sae.resample import resample_dead


def _data(n=4096, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def test_dead_features_point_at_badly_reconstructed_tokens():
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="topk", k=2)
    tcfg = asae.TrainConfig(batch_size=256, total_tokens=256 * 4, lr=1e-3, dead_window_tokens=256)
    t = asae.Trainer(cfg, tcfg)
    x = _data()
    t.init_from_data(x[:1024])
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 40]] = True
    t.stats.tokens_since_match[dead] = 10**6
    live_before = t.sae.W_enc[:, ~dead].clone()
    # one token with a huge error: every draw must pick it
    x_s = t.sae.scale_input(x[:256])
    x_hat = x_s.clone()
    x_hat[7] += 100.0
    t.opt.state[t.sae.W_dec] = {
        "exp_avg": torch.ones(64, 16),
        "exp_avg_sq": torch.ones(64, 16),
        "step": torch.tensor(1.0),
    }
    assert resample_dead(t, x_s, x_hat) == 3
    want = (x_s[7] - t.sae.b_dec) / (x_s[7] - t.sae.b_dec).norm()
    for j in (3, 10, 40):
        torch.testing.assert_close(t.sae.W_dec[j], want)
        assert t.sae.b_enc[j] == 0
        cos = torch.nn.functional.cosine_similarity(t.sae.W_enc[:, j], want, dim=0)
        assert cos > 0.999
    mean_live = live_before.norm(dim=0).mean()
    torch.testing.assert_close(t.sae.W_enc[:, 3].norm(), 0.2 * mean_live)
    torch.testing.assert_close(t.sae.W_enc[:, ~dead], live_before)  # live features untouched
    assert (t.opt.state[t.sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (t.opt.state[t.sae.W_dec]["exp_avg"][~dead] == 1).all()
    assert not t.stats.dead_mask.any()


def test_training_with_resampling_revives_features_and_is_repeatable():
    cfg = asae.SAEConfig(d_in=16, n_features=128, rule="mutual_choice", k=2)
    common = dict(batch_size=256, total_tokens=256 * 40, lr=3e-3, dead_window_tokens=1024)
    plain = asae.train(cfg, asae.TrainConfig(**common), _data(8192))
    tcfg = asae.TrainConfig(**common, resample_every_tokens=2048)
    a = asae.train(cfg, tcfg, _data(8192))
    b = asae.train(cfg, tcfg, _data(8192))
    assert a.history["resampled"].iloc[-1] > 0
    assert a.history["dead_pct"].iloc[-1] <= plain.history["dead_pct"].iloc[-1]
    for name, value in a.sae.state_dict().items():
        assert torch.equal(value, b.sae.state_dict()[name]), name


def test_train_grid_resample_condition_is_resampling_without_aux_loss():
    """The "resample" condition of train_grid's dead-feature axis trains with no auxiliary loss
    and resampling, names itself in the table, and needs its interval."""
    import pytest
    from adaptive_sae import experiments as ex

    data = _data(8192)
    common = dict(variants=["mutual_choice"], seeds=[0], k_values=[2], widths=[128],
                  batch_size=256, total_tokens=256 * 40, lrs=[3e-3], progress=False,
                  train_kwargs=dict(dead_window_tokens=1024))  # fmt: skip
    with pytest.raises(asae.ConfigError, match="resample_every_tokens"):
        ex.train_grid(data, aux_losses=["none", ex.RESAMPLE], **common)
    grid = ex.train_grid(
        data, aux_losses=["none", ex.RESAMPLE], resample_every_tokens=2048, keep_runs=True,
        **common,
    )  # fmt: skip
    by = {t.aux_loss: t for t in grid.runs}
    assert set(grid.table["aux_loss"]) == {"none", ex.RESAMPLE}
    assert by[ex.RESAMPLE].run.tcfg.aux_loss == "none"
    assert by[ex.RESAMPLE].run.tcfg.resample_every_tokens == 2048
    assert by[ex.RESAMPLE].run.history["resampled"].iloc[-1] > 0
    assert by["none"].run.tcfg.resample_every_tokens == 0
    # the same SAE as train() with resampling alone
    alone = asae.train(by[ex.RESAMPLE].run.cfg, by[ex.RESAMPLE].run.tcfg, data)
    for name, value in alone.sae.state_dict().items():
        torch.testing.assert_close(by[ex.RESAMPLE].run.sae.state_dict()[name], value)
