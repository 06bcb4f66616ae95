"""The SAE and its trainer: configs, unit-norm decoder, save/load, thresholds, exact resume,
non-finite handling, the public Trainer, and training against the naive oracle forward."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import adaptive_sae as asae
import oracles
import pandas as pd
import pytest
import torch
from adaptive_sae import selection_kernels
from adaptive_sae.config import ConfigError, check_compatible
from adaptive_sae.trainer import batch_stream

RULES = ["topk", "feature_choice", "feature_choice_zipf", "mutual_choice", "relu_l1"]


def _data(n=4096, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(64, d, generator=g)
    acts = (torch.rand(n, 64, generator=g) < 0.06) * torch.rand(n, 64, generator=g)
    return acts @ feats + 0.01 * torch.randn(n, d, generator=g)


def _cfgs(rule="mutual_choice", aux="none", **kw):
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
    params = dict(
        batch_size=128,
        total_tokens=128 * 24,
        lr=3e-3,
        aux_loss=aux,
        log_every=4,
        dead_window_tokens=512,
        density_window_tokens=512,
        zipf_refit_every=5,
    )
    return cfg, asae.TrainConfig(**{**params, **kw})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_in=8, n_features=16, k=17), "k=17 exceeds n_features=16"),
        (dict(d_in=8, n_features=16, k=0), "k=0"),
        (dict(d_in=8, n_features=16, k=-2), "k=-2"),
        (dict(d_in=8, n_features=16, rule="nope"), "rule='nope' is not known.*topk"),
        (dict(d_in=0, n_features=16), "d_in=0"),
        (dict(d_in=8, n_features=16, k=2.5), "integer number of matches"),
        (dict(d_in=8, n_features=16, input_scaling="x"), "input_scaling"),
    ],
)
def test_sae_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        asae.SAEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(aux_loss="aux_q"), "aux_loss='aux_q'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(batch_size=64, total_tokens=10), "total_tokens=10"),
        (dict(gamma=0.0), "gamma"),
        (dict(warmup_fraction=0.7, decay_fraction=0.5), "lower one"),
        (dict(lr=-1.0), "lr=-1.0"),
    ],
)
def test_train_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        asae.TrainConfig(**kwargs)


def test_feature_choice_budget_error_names_the_fix():
    cfg = asae.SAEConfig(d_in=8, n_features=512, rule="feature_choice", k=4)
    with pytest.raises(ConfigError, match="raise batch_size to at least 128"):
        check_compatible(cfg, asae.TrainConfig(batch_size=64, total_tokens=640))


def test_config_json_round_trip():
    cfg, tcfg = _cfgs()
    assert asae.SAEConfig.from_json(cfg.to_json()) == cfg
    assert asae.TrainConfig.from_json(tcfg.to_json()) == tcfg
    with pytest.raises(ConfigError, match="no field"):
        asae.SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("rule", RULES)
def test_training_every_rule(rule, tmp_path):
    x = _data()
    cfg, tcfg = _cfgs(rule, aux="aux_zipf")
    run = asae.train(cfg, tcfg, x)
    sae = run.sae
    # decoder rows stay unit-norm
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert run.history["step"].iloc[-1] == tcfg.n_steps
    assert {"nmse", "l0_mean", "l0_std", "dead_pct", "underutilised_pct", "lr"} <= set(
        run.history.columns
    )
    res = asae.evaluate(sae, x, mode="train")
    if rule == "relu_l1":  # starts far from sparse (all-positive codes); just check it learns
        assert run.history["nmse"].iloc[-1] < 0.5 * run.history["nmse"].iloc[0]
    else:
        assert res.nmse < 0.9
        assert res.l0_mean <= cfg.k + 1e-6  # the budget is never exceeded
    inf = asae.evaluate(sae, x, mode="inference")
    assert 0 <= inf.nmse < 1.5
    # save/load round trip keeps every tensor and both rules' outputs
    sae.save(tmp_path / "sae")
    loaded = asae.SparseAutoencoder.load(tmp_path / "sae")
    for name, t in sae.state_dict().items():
        assert torch.equal(t.nan_to_num(), loaded.state_dict()[name].nan_to_num()), name
    assert torch.equal(sae.encode(x[:128], mode="train"), loaded.encode(x[:128], mode="train"))
    assert torch.equal(sae.reconstruct(x[:50]), loaded.reconstruct(x[:50]))


def test_feature_choice_has_no_dead_feature_and_varies_per_token():
    x = _data()
    cfg, tcfg = _cfgs("feature_choice")
    run = asae.train(cfg, tcfg, x)
    res = asae.evaluate(run.sae, x, mode="train")
    assert res.dead_pct == 0.0
    assert res.l0_std > 0.5


def test_encode_decode_shapes_and_units():
    x = _data()
    cfg, tcfg = _cfgs("topk")
    sae = asae.train(cfg, tcfg, x).sae
    codes = sae.encode(x[:10].reshape(2, 5, 16), mode="inference")
    assert codes.shape == (2, 5, 64)
    assert torch.allclose(sae.decode(codes), sae.reconstruct(x[:10]).reshape(2, 5, 16), atol=1e-5)
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.zeros(3, 7))


def test_inference_threshold_needs_training():
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="mutual_choice", k=4)
    sae = asae.SparseAutoencoder(cfg)
    with pytest.raises(RuntimeError, match="no inference threshold"):
        sae.encode(torch.randn(4, 16), mode="inference")


def test_thresholds_track_selection():
    x = _data()
    for rule in ("mutual_choice", "feature_choice"):
        cfg, tcfg = _cfgs(rule)
        sae = asae.train(cfg, tcfg, x).sae
        tr = asae.evaluate(sae, x, mode="train")
        inf = asae.evaluate(sae, x, mode="inference")
        # the per-token rule spends about the same budget as the batch rule
        assert abs(inf.l0_mean - tr.l0_mean) < 0.5 * cfg.k, rule


def test_runs_are_bit_for_bit_repeatable():
    x = _data()
    cfg, tcfg = _cfgs("feature_choice_zipf", aux="aux_k")
    a = asae.train(cfg, tcfg, x).sae.state_dict()
    b = asae.train(cfg, tcfg, x).sae.state_dict()
    assert _same_state(a, b)


def _same_state(a: dict, b: dict) -> bool:
    """Bit-for-bit equality of two state dicts (NaN buffers of unused thresholds compare equal)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a
    )


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "rule, aux", [("mutual_choice", "aux_zipf"), ("feature_choice_zipf", "aux_k")]
)
def test_resume_equals_uninterrupted(rule, aux, tmp_path):
    x = _data()
    cfg, tcfg = _cfgs(rule, aux=aux, checkpoint_every=5)
    full = asae.train(cfg, tcfg, x)

    def interrupt(step, row):
        if step == 12:
            raise _Stop

    with pytest.raises(_Stop):
        asae.train(cfg, tcfg, x, checkpoint_dir=tmp_path, callback=interrupt)
    assert (tmp_path / "latest").read_text() == "step_00000010"
    resumed = asae.train(cfg, tcfg, x, resume_from=tmp_path)
    assert _same_state(full.sae.state_dict(), resumed.sae.state_dict())
    assert full.history.equals(resumed.history)


