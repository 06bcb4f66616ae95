"""Many SAEs in one pass (``adaptive_sae.grid``): each SAE of a grid trains as it would alone."""

from __future__ import annotations

import json

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae import checkpoints
from adaptive_sae.grid import GridTrainer, train_many

RULES = ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu_l1"]


def _data(n: int = 4096, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def _member(rule, *, k=4, F=64, seed=0, aux="none", lr=1e-3, steps=12, **train):
    cfg = asae.SAEConfig(d_in=16, n_features=F, rule=rule, k=k)
    tcfg = asae.TrainConfig(
        batch_size=128,
        total_tokens=128 * steps,
        seed=seed,
        aux_loss="aux_zipf" if aux == "aux_zipf_topk" else aux,
        aux_allocation="topk" if aux == "aux_zipf_topk" else "deficit",
        k_aux=8,
        dead_window_tokens=128,  # features die after one step without a match: aux is active
        zipf_refit_every=1,
        gamma=1.0,
        log_every=1,
        lr=lr,
        init_sample_tokens=256,
        **train,
    )
    return cfg, tcfg


def _assert_same_run(grid_run, alone_run, exact: bool) -> None:
    a, b = grid_run.sae.state_dict(), alone_run.sae.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True)
    ha, hb = grid_run.history, alone_run.history
    assert list(ha.columns) == list(hb.columns) and len(ha) == len(hb)
    for col in ("loss", "nmse", "aux_loss", "l0_mean", "dead_pct", "underutilised_pct"):
        torch.testing.assert_close(
            torch.tensor(ha[col].values), torch.tensor(hb[col].values), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("loss_kernel", [True, False], ids=["loss_kernel", "autograd"])
@pytest.mark.parametrize("aux", ["none", "aux_k", "aux_zipf", "aux_zipf_topk"])
def test_every_rule_in_one_grid_trains_as_alone(aux, loss_kernel, monkeypatch):
    """Every rule at two widths, two seeds (own shuffles of the tensor) and two learning rates
    in one grid; each member equals ``train`` of it alone. With the loss and update kernels
    (a CPU's path) and without them (the stacked autograd and update an accelerator takes)."""
    if not loss_kernel:
        monkeypatch.setattr(asae.Trainer, "_closed_form_applies", lambda self: False)
        monkeypatch.setattr(asae.Trainer, "_kernel_plan", lambda self: None)
    x = _data()
    members = [
        _member(r, F=64 if i % 2 else 96, seed=i % 2, aux=aux, lr=1e-3 if i % 3 else 3e-3)
        for i, r in enumerate(RULES)
    ]
    runs = train_many(members, x)
    for (cfg, tcfg), run in zip(members, runs):
        alone = asae.train(cfg, tcfg, x)
        _assert_same_run(run, alone, exact=False)
        assert run.info["lr"] == tcfg.lr


def test_grid_with_differing_k_and_aux_on_a_batch_list():
    """An iterable of batches (one stream for all) and members differing in k and aux loss."""
    x = _data()
    batches = [x[i * 128 : (i + 1) * 128] for i in range(30)]
    members = [
        _member("topk", k=2, aux="aux_k"),
        _member("mutual_choice", k=6, aux="aux_zipf"),
        _member("feature_choice_zipf", k=3),
    ]
    runs = train_many(members, batches)
    for (cfg, tcfg), run in zip(members, runs):
        _assert_same_run(run, asae.train(cfg, tcfg, batches), exact=False)


class _Stop(Exception):
    pass


def test_resume_of_the_whole_set_equals_uninterrupted(tmp_path):
    x = _data()
    members = [
        _member("mutual_choice", aux="aux_zipf", checkpoint_every=5),
        _member("feature_choice_zipf", aux="aux_k", seed=1, checkpoint_every=5),
        _member("relu_l1", F=32, checkpoint_every=5),
    ]
    full = train_many(members, x)

    def interrupt(step, rows):
        if step == 7:
            raise _Stop

    with pytest.raises(_Stop):
        train_many(members, x, checkpoint_dir=tmp_path, callback=interrupt)
    assert (tmp_path / "sae_001" / "latest").read_text() == "step_00000005"
    man = json.loads((tmp_path / "grid.json").read_text())
    assert [m["sae"]["rule"] for m in man["members"]] == [c.rule for c, _ in members]
    resumed = train_many(members, x, resume_from=tmp_path)
    for a, b in zip(full, resumed):
        _assert_same_run(a, b, exact=True)
        assert a.history.equals(b.history)
    # each member's folder is a lone run's checkpoint: it loads alone
    sae = asae.SparseAutoencoder.load(tmp_path / "sae_002" / "step_00000012")
    assert torch.equal(sae.W_dec, resumed[2].sae.W_dec)


def test_resume_uses_the_newest_step_every_member_has(tmp_path):
    x = _data()
    members = [
        _member("topk", checkpoint_every=4, steps=8),
        _member("mutual_choice", steps=8, checkpoint_every=4),
    ]
    train_many(members, x, checkpoint_dir=tmp_path)
    # a save killed after the first member wrote step 8 and before the second did
    for name in ("latest",):
        (tmp_path / "sae_001" / name).write_text("step_00000004")
    import shutil

    shutil.rmtree(tmp_path / "sae_001" / "step_00000008")
    g = GridTrainer(members, tmp_path)
    g.load_checkpoint(tmp_path)
    assert g.steps_done == 4 and all(t.steps_done == 4 for t in g.trainers)


def test_a_non_finite_batch_stops_the_grid_with_the_last_good_state(tmp_path):
    x = _data()
    x[128 * 5 + 3, 2] = float("nan")
    members = [_member("topk"), _member("feature_choice", seed=1)]
    batches = [x[i * 128 : (i + 1) * 128] for i in range(30)]
    with pytest.raises(asae.NonFiniteError, match="step 5: the batch holds non-finite") as err:
        train_many(members, batches, checkpoint_dir=tmp_path)
    assert "every SAE is saved in" in str(err.value)
    for i in range(2):
        folder = checkpoints.latest_checkpoint(tmp_path / f"sae_{i:03d}")
        assert folder.name == "step_00000005"
        sae = asae.SparseAutoencoder.load(folder)
        assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())


