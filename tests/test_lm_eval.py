"""Evaluations that run the language model: splicing, top contexts, difficulty."""

from __future__ import annotations

import math

import adaptive_sae as asae
import numpy as np
import pytest
import torch
from adaptive_sae import lm_eval
from adaptive_sae.data import tiny as tiny_mod
from adaptive_sae.data.corpus import build_corpus

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    corpus = build_corpus(
        modules=["json", "json.decoder", "csv", "textwrap", "shlex", "fnmatch"],
        include_topics=False,
        val_fraction=0.3,
    )
    cfg = tiny_mod.TinyLMConfig(
        d_model=32, n_layers=2, n_heads=2, d_mlp=64, n_ctx=32, steps=8, batch_size=8
    )
    return tiny_mod.load_tiny_lm(
        cfg, corpus=corpus, cache_dir=tmp_path_factory.mktemp("c"), log=None
    )


@pytest.fixture(scope="module")
def source(lm):
    return tiny_mod.TinyLMSource(lm=lm, buffer_tokens=1024, harvest_contexts=16)


@pytest.fixture(scope="module")
def tokens(source):
    return source.eval_contexts(12)


@pytest.fixture(scope="module")
def mc_sae(source):
    """A Mutual Choice SAE trained directly on the tiny source (a few steps)."""
    cfg = asae.SAEConfig(d_in=source.d_in, n_features=64, rule="mutual_choice", k=4)
    tcfg = asae.TrainConfig(batch_size=128, total_tokens=128 * 6, init_sample_tokens=256)
    return asae.train(cfg, tcfg, source).sae


def test_identity_splice_leaves_the_loss_unchanged(lm, tokens):
    res = lm_eval.downstream_loss(lm.model, lm_eval.IdentitySAE(32), tokens, HOOK, mode="both")
    for r in ("train", "inference"):
        assert abs(res[f"delta_ce_{r}"]) < 1e-6
        assert res[f"ce_sae_{r}"] == pytest.approx(res["ce_clean"], abs=1e-6)
        assert res[f"loss_recovered_zero_{r}"] == pytest.approx(1.0, abs=1e-5)
        assert res[f"nmse_{r}"] == 0.0
    clean = lm_eval.token_losses(lm.model, tokens)[:, 1:].double().mean()
    assert res["ce_clean"] == pytest.approx(float(clean))
    assert res["n_tokens_scored"] == 12 * 30 and res["units"] == "nats"


def test_splice_touches_only_positions_from_first(lm, tokens):
    # (A constant shift would do nothing: the LayerNorms that follow remove it.)
    scale = torch.linspace(0.0, 2.0, 32)

    class Noisy(lm_eval.IdentitySAE):
        def reconstruct(self, x, mode="inference"):
            return x * scale

    acts = lm_eval.hook_activations(lm.model, tokens, HOOK)
    rep = acts * scale
    losses = lm_eval._spliced_losses(lm.model, tokens, HOOK, rep, first=1, batch_size=4)
    clean = lm_eval.token_losses(lm.model, tokens)
    torch.testing.assert_close(losses[:, 0], clean[:, 0])  # position 0 untouched
    assert not torch.allclose(losses[:, 1:], clean[:, 1:])
    res = lm_eval.downstream_loss(lm.model, Noisy(32), tokens, HOOK, mode="inference")
    assert res["delta_ce_inference"] != 0
    expect = (res["ce_zero"] - res["ce_sae_inference"]) / (res["ce_zero"] - res["ce_clean"])
    assert res["loss_recovered_zero_inference"] == pytest.approx(expect)
    expect = (res["ce_mean"] - res["ce_sae_inference"]) / (res["ce_mean"] - res["ce_clean"])
    assert res["loss_recovered_mean_inference"] == pytest.approx(expect)


def test_train_rule_batches_are_restored_to_token_order():
    x = torch.randn(1000, 8)
    sae = lm_eval.IdentitySAE(8)
    sae.train_batch_size = torch.tensor(128)
    assert torch.equal(lm_eval.sae_apply(sae, x, "train"), x)
    assert torch.equal(lm_eval.sae_apply(sae, x, "inference", what="encode"), x)


def test_trained_sae_on_the_tiny_source(lm, source, tokens, mc_sae):
    res = lm_eval.downstream_loss(lm.model, mc_sae, tokens, source.hook, mode="both")
    for r in ("train", "inference"):
        for key in ("ce_sae", "delta_ce", "loss_recovered_zero", "loss_recovered_mean", "nmse"):
            assert math.isfinite(res[f"{key}_{r}"])
        assert 0 < res[f"l0_{r}"] <= 64
    m = asae.evaluate(mc_sae, source.held_out(512), mode="train", batch_size=128)
    assert m.nmse > 0


def test_top_activating_contexts_mark_the_byte(lm, tokens):
    top = lm_eval.top_activating_contexts(
        lm.model, lm_eval.IdentitySAE(32), tokens, HOOK, feature=3, n=5, window=(6, 3)
    )
    assert 1 <= len(top) <= 5
    values = [t["activation"] for t in top]
    assert values == sorted(values, reverse=True) and values[0] > 0
    acts = lm_eval.hook_activations(lm.model, tokens, HOOK)
    for t in top:
        assert t["text"].count("«") == 1 and t["text"].count("»") == 1
        assert t["position"] >= 1
        assert acts[t["context"], t["position"], 3].item() == pytest.approx(t["activation"])
        byte = bytes([int(tokens[t["context"], t["position"]])]).decode("utf-8", "replace")
        assert "«" + lm_eval._visible(byte) + "»" in t["text"]


def test_token_difficulty_and_rank_correlation(lm, tokens, mc_sae):
    bits = lm_eval.token_difficulty(lm.model, tokens)
    nats = lm_eval.token_difficulty(lm.model, tokens, unit="nats")
    assert bits.shape == (12, 31)
    torch.testing.assert_close(bits, nats / math.log(2))
    assert lm_eval.rank_correlation(np.arange(10), np.arange(10) ** 3)[0] == pytest.approx(1.0)
    assert np.isnan(lm_eval.rank_correlation(np.ones(10), np.arange(10))[0])  # TopK's L0
    res = lm_eval.l0_vs_difficulty(
        lm.model, mc_sae, tokens, HOOK, reference_sae=mc_sae, mode="inference"
    )
    assert res["n_tokens"] == 12 * 30 == len(res["l0"]) == len(res["lm_loss_bits"])
    for key in ("spearman_l0_vs_lm_loss", "spearman_l0_vs_ref_error"):
        assert np.isnan(res[key]) or -1 <= res[key] <= 1


def test_lm_comparison_writes_a_table(source, tmp_path):
    df = lm_eval.lm_comparison(
        ("topk", "feature_choice"),
        n_features=64,
        k=4,
        batch_size=128,
        total_tokens=128 * 4,
        eval_tokens=256,
        eval_contexts=6,
        source=source,
        out_dir=str(tmp_path),
        log=None,
    )
    assert list(df["variant"]) == ["topk", "feature_choice"]
    for col in ("nmse", "nmse_inference", "delta_ce", "delta_ce_inference"):
        assert df[col].notna().all()
    out = tmp_path / "lm_comparison" / "tiny"
    assert (out / "table.csv").is_file() and (out / "provenance.json").is_file()
