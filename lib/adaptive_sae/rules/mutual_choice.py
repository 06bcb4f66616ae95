"""Mutual Choice (= BatchTopK, Bussmann et al. 2024): the K = int(k·B) largest affinities of
the whole batch, with no per-token or per-feature limit. DESIGN §3.

Inference (DESIGN §4): one global threshold θ, a running mean of the smallest selected affinity
per batch, applied to every feature: z = ReLU(P)·1[P > θ]. It is stored on every feature of the
SAE's ``thresholds`` buffer, the JumpReLU form SAELens saves BatchTopK SAEs in.

Selection without a full sort: a threshold t (the previous step's, else one from a strided
sample of P) such that
C = {P ≥ t} has |C| ≥ K (checked; t is lowered if not), then top-K of C (on a CPU one compiled
kernel, ``selection_kernels.top_k_at_least``). Exact: an entry
outside C is < t ≤ every entry of C, and C holds ≥ K entries, so it cannot be in the top K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import selection_kernels
from ..config import ConfigError
from ..sparse_ops import Workspace, entries_at_least, sorted_indices, values_at
from .base import AllocationRule, ema_thresholds, register_rule

# Threshold search: sample size and safety margin in standard deviations.
_MC_SAMPLE = 1 << 16
_MC_MARGIN_SD = 4.0
# The kernel's next threshold: one that about (1 + this)·K entries of the batch reach. The
# selection is exact whatever the threshold; this only keeps the candidates few (the K-th
# largest affinity moves by a few percent from batch to batch).
_MC_HINT_MARGIN = 0.15


def _hint_rank(K: int) -> int:
    """The rank whose entry is the next threshold: about (1 + _MC_HINT_MARGIN)·K."""
    return K + math.ceil(_MC_HINT_MARGIN * K)


def _flat_storage(P: Tensor) -> tuple[Tensor, bool]:
    """A 1-D view of P's storage and whether it is feature-major (index f·B + b)."""
    if P.is_contiguous():
        return P.reshape(-1), False
    if P.t().is_contiguous():
        return P.t().reshape(-1), True
    return P.contiguous().reshape(-1), False


def _coprime_stride(n: int, samples: int, F: int, B: int) -> int:
    s = max(1, n // samples)
    while math.gcd(s, F) != 1 or math.gcd(s, B) != 1:
        s += 1
    return s


def _top_of_candidates(flat: Tensor, cand: Tensor, K: int) -> Tensor:
    """The K largest of flat[cand] (cand ascending, at least K of them): indices, ascending."""
    if cand.numel() == K:
        return cand
    top = flat[cand].topk(K, sorted=False).indices
    keep = torch.zeros(cand.numel(), dtype=torch.bool, device=flat.device)
    keep[top] = True
    return cand[keep]


def _top_at_least(flat: Tensor, rows: int, K: int, t: Tensor, cap: int, ws) -> Tensor | None:
    """The top K of the entries >= t (ascending) when K to ``cap`` entries reach t, else None:
    the compiled kernel on a CPU, else candidates by a mask and a topk over them. Where they
    are found, the next step's threshold goes to ``ws``: the kernel's, which about
    (1 + _MC_HINT_MARGIN)·K entries reach, else t."""
    if selection_kernels.applies(flat):
        idx, hint = selection_kernels.top_k_at_least(flat, K, t, cap, hint_rank=_hint_rank(K))
        if idx is not None and ws is not None:
            ws.hints["mutual_choice"] = torch.tensor(hint, dtype=torch.float64)
        return idx
    cand = entries_at_least(flat.view(rows, -1), t, ws)
    if not K <= cand.numel() <= cap:
        return None
    if ws is not None:
        ws.hints["mutual_choice"] = t
    return _top_of_candidates(flat, cand, K)


def select_mutual_choice(P: Tensor, budget: int, ws: Workspace | None = None) -> Tensor:
    """The ``budget`` largest entries of the whole (B, F) matrix: flat indices, ascending.

    A threshold bounds the candidates: the previous step's (kept in the workspace ``ws``; the
    affinities drift slowly, so it usually still holds between K and 4K entries) or one from a
    strided sample. The count is checked, so the result is the exact top-K (module docstring)
    whatever the threshold."""
    B, F = P.shape
    n, K = B * F, int(budget)
    if not 0 < K <= n:
        raise ConfigError(f"mutual_choice needs 0 < budget <= B*F = {n}, got {K}.")
    flat, fmajor = _flat_storage(P)
    rows_of_storage = F if fmajor else B
    idx = None
    hint = ws.hints.get("mutual_choice") if ws is not None else None
    if K * 8 > n:  # dense: a plain topk is as fast
        idx = sorted_indices(flat.topk(K, sorted=False).indices)
    elif hint is not None and hint.device == P.device:
        idx = _top_at_least(flat, rows_of_storage, K, hint, 4 * K, ws)
    if idx is None and n <= 4 * _MC_SAMPLE and selection_kernels.applies(flat):
        # small: a threshold that a few more than K entries reach, from one topk, then the kernel
        t = flat.topk(min(n, _hint_rank(K)), sorted=False).values.min()
        idx = _top_at_least(flat, rows_of_storage, K, t, n, ws)
    if idx is None and n <= 4 * _MC_SAMPLE:  # small: one topk (its K-th value the next hint)
        top = flat.topk(K, sorted=False)
        idx = sorted_indices(top.indices)
        if ws is not None:
            ws.hints["mutual_choice"] = top.values.min()
    if idx is None:
        stride = _coprime_stride(n, _MC_SAMPLE, F, B)
        sample = flat[::stride]
        s = sample.numel()
        mean = K / n * s
        r = min(s, int(math.ceil(mean + _MC_MARGIN_SD * math.sqrt(mean) + 8)))
        while idx is None:
            t = sample.topk(r, sorted=False).values.min()
            idx = _top_at_least(flat, rows_of_storage, K, t, n, ws)
            if idx is None and r == s:  # the whole sample did not hold K (ties or NaN): sort all
                idx = sorted_indices(flat.topk(K, sorted=False).indices)
            else:
                r = min(s, 4 * r)
    if fmajor:  # f·B + b -> b·F + f
        f = torch.div(idx, B, rounding_mode="floor")
        idx = sorted_indices((idx - f * B) * F + f)
    return idx


class MutualChoice(AllocationRule):
    name = "mutual_choice"
    aliases = ("batch_topk",)
    label = "Mutual Choice"
    batch_level = True
    uses_thresholds = True

    def select(self, sae, P, ws=None) -> Tensor:
        return select_mutual_choice(P, max(1, sae.cfg.budget(P.shape[0])), ws)

    def select_global(self, sae, P, ws, comm) -> Tensor:
        if comm.world == 1:
            return self.select(sae, P, ws)
        from ..distributed import select_top_global

        return select_top_global(P, max(1, sae.cfg.budget(P.shape[0] * comm.world)), comm, ws)

    @torch.no_grad()
    def observe(self, sae, P, idx, stats, step, tcfg, comm=None) -> None:
        inf = torch.tensor([float("inf")], device=P.device, dtype=torch.float32)
        smallest = values_at(P, idx).float().min().reshape(1) if idx.numel() else inf
        if comm is not None:
            smallest = comm.min_(smallest)
        if torch.isfinite(smallest).all():
            ema_thresholds(sae, smallest.expand(sae.cfg.n_features))


register_rule(MutualChoice())
