r"""Data-parallel training that keeps every rule's meaning (DESIGN §12).

Under ``torchrun`` (or any initialised ``torch.distributed`` process group of W processes),
``TrainConfig.batch_size`` is the global batch B and each rank holds B/W of its tokens. The
rules keep their one-process meaning:

- TopK is per token: each rank selects alone.
- Mutual Choice takes the top K = k·B affinities of all ranks together. Each rank finds its local
  ⌈K/W⌉-th largest affinity t_r; L = min_r t_r (one all-reduce) bounds the global K-th largest
  from below (every rank has ⌈K/W⌉ entries ≥ t_r ≥ L, so ≥ K entries are ≥ L). Each rank sends
  only its entries ≥ L (about K/W of them), every rank ranks the union the same way and keeps
  its own members of the global top K.
- Feature Choice: column j keeps its top m_j over all ranks' tokens. Each rank sends, per column,
  its local top-min(m_j, B/W) values in a fixed layout (Σ_j of them), every rank ranks each
  column's union and keeps its own members.

Ties are broken by rank, then by position, identically on every rank, so the selection is exact
and the same on every rank as the one-process selection (which breaks ties arbitrarily).
Everything else that depends on the batch is reduced too: the normalisers of the losses
(variance over the global batch), the gradients (summed), feature statistics, inference
thresholds (global minimum of the selected affinities), Zipf demand and the L1 controller's L0.
So weights, statistics and thresholds stay identical on every rank, and rank 0 alone writes
checkpoints, which resume on any world size.

Communication per step (bytes, fp32): gradients 4·(2dF + F + d) (all-reduce), Mutual Choice
about 4·K/W sent per rank, Feature Choice 4·Σ_j min(m_j, B/W) per rank, statistics 8·F.
``Comm.bytes`` counts what a rank sent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class LocalComm:
    """One process: every reduction is the identity."""

    world = 1
    rank = 0
    bytes = 0

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def min_(self, t: Tensor) -> Tensor:
        return t

    def gather_fixed(self, t: Tensor) -> Tensor:
        """(W, *t.shape): every rank's tensor of the same shape."""
        return t.unsqueeze(0)

    def gather_varlen(self, t: Tensor) -> list[Tensor]:
        """Every rank's 1-D tensor (lengths may differ), in rank order."""
        return [t]

    def barrier(self) -> None:
        pass


class ProcessGroupComm(LocalComm):
    """Reductions over a ``torch.distributed`` process group; counts the bytes a rank sends."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes = 0

    def _count(self, t: Tensor) -> None:
        self.bytes += t.numel() * t.element_size()

    def sum_(self, t: Tensor) -> Tensor:
        self._count(t)
        self.dist.all_reduce(t, self.dist.ReduceOp.SUM, group=self.group)
        return t

    def min_(self, t: Tensor) -> Tensor:
        self._count(t)
        self.dist.all_reduce(t, self.dist.ReduceOp.MIN, group=self.group)
        return t

    def gather_fixed(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._count(t)
        self.dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def gather_varlen(self, t: Tensor) -> list[Tensor]:
        n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
        sizes = self.gather_fixed(n).view(-1).tolist()
        padded = t.new_zeros(max(sizes))
        padded[: t.numel()] = t
        return [row[:s] for row, s in zip(self.gather_fixed(padded), sizes)]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)


def current_comm():
    """ProcessGroupComm when an initialised default group has more than one process, else a
    LocalComm."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupComm()
    return LocalComm()


def _stable_desc(v: Tensor) -> Tensor:
    """Indices that sort v descending, ties kept in their order."""
    return torch.sort(v, descending=True, stable=True).indices


@torch.no_grad()
def select_top_global(P: Tensor, budget: int, comm, ws=None) -> Tensor:
    """Local flat indices (ascending) of this rank's members of the top ``budget`` entries of
    all ranks' (B/W, F) affinity matrices together (module docstring)."""
    from .rules.mutual_choice import select_mutual_choice
    from .sparse_ops import entries_at_least, values_at

    n_local = P.numel()
    q = min(n_local, math.ceil(budget / comm.world))
    t = values_at(P, select_mutual_choice(P, q, ws)).min().reshape(1).float()
    lower = comm.min_(t.clone())
    Pc = P if P.is_contiguous() else P.contiguous()
    cand = entries_at_least(Pc, lower.to(P.dtype), ws)  # ascending flat indices
    vals = Pc.view(-1)[cand].float()
    mine = _stable_desc(vals)
    parts = comm.gather_varlen(vals[mine])  # each rank's candidates, descending
    union = torch.cat(parts)
    owner = torch.repeat_interleave(
        torch.arange(len(parts), device=P.device),
        torch.tensor([p.numel() for p in parts], device=P.device),
    )
    if union.numel() < budget:
        raise RuntimeError(f"only {union.numel()} candidates for a budget of {budget}.")
    top = _stable_desc(union)[:budget]
    count = int((owner[top] == comm.rank).sum())
    return cand[mine[:count]].sort().values


@torch.no_grad()
def select_columns_global(P: Tensor, capacities: Tensor, comm, ws=None) -> Tensor:
    """Local flat indices (ascending) of this rank's members of each column j's top
    ``capacities[j]`` entries over all ranks' tokens (module docstring)."""
    from .rules.feature_choice import select_feature_choice
    from .sparse_ops import values_at

    B_l, F = P.shape
    dev = P.device
    local_caps = capacities.to(dev).clamp(max=B_l)
    idx = select_feature_choice(P, local_caps, ws)
    vals = values_at(P, idx).float()
    cols = idx % F
    order = _stable_desc(vals)
    order = order[torch.sort(cols[order], stable=True).indices]  # column asc, value desc
    idx, vals, cols = idx[order], vals[order], cols[order]
    start = torch.zeros(F, dtype=torch.long, device=dev)
    start[1:] = torch.cumsum(local_caps, 0)[:-1]
    pos = torch.arange(idx.numel(), device=dev) - start[cols]  # rank within own column
    allv = comm.gather_fixed(vals)  # (W, S), same layout on every rank
    W, S = allv.shape
    flat = allv.reshape(-1)
    owner = torch.arange(W, device=dev).repeat_interleave(S)
    colsW = cols.repeat(W)
    o = _stable_desc(flat)
    o = o[torch.sort(colsW[o], stable=True).indices]  # column asc, value desc, rank asc
    cstart = torch.zeros(F, dtype=torch.long, device=dev)
    cstart[1:] = torch.cumsum(local_caps * W, 0)[:-1]
    rank_in_col = torch.arange(o.numel(), device=dev) - cstart[colsW[o]]
    chosen = o[rank_in_col < capacities.to(dev)[colsW[o]]]
    mine = chosen[owner[chosen] == comm.rank]
    count = torch.bincount(colsW[mine], minlength=F)
    return idx[pos < count[cols]].sort().values


def global_variance(x: Tensor, comm) -> Tensor:
    """Σ‖x − x̄‖² over the rows of every rank's x (x̄ the global mean), no grad."""
    with torch.no_grad():
        xd = x.detach().double()
        s = comm.sum_(torch.cat([xd.sum(0), xd.pow(2).sum().reshape(1)]))
        n = comm.sum_(torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device))
        mean_sum, sq = s[:-1], s[-1]
        return (sq - mean_sum.pow(2).sum() / n[0]).to(x.dtype)


__all__ = [
    "LocalComm",
    "ProcessGroupComm",
    "current_comm",
    "global_variance",
    "select_columns_global",
    "select_top_global",
]
