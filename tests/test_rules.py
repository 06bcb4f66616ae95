"""Allocation rules through the registry: exact hand-built cases, the fast selections against
the naive oracles (``tests/oracles.py``) at small and large sizes, properties, inference
rules, and a rule registered from this file."""

from __future__ import annotations

import contextlib
import math

import adaptive_sae as asae
import oracles
import pytest
import torch
from adaptive_sae import selection_kernels, sparse_ops
from adaptive_sae.config import ConfigError
from adaptive_sae.rules import (
    AllocationRule,
    codes_at,
    ema_thresholds,
    feature_choice,
    get_rule,
    mutual_choice,
    register_rule,
    rule_names,
    select_feature_choice,
    select_mutual_choice,
    select_topk,
    unregister_rule,
)
from adaptive_sae.stats import FeatureStats
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import as_set

BUILTIN = [
    "topk",
    "mutual_choice",
    "batch_topk",
    "feature_choice",
    "feature_choice_zipf",
    "relu_l1",
]


def sae_for(rule: str, F: int, k: float = 2.0, d: int = 2) -> asae.SparseAutoencoder:
    return asae.SparseAutoencoder(asae.SAEConfig(d_in=d, n_features=F, rule=rule, k=k))


def select(rule: str, sae, P, ws=None):
    """The library's training selection of ``rule``, from the registry."""
    return get_rule(rule).select(sae, P, ws)


def assert_ascending_unique(idx):
    assert idx.dtype == torch.int64
    assert idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())


# ----- exact hand-built cases ------------------------------------------------------------------------

P = torch.tensor(
    [
        [5.0, 4.0, -1.0, 0.5],
        [0.1, 0.2, 0.3, 9.0],
        [-2.0, -3.0, 1.0, -4.0],
    ]
)

# k = 2 per token on average over B = 3 tokens: K = 6 matches. Flat index = 4·row + column.
HAND = {
    # every row its two largest (row 2's second pick, -2.0, is selected but its code is 0)
    "topk": {0, 1, 6, 7, 8, 10},
    # the six largest of the batch, unevenly over rows: 3, 2 and 1
    "mutual_choice": {0, 1, 3, 6, 7, 10},
    "batch_topk": {0, 1, 3, 6, 7, 10},
    # uniform capacities (2, 2, 1, 1)
    "feature_choice": {0, 4, 1, 5, 10, 7},
    # Zipf capacities (3, 1, 1, 1): column 0 takes every token, -2.0 included (code 0)
    "feature_choice_zipf": {0, 4, 8, 1, 10, 7},
    # every positive entry
    "relu_l1": {0, 1, 3, 4, 5, 6, 7, 10},
}


@pytest.mark.parametrize("rule", BUILTIN)
def test_hand_built_selection(rule):
    sae = sae_for(rule, F=4)
    idx = select(rule, sae, P)
    assert_ascending_unique(idx)
    assert as_set(idx) == HAND[rule]
    assert as_set(oracles.select(sae, P)) == HAND[rule]
    codes = sae.codes_from_pre_acts(P, mode="train")
    expected = torch.zeros(12)
    for i in HAND[rule]:
        expected[i] = max(P.view(-1)[i].item(), 0.0)
    assert torch.equal(codes, expected.view(3, 4))


def test_hand_built_counts():
    mc = sae_for("mutual_choice", F=4).codes_from_pre_acts(P)
    assert (mc > 0).sum(1).tolist() == [3, 2, 1]  # uneven across tokens, 6 in all
    fc = select("feature_choice", sae_for("feature_choice", F=4), P)
    assert torch.bincount(fc % 4, minlength=4).tolist() == [2, 2, 1, 1]
    caps = torch.tensor([1, 0, 2, 3])  # uneven, one feature with none
    idx = select_feature_choice(P, caps)
    assert as_set(idx) == {0, 6, 10, 7, 3, 11}
    assert torch.bincount(idx % 4, minlength=4).tolist() == caps.tolist()


