"""Feature Choice: feature j chooses its top-m_j tokens of the batch, Σ m_j = K = int(k·B)
(expert-choice routing). DESIGN §3.

Capacities are uniform (``feature_choice``: m_j = K/F by largest remainder) or Zipf
(``feature_choice_zipf``: m_r ∝ (r + 1 + β)^−α, water-filled into [1, B]), ranked by feature
index (``capacity_ranking="fixed"``) or by demand, a running average of how often the feature
is among a token's top-k affinities (``"demand"``, re-ranked every ``demand_rerank_every`` steps).

Inference (DESIGN §4): one threshold θ_j per feature, a running mean of column j's smallest
selected affinity (its m_j-th largest), i.e. a JumpReLU SAE.

Selection without a full sort: on the CPU, a compiled kernel
(``selection_kernels.column_topk_flat``), else a threshold t_j per column from the first r tokens
of the batch gives candidates {P[:, j] ≥ t_j} in one pass over P (no transposed copy of P); the
top-m_j of the candidates is exact wherever a column has ≥ m_j of them, and the few other columns
are selected exactly on their own. On a GPU (or for small P), features are grouped into
O(log B) buckets of similar capacity and each bucket runs one ``topk`` over tokens with its
largest m, then keeps rank < m_j.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import zipf
from ..config import ConfigError
from ..selection_kernels import column_topk_flat, row_topk_columns
from ..sparse_ops import Workspace, entries_at_least, exclusive_cumsum, values_at
from .base import AllocationRule, ema_thresholds, register_rule

# Below this many entries P is simply transposed; above, thresholds from the first
# B/8 tokens (at least 256, at most 1024) select candidates in one pass (no B×F copy). The
# sample's top-q per column is the pass's main cost beside the compare: a smaller sample is
# cheaper and its looser thresholds admit few extra candidates (measured: bench/README.md).
_FC_SMALL = 1 << 20
_FC_SAMPLE_ROWS = (256, 1024)


def _sample_rows(B: int) -> int:
    lo, hi = _FC_SAMPLE_ROWS
    return min(B, max(lo, min(hi, B // 8)))


def _capacity_buckets(caps_sorted: Tensor) -> list[tuple[int, int, int, int]]:
    """Split non-increasing capacities into runs whose values share one power-of-two range.
    Returns (start, end, largest, smallest) per run; O(log B) runs."""
    if caps_sorted.numel() == 0:
        return []
    # bucket id floor(log2 m) (-1 for m = 0); non-increasing, so each id is one run
    bid = torch.where(caps_sorted > 0, torch.log2(caps_sorted.double()).floor(), -1.0)
    change = (bid[1:] != bid[:-1]).nonzero().squeeze(1) + 1
    bounds = [0, *change.tolist(), caps_sorted.numel()]
    hi = caps_sorted[bounds[:-1]].tolist()
    lo = caps_sorted[[b - 1 for b in bounds[1:]]].tolist()
    return list(zip(bounds[:-1], bounds[1:], hi, lo))


def _fc_topk(PT: Tensor, feats: Tensor, caps_h: Tensor, F: int) -> Tensor:
    """Exact per-column top-m_j on a feature-major matrix PT (n, B) of the columns ``feats``
    (n,), capacities ``caps_h`` (n,) on the host: flat indices b·F + f, unordered.

    Columns go in order of decreasing capacity, in O(log B) buckets of capacities within a
    power of two: one ``topk`` per bucket with its largest m, then rank < m_j."""
    n, B = PT.shape
    dev = PT.device
    order_h = torch.argsort(caps_h, descending=True, stable=True)
    caps_sorted_h = caps_h[order_h]
    identity = bool((order_h == torch.arange(n)).all())
    order = None if identity else order_h.to(dev)
    pieces = []
    for s, e, hi, lo in _capacity_buckets(caps_sorted_h):
        if hi <= 0:
            continue
        idx = torch.arange(s, e, device=dev) if order is None else order[s:e]
        f = feats[idx]
        if lo >= B:  # every token
            pieces.append(torch.arange(B, device=dev).repeat(e - s) * F + f.repeat_interleave(B))
            continue
        sub = PT[s:e] if order is None else PT.index_select(0, idx)  # (n_b, B)
        flat = sub.topk(hi, dim=1, sorted=hi != lo).indices * F + f.unsqueeze(1)  # (n_b, hi)
        if hi == lo:
            pieces.append(flat.reshape(-1))
        else:
            c = caps_sorted_h[s:e].to(dev)
            pieces.append(flat[torch.arange(hi, device=dev).unsqueeze(0) < c.unsqueeze(1)])
    if not pieces:
        return torch.empty(0, dtype=torch.long, device=dev)
    return torch.cat(pieces)


def _fc_columns(P: Tensor, feats_h: Tensor, caps_h: Tensor) -> Tensor:
    """Exact selection on a few columns of a token-major P (gathered, then ``_fc_topk``)."""
    feats = feats_h.to(P.device)
    return _fc_topk(P.index_select(1, feats).t().contiguous(), feats, caps_h[feats_h], P.shape[1])


def _descending_key(v: Tensor) -> Tensor:
    """int64 in [0, 2^32) whose ascending order is v's (float32) descending order."""
    bits = v.float().view(torch.int32).long()
    asc = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # same order as the floats
    return (2**31 - 1) - asc