def test_a_diverging_member_is_named(tmp_path):
    """A learning rate of 1e38 sends SAE 1's weights to ~1e38: its next loss overflows."""
    members = [_member("topk"), _member("topk", lr=1e38)]
    with pytest.raises(asae.NonFiniteError, match=r"step 1: SAE 1's loss is (inf|nan)"):
        train_many(members, _data(), checkpoint_dir=tmp_path)
    assert checkpoints.latest_checkpoint(tmp_path / "sae_000").name == "step_00000001"


def test_members_must_share_the_batch_and_the_budget():
    a = _member("topk")
    b = _member("topk", steps=13)
    with pytest.raises(asae.ConfigError, match="total_tokens.*share it"):
        GridTrainer([a, b])
    with pytest.raises(asae.ConfigError, match="at least one"):
        GridTrainer([])


def test_resampling_members_train_as_alone():
    """Dead-feature resampling writes into a member's parameters and Adam state in place: in a
    grid those are slices of the stacked tensors, and the result is still the lone run's."""
    x = _data()
    members = [
        _member("topk", k=1, resample_every_tokens=128 * 3),
        _member("mutual_choice", k=1, seed=1, resample_every_tokens=128 * 4, aux="aux_k"),
    ]
    runs = train_many(members, x)
    for (cfg, tcfg), run in zip(members, runs):
        alone = asae.train(cfg, tcfg, x)
        assert alone.history["resampled"].iloc[-1] > 0  # resampling happened
        _assert_same_run(run, alone, exact=False)


def test_by_member_blocks_train_each_sae_exactly_as_alone(monkeypatch):
    """Where every member takes the closed-form step the grid trains them member by member
    in blocks (``GridTrainer._by_member``): each SAE's run is its lone run bit for bit, for
    any block length, blocks ending at checkpoints; the callback sees every step in order."""
    x = _data()
    members = [
        _member("topk", steps=20, checkpoint_every=7),
        _member("feature_choice_zipf", aux="aux_zipf", seed=1, steps=20, checkpoint_every=7),
        _member("relu_l1", F=32, steps=20, checkpoint_every=7),
    ]
    assert GridTrainer(members)._by_member()
    alone = [asae.train(cfg, tcfg, x) for cfg, tcfg in members]
    for block in (1, 3, 16):
        monkeypatch.setattr("adaptive_sae.grid.BLOCK_STEPS", block)
        seen: list[tuple[int, int]] = []

        def note(step, rows, seen=seen):
            seen.append((step, len(rows)))

        runs = train_many(members, x, callback=note)
        assert seen == [(s, 3) for s in range(20)]
        for run, lone in zip(runs, alone):
            _assert_same_run(run, lone, exact=True)
            assert run.history.equals(lone.history)


def test_a_member_failing_mid_block_leaves_every_sae_at_its_last_good_step(tmp_path):
    """SAE 1 diverges at step 1 while SAE 0 has already trained through its block: the block is
    replayed in lockstep, so SAE 0 is saved at step 1 too, with its lone run's weights there."""
    members = [_member("topk"), _member("topk", lr=1e38)]
    assert GridTrainer(members)._by_member()
    with pytest.raises(asae.NonFiniteError, match=r"step 1: SAE 1's loss is (inf|nan)"):
        train_many(members, _data(), checkpoint_dir=tmp_path)
    saved = checkpoints.latest_checkpoint(tmp_path / "sae_000")
    assert saved.name == "step_00000001"
    lone = asae.Trainer(*members[0])

    def stop_after_the_first(step, row):
        raise _Stop

    with pytest.raises(_Stop):
        lone.fit(_data(), callback=stop_after_the_first)
    assert lone.steps_done == 1
    sae = asae.SparseAutoencoder.load(saved)
    assert torch.equal(sae.W_enc, lone.sae.W_enc) and torch.equal(sae.W_dec, lone.sae.W_dec)