@pytest.mark.parametrize("rule", BUILTIN)
def test_exact_budgets_on_random_batches(rule):
    g = torch.Generator().manual_seed(0)
    B, F, k = 96, 40, 3.0
    P = torch.randn(B, F, generator=g)
    sae = sae_for(rule, F, k)
    idx = select(rule, sae, P)
    assert_ascending_unique(idx)
    per_row = torch.bincount(idx // F, minlength=B)
    per_col = torch.bincount(idx % F, minlength=F)
    if rule == "topk":
        assert bool((per_row == 3).all())
    elif rule in ("mutual_choice", "batch_topk"):
        assert idx.numel() == int(k * B) and per_row.float().std() > 0
    elif rule.startswith("feature_choice"):
        assert torch.equal(per_col, get_rule(rule).capacities(sae, B))
        assert (
            idx.numel() == int(k * B) and per_row.float().std() > 0 and bool((per_col >= 1).all())
        )
    else:
        assert idx.numel() == int((P > 0).sum())


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="k=5"):
        select_topk(P, 5)
    with pytest.raises(ConfigError, match="budget"):
        select_mutual_choice(P, 13)
    with pytest.raises(ConfigError, match="shape"):
        select_feature_choice(P, torch.tensor([1, 1]))
    with pytest.raises(ConfigError, match=r"\[0, B=3\]"):
        select_feature_choice(P, torch.tensor([4, 0, 0, 0]))
    with pytest.raises(ConfigError, match="integer number of matches"):
        asae.SAEConfig(d_in=4, n_features=16, rule="topk", k=2.5)


def test_unknown_rule_fails_at_config_time_listing_the_known_rules():
    with pytest.raises(ConfigError, match="rule='nope' is not known") as err:
        asae.SAEConfig(d_in=4, n_features=16, rule="nope")
    for name in rule_names():
        assert repr(name) in str(err.value)
    assert "register_rule" in str(err.value)
    with pytest.raises(ConfigError, match="not known"):
        get_rule("nope")


# ----- the fast selections against the oracles ----------------------------------------------------


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("B,F,k", [(16, 32, 1), (50, 37, 5), (8, 8, 8), (1024, 512, 16)])
def test_topk_matches_oracle(B, F, k, kernels, monkeypatch):
    """Through the compiled kernel and through torch.topk (``selection_kernels``)."""
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(B))
    idx = select("topk", sae_for("topk", F, k), P)
    assert idx.numel() == B * k
    assert_ascending_unique(idx)
    assert as_set(idx) == as_set(oracles.topk_indices(P, k))


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
@pytest.mark.parametrize("B,F,k", [(32, 64, 3.0), (512, 1024, 8.0), (600, 1000, 2.5)])
@pytest.mark.parametrize("block,kernels", [(1 << 22, False), (5000, False), (1 << 22, True)])
def test_mutual_choice_matches_oracle(B, F, k, layout, block, kernels, monkeypatch):
    """(512, 1024) and (600, 1000) have B·F > 4·2^16 and K·8 < B·F: the sampled-threshold path,
    through torch's mask (in one block or many) or through the compiled kernel; (32, 64) one
    topk, whose threshold (a little below the K-th largest) the kernel takes where it runs."""
    monkeypatch.setattr(sparse_ops, "_MASK_BLOCK", block)  # one block, or many
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(B + F))
    if layout == "feature_major":
        P = P.t().contiguous().t()
    if kernels:
        calls = spy(monkeypatch, selection_kernels, "top_k_at_least")
    else:
        calls = spy(monkeypatch, mutual_choice, "entries_at_least")
    idx = select("mutual_choice", sae_for("mutual_choice", F, k), P)
    assert bool(calls) == (kernels or B * F > 4 * mutual_choice._MC_SAMPLE)
    K = int(k * B)
    assert idx.numel() == K
    assert_ascending_unique(idx)
    assert as_set(idx) == as_set(oracles.global_topk_indices(P.contiguous(), K))


