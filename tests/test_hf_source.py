"""The ``hf`` activation source end to end, offline, on a GPT-2-architecture model built here.

The session fixture trains a byte-level BPE tokenizer on a slice of the suite's corpus (the
standard library's docstrings), builds a 2-layer GPT-2 of tiny widths with ``transformers``,
trains it for a few steps on the same text, and saves both with ``save_pretrained``: exactly
what a user's local model directory holds. The text goes to local ``.txt`` files. Then the
source is used as a user would: activations at a hook, the activation store, training an SAE,
ΔCE with the SAE spliced in, top activating contexts. The Hub paths are checked for failing
fast: under HF_HUB_OFFLINE, and against an endpoint on 127.0.0.1 that accepts TCP connections
and then closes them or never answers (no TLS).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import adaptive_sae as asae
import pytest
import torch
from adaptive_sae.config import ConfigError
from adaptive_sae.data import activation_source
from adaptive_sae.data.corpus import build_corpus
from adaptive_sae.data.hf import HFSource, SourceUnavailable, in_held_out
from adaptive_sae.lm_eval import IdentitySAE, downstream_loss, top_activating_contexts

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

MODULES = ["argparse", "json", "textwrap", "string", "functools", "pathlib", "dataclasses"]
CTX = 32
N_POSITIONS = 64
BOS = "<|endoftext|>"
HUB_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS
    )


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(model directory, text directory, corpus text): a GPT-2 saved like a user's model."""
    root = tmp_path_factory.mktemp("hf_source")
    corpus = build_corpus(modules=MODULES, include_topics=False)
    texts = [d.text for d in corpus.documents]
    tokenizer = _train_tokenizer(texts)
    cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    # a few steps of training, so that the loss means something (random weights give ~log V)
    ids = torch.tensor(tokenizer(BOS.join(texts))["input_ids"])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        starts = torch.randint(0, ids.numel() - N_POSITIONS, (16,), generator=g)
        x = ids[starts[:, None] + torch.arange(N_POSITIONS)]
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text_dir = root / "texts"
    text_dir.mkdir()
    for d in corpus.documents:
        (text_dir / f"{d.name.replace(':', '_')}.txt").write_text(d.text, encoding="utf-8")
    return model_dir, text_dir, "\n".join(texts)


def _source(built, **kw) -> HFSource:
    model_dir, text_dir, _ = built
    params = dict(
        model=str(model_dir),
        hook="blocks.1.hook_resid_pre",
        dataset=str(text_dir),
        context_len=CTX,
        held_out_fraction=0.1,
        harvest_contexts=16,
        buffer_tokens=4096,
        device="cpu",
    )
    return activation_source("hf", **{**params, **kw})


