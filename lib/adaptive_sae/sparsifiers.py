r"""Allocation rules: which (token, feature) pairs of a batch are matched (DESIGN §3).

All rules share one signature family. ``select_*`` return the flat indices ``b * F + f`` of
the selected entries of the affinity matrix P (B, F); the public functions return codes
Z = M ⊙ ReLU(P), i.e. ReLU(P) at the selected entries and 0 elsewhere. A selected entry with
P ≤ 0 is not a match (its code is 0) and is not counted in L0.

    topk            each row keeps its top-k entries                        (Gao et al. 2024)
    mutual_choice   the top K = int(k·B) entries of the whole matrix        (= BatchTopK)
    feature_choice  column j keeps its top-m_j entries, Σ_j m_j = K         (expert choice)

Ties are broken by ``torch.topk``; the counts are exact whatever the ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ConfigError


def _check_pre_acts(pre_acts: Tensor) -> None:
    if pre_acts.ndim != 2:
        raise ValueError(
            f"pre_acts must be a (B, F) matrix, got shape {tuple(pre_acts.shape)}; "
            f"flatten leading dimensions with pre_acts.reshape(-1, F)."
        )


def select_topk(pre_acts: Tensor, k: int) -> Tensor:
    """Flat indices of each row's top-k entries: (B·k,) int64, row-major."""
    _check_pre_acts(pre_acts)
    B, F = pre_acts.shape
    k = int(k)
    if not 0 < k <= F:
        raise ConfigError(f"topk needs 0 < k <= F, got k={k}, F={F}.")
    cols = pre_acts.topk(k, dim=1, sorted=False).indices  # (B, k)
    rows = torch.arange(B, device=pre_acts.device).unsqueeze(1) * F
    return (rows + cols).reshape(-1)


def select_mutual_choice(pre_acts: Tensor, budget: int) -> Tensor:
    """Flat indices of the ``budget`` largest entries of the whole (B, F) matrix."""
    _check_pre_acts(pre_acts)
    n = pre_acts.numel()
    budget = int(budget)
    if not 0 < budget <= n:
        raise ConfigError(f"mutual_choice needs 0 < budget <= B*F = {n}, got {budget}.")
    return pre_acts.reshape(-1).topk(budget, sorted=False).indices


def select_feature_choice(pre_acts: Tensor, capacities: Tensor) -> Tensor:
    """Flat indices where column j keeps its top-capacities[j] entries (uneven, one pass)."""
    _check_pre_acts(pre_acts)
    B, F = pre_acts.shape
    capacities = check_capacities(capacities, F, B)
    m_max = int(capacities.max())
    if m_max == 0:
        return torch.empty(0, dtype=torch.long, device=pre_acts.device)
    # Top m_max tokens of every column (sorted), then keep rank r < m_j in column j.
    rows = pre_acts.topk(m_max, dim=0, sorted=True).indices  # (m_max, F)
    keep = torch.arange(m_max, device=pre_acts.device).unsqueeze(1) < capacities.to(
        pre_acts.device
    ).unsqueeze(0)  # (m_max, F)
    cols = torch.arange(F, device=pre_acts.device).expand(m_max, F)
    return (rows * F + cols)[keep]


def check_capacities(capacities: Tensor, n_features: int, batch_size: int) -> Tensor:
    """Validate Feature Choice capacities: int64 (F,), each in [0, B]."""
    if not isinstance(capacities, Tensor):
        capacities = torch.as_tensor(capacities)
    if capacities.shape != (n_features,):
        raise ConfigError(
            f"capacities must have shape ({n_features},) (one per feature), "
            f"got {tuple(capacities.shape)}."
        )
    if capacities.dtype.is_floating_point:
        raise ConfigError("capacities must be integers (int64); use zipf.zipf_capacities.")
    if capacities.numel() and (capacities.min() < 0 or capacities.max() > batch_size):
        raise ConfigError(
            f"capacities must lie in [0, B={batch_size}], got range "
            f"[{int(capacities.min())}, {int(capacities.max())}]; a feature cannot choose more "
            f"tokens than the batch holds."
        )
    return capacities.long()


def mask_from_indices(flat_idx: Tensor, shape: tuple[int, int]) -> Tensor:
    """Boolean (B, F) mask with True at the flat indices."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=flat_idx.device)
    mask[flat_idx] = True
    return mask.reshape(shape)


def codes_from_indices(pre_acts: Tensor, flat_idx: Tensor) -> Tensor:
    """Z = M ⊙ ReLU(P) for the selection (differentiable in pre_acts)."""
    return pre_acts.relu() * mask_from_indices(flat_idx, tuple(pre_acts.shape))


def topk(pre_acts: Tensor, k: int) -> Tensor:
    """TopK codes (B, F): ReLU at each row's top-k affinities."""
    return codes_from_indices(pre_acts, select_topk(pre_acts, k))


def mutual_choice(pre_acts: Tensor, k: float) -> Tensor:
    """Mutual Choice (= BatchTopK) codes: the top int(k·B) entries of the whole matrix."""
    _check_pre_acts(pre_acts)
    return codes_from_indices(pre_acts, select_mutual_choice(pre_acts, int(k * pre_acts.shape[0])))


def feature_choice(pre_acts: Tensor, capacities: Tensor) -> Tensor:
    """Feature Choice codes: column j keeps its top-capacities[j] entries."""
    return codes_from_indices(pre_acts, select_feature_choice(pre_acts, capacities))


def relu(pre_acts: Tensor) -> Tensor:
    """The ReLU baseline (sparsity from an L1 penalty, not from selection)."""
    return pre_acts.relu()


def threshold(pre_acts: Tensor, theta: Tensor) -> Tensor:
    """Batch-independent inference rule (DESIGN §4): ReLU(P)·1[P > θ] (θ scalar or (F,))."""
    return pre_acts.relu() * (pre_acts > theta)


__all__ = [
    "select_topk",
    "select_mutual_choice",
    "select_feature_choice",
    "check_capacities",
    "mask_from_indices",
    "codes_from_indices",
    "topk",
    "mutual_choice",
    "feature_choice",
    "relu",
    "threshold",
]