def test_resume_after_kill(tmp_path):
    """A run killed with SIGKILL part-way resumes to the same weights."""
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_training import _data, _cfgs
        import adaptive_sae as asae
        cfg, tcfg = _cfgs("mutual_choice", checkpoint_every=2)
        def slow(step, row):
            if step >= 6:
                time.sleep(0.5)
        asae.train(cfg, tcfg, _data(), checkpoint_dir=sys.argv[1], callback=slow)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "step_00000008").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "latest").exists()
    step = int((tmp_path / "latest").read_text().split("_")[1])
    cfg, tcfg = _cfgs("mutual_choice", checkpoint_every=2)
    assert 0 < step < tcfg.n_steps
    resumed = asae.train(cfg, tcfg, _data(), resume_from=tmp_path)
    full = asae.train(cfg, tcfg, _data())
    assert _same_state(full.sae.state_dict(), resumed.sae.state_dict())


def test_non_finite_activations_stop_with_checkpoint(tmp_path):
    x = _data()
    x[128 * 7 + 3, 2] = float("nan")  # inside the batch of step 7
    cfg, tcfg = _cfgs("topk", init_sample_tokens=256)
    batches = [x[i * 128 : (i + 1) * 128] for i in range(tcfg.n_steps)]
    with pytest.raises(asae.NonFiniteError, match="step 7: the batch holds non-finite") as err:
        asae.train(cfg, tcfg, batches, checkpoint_dir=tmp_path)
    assert "saved in" in str(err.value)
    state = json.loads((tmp_path / "step_00000007" / "trainer_state.json").read_text())
    assert state["step"] == 7
    sae = asae.SparseAutoencoder.load(tmp_path / "step_00000007")
    for p in sae.parameters():
        assert bool(torch.isfinite(p).all())