def _fc_threshold(P: Tensor, caps_h: Tensor, ws: Workspace | None) -> Tensor:
    """Feature Choice on a token-major P without transposing it (module docstring).

    Per column j a threshold t_j from the first r tokens (the q_j-th largest there, q_j the
    expected rank plus 2.5 standard deviations) gives candidates C_j = {b : P[b, j] >= t_j} in
    one pass over P. Where |C_j| >= m_j, the top-m_j of column j lies in C_j (an entry outside
    is below m_j entries of C_j) and is found by ranking C_j; the other columns, and those whose
    capacity is a large share of the batch, are selected exactly on their own."""
    B, F = P.shape
    dev = P.device
    r = _sample_rows(B)
    mean = caps_h.double() * (r / B)
    q = torch.ceil(mean + 2.5 * mean.sqrt() + 1.0).long().clamp(1, r)
    exact = (caps_h > 0) & ((caps_h * 16 >= B) | (q * 4 >= r))
    small = (caps_h > 0) & ~exact
    pieces = []
    if bool(small.any()):
        sample = P[:r].t().contiguous()  # (F, r): a contiguous row block transposes fast
        t = torch.full((F,), float("inf"), dtype=P.dtype, device=dev)
        lo = 0
        for hi in (16, 64, r):  # one topk per coarse range of q (one range when uniform)
            sel = small & (q > lo) & (q <= hi)
            lo = hi
            if not bool(sel.any()):
                continue
            fs = sel.nonzero().squeeze(1)
            qs = q[fs]
            rows = fs.to(dev)
            sub = sample if bool(sel.all()) else sample.index_select(0, rows)
            tv = sub.topk(int(qs.max()), dim=1, sorted=True).values  # (n, max q)
            t[rows] = tv.gather(1, (qs - 1).to(dev).unsqueeze(1)).squeeze(1)
        cand = entries_at_least(P, t, ws)
        vals = P.view(-1)[cand]
        cols = cand % F
        short_h = small & (torch.bincount(cols, minlength=F).cpu() < caps_h)
        if bool(short_h.any()):  # the sample misled these columns: select them exactly
            exact |= short_h
            keep = ~short_h.to(dev)[cols]
            cand, vals, cols = cand[keep], vals[keep], cols[keep]
        # rank the candidates within each column by value (one sort of (column, -value) keys)
        key, o = torch.sort((cols << 32) | _descending_key(vals))
        cols_s = key >> 32
        start = exclusive_cumsum(torch.bincount(cols_s, minlength=F))
        rank = torch.arange(cols_s.numel(), device=dev) - start[cols_s]
        pieces.append(cand[o][rank < caps_h.to(dev)[cols_s]])
    if bool(exact.any()):
        pieces.append(_fc_columns(P, exact.nonzero().squeeze(1), caps_h))
    if not pieces:
        return torch.empty(0, dtype=torch.long, device=dev)
    return torch.cat(pieces)