@pytest.fixture(scope="session")
def source(built):
    return _source(built)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no offline flags or endpoint from the environment."""
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


# ----- the whole path -------------------------------------------------------------------------
def test_end_to_end_activations_store_training_delta_ce_and_top_contexts(source):
    assert source.d_in == 32 and source.hook == "blocks.1.hook_resid_pre"
    batch = next(source.batches(128))
    assert batch.shape == (128, 32) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and batch.std() > 0
    x_eval = source.held_out(1024)
    assert x_eval.shape == (1024, 32)

    cfg = asae.SAEConfig(d_in=32, n_features=128, k=4)
    tcfg = asae.TrainConfig(batch_size=256, total_tokens=40_960, seed=0, init_sample_tokens=1024)
    run = asae.train(cfg, tcfg, source)
    nmse = asae.evaluate(run.sae, x_eval).nmse
    assert 0 < nmse < 0.5

    ctx = source.eval_contexts(24)
    assert ctx.shape == (24, CTX) and bool((ctx[:, 0] == source.bos).all())
    ident = downstream_loss(source.model, IdentitySAE(32), ctx, source.hook)
    assert abs(ident["delta_ce_inference"]) < 1e-5 and abs(ident["delta_ce_train"]) < 1e-5
    assert ident["ce_clean"] < math.log(len(source.tokenizer)) - 1  # the model learned something
    assert ident["ce_zero"] > ident["ce_clean"] + 0.05
    ds = downstream_loss(source.model, run.sae, ctx, source.hook)
    assert 0 < ds["nmse_inference"] < 0.5
    assert ds["l0_inference"] > 0
    # the SAE's reconstruction hurts the loss less than removing the activation does
    assert abs(ds["delta_ce_inference"]) < ds["ce_zero"] - ds["ce_clean"]

    acts = (run.sae.encode(x_eval) != 0).float().mean(0)
    feature = int(acts.argmax())
    top = top_activating_contexts(source.model, run.sae, ctx, source.hook, feature, n=5)
    assert len(top) == 5
    values = [t["activation"] for t in top]
    assert values == sorted(values, reverse=True) and values[-1] > 0
    for t in top:
        assert t["position"] >= 1 and t["text"].count("«") == 1 and t["text"].count("»") == 1
    d = source.describe()
    assert d["source"] == "hf" and d["model_files_sha256"] and d["data_files_sha256"]
    json.dumps(d)  # provenance is JSON


def test_hook_activations_equal_the_hf_models_hidden_states(source, built):
    model_dir, _, _ = built
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager")
    hf.eval()
    ctx = source.eval_contexts(8)
    with torch.no_grad():
        out = hf(ctx, output_hidden_states=True)
    # hidden_states[L] is the input of block L (the last one is after the final LayerNorm)
    for layer in range(2):
        src = _source(built, hook=f"blocks.{layer}.hook_resid_pre") if layer != 1 else source
        torch.testing.assert_close(src.harvest(ctx), out.hidden_states[layer], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(source.model(ctx), out.logits, atol=1e-4, rtol=0)


def test_windows_are_bos_led_token_runs_of_the_text_and_held_out_documents_are_apart(source, built):
    _, _, text = built
    tok = source.tokenizer
    windows = torch.cat([w for _, w in zip(range(3), source._windows(0, held_out=False))])
    held = source.eval_contexts(16)
    for w in (windows, held):
        assert w.shape[1] == CTX and bool((w[:, 0] == source.bos).all())
        assert int(w.max()) < len(tok)
    # a window is pieces of documents separated by BOS; each piece is text of the corpus
    for row in torch.cat([windows[:4], held[:4]]).tolist():
        pieces, cur = [], []
        for i in row[1:]:
            if i == source.bos:
                pieces.append(cur)
                cur = []
            else:
                cur.append(i)
        pieces.append(cur)
        for p in pieces:
            if p:
                assert tok.decode(p) in text
    # held-out documents never reach training, training documents never the held-out set
    docs = list(source._documents(0))
    assert any(in_held_out(t, 0.1) for t in docs) and not all(in_held_out(t, 0.1) for t in docs)
    train_ids = {tuple(r) for r in windows[:, 1:].tolist()}
    assert not any(tuple(r) in train_ids for r in held[:, 1:].tolist())


def test_a_loaded_model_object_and_tokenizer_give_the_same_activations(source, built):
    model_dir, text_dir, _ = built
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    other = HFSource(
        model,
        "blocks.1.hook_resid_pre",
        str(text_dir),
        tokenizer=tok,
        context_len=CTX,
        held_out_fraction=0.1,
        device="cpu",
    )
    ctx = source.eval_contexts(4)
    torch.testing.assert_close(other.harvest(ctx), source.harvest(ctx), atol=1e-6, rtol=0)
    assert torch.equal(other.eval_contexts(4), ctx)


def test_the_disk_cache_is_keyed_by_the_model_files(built, tmp_path):
    model_dir, _, _ = built
    kw = dict(cache=True, cache_tokens=2048, cache_dir=str(tmp_path))
    first = _source(built, **kw)
    a = next(first.batches(256))
    path = first.store.cache_path()
    assert path.is_file() and first.describe()["cache_vectors"] == 2048
    assert torch.equal(next(_source(built, **kw).batches(256)), a)  # read back, same order
    changed = tmp_path / "changed_model"
    changed.mkdir()
    for f in model_dir.iterdir():
        changed.joinpath(f.name).write_bytes(f.read_bytes())
    weights = changed / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of one weight: same names and sizes, other content
    weights.write_bytes(bytes(blob))
    assert _source(built, model=str(changed), **kw).store.cache_path() != path


def test_local_jsonl_and_saved_datasets_are_read_by_field(built, tmp_path):
    rows = [{"body": f"record {i} says hello"} for i in range(40)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = _source(built, dataset=str(path), text_field="body")
    assert sorted(src._documents(0)) == sorted(r["body"] for r in rows)
    with pytest.raises(ConfigError, match="text_field"):
        list(_source(built, dataset=str(path))._documents(0))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    saved = _source(built, dataset=str(tmp_path / "saved"), text_field="body")
    assert sorted(saved._documents(0)) == sorted(r["body"] for r in rows)


# ----- bad input -------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem(built, tmp_path):
    model_dir, text_dir, _ = built
    with pytest.raises(ConfigError, match="no config.json"):
        _source(built, model=str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        _source(built, model=str(tmp_path / "missing" / "model"))
    with pytest.raises(ConfigError, match="does not exist"):
        _source(built, dataset=str(tmp_path / "missing" / "texts"))
    for name in ("missing_texts/", "notes.txt", "rows.jsonl"):  # paths, not Hub names
        with pytest.raises(ConfigError, match="does not exist"):
            _source(built, dataset=name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no file"):
        _source(built, dataset=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="hook point"):
        _source(built, hook="blocks.7.hook_resid_pre")
    with pytest.raises(ConfigError, match="context_len"):
        _source(built, context_len=N_POSITIONS + 1)
    with pytest.raises(ConfigError, match="dataset is missing"):
        HFSource(str(model_dir))


# ----- the Hub, offline -----------------------------------------------------------------------
def test_hub_names_fail_fast_and_clearly_offline(built, no_hub, monkeypatch):
    model_dir, text_dir, _ = built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SourceUnavailable) as err:
        activation_source("hf", model="some-org/some-model", dataset=str(text_dir))
    msg = str(err.value)
    for word in ("some-org/some-model", "HF_HUB_OFFLINE", "local Hugging Face cache", "'tiny'"):
        assert word in msg
    with pytest.raises(SourceUnavailable, match="some-org/some-texts"):
        activation_source("hf", model=str(model_dir), dataset="some-org/some-texts")
    with pytest.raises(SourceUnavailable, match="openwebtext"):
        activation_source("gpt2")
    assert time.perf_counter() - t0 < 3


class _NoTLSServer:
    """A server on 127.0.0.1 that accepts TCP connections and then closes them at once
    ("close") or never answers ("silent"): TCP opens, TLS never completes."""

    def __init__(self, mode: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.mode, self.held, self.stop = mode, [], threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if self.mode == "close":
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("mode", ["close", "silent"])
def test_an_endpoint_that_fails_tls_fails_fast(built, no_hub, monkeypatch, mode):
    model_dir, text_dir, _ = built
    server = _NoTLSServer(mode)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{server.port}")
        for name, params in [
            ("gpt2", {}),
            ("hf", {"model": "some-org/some-model", "dataset": str(text_dir)}),
        ]:
            t0 = time.perf_counter()
            with pytest.raises(SourceUnavailable) as err:
                activation_source(name, **params)
            assert time.perf_counter() - t0 < 2.5, name
            assert "127.0.0.1" in str(err.value) and "did not answer" in str(err.value)
        # everything local: no network is needed, so none is asked for
        t0 = time.perf_counter()
        _source(built)
        assert time.perf_counter() - t0 < 2.5
    finally:
        server.close()


def test_a_cached_hub_model_loads_offline_and_without_an_answering_hub(built, no_hub, monkeypatch):
    model_dir, text_dir, _ = built
    commit = "0" * 40
    repo = Path(os.environ["HF_HOME"]) / "hub" / "models--some-org--tiny-gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = activation_source(
        "hf",
        model="some-org/tiny-gpt2",
        hook="blocks.0.hook_resid_pre",
        dataset=str(text_dir),
        context_len=CTX,
    )
    assert src.d_in == 32 and src.describe()["model"] == "some-org/tiny-gpt2"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server = _NoTLSServer("close")
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{server.port}")
        t0 = time.perf_counter()
        src = activation_source(
            "hf", model="some-org/tiny-gpt2", dataset=str(text_dir), context_len=CTX
        )
        assert time.perf_counter() - t0 < 5
        assert src.hook == "blocks.1.hook_resid_pre"  # the default: the middle block's input
    finally:
        server.close()