@pytest.mark.parametrize("bad", ["nan", "inf", "both infinities"])
def test_batch_check_finds_every_non_finite_entry(bad):
    from adaptive_sae.distributed import current_comm
    from adaptive_sae.trainer import _holds_nonfinite

    x = torch.randn(64, 8)
    if bad == "both infinities":  # their sum is NaN
        x[3, 1], x[40, 7] = float("inf"), float("-inf")
    else:
        x[17, 5] = float(bad)
    assert _holds_nonfinite(x, current_comm())
    assert not _holds_nonfinite(torch.randn(64, 8), current_comm())


def test_batch_check_overflowing_sum_of_finite_entries_is_not_an_error():
    from adaptive_sae.distributed import current_comm
    from adaptive_sae.trainer import _holds_nonfinite

    x = torch.full((64, 8), 3e38)  # finite, but their float32 sum is inf
    assert not bool(torch.isfinite(x.sum()))
    assert not _holds_nonfinite(x, current_comm())


def test_nan_loss_stops(tmp_path):
    # unscaled inputs of norm ~1e25: squared errors overflow float32, the loss becomes inf
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule="topk", k=4, input_scaling="none")
    _, tcfg = _cfgs("topk")
    with pytest.raises(asae.NonFiniteError, match=r"step 0: the loss is (inf|nan)"):
        asae.train(cfg, tcfg, _data() * 1e25, checkpoint_dir=tmp_path)
    assert (tmp_path / "step_00000000" / "sae.safetensors").exists()


def test_bad_data_errors():
    cfg, tcfg = _cfgs()
    with pytest.raises(ValueError, match=r"\(N, d_in=16\)"):
        asae.train(cfg, tcfg, torch.zeros(1000, 8))
    with pytest.raises(ValueError, match="fewer than one batch"):
        asae.train(cfg, tcfg, torch.zeros(100, 16))
    with pytest.raises(ValueError, match="expected \\(128, 16\\)"):
        asae.train(cfg, tcfg, [torch.zeros(64, 16)] * 40)
    with pytest.raises(ValueError, match="ran out after"):
        asae.train(cfg, tcfg, [torch.randn(128, 16)] * 5)
    with pytest.raises(TypeError, match="activation source"):
        asae.train(cfg, tcfg, 42)


def test_trains_on_a_source():
    from adaptive_sae.data import activation_source

    src = activation_source("synthetic", d_in=16, n_true_features=64, k_true=3, seed=1)
    cfg, tcfg = _cfgs("topk")
    run = asae.train(cfg, tcfg, src)
    assert asae.evaluate(run.sae, src.held_out(1024)).nmse < 1.0


# ----- the public Trainer ---------------------------------------------------------------------------


def test_trainer_step_and_fit_equal_train():
    x = _data()
    cfg, tcfg = _cfgs("feature_choice_zipf", aux="aux_zipf")
    ref = asae.train(cfg, tcfg, x)
    stepped = asae.Trainer(cfg, tcfg)
    batches = batch_stream(x, tcfg.batch_size, cfg.d_in, tcfg.seed)
    n_init = tcfg.init_sample_tokens // tcfg.batch_size  # what fit() initialises from
    stepped.init_from_data(torch.cat([next(batches) for _ in range(n_init)]))
    batches = batch_stream(x, tcfg.batch_size, cfg.d_in, tcfg.seed)
    rows = [stepped.step(next(batches)) for _ in range(tcfg.n_steps)]
    logged = [r for r in rows if r is not None]
    assert [r["step"] for r in logged] == [4, 8, 12, 16, 20, 24]
    assert _same_state(stepped.sae.state_dict(), ref.sae.state_dict())
    assert pd.DataFrame(logged).equals(ref.history)
    fitted = asae.Trainer(cfg, tcfg).fit(x)
    assert _same_state(fitted.sae.state_dict(), ref.sae.state_dict())


