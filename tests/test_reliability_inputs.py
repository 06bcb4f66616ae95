"""Array-like training data (issue 13, item 10) and SAE folders saved as one unit (item 6)."""

from __future__ import annotations

import adaptive_sae as asae
import pytest
import torch


def _cfgs():
    cfg = asae.SAEConfig(d_in=8, n_features=32, rule="topk", k=2)
    return cfg, asae.TrainConfig(batch_size=16, total_tokens=64, init_sample_tokens=32)


def _x() -> torch.Tensor:
    return torch.randn(128, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("as_", ["numpy", "list"])
def test_array_likes_train_like_the_tensor(as_):
    cfg, tcfg = _cfgs()
    x = _x()
    data = x.numpy() if as_ == "numpy" else x.tolist()
    a = asae.train(cfg, tcfg, data).sae
    b = asae.train(cfg, tcfg, x).sae
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_something_else_says_what_is_accepted():
    cfg, tcfg = _cfgs()
    with pytest.raises((TypeError, ValueError), match="tensor"):
        asae.train(cfg, tcfg, 3.5)


def test_an_interrupted_save_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    """Two writers (or a killed one) used to leave one SAE's weights beside another's cfg."""
    folder = tmp_path / "sae"
    first = asae.SparseAutoencoder(asae.SAEConfig(d_in=8, n_features=32, k=2))
    first.save(folder)
    second = asae.SparseAutoencoder(
        asae.SAEConfig(d_in=8, n_features=32, k=3), generator=torch.Generator().manual_seed(1)
    )

    def killed(self):
        raise KeyboardInterrupt("killed between the weights and cfg.json")

    monkeypatch.setattr(asae.SAEConfig, "to_json", killed)
    with pytest.raises(KeyboardInterrupt):
        second.save(folder)
    monkeypatch.undo()
    loaded = asae.SparseAutoencoder.load(folder)
    assert loaded.cfg == first.cfg
    assert torch.equal(loaded.W_dec, first.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary left


@pytest.mark.parametrize("name", ["my run", "../up", "/abs", "a/b c"])
def test_a_bad_run_name_is_refused_before_any_work(name):
    from adaptive_sae import results

    with pytest.raises(ValueError, match="run_name="):
        results.check_run_name(name)
    assert results.check_run_name("sweep/k=8") == "sweep/k=8"


def test_constant_activations_are_refused_with_the_reason():
    cfg, tcfg = _cfgs()
    with pytest.raises(ValueError, match="constant"):
        asae.train(cfg, tcfg, torch.ones(128, 8))
    sae = asae.train(cfg, tcfg, _x()).sae
    with pytest.raises(ValueError, match="constant"):
        asae.evaluate(sae, torch.zeros(64, 8), mode="inference")
