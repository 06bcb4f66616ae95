"""The selection kernels against naive oracles: a stable descending sort of each row or column."""

from __future__ import annotations

import pytest
import torch
from adaptive_sae import selection_kernels
from adaptive_sae.selection_kernels import column_topk_flat, row_topk_columns, top_k_at_least
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import column_topk_indices

pytest.importorskip("numba")


def oracle(P: torch.Tensor, k: int) -> torch.Tensor:
    """Larger value first, lower column among equals; the k columns ascending."""
    order = torch.sort(P, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


WIDE = (st.integers(1, 12), st.integers(1, 80))  # rows, columns
TALL = (st.integers(129, 400), st.integers(1, 6))  # B > 128: several tokens per column group
LONG = (st.integers(1, 6), st.integers(65, 1500))  # F > 64: the row kernel's lanes


@st.composite
def matrices(draw, shape=WIDE, max_k=None):
    B = draw(shape[0])
    F = draw(shape[1])
    k = draw(st.integers(1, min(F, max_k or F)))
    levels = draw(st.sampled_from([3, 1000]))  # 3: ties everywhere
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(-levels, levels + 1, (B, F), generator=g).float() / levels
    if draw(st.booleans()):
        P[torch.rand(B, F, generator=g) < 0.2] = float("-inf")
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return P.to(dtype), k


@settings(max_examples=300, deadline=None)
@given(matrices())
@example((torch.zeros(3, 17), 5))  # all equal: the lowest columns
@example((torch.full((2, 9), float("-inf")), 9))
@example((torch.arange(64.0).flip(0).repeat(2, 1), 8))  # the answer is the first group
def test_kernel_equals_stable_sort_oracle(case):
    P, k = case
    assert torch.equal(row_topk_columns(P, k), oracle(P, k))


@settings(max_examples=300, deadline=None)
@given(matrices(LONG, max_k=100))
@example((torch.zeros(2, 700), 9))  # every lane reaches the bound: ranked by insertion
@example((torch.arange(1024.0).repeat(3, 1), 20))  # the answer is the last lanes
@example((torch.zeros(2, 1000), 40))  # k > 32 winners: sorted, not placed by rank
def test_row_kernel_lanes_equal_stable_sort_oracle(case):
    """Rows wider than the lanes (F > 64, k < F/8): the bound, the candidates and their
    ranking (by counting, or by insertion beyond 64 lanes or candidates), and the winners put
    in column order (by rank, or sorted beyond 32), with ties and -inf."""
    P, k = case
    assert torch.equal(row_topk_columns(P, k), oracle(P, k))


def test_exact_small_case():
    P = torch.tensor([[0.1, 0.9, 0.5, 0.9, -1.0], [3.0, 2.0, 1.0, 0.0, 2.0]])
    assert row_topk_columns(P, 2).tolist() == [[1, 3], [0, 1]]
    assert row_topk_columns(P, 3).tolist() == [[1, 2, 3], [0, 1, 4]]


def test_sizes_of_the_experiments_match_torch_topk():
    g = torch.Generator().manual_seed(0)
    for B, d, F, k in [(1024, 64, 512, 8), (256, 64, 512, 4), (300, 128, 2048, 16)]:
        P = torch.randn(B, d, generator=g) @ torch.randn(d, F, generator=g)
        ref = P.topk(k, dim=1).indices.sort(dim=1).values
        assert torch.equal(row_topk_columns(P, k), ref)


def test_nan_rows_fall_back_to_torch_topk():
    P = torch.randn(6, 40)
    P[2, 7] = float("nan")
    P[4] = float("nan")
    ref = P.topk(5, dim=1).indices.sort(dim=1).values
    assert torch.equal(row_topk_columns(P, 5), ref)


def test_torch_path_when_kernels_are_off(monkeypatch):
    P = torch.randn(50, 96)
    fast = row_topk_columns(P, 6)
    monkeypatch.setattr(selection_kernels, "use_kernels", False)
    assert torch.equal(row_topk_columns(P, 6), fast)
    assert torch.equal(row_topk_columns(P.t().contiguous().t(), 6), fast)  # non-contiguous


@st.composite
def columns_case(draw):
    """Short wide matrices, and tall ones (B > 128: several tokens per group), ties included."""
    tall = draw(st.booleans())
    P, _ = draw(matrices(TALL if tall else WIDE))
    B, F = P.shape
    caps = torch.tensor(draw(st.lists(st.integers(0, B), min_size=F, max_size=F)))
    return P, caps


@settings(max_examples=300, deadline=None)
@given(columns_case())
@example((torch.zeros(300, 3), torch.tensor([5, 0, 300])))  # ties, empty and full columns
@example((torch.randn(1024, 12), torch.tensor([1, 2, 4, 8, 16, 31, 32, 33, 100, 500, 1000, 1023])))
@example(  # ties among the group maxima, every cap small enough for the two-stage bound
    (
        torch.randint(-2, 3, (512, 8), generator=torch.Generator().manual_seed(0)).float(),
        torch.tensor([1, 2, 3, 5, 8, 13, 21, 32]),
    )
)
def test_column_kernel_equals_stable_sort_oracle(case):
    P, caps = case
    got = column_topk_flat(P, caps)
    assert got is not None
    assert torch.equal(got, column_topk_indices(P, caps).sort().values)


def test_column_kernel_declines_nan_and_non_contiguous():
    P = torch.randn(64, 10)
    caps = torch.full((10,), 3)
    P[5, 2] = float("nan")
    assert column_topk_flat(P, caps) is None
    assert column_topk_flat(torch.randn(10, 64).t(), torch.full((10,), 3)[:10]) is None


def test_row_kernel_large_k_by_partition():
    g = torch.Generator().manual_seed(1)
    P = torch.randint(-4, 5, (40, 300), generator=g).double()  # ties; k >= F/8: partition
    for k in (38, 150, 299, 300):
        assert torch.equal(row_topk_columns(P, k), oracle(P, k))


@settings(max_examples=300, deadline=None)
@given(matrices(), st.data())
def test_top_at_least_equals_global_oracle_or_declines(case, data):
    """Mutual Choice's kernel: the global top K when K..cap entries reach t, else None."""
    P, _ = case
    x = P.reshape(-1)
    n = x.numel()
    K = data.draw(st.integers(1, n))
    t = float(x[data.draw(st.integers(0, n - 1))])
    cap = data.draw(st.integers(K, n))
    rank = data.draw(st.integers(0, n))
    count = int((x >= t).sum())
    got, hint = top_k_at_least(x, K, t, cap, hint_rank=rank)
    if K <= count <= cap:
        ref = torch.sort(x, descending=True, stable=True).indices[:K].sort().values
        assert torch.equal(got, ref)
    else:
        assert got is None
    # the next threshold: the rank-th largest entry where more than 2·rank − K reach t, else t
    if K <= count <= cap and K < rank and count > 2 * rank - K:
        assert hint == float(x.double().sort(descending=True).values[rank - 1])
        assert int((x >= hint).sum()) >= rank
    else:
        assert hint == t


def test_top_at_least_gathers_beyond_one_pass():
    """More candidates than one pass holds (2·K, at least 1024): gathered again, all of them."""
    x = torch.arange(5000.0).flip(0)
    got, hint = top_k_at_least(x, 10, 0.0, 5000, hint_rank=20)
    assert got.tolist() == list(range(10)) and hint == 4980.0


def test_top_at_least_declines_nan():
    x = torch.randn(1000)
    x[10] = float("nan")
    assert top_k_at_least(x, 5, -10.0, 1000)[0] is None


@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"])
@pytest.mark.parametrize("aux", ["aux_k", "aux_zipf"])
def test_training_is_bit_identical_with_and_without_kernels(rule, aux, monkeypatch):
    """Where the affinities have no ties at a selection's boundary (random data here) the
    selection kernels select the same entries as torch's paths, so a run's weights and history
    do not depend on them. (With ties, e.g. repeated tokens, the kernels take the lower index
    and torch.topk an unspecified one: equally exact selections, different runs.) The loss
    and update kernels, which sum in another order, are off in both runs
    (``tests/test_loss_kernel.py``, ``tests/test_update_kernel.py``), and both refit the Zipf
    law by the trust-region fit (the profile fit goes with the switch this test flips)."""
    import adaptive_sae as asae
    from adaptive_sae import zipf

    monkeypatch.setattr(asae.Trainer, "_closed_form_applies", lambda self: False)
    monkeypatch.setattr(asae.Trainer, "_kernel_plan", lambda self: None)
    trf = zipf.fit_zipf
    monkeypatch.setattr(zipf, "fit_zipf", lambda d, h=0.5, method="trf": trf(d, h))
    data = torch.randn(128 * 12, 16, generator=torch.Generator().manual_seed(0))
    runs = []
    for on in (True, False):
        monkeypatch.setattr(selection_kernels, "use_kernels", on)
        cfg = asae.SAEConfig(d_in=16, n_features=64, rule=rule, k=4)
        tcfg = asae.TrainConfig(
            batch_size=128, total_tokens=128 * 10, seed=0, aux_loss=aux, log_every=1,
            dead_window_tokens=128, zipf_refit_every=1, init_sample_tokens=128,
        )  # fmt: skip
        runs.append(asae.train(cfg, tcfg, data))
    a, b = runs[0].sae.state_dict(), runs[1].sae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].history.equals(runs[1].history)


def test_without_numba_every_selection_takes_the_torch_path(monkeypatch):
    """numba missing (an environment without it): no entry point raises, each selects exactly."""
    import sys

    from adaptive_sae import sparse_ops
    from adaptive_sae.rules.mutual_choice import select_mutual_choice

    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.setattr(selection_kernels, "_compiled", None)
    monkeypatch.setattr(selection_kernels, "use_kernels", True)
    P = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    ws = sparse_ops.Workspace()
    for _ in range(2):  # the second call takes the threshold (hint) path
        idx = select_mutual_choice(P, 4096, ws)
        assert torch.equal(idx, P.reshape(-1).topk(4096).indices.sort().values)
    assert not selection_kernels.applies(P)
    assert torch.equal(row_topk_columns(P, 3), P.topk(3, dim=1).indices.sort(dim=1).values)
    assert column_topk_flat(P, torch.full((1024,), 2)) is None