@pytest.mark.parametrize("kernels", [True, False])
def test_mutual_choice_when_the_sample_misleads(kernels, monkeypatch):
    """The sampled entries are all tied at the top, so the sample's threshold leaves too few
    candidates: the threshold must be lowered (finally a full top-K) and stay exact."""
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    monkeypatch.setattr(mutual_choice, "_MC_SAMPLE", 1 << 10)
    B, F = 512, 1024
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(0))
    stride = mutual_choice._coprime_stride(B * F, 1 << 10, F, B)
    P.view(-1)[::stride] = 10.0
    K = 20000  # more than the sample holds
    idx = select_mutual_choice(P, K)
    assert idx.numel() == K
    torch.testing.assert_close(
        P.view(-1)[idx].sort().values, P.view(-1)[oracles.global_topk_indices(P, K)].sort().values
    )


def test_mutual_choice_reuses_the_workspace(monkeypatch):
    """torch's candidate path keeps its mask buffer in the workspace."""
    monkeypatch.setattr(selection_kernels, "use_kernels", False)
    ws = sparse_ops.Workspace()
    P = torch.randn(300, 1000, generator=torch.Generator().manual_seed(1))
    a = select_mutual_choice(P, 2400, ws)
    buf = ws._bufs["ge_mask"]
    b = select_mutual_choice(P, 2400, ws)
    assert ws._bufs["ge_mask"] is buf and torch.equal(a, b)
    assert as_set(a) == as_set(oracles.global_topk_indices(P, 2400))


def zipf_like(F, K, B):
    """Zipf-shaped capacities with a full column and an empty one."""
    w = 1.0 / torch.arange(1, F + 1, dtype=torch.float64)
    caps = torch.clamp((w / w.sum() * K).floor().long(), 0, B)
    caps[F // 2] = 0
    caps[0] = B
    return caps


def capacities(kind, F, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "uniform": lambda: torch.full((F,), 9 if B >= 9 else 1, dtype=torch.long),
        "zipf": lambda: zipf_like(F, 8 * B, B),
        "zipf_shuffled": lambda: zipf_like(F, 8 * B, B)[torch.randperm(F, generator=g)],
        "tiny": lambda: torch.randint(0, 3, (F,), generator=g),
    }[kind]()


@pytest.mark.parametrize("layout", ["token_major", "feature_major"])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "zipf_shuffled", "tiny"])
@pytest.mark.parametrize("kernels", [True, False])
def test_feature_choice_bucket_path_matches_oracle(kind, layout, kernels, monkeypatch):
    """Small P or feature-major P: one topk per bucket of similar capacities (``_fc_topk``);
    a small token-major P on the CPU: the compiled kernel, where it is on."""
    monkeypatch.setattr(selection_kernels, "use_kernels", kernels)
    B, F = 64, 96
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(1))
    if layout == "feature_major":
        P = P.t().contiguous().t()
    caps = capacities(kind, F, B)
    idx = select_feature_choice(P, caps, sparse_ops.Workspace())
    assert idx.numel() == int(caps.sum())
    assert_ascending_unique(idx)
    assert as_set(idx) == as_set(oracles.column_topk_indices(P, caps))


