"""Checkpoints lose nothing and name what is wrong (issue 13, items 1-5, 9, 12, 15)."""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import adaptive_sae as asae
import numpy as np
import pytest
import torch
from adaptive_sae import checkpoints, io
from adaptive_sae.checkpoints import CheckpointError

N_STEPS = 6
B = 16


def _cfgs(n_steps: int = N_STEPS, **train):
    cfg = asae.SAEConfig(d_in=8, n_features=32, rule="mutual_choice", k=2)
    kwargs = dict(
        batch_size=B,
        total_tokens=B * n_steps,
        init_sample_tokens=64,
        log_every=2,
        checkpoint_every=2,
        keep_checkpoints=2,
    )
    kwargs.update(train)
    return cfg, asae.TrainConfig(**kwargs)


def _data() -> torch.Tensor:
    return torch.randn(512, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 4 and 6 (keep_checkpoints=2)."""
    root = tmp_path_factory.mktemp("finished") / "run"
    cfg, tcfg = _cfgs()
    asae.train(cfg, tcfg, _data(), checkpoint_dir=root)
    return root


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _steps(root: Path) -> list[int]:
    return [s for s, _ in checkpoints.step_folders(root)]


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- item 1


def test_prepare_refuses_a_folder_holding_another_run(run_dir):
    with pytest.raises(CheckpointError) as err:
        checkpoints.prepare(run_dir)
    message = str(err.value)
    assert str(run_dir) in message and "[4, 6]" in message
    assert "resume_from=" in message and "checkpoints.clear(" in message
    assert _steps(run_dir) == [4, 6]  # nothing touched
    checkpoints.prepare(run_dir, resume_from=run_dir)  # continuing it is fine
    checkpoints.prepare(run_dir, resume_from=run_dir / "step_00000004")


def test_overwrite_and_clear_remove_only_checkpoints(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    checkpoints.prepare(run_dir, overwrite=True)
    assert _steps(run_dir) == [] and not (run_dir / "latest").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not checkpoints.holds_run(run_dir)


def test_train_refuses_a_folder_of_another_run_before_the_first_step(run_dir):
    steps = []
    cfg, tcfg = _cfgs(n_steps=4, seed=1)
    with pytest.raises(CheckpointError, match="resume_from="):
        asae.train(
            cfg, tcfg, _data(), checkpoint_dir=run_dir, callback=lambda s, r: steps.append(s)
        )
    assert steps == [] and _steps(run_dir) == [4, 6]


def test_pruning_keeps_the_current_run_when_later_steps_exist(run_dir):
    """Pruning used to keep the highest step numbers: a shorter run's own checkpoints went."""
    cfg, tcfg = _cfgs(n_steps=4, seed=1)
    run = asae.train(cfg, tcfg, _data())
    opt = torch.optim.Adam(run.sae.parameters())
    for step in (2, 3):
        state = {"rule_state": {}, "rows": []}
        checkpoints.save_checkpoint(
            run_dir, step, run.sae, run.stats.state_dict(), opt, tcfg, state
        )
        assert (run_dir / "latest").read_text() == f"step_{step:08d}"
        assert checkpoints.latest_checkpoint(run_dir) == run_dir / f"step_{step:08d}"
    assert _steps(run_dir) == [2, 3, 4, 6]


# ----------------------------------------------------------------------------- item 2


def test_numpy_numbers_in_configs_train_and_save(tmp_path):
    cfg = asae.SAEConfig(d_in=np.int64(8), n_features=np.int64(32), rule="topk", k=np.int64(2))
    tcfg = asae.TrainConfig(
        batch_size=np.int64(B),
        total_tokens=np.int64(4 * B),
        lr=np.float32(3e-3),
        init_sample_tokens=64,
    )
    run = asae.train(cfg, tcfg, _data(), checkpoint_dir=tmp_path / "ckpt")
    run.sae.save(tmp_path / "sae")
    assert asae.SparseAutoencoder.load(tmp_path / "sae").cfg == cfg
    assert checkpoints.is_complete(checkpoints.latest_checkpoint(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_is_refused(keep):
    with pytest.raises(asae.ConfigError, match="keep_checkpoints"):
        _cfgs(keep_checkpoints=keep)


# ----------------------------------------------------------------------------- item 4


def test_check_writable_names_the_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write in the checkpoint_dir .*a_file"):
        io.check_writable(blocker / "ckpt", "checkpoint_dir")
    with pytest.raises(PermissionError, match="a_file"):
        checkpoints.prepare(blocker / "ckpt")
    assert io.check_writable(tmp_path / "new" / "ckpt").is_dir()


def test_unwritable_checkpoint_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    steps = []
    cfg, tcfg = _cfgs()
    with pytest.raises(PermissionError, match="a_file"):
        asae.train(
            cfg,
            tcfg,
            _data(),
            checkpoint_dir=blocker / "ckpt",
            callback=lambda s, r: steps.append(s),
        )
    assert steps == []


# ----------------------------------------------------------------------------- item 5


def test_resaving_a_step_never_leaves_it_missing(run_dir, monkeypatch):
    """Resuming a finished run saves its last step again. A kill at the moment the new copy
    is renamed in used to leave 'latest' naming a deleted folder."""
    real_replace = os.replace

    def killed_at_folder_rename(src, dst):
        if Path(src).is_dir():
            raise KeyboardInterrupt("killed while renaming a checkpoint folder")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_folder_rename)
    cfg, tcfg = _cfgs()
    try:
        asae.train(cfg, tcfg, _data(), resume_from=run_dir)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert checkpoints.is_complete(run_dir / "step_00000006")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed
        assert checkpoints.latest_checkpoint(run_dir) == run_dir / "step_00000006"


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    cfg, tcfg = _cfgs(keep_checkpoints=5)
    full = asae.train(cfg, tcfg, _data())
    part_cfg, part_tcfg = _cfgs(n_steps=N_STEPS, keep_checkpoints=5)
    root = tmp_path / "run"
    asae.train(part_cfg, part_tcfg, _data(), checkpoint_dir=root)
    shutil.rmtree(root / "step_00000006")  # 'latest' names a folder that is gone
    (root / "step_00000004" / "optimizer.pt").unlink()  # and the one before is incomplete
    with pytest.warns(UserWarning, match="newest complete checkpoint .*step_00000002"):
        resumed = asae.train(cfg, tcfg, _data(), resume_from=root)
    assert _same_weights(resumed.sae, full.sae)
    assert resumed.history.equals(full.history)


def test_no_complete_checkpoint_says_so(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "latest").write_text("step_00000006")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        checkpoints.latest_checkpoint(root)


# ----------------------------------------------------------------------------- item 9

CORRUPTIONS = {
    "sae.safetensors": "truncate",
    "stats.safetensors": "truncate",
    "optimizer.pt": "truncate",
    "trainer_state.json": "nonsense",
    "train_cfg.json": "nonsense",
    "cfg.json": "nonsense",
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_checkpoint_file_is_named_with_the_fix(run_dir, name):
    path = run_dir / "step_00000006" / name
    if CORRUPTIONS[name] == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.write_text('{"step": 6, "rows": [')
    cfg, tcfg = _cfgs()
    with pytest.raises(io.FileFormatError) as err:
        asae.train(cfg, tcfg, _data(), resume_from=run_dir)
    message = str(err.value)
    assert str(path) in message
    assert f"resume_from={str(run_dir / 'step_00000004')!r}" in message


# ----------------------------------------------------------------------------- item 12


def test_resume_may_change_bookkeeping_and_device_not_the_rest(tmp_path):
    cfg, tcfg = _cfgs(keep_checkpoints=5)
    full = asae.train(cfg, tcfg, _data(), checkpoint_dir=tmp_path / "a")
    step2 = tmp_path / "a" / "step_00000002"
    saved = io.read_json(step2 / "train_cfg.json")
    io.write_json(step2 / "train_cfg.json", {**saved, "device": "cuda:0"})  # written on a GPU
    _, changed = _cfgs(checkpoint_every=3, keep_checkpoints=1, log_every=1)
    resumed = asae.train(cfg, changed, _data(), resume_from=step2, checkpoint_dir=tmp_path / "b")
    assert _same_weights(resumed.sae, full.sae)
    assert _steps(tmp_path / "b") == [6]

    _, other_lr = _cfgs(keep_checkpoints=5, lr=1e-3)
    with pytest.raises(CheckpointError) as err:
        asae.train(cfg, other_lr, _data(), resume_from=step2, checkpoint_dir=tmp_path / "c")
    assert "lr: checkpoint None, now 0.001" in str(err.value)
    other_cfg = asae.SAEConfig(d_in=8, n_features=32, rule="mutual_choice", k=3)
    with pytest.raises(CheckpointError, match="k: checkpoint 2, now 3"):
        asae.train(other_cfg, tcfg, _data(), resume_from=step2, checkpoint_dir=tmp_path / "d")


# ----------------------------------------------------------------------------- item 15


def test_leftovers_of_killed_saves_are_removed_and_modes_are_consistent(run_dir):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale_dir = run_dir / f".tmp_step_00000008_{dead_pid}"
    stale_dir.mkdir()
    (stale_dir / "sae.safetensors").write_bytes(b"partial")
    stale_file = run_dir / ".latest.k2j3h4.tmp"
    stale_file.write_text("step_00000008")
    new_style = run_dir / f".tmp_step_00000008.p{dead_pid}.abcd"
    new_style.mkdir()
    cfg, tcfg = _cfgs()
    asae.train(cfg, tcfg, _data(), resume_from=run_dir)
    assert not stale_dir.exists() and not stale_file.exists() and not new_style.exists()
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for p in run_dir.rglob("*"):
        if p.name == "sae.safetensors":
            continue  # SparseAutoencoder.save's: see the test below
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (io.DIR_MODE if p.is_dir() else io.FILE_MODE), (p, oct(mode))


def test_sae_save_writes_0644_files_and_load_names_a_damaged_file(tmp_path):
    sae = asae.SparseAutoencoder(asae.SAEConfig(d_in=8, n_features=32, k=2))
    folder = sae.save(tmp_path / "sae")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {io.FILE_MODE}, modes
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(io.FileFormatError, match=str(weights)):
        asae.SparseAutoencoder.load(folder)


def test_a_live_writers_temporaries_are_kept(tmp_path):
    live = tmp_path / f".tmp_step_00000002.p{os.getppid()}.abcd"
    live.mkdir()
    io.remove_stale_temporaries(tmp_path)
    assert live.exists()


def test_results_files_are_0644(tmp_path):
    from adaptive_sae import results

    out = results.ResultsDir("probe", "quick", root=tmp_path)
    paths = [out.save_json("m", {"a": 1}), results.write_csv(out.path / "t.csv", _frame())]
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == io.FILE_MODE


def _frame():
    import pandas as pd

    return pd.DataFrame({"a": [1, 2]})
