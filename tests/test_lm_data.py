"""Language-model activation sources: corpus, embedded model, hooks, store, GPT-2 offline."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from adaptive_sae.data import activation_source
from adaptive_sae.data import tiny as tiny_mod
from adaptive_sae.data.corpus import (
    DOC_START,
    build_corpus,
    module_document,
    stdlib_module_files,
)
from adaptive_sae.data.gpt2 import GPT2Source, SourceUnavailable
from adaptive_sae.data.store import ActivationStore, StoreConfig

SLICE = ["json", "json.decoder", "json.encoder", "csv", "textwrap", "shlex", "fnmatch", "glob"]
TOY = dict(
    d_model=32, n_layers=2, n_heads=2, d_mlp=64, n_ctx=32, steps=6, batch_size=4,
    warmup_steps=2, checkpoint_every=3,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are dominated by per-op overhead; one thread is faster (and on a shared
    # machine much faster) than several.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(modules=SLICE, include_topics=False, val_fraction=0.3)


@pytest.fixture(scope="module")
def lm(corpus, tmp_path_factory):
    cfg = tiny_mod.TinyLMConfig(**TOY)
    return tiny_mod.load_tiny_lm(
        cfg, corpus=corpus, cache_dir=tmp_path_factory.mktemp("c"), log=None
    )


# ----- corpus ------------------------------------------------------------------------------------
def test_module_document_reads_docstrings_without_importing():
    src = '''"""Module doc."""
import sys; sys.exit("importing this would stop the tests")
class A:
    """Class doc."""
    def f(self, x, *, y=1):
        """Method doc."""
def _no_doc(): pass
'''
    doc = module_document("pkg.mod", src)
    assert doc.name == "module:pkg.mod"
    assert doc.text == (
        "Module doc.\n\nclass pkg.mod.A\nClass doc.\n\npkg.mod.A.f(self, x, *, y=1)\nMethod doc."
    )
    assert module_document("m", "x = 1") is None
    assert module_document("m", "def (") is None


def test_corpus_is_deterministic_and_split_by_document(corpus):
    again = build_corpus(modules=SLICE, include_topics=False, val_fraction=0.3)
    assert again.sha256 == corpus.sha256 and len(corpus.sha256) == 64
    train, val = corpus.split("train"), corpus.split("val")
    assert train and val
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in corpus.documents}
    assert not {d.name for d in train} & {d.name for d in val}
    assert [d.name for d in corpus.documents] == sorted(d.name for d in corpus.documents)
    tokens = corpus.tokens("train")
    assert tokens.dtype == torch.uint8
    assert int((tokens == DOC_START).sum()) == len(train)
    assert corpus.describe()["n_bytes"] == corpus.n_bytes > 10_000


def test_stdlib_walk_skips_tests_and_demos():
    names = {n for n, _ in stdlib_module_files()}
    assert {"json", "json.decoder", "email.mime.text"} <= names
    assert not any(n.split(".")[0] in ("test", "idlelib", "turtledemo") for n in names)
    assert not any(".test." in f".{n}." or ".tests." in f".{n}." for n in names)


# ----- the embedded model ------------------------------------------------------------------------
def test_tiny_model_trains_and_is_cached(lm, corpus):
    rec = lm.record
    assert rec["corpus_sha256"] == corpus.sha256
    assert 0 < rec["val_bits_per_byte"] < 9
    assert lm.model.cfg.d_vocab == 256 and lm.model.cfg.n_layers == 2
    assert (lm.directory / tiny_mod.WEIGHTS_FILE).is_file()
    assert not (lm.directory / tiny_mod.CHECKPOINT_FILE).exists()
    logs: list[str] = []
    again = tiny_mod.load_tiny_lm(
        lm.cfg, corpus=corpus, cache_dir=lm.directory.parents[1], log=logs.append
    )
    assert logs == [] and again.record == rec  # loaded, not retrained
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(again.model(x), lm.model(x))
    assert isinstance(lm.sample("Return ", 8), str)


def test_training_resumes_to_the_same_weights(corpus, tmp_path):
    cfg = tiny_mod.TinyLMConfig(**TOY)
    full = tiny_mod.train_tiny_lm(cfg, corpus, tmp_path / "a", log=None)
    assert tiny_mod.train_tiny_lm(cfg, corpus, tmp_path / "b", max_steps=4, log=None) is None
    assert (tmp_path / "b" / tiny_mod.CHECKPOINT_FILE).is_file()
    resumed = tiny_mod.train_tiny_lm(cfg, corpus, tmp_path / "b", log=None)
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert resumed["val_bits_per_byte"] == full["val_bits_per_byte"]


def test_loaders_side_by_side_train_the_model_once(corpus, tmp_path):
    """Two loaders start on an empty cache at once (sweep points side by side): one trains,
    the other waits for it and loads the same weights."""
    cfg = tiny_mod.TinyLMConfig(**TOY)
    logs: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        got = list(
            pool.map(
                lambda _: tiny_mod.load_tiny_lm(
                    cfg, corpus=corpus, cache_dir=tmp_path, log=logs.append
                ),
                range(2),
            )
        )
    assert sum("training" in m for m in logs) == 1
    assert got[0].record == got[1].record


def test_retrain_forces_a_new_model(lm, corpus):
    logs: list[str] = []
    tiny_mod.load_tiny_lm(
        lm.cfg, corpus=corpus, cache_dir=lm.directory.parents[1], retrain=True, log=logs.append
    )
    assert any("training" in m for m in logs)


@pytest.mark.parametrize(
    "hook",
    ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid",
     "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
)  # fmt: skip
def test_hook_activations_match_a_full_run(lm, hook):
    x = torch.randint(0, 256, (3, 20))
    acts = tiny_mod.activations_at(lm.model, x, hook)
    _, cache = lm.model.run_with_cache(x)
    assert acts.shape == (3, 20, 32)
    torch.testing.assert_close(acts, cache[hook])


def test_hook_stops_before_later_blocks(lm):
    ran: list[str] = []
    handles = [
        lm.model.hook_dict[f"blocks.{i}.hook_out"].add_hook(lambda t, hook: ran.append(hook.name))
        for i in range(2)
    ]
    try:
        tiny_mod.activations_at(lm.model, torch.randint(0, 256, (1, 8)), "blocks.1.hook_resid_pre")
    finally:
        for h in handles:
            h.remove() if hasattr(h, "remove") else None
        lm.model.reset_hooks()
    assert ran == ["blocks.0.hook_out"]


def test_unknown_hook_is_refused(lm):
    with pytest.raises(ValueError, match="not a hook point"):
        tiny_mod.TinyLMSource("blocks.7.hook_resid_pre", lm=lm)


# ----- the source ---------------------------------------------------------------------------------
def test_tiny_source_interface(lm):
    src = tiny_mod.TinyLMSource(lm=lm, buffer_tokens=512, harvest_contexts=8)
    assert src.hook == "blocks.1.hook_resid_pre" and src.d_in == 32
    b = next(src.batches(100))
    assert b.shape == (100, 32) and b.dtype == torch.float32
    assert torch.is_grad_enabled()  # harvesting must not leave gradients switched off
    assert src.held_out(50).shape == (50, 32)
    d = json.loads(json.dumps(src.describe()))
    assert d["val_bits_per_byte"] == lm.record["val_bits_per_byte"]
    assert d["corpus_sha256"] == lm.corpus.sha256 and d["hook"] == src.hook
    assert d["model"]["config"]["d_model"] == 32
    assert d["filter_counts"]["dropped_first_position"] > 0


def test_tiny_source_is_deterministic_and_skips(lm):
    def take(src, n, start=0):
        it = src.batches(64, start_batch=start)
        return [next(it) for _ in range(n)]

    a = take(tiny_mod.TinyLMSource(lm=lm, buffer_tokens=512, seed=3), 6)
    b = take(tiny_mod.TinyLMSource(lm=lm, buffer_tokens=512, seed=3), 6)
    c = take(tiny_mod.TinyLMSource(lm=lm, buffer_tokens=512, seed=4), 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    late = take(tiny_mod.TinyLMSource(lm=lm, buffer_tokens=512, seed=3), 2, start=4)
    assert torch.equal(late[0], a[4]) and torch.equal(late[1], a[5])


def test_registry_builds_the_tiny_source(lm):
    src = activation_source("tiny", lm=lm, context_len=16)
    assert src.context_len == 16 and next(src.batches(8)).shape == (8, 32)


# ----- the store, on activations that name their context and position --------------------------
N_CTX, T, D = 40, 9, 4


def _labelled_store(cfg: StoreConfig, seed: int = 0, big: set[tuple[int, int]] = frozenset()):
    """Contexts are ids 0..N_CTX-1; the vector of (c, t) is (c, t, 1, 1), times 1000 when big."""
    calls = {"n": 0}

    def harvest(ctx: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        c = ctx[:, :1].float().expand(-1, T)
        t = torch.arange(T).float().expand(ctx.shape[0], -1)
        v = torch.stack([c, t, torch.ones_like(c), torch.ones_like(c)], -1)
        for i, cid in enumerate(ctx[:, 0].tolist()):
            for tt in range(T):
                if (cid, tt) in big:
                    v[i, tt] *= 1000
        return v

    def contexts(pass_idx: int):
        order = torch.randperm(N_CTX, generator=torch.Generator().manual_seed(pass_idx))
        ids = order[:, None].expand(-1, T)
        for i in range(0, N_CTX, 5):
            yield ids[i : i + 5]

    return ActivationStore(harvest, contexts, D, cfg, seed=seed, provenance={"t": "label"}), calls


def _keys(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(c), int(t)) for c, t in batch[:, :2].tolist()]


def test_store_mixes_contexts_and_never_repeats_within_a_pass():
    store, _ = _labelled_store(StoreConfig(buffer_tokens=120, outlier_multiple=None))
    per_pass = N_CTX * (T - 1)
    it = store.batches(16)
    seen = [k for _ in range(per_pass // 16) for k in _keys(next(it))]
    assert len(seen) == len(set(seen)) == per_pass
    assert set(seen) == {(c, t) for c in range(N_CTX) for t in range(1, T)}
    first = _keys(next(store.batches(16)))
    assert len({c for c, _ in first}) >= 8  # tokens from many contexts in one batch
    assert store.counts["dropped_first_position"] >= N_CTX


def test_store_filters_count_what_they_drop():
    big = {(3, 4), (7, 2), (11, 8)}
    store, _ = _labelled_store(StoreConfig(buffer_tokens=64, outlier_multiple=5.0), big=big)
    chunks = list(store.stream(0))
    kept = {k for ch in chunks for k in _keys(ch)}
    assert store.counts == {
        "harvested": N_CTX * T,
        "dropped_first_position": N_CTX,
        "dropped_outliers": len(big),
    }
    assert not kept & {(c, t) for c, t in big}
    assert len(kept) == N_CTX * (T - 1) - len(big)
    keep_all, _ = _labelled_store(StoreConfig(exclude_first=False, outlier_multiple=None))
    list(keep_all.stream(0))
    assert keep_all.counts["dropped_first_position"] == keep_all.counts["dropped_outliers"] == 0


def test_store_cache_round_trips(tmp_path):
    cfg = StoreConfig(buffer_tokens=64, cache=True, cache_tokens=200, cache_dir=str(tmp_path))
    store, calls = _labelled_store(cfg)
    it = store.batches(25)
    first_pass = torch.cat([next(it) for _ in range(8)])  # 200 vectors = the whole cache
    assert len(set(_keys(first_pass))) == 200
    path = store.cache_path()
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert not [p for p in path.parent.iterdir() if "tmp" in p.name]
    harvested = calls["n"]
    reread, calls2 = _labelled_store(cfg)
    it2 = reread.batches(25)
    assert torch.equal(torch.cat([next(it2) for _ in range(8)]), first_pass)
    assert calls2["n"] == 0 and harvested > 0  # read from disk, nothing harvested again
    assert reread.describe()["filter_counts"]["dropped_first_position"] > 0
    full = reread.batches(25)
    ref = [next(full) for _ in range(12)]
    late = reread.batches(25, start_batch=9)
    assert torch.equal(next(late), ref[9]) and torch.equal(next(late), ref[10])


# ----- GPT-2 -------------------------------------------------------------------------------------
def test_gpt2_fails_fast_and_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(SourceUnavailable) as err:
        GPT2Source()
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    for word in ("gpt2", "HF_HUB_OFFLINE", "openwebtext", "'tiny'", "'synthetic'"):
        assert word in msg
    with pytest.raises(SourceUnavailable):
        activation_source("gpt2")


def test_gpt2_windows_start_with_bos_and_hold_out_documents():
    class FakeTokenizer:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(ch) for ch in t] for t in texts]}

    src = object.__new__(GPT2Source)  # the windowing logic, without loading GPT-2
    src.context_len, src.harvest_contexts, src.bos = 8, 3, 0
    src.tokenizer, src.held_out_fraction = FakeTokenizer(), 0.3
    docs = [f"document number {i} " * 3 for i in range(40)]
    src._documents = lambda pass_idx: iter(docs)
    train = torch.cat(list(src._windows(0, held_out=False)))
    held = torch.cat(list(src._windows(0, held_out=True)))
    for w in (train, held):
        assert w.shape[1] == 8 and bool((w[:, 0] == 0).all())
    text = lambda w: "".join(chr(int(c)) for c in w[:, 1:].flatten() if c)  # noqa: E731
    held_docs = {i for i in range(40) if f"number {i} " in text(held)}
    train_docs = {i for i in range(40) if f"number {i} " in text(train)}
    assert held_docs and train_docs and not held_docs & train_docs