@pytest.mark.parametrize("kind", ["uniform", "zipf", "zipf_shuffled", "tiny"])
@pytest.mark.parametrize("misleading", [False, True])
def test_feature_choice_threshold_path_forced(kind, misleading, monkeypatch):
    """The candidate path (``_fc_threshold``) forced on a small P: exact, also when the sampled
    tokens mislead the thresholds (those columns fall back to an exact topk)."""
    B, F = 300, 64
    monkeypatch.setattr(selection_kernels, "use_kernels", False)
    monkeypatch.setattr(feature_choice, "_FC_SMALL", 0)
    monkeypatch.setattr(feature_choice, "_FC_SAMPLE_ROWS", (60, 60))
    monkeypatch.setattr(sparse_ops, "_MASK_BLOCK", 1000)  # several blocks of the threshold pass
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(2))
    if misleading:
        P[:60] += 3.0  # the sample sees only unusually large values
    caps = capacities(kind, F, B, seed=3)
    calls = spy(monkeypatch, feature_choice, "_fc_threshold")
    idx = select_feature_choice(P, caps, sparse_ops.Workspace())
    assert calls
    assert idx.numel() == int(caps.sum())
    assert_ascending_unique(idx)
    assert as_set(idx) == as_set(oracles.column_topk_indices(P, caps))


def spy(monkeypatch, module, name):
    """Count the calls of module.name (to prove a test reaches the code path it is about)."""
    calls = []
    fn = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(1)
        return fn(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("rule", ["feature_choice", "feature_choice_zipf"])
def test_feature_choice_threshold_path_at_scale(rule, monkeypatch):
    """B·F = 1024·1280 > 2^20, token-major on the CPU: the real ``_fc_threshold`` path, through
    the registry with the rule's own capacities (the compiled kernel turned off)."""
    monkeypatch.setattr(selection_kernels, "use_kernels", False)
    B, F = 1024, 1280
    assert B * F > feature_choice._FC_SMALL
    sae = sae_for(rule, F, k=8.0)
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(4))
    caps = get_rule(rule).capacities(sae, B)
    assert int(caps.sum()) == 8 * B
    calls = spy(monkeypatch, feature_choice, "_fc_threshold")
    idx = select(rule, sae, P, sparse_ops.Workspace())
    assert calls, "the threshold path was not taken"
    assert idx.numel() == 8 * B
    assert_ascending_unique(idx)
    assert as_set(idx) == as_set(oracles.column_topk_indices(P, caps))


def test_capacity_buckets_are_log_many_runs():
    caps = zipf_like(4096, 32 * 2048, 2048)
    caps_sorted = caps.sort(descending=True).values
    runs = feature_choice._capacity_buckets(caps_sorted)
    assert len(runs) <= math.log2(2048) + 2
    assert runs[0][0] == 0 and runs[-1][1] == 4096
    for s, e, hi, lo in runs:
        assert hi == int(caps_sorted[s]) and lo == int(caps_sorted[e - 1])


# ----- properties ---------------------------------------------------------------------------------------

matrices = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))


@contextlib.contextmanager
def kernels_set(on: bool):
    """The compiled selection kernels on or off (torch's paths) inside the block."""
    before, selection_kernels.use_kernels = selection_kernels.use_kernels, on
    try:
        yield
    finally:
        selection_kernels.use_kernels = before


def _rand(B: int, F: int, seed: int) -> torch.Tensor:
    return torch.randn(B, F, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60)
@given(matrices, st.data(), st.booleans())
def test_topk_property(shape, data, kernels):
    B, F, seed = shape
    k = data.draw(st.integers(1, F))
    p = _rand(B, F, seed)
    with kernels_set(kernels):
        idx = select("topk", sae_for("topk", F, k), p)
    assert as_set(idx) == as_set(oracles.topk_indices(p, k))
    z = codes_at(p, idx)
    assert torch.equal((z > 0).sum(1), torch.clamp((p > 0).sum(1), max=k))


@settings(max_examples=60)
@given(matrices, st.data())
def test_mutual_choice_property(shape, data):
    B, F, seed = shape
    k = data.draw(st.floats(1.0 / B, F))
    p = _rand(B, F, seed)
    K = max(1, int(k * B))
    idx = select("batch_topk", sae_for("batch_topk", F, k), p)
    assert idx.numel() == K
    assert as_set(idx) == as_set(oracles.global_topk_indices(p, K))
    # spends exactly the positive part of the budget
    assert int((codes_at(p, idx) > 0).sum()) == min(K, int((p > 0).sum()))