# ----- whole training: the library against the oracle forward ---------------------------------------


@pytest.mark.parametrize(
    "rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu_l1"]
)
@pytest.mark.parametrize("aux", ["none", "aux_k", "aux_zipf", "aux_zipf_topk"])
def test_training_equals_training_with_the_oracle_forward(rule, aux, monkeypatch):
    """The sparse kernel (the loss kernel on a CPU), the fast selections and the one aux loss
    train exactly as dense autograd on the oracles' selections (``oracles.trainer_forward`` /
    ``trainer_aux``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 16, generator=g)
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
    tcfg = asae.TrainConfig(
        batch_size=128,
        total_tokens=128 * 6,
        aux_loss="aux_zipf" if aux == "aux_zipf_topk" else aux,
        aux_allocation="topk" if aux == "aux_zipf_topk" else "deficit",
        k_aux=8,
        dead_window_tokens=128,  # features die after one step without a match
        zipf_refit_every=1,
        gamma=1.0,  # underutilised: below the fitted law (about half the features)
        log_every=1,
        lr=1e-3,
    )
    library = asae.train(cfg, tcfg, x).history
    with monkeypatch.context() as m:
        m.setattr(asae.Trainer, "_forward", oracles.trainer_forward)
        m.setattr(asae.Trainer, "_aux", oracles.trainer_aux)
        m.setattr(asae.Trainer, "_closed_form_applies", lambda self: False)  # autograd
        oracle = asae.train(cfg, tcfg, x).history
    for col in ("loss", "nmse", "aux_loss", "l0_mean", "dead_pct", "underutilised_pct"):
        torch.testing.assert_close(
            torch.tensor(library[col].values),
            torch.tensor(oracle[col].values),
            rtol=1e-3,
            atol=1e-5,
        )
    # the auxiliary loss is exercised (aux_k needs dead features, which Feature Choice, giving
    # every feature its capacity, and ReLU+L1, dense at the start, do not have; aux_zipf needs
    # features below the fitted law, which uniform Feature Choice, every feature matching its
    # equal capacity, does not have: its law is flat)
    zipf_active = aux.startswith("aux_zipf") and rule != "feature_choice"
    if zipf_active or (aux == "aux_k" and rule in ("topk", "mutual_choice")):
        assert (oracle["aux_loss"] > 0).any(), "the auxiliary loss should be active in this test"
    if aux.startswith("aux_zipf") and rule == "feature_choice" and selection_kernels.use_kernels:
        assert (library["underutilised_pct"] == 0).all()  # equal densities: none below the law


@pytest.mark.parametrize("share", [1, 10**9])  # the mask's indices / the mask itself
def test_dense_rule_by_mask_trains_as_by_indices(share, monkeypatch):
    """ReLU+L1 selects by a mask (``select_mask``), which stands for its matches while they are
    many, else its indices do; the same rule without it goes through ``select``'s flat indices
    (the general path for dense-code rules). Same weights, statistics and history."""
    from adaptive_sae import trainer
    from adaptive_sae.rules import register_rule, unregister_rule
    from adaptive_sae.rules.relu_l1 import ReluL1

    monkeypatch.setattr(trainer, "DENSE_MASK_SHARE", share)

    class ByIndices(ReluL1):
        name = "relu_l1_by_indices"

        def select_mask(self, sae, P):
            return None

    register_rule(ByIndices())
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
        runs = {}
        for rule in ("relu_l1", "relu_l1_by_indices"):
            cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
            tcfg = asae.TrainConfig(batch_size=256, total_tokens=256 * 12, log_every=1)
            runs[rule] = asae.train(cfg, tcfg, x)
        a, b = runs["relu_l1"], runs["relu_l1_by_indices"]
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(a.sae, name), getattr(b.sae, name)), name
        cols = ["l0_mean", "l0_std", "nmse", "l1_coef", "dead_pct"]
        pd.testing.assert_frame_equal(a.history[cols], b.history[cols])
        assert (a.history["l0_mean"] > 0).all()
    finally:
        unregister_rule("relu_l1_by_indices")