@torch.no_grad()
def select_feature_choice(P: Tensor, capacities: Tensor, ws: Workspace | None = None) -> Tensor:
    """Column j keeps its top-capacities[j] entries (uneven capacities): flat indices, ascending.

    A feature-major P (contiguous along tokens), a small one or one on a GPU: one ``topk`` over
    tokens per bucket of similar capacities (``_fc_topk``) on P transposed. A large token-major
    P on the CPU: per-column thresholds and candidates (``_fc_threshold``), so P is never
    transposed or copied (a CPU transposes 4 bytes per entry far slower than it compares)."""
    B, F = P.shape
    caps_h = capacities.detach().to("cpu", torch.long)  # bucket layout and checks: host-side
    if caps_h.shape != (F,) or (caps_h.numel() and (caps_h.min() < 0 or caps_h.max() > B)):
        raise ConfigError(
            f"capacities must be {F} integers (one per feature) in [0, B={B}], got shape "
            f"{tuple(caps_h.shape)}; a feature cannot choose more tokens than the batch holds."
        )
    idx = column_topk_flat(P, caps_h)  # a compiled kernel on a token-major CPU P
    if idx is not None:
        return idx
    if P.t().is_contiguous():
        idx = _fc_topk(P.t(), torch.arange(F, device=P.device), caps_h, F)
    elif B * F <= _FC_SMALL or P.device.type != "cpu":  # a GPU transposes P in microseconds
        idx = _fc_topk(P.t().contiguous(), torch.arange(F, device=P.device), caps_h, F)
    else:
        idx = _fc_threshold(P if P.is_contiguous() else P.contiguous(), caps_h, ws)
    return idx.sort().values


class FeatureChoice(AllocationRule):
    """Feature Choice with uniform capacities (``zipf=False``) or Zipf capacities."""

    batch_level = True
    uses_thresholds = True

    def __init__(self, name: str, zipf_capacities: bool, label: str):
        self.name, self.zipf, self.label = name, zipf_capacities, label

    def check_training(self, cfg, tcfg) -> None:
        super().check_training(cfg, tcfg)
        B, F, K = tcfg.batch_size, cfg.n_features, cfg.budget(tcfg.batch_size)
        if K < F:
            raise ConfigError(
                f"Feature Choice gives every feature at least one match, so it needs "
                f"K = int(k * batch_size) = {K} >= n_features = {F}; raise batch_size to at "
                f"least {math.ceil(F / cfg.k)} or lower n_features."
            )
        if K > F * B:
            raise ConfigError(f"K = {K} exceeds n_features * batch_size = {F * B}; lower k.")

    def buffers(self, cfg) -> dict[str, Tensor]:
        # capacity_order[r] = the feature holding the rank-r capacity slot
        return {**super().buffers(cfg), "capacity_order": torch.arange(cfg.n_features)}

    def capacities(self, sae, batch_size: int) -> Tensor:
        """Capacities m_j (F,) int64 for a batch of this size, indexed by feature."""
        cfg = sae.cfg
        cache = sae.__dict__.setdefault("_capacity_cache", {})
        key = (int(batch_size), str(sae.capacity_order.device))
        by_rank = cache.get(key)
        if by_rank is None:
            K, F = cfg.budget(batch_size), cfg.n_features
            alpha = cfg.zipf_alpha if self.zipf else 0.0
            by_rank = zipf.zipf_capacities(
                F, K, batch_size, alpha, cfg.zipf_beta, min_capacity=1 if K >= F else 0
            ).to(sae.capacity_order.device)
            cache[key] = by_rank
        caps = torch.empty_like(by_rank)
        caps[sae.capacity_order] = by_rank
        return caps

    def select(self, sae, P, ws=None) -> Tensor:
        return select_feature_choice(P, self.capacities(sae, P.shape[0]), ws)

    def select_global(self, sae, P, ws, comm) -> Tensor:
        if comm.world == 1:
            return self.select(sae, P, ws)
        from ..distributed import select_columns_global

        caps = self.capacities(sae, P.shape[0] * comm.world)
        return select_columns_global(P, caps, comm, ws)

    @torch.no_grad()
    def observe(self, sae, P, idx, stats, step, tcfg, comm=None) -> None:
        F = P.shape[1]
        col_min = torch.full((F,), float("inf"), device=P.device, dtype=torch.float32)
        col_min.scatter_reduce_(0, idx % F, values_at(P, idx).float(), reduce="amin")
        world = 1 if comm is None else comm.world
        if comm is not None:
            col_min = comm.min_(col_min)
        ema_thresholds(sae, col_min, torch.isfinite(col_min))
        cfg = sae.cfg
        if self.zipf and cfg.capacity_ranking == "demand":
            top = row_topk_columns(P, min(P.shape[1], max(1, math.ceil(cfg.k)))).reshape(-1)
            counts = torch.bincount(top, minlength=F)
            if comm is not None:
                counts = comm.sum_(counts)
            stats.update_demand(counts, P.shape[0] * world)
            if (step + 1) % tcfg.demand_rerank_every == 0:
                sae.capacity_order.copy_(torch.argsort(-stats.demand, stable=True))


register_rule(FeatureChoice("feature_choice", False, "Feature Choice (uniform)"))
register_rule(FeatureChoice("feature_choice_zipf", True, "Feature Choice (Zipf)"))