@settings(max_examples=60)
@given(matrices, st.data(), st.booleans())
def test_feature_choice_property(shape, data, kernels):
    B, F, seed = shape
    caps = torch.tensor(data.draw(st.lists(st.integers(0, B), min_size=F, max_size=F)))
    p = _rand(B, F, seed)
    with kernels_set(kernels):
        idx = select_feature_choice(p, caps)
    assert as_set(idx) == as_set(oracles.column_topk_indices(p, caps))
    assert torch.equal(torch.bincount(idx % F, minlength=F), caps)


@settings(max_examples=30)
@given(st.integers(1, 40), st.integers(2, 24), st.floats(1.0, 4.0), st.integers(0, 2**31 - 1))
def test_feature_choice_rule_property(B, F, k, seed):
    """Through the registry: the rule's capacities sum to the budget, each feature gets >= 1,
    and the selection is the oracle's."""
    k = min(k, F)
    if int(k * B) < F:  # Feature Choice needs K >= F (a training config check)
        return
    for rule in ("feature_choice", "feature_choice_zipf"):
        sae = sae_for(rule, F, k)
        p = _rand(B, F, seed)
        caps = get_rule(rule).capacities(sae, B)
        assert int(caps.sum()) == int(k * B) and int(caps.min()) >= 1 and int(caps.max()) <= B
        assert as_set(select(rule, sae, p)) == as_set(oracles.column_topk_indices(p, caps))


# ----- state observed during training, and the inference rules -----------------------------------------


def test_observe_sets_and_averages_thresholds():
    """Mutual Choice: θ (every feature) = smallest selected affinity, then an EMA; Feature
    Choice: θ_j = column j's smallest selected affinity."""
    tcfg = asae.TrainConfig(batch_size=3, total_tokens=3)
    stats = FeatureStats(4, 10, 10)
    mc = sae_for("mutual_choice", F=4)
    rule = get_rule("mutual_choice")
    assert not rule.ready(mc)
    rule.observe(mc, P, select("mutual_choice", mc, P), stats, 0, tcfg)
    assert torch.equal(mc.thresholds, P[1, 2].expand(4)) and rule.ready(mc)
    P2 = P + 1.0  # smallest selected: 1.3
    rule.observe(mc, P2, select("mutual_choice", mc, P2), stats, 1, tcfg)
    m = mc.cfg.threshold_momentum
    expected = m * P[1, 2] + (1 - m) * P2[1, 2]
    torch.testing.assert_close(mc.thresholds, expected.expand(4), rtol=0, atol=1e-7)

    fc = sae_for("feature_choice", F=4)
    get_rule("feature_choice").observe(fc, P, select("feature_choice", fc, P), stats, 0, tcfg)
    assert torch.equal(fc.thresholds, torch.tensor([0.1, 0.2, 1.0, 9.0]))


def test_ema_thresholds_only_where_seen():
    sae = sae_for("feature_choice", F=4)
    sae.thresholds.copy_(torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    seen = torch.tensor([True, True, False, True])
    ema_thresholds(sae, torch.tensor([2.0, 5.0, 9.0, 3.0]), seen)
    m = sae.cfg.threshold_momentum
    expected = torch.tensor([m + (1 - m) * 2.0, 5.0, 2.0, 3.0])
    torch.testing.assert_close(sae.thresholds, expected)


def test_inference_rules_by_hand():
    th = torch.tensor([1.0, 4.5, 0.0, 0.4])
    for rule in ("mutual_choice", "feature_choice"):
        sae = sae_for(rule, F=4)
        sae.thresholds.copy_(th)
        z = get_rule(rule).infer(sae, P)
        expected = [[5.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.3, 9.0], [0.0, 0.0, 1.0, 0.0]]
        assert torch.equal(z, torch.tensor(expected))
    assert torch.equal(get_rule("relu_l1").infer(sae_for("relu_l1", 4), P), P.relu())
    topk_codes = codes_at(P, torch.tensor(sorted(HAND["topk"])))
    assert torch.equal(get_rule("topk").infer(sae_for("topk", 4), P), topk_codes)


@pytest.mark.parametrize("rule", BUILTIN)
def test_inference_is_batch_independent(rule):
    """Encoding a token alone gives its codes in a batch (mode='inference')."""
    F, d = 48, 8
    sae = sae_for(rule, F, k=4.0, d=d).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, d, generator=g, dtype=torch.float64)
    if get_rule(rule).uses_thresholds:
        with torch.no_grad():
            sae.thresholds.copy_(torch.rand(F, generator=g, dtype=torch.float64))
    batch = sae.encode(x, mode="inference")
    alone = torch.cat([sae.encode(x[i : i + 1], mode="inference") for i in range(64)])
    assert bool((batch > 0).any())
    assert torch.equal(batch > 0, alone > 0)
    torch.testing.assert_close(alone, batch, rtol=1e-12, atol=1e-12)
    if get_rule(rule).batch_level:  # the training rule is not: it spends the batch's budget
        train_alone = torch.cat([sae.encode(x[i : i + 1], mode="train") for i in range(64)])
        assert not torch.equal(train_alone > 0, sae.encode(x, mode="train") > 0)


def test_batch_topk_is_mutual_choice():
    data = _train_data()
    runs = {}
    for rule in ("mutual_choice", "batch_topk"):
        cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
        runs[rule] = asae.train(cfg, _tcfg(), data)
    a, b = (runs[r].sae.state_dict() for r in runs)
    assert all(torch.equal(a[n].nan_to_num(), b[n].nan_to_num()) for n in a)
    assert runs["batch_topk"].sae.cfg.rule == "batch_topk"


# ----- a rule registered from this file --------------------------------------------------------------


class TopKHalf(AllocationRule):
    """Per token: the top ⌈k/2⌉ affinities (plain torch.topk)."""

    name = "topk_half"
    label = "TopK (half budget)"

    def select(self, sae, P, ws=None):
        k = max(1, math.ceil(sae.cfg.k / 2))
        cols = P.topk(k, dim=1).indices.sort(dim=1).values
        return (cols + torch.arange(P.shape[0]).unsqueeze(1) * P.shape[1]).reshape(-1)


class BatchHalf(AllocationRule):
    """Batch level: the top K/2 entries of the batch; inference by a global threshold kept
    as a running mean of the smallest selected affinity (the protocol's default ``infer``)."""

    name = "batch_half"
    batch_level = True
    uses_thresholds = True

    def select(self, sae, P, ws=None):
        K = max(1, sae.cfg.budget(P.shape[0]) // 2)
        return P.reshape(-1).topk(K).indices.sort().values

    def observe(self, sae, P, idx, stats, step, tcfg, comm=None):
        ema_thresholds(sae, sparse_ops.values_at(P, idx).min().expand(sae.cfg.n_features))


@pytest.fixture
def custom_rules():
    rules = [register_rule(TopKHalf()), register_rule(BatchHalf())]
    yield rules
    for r in rules:
        unregister_rule(r.name)


def _train_data(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(64, d, generator=g)
    acts = (torch.rand(n, 64, generator=g) < 0.06) * torch.rand(n, 64, generator=g)
    return acts @ feats + 0.01 * torch.randn(n, d, generator=g)


def _tcfg(**kw):
    params = dict(batch_size=128, total_tokens=128 * 16, lr=3e-3, log_every=4)
    return asae.TrainConfig(**{**params, **kw})


@pytest.mark.parametrize("name", ["topk_half", "batch_half"])
def test_registered_rule_trains_and_evaluates(name, custom_rules, tmp_path):
    assert name in rule_names()
    data = _train_data()
    cfg = asae.SAEConfig(d_in=16, n_features=64, rule=name, k=4)
    run = asae.train(cfg, _tcfg(aux_loss="aux_zipf"), data)
    h = run.history
    assert h["step"].iloc[-1] == 16 and h["nmse"].iloc[-1] < h["nmse"].iloc[0]
    assert h["l0_mean"].iloc[-1] <= 2.0 + 1e-9  # half the budget
    tr = asae.evaluate(run.sae, data, mode="train")
    inf = asae.evaluate(run.sae, data, mode="inference")
    assert tr.mode == "train" and inf.mode == "inference"
    assert tr.l0_mean <= 2.0 + 1e-9 and tr.nmse < 1.0 and 0 <= inf.nmse < 1.5
    if name == "topk_half":  # per token: the two modes are one rule
        assert inf.nmse == pytest.approx(tr.nmse) and inf.l0_mean == tr.l0_mean
    else:
        assert torch.isfinite(run.sae.thresholds).all()
        assert abs(inf.l0_mean - tr.l0_mean) < 1.0
    run.sae.save(tmp_path / "sae")
    loaded = asae.SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.rule == name
    assert torch.equal(
        loaded.encode(data[:128], mode="inference"), run.sae.encode(data[:128], "inference")
    )


def test_registry_errors(custom_rules):
    with pytest.raises(ValueError, match="already registered"):
        register_rule(TopKHalf())
    assert register_rule(custom_rules[0]) is custom_rules[0]  # the same instance again is fine

    class Nameless(AllocationRule):
        pass

    with pytest.raises(ValueError, match="no name"):
        register_rule(Nameless())
    unregister_rule("topk_half")
    with pytest.raises(ConfigError, match="topk_half"):
        asae.SAEConfig(d_in=4, n_features=16, rule="topk_half")
    register_rule(TopKHalf())  # the fixture unregisters it again


def test_lib_does_not_import_the_oracles():
    from pathlib import Path

    lib = Path(asae.__file__).parent
    for path in lib.rglob("*.py"):
        text = path.read_text()
        assert "import oracles" not in text and "from oracles" not in text, path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"])
def test_cuda_selection_matches_oracle(rule):
    """The GPU paths (one-block threshold pass, per-bucket topk on the transposed P)."""
    B, F = 1024, 1280
    P = torch.randn(B, F, generator=torch.Generator().manual_seed(6))
    sae = sae_for(rule, F, k=8.0)
    ref = as_set(oracles.select(sae, P))
    idx = select(rule, sae.cuda(), P.cuda(), sparse_ops.Workspace())
    assert idx.is_cuda and as_set(idx.cpu()) == ref


def test_registered_rule_appears_in_comparison_table_and_plot(custom_rules, tmp_path):
    """A rule registered here, without touching the library, trains through the experiment
    driver, is evaluated in both modes, and gets its own rows and plot style."""
    from adaptive_sae import experiments as ex
    from adaptive_sae import plots

    x = _train_data()
    held = ex.EvalSet(_train_data(512, seed=1))
    grid = ex.train_grid(
        x,
        variants=["topk", "topk_half", "batch_half"],
        seeds=[0],
        k_values=[4],
        widths=[32],
        batch_size=256,
        total_tokens=256 * 4,
        eval_set=held,
        progress=False,
    )
    table = grid.table.set_index("variant")
    assert list(table.index) == ["topk", "topk_half", "batch_half"]
    assert table.loc["topk_half", "l0_mean"] <= 2.0 + 1e-9  # half of k = 4 per token
    assert table.loc["batch_half", "l0_mean"] <= 2.0 + 1e-9  # half of the batch budget
    assert {"nmse", "nmse_inference"} <= set(table.columns)
    fig = plots.pareto(grid.table.assign(seed=0))
    fig.savefig(tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert plots.rule_label("topk_half") == "TopK (half budget)"
    assert plots.rule_style("batch_half") != plots.rule_style("topk")
