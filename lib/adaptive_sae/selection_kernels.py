"""Compiled CPU kernels (numba) for the selections ``torch.topk`` makes slow at small sizes.

On a CPU ``torch.topk`` costs about half a microsecond a row whatever k: per token (TopK's whole
selection, Feature Choice (Zipf)'s demand, aux_k) 4-5× the dense product at the suite's own
sizes (d=64, F=512, B=1024), and per feature over tokens (Feature Choice) more, after a
transposed copy of P. Both kernels read P once in its own (token-major) layout and bound each
top-k from below by group maxima, so that only a few entries are ranked:

* ``row_topk_columns(P, k)``: per row, the maxima of G = min(F, max(64, 8k)) strided column
  groups (lanes); t = their k-th largest is at most the row's k-th largest (k lanes each hold an
  entry ≥ t). Only the lanes whose maximum reaches t are scanned for candidates ≥ t, and those
  are ranked by counting, without branches (or by insertion, when there are many).
* ``top_k_at_least(x, K, t, cap)``: Mutual Choice's top K of the whole batch among the entries
  ≥ a threshold t (the previous step's): one pass that counts and gathers them, one partition
  of the candidates, and a threshold for the next batch that a little more than K entries
  reach (so the candidates stay few while the affinities drift).
* ``column_topk_flat(P, m)``: per column j, its top m_j tokens. One pass over P gives the maxima
  of G = min(B, 128) strided token groups for every column at once (along the rows, as P
  lies); t_j = the m_j-th largest of column j's group maxima (-inf where m_j > G). Two more
  passes count and gather the candidates P[b, j] ≥ t_j per column, in token order, and each
  column ranks only its candidates.

Exact: an entry below a bound has at least k entries above it. Ties go to the lower index, the
rule of a stable descending sort (the oracles in ``tests/``). A NaN in P (seen in running sums
of the entries, which also flag inf - inf) sends the whole matrix to the torch path.
``ADAPTIVE_SAE_KERNELS=0`` turns the kernels off (``use_kernels``; the benchmarks compare both
in one process). Compiled on first use and cached by numba beside this file.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

_ROW_GROUPS_PER_K = 8  # per-token top-k: G = min(F, max(64, 8k)) column groups (lanes)
_MIN_LANES = 64  # fewer lanes than this and the maxima pass no longer vectorises
_COL_GROUPS = 128  # per-feature top-m: G = min(B, 128) token groups ...
_RANK_BY_INSERTION = 32  # up to this many winners a list is ranked by insertion, else partitioned
_PLACE_BY_RANK = 32  # up to this many winners are put in order by counting, else sorted
use_kernels = os.environ.get("ADAPTIVE_SAE_KERNELS", "1") != "0"
_compiled: dict | None = None  # numba import and JIT stay off the import path


# The kernels, written in the subset of Python numba compiles (plain loops over arrays).
def _insert_desc(vals, ids, n, v, i):  # pragma: no cover - compiled
    """Insert (v, i) into the best-n list (vals descending, ids ascending among equals)."""
    if v > vals[n - 1] or (v == vals[n - 1] and i < ids[n - 1]):
        p = n - 1
        while p > 0 and (vals[p - 1] < v or (vals[p - 1] == v and ids[p - 1] > i)):
            vals[p] = vals[p - 1]
            ids[p] = ids[p - 1]
            p -= 1
        vals[p] = v
        ids[p] = i


def _place_ascending(ids, n, out):  # pragma: no cover - compiled
    """out[:n] = ids[:n] (distinct) in ascending order: up to _PLACE_BY_RANK of them each at
    its rank among them, counted without a branch (an insertion sort of a few ids mispredicts
    most of its moves); more, sorted (O(n log n))."""
    if n > _PLACE_BY_RANK:
        ids[:n].sort()
        for p in range(n):
            out[p] = ids[p]
        return
    for p in range(n):
        i = ids[p]
        r = 0
        for q in range(n):
            r += ids[q] < i
        out[r] = i


def _top_by_partition(x, m, scratch, out, start):  # pragma: no cover - compiled
    """The indices of x's m largest entries (ties: lower index), ascending, into
    out[start:start + m], by one partition: for large m, where ranking would cost O(n·m)."""
    n = x.shape[0]
    acc = 0.0
    for p in range(n):
        scratch[p] = x[p]
        acc += x[p]
    if acc != acc:  # NaN
        return False
    t = np.partition(scratch[:n], n - m)[n - m]  # the m-th largest
    above = 0
    for p in range(n):
        if x[p] > t:
            above += 1
    ties = m - above
    q = start
    for p in range(n):
        v = x[p]
        if v > t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            out[q] = p
            q += 1
    return True


def _rank_into(vals, ids, n, k, out_ids):  # pragma: no cover - compiled
    """The ids of the k best of n (value descending, then id ascending) into out_ids, in
    their input order, by counting for each how many beat it: O(n²) without a branch to
    mispredict, which for n ≤ 64 costs less than ranking by insertion."""
    q = 0
    for p in range(n):
        v = vals[p]
        i = ids[p]
        r = 0
        for u in range(n):
            r += (vals[u] > v) | ((vals[u] == v) & (ids[u] < i))
        out_ids[q] = i
        q += r < k


def _best_by_insertion(vals, ids, n, k, tv, tc, none):  # pragma: no cover - compiled
    """The ids of the k best of n into tc (value descending, ids ascending among equals)."""
    for j in range(k):
        tv[j] = -np.inf
        tc[j] = none
    for p in range(n):
        if vals[p] > tv[k - 1] or (vals[p] == tv[k - 1] and ids[p] < tc[k - 1]):
            _insert_desc(tv, tc, k, vals[p], ids[p])


def _kth_largest(vals, n, k, top):  # pragma: no cover - compiled
    """The k-th largest of vals[:n] (n >= k), by insertion into top (k long, descending)."""
    for j in range(k):
        top[j] = -np.inf
    for p in range(n):
        v = vals[p]
        if v > top[k - 1]:
            q = k - 1
            while q > 0 and top[q - 1] < v:
                top[q] = top[q - 1]
                q -= 1
            top[q] = v
    return top[k - 1]


def _row_topk(P, k, G, out):  # pragma: no cover - compiled
    B, F = P.shape
    gm = np.empty(G, P.dtype)
    acc = np.empty(G, P.dtype)
    lv = np.empty(G, P.dtype)
    li = np.empty(G, np.int64)
    cv = np.empty(F, P.dtype)
    ci = np.empty(F, np.int64)
    tv = np.empty(k, P.dtype)
    tc = np.empty(k, np.int64)
    scratch = np.empty(F, P.dtype)
    flat = out.reshape(-1)
    for b in range(B):
        row = P[b]
        if G == F:  # k >= F/8: no grouping pays
            if not _top_by_partition(row, k, scratch, flat, b * k):
                return False
            continue
        # lane maxima gm[j] = max of row[j::G] (a loop that vectorises), and sums, so that NaN
        # (or inf - inf) shows in the same pass
        for j in range(G):
            gm[j] = row[j]
            acc[j] = row[j]
        o = G
        while o + G <= F:
            for j in range(G):
                v = row[o + j]
                acc[j] += v
                gm[j] = v if v > gm[j] else gm[j]
            o += G
        for j in range(F - o):
            v = row[o + j]
            acc[j] += v
            gm[j] = v if v > gm[j] else gm[j]
        s = 0.0
        for j in range(G):
            s += acc[j]
        if s != s:  # the caller falls back to torch.topk
            return False
        # a first bound: the least of k maxima over strided sets of lanes (k lanes reach it)
        t = np.inf
        for r in range(k):
            m = gm[r]
            q = r + k
            while q < G:
                m = gm[q] if gm[q] > m else m
                q += k
            t = m if m < t else t
        nl = 0  # the lanes reaching it; the k-th largest of their maxima is the tight bound
        for j in range(G):
            lv[nl] = gm[j]
            li[nl] = j
            nl += gm[j] >= t
        if nl > k:
            t = _kth_largest(lv, nl, k, tv)
        n = 0  # every entry >= t, from the lanes reaching it
        for p in range(nl):
            j = li[p]
            if gm[j] >= t:
                f = j
                while f < F:
                    v = row[f]
                    cv[n] = v
                    ci[n] = f
                    n += v >= t
                    f += G
        if n == k:  # the candidates are the winners (often: the bound is tight)
            for j in range(k):
                tc[j] = ci[j]
        elif n <= 64:
            _rank_into(cv, ci, n, k, tc)
        else:
            _best_by_insertion(cv, ci, n, k, tv, tc, F)
        _place_ascending(tc, k, out[b])
    return True


def _column_topk(P, caps, G, out, offsets):  # pragma: no cover - compiled
    """Column j's top caps[j] tokens (ascending) into out[offsets[j]:offsets[j + 1]]."""
    B, F = P.shape
    gm = np.empty((G, F), P.dtype)  # gm[g, j]: max of P[b, j] over tokens b ≡ g (mod G)
    acc = np.zeros(F, P.dtype)  # sums, so NaN (or inf - inf) shows: the caller's torch path
    for g in range(G):
        for j in range(F):
            gm[g, j] = P[g, j]
            acc[j] += P[g, j]
    o = G
    while o < B:
        for g in range(min(G, B - o)):
            for j in range(F):
                v = P[o + g, j]
                acc[j] += v
                if v > gm[g, j]:
                    gm[g, j] = v
        o += G
    if np.isnan(acc.sum()):
        return False
    # per column a bound t_j <= its m_j-th largest: the m_j-th largest group maximum
    t = np.empty(F, P.dtype)
    col = np.empty(G, P.dtype)
    mmax = 1
    for j in range(F):
        mmax = max(mmax, caps[j])
    tv = np.empty(mmax, P.dtype)
    tb = np.empty(mmax, np.int64)
    for j in range(F):
        m = caps[j]
        if m == 0:
            t[j] = np.inf
        elif m > G or m >= B:
            t[j] = -np.inf
        elif m <= _RANK_BY_INSERTION:
            # first the least of m maxima over strided sets of groups (m groups reach it), then
            # the m-th largest of the maxima that reach it: the same bound, fewer insertions
            t0 = np.inf
            for r in range(m):
                mx = gm[r, j]
                for g in range(r + m, G, m):
                    mx = gm[g, j] if gm[g, j] > mx else mx
                t0 = mx if mx < t0 else t0
            nl = 0
            for g in range(G):
                col[nl] = gm[g, j]
                nl += gm[g, j] >= t0
            t[j] = _kth_largest(col, nl, m, tv) if nl > m else t0
        else:
            for g in range(G):
                col[g] = gm[g, j]
            t[j] = np.partition(col, G - m)[G - m]
    # candidates P[b, j] >= t_j, gathered per column in token order (two passes: count, fill)
    start = np.zeros(F + 1, np.int64)
    for b in range(B):
        for j in range(F):
            if P[b, j] >= t[j]:
                start[j + 1] += 1
    for j in range(F):
        start[j + 1] += start[j]
    cval = np.empty(start[F], P.dtype)
    ctok = np.empty(start[F], np.int64)
    pos = start[:F].copy()
    for b in range(B):
        for j in range(F):
            v = P[b, j]
            if v >= t[j]:
                cval[pos[j]] = v
                ctok[pos[j]] = b
                pos[j] += 1
    scratch = np.empty(B, P.dtype)
    for j in range(F):
        m = caps[j]
        s, n = start[j], start[j + 1] - start[j]
        if m == 0:
            continue
        if n == m or m > _RANK_BY_INSERTION:
            if n == m:
                for p in range(m):
                    tb[p] = p
            else:
                _top_by_partition(cval[s : s + n], m, scratch, tb, 0)
            for p in range(m):
                out[offsets[j] + p] = ctok[s + tb[p]]
            continue
        for p in range(m):
            tv[p] = -np.inf
            tb[p] = n
        for p in range(n):
            if cval[s + p] >= tv[m - 1]:
                _insert_desc(tv, tb, m, cval[s + p], p)
        for p in range(m):  # candidates lie in token order: their tokens rank as they do
            tb[p] = ctok[s + tb[p]]
        _place_ascending(tb, m, out[offsets[j] :])
    return True


def _token_major(tokens, caps, offsets, F, B, out):  # pragma: no cover - compiled
    """Flat indices b·F + j of the selected (token, column) pairs, ascending."""
    pos = np.zeros(B + 1, np.int64)
    for p in range(tokens.shape[0]):
        pos[tokens[p] + 1] += 1
    for b in range(B):
        pos[b + 1] += pos[b]
    for j in range(F):
        for p in range(offsets[j], offsets[j] + caps[j]):
            b = tokens[p]
            out[pos[b]] = b * F + j
            pos[b] += 1


def _gather_at_least(x, t, vals, ids):  # pragma: no cover - compiled
    """The entries of x that are >= t, in order, into vals/ids as far as they hold them, in one
    pass; returns how many there are, or -1 where x holds NaN (neither >= t nor < t)."""
    ge = 0
    nan = False
    for i in range(x.shape[0]):
        v = x[i]
        if v >= t:
            if ge < vals.shape[0]:
                vals[ge] = v
                ids[ge] = i
            ge += 1
        elif not v < t:
            nan = True
    return -1 if nan else ge


def _top_at_least(x, K, t, cap, out, hint_rank, hint):  # pragma: no cover - compiled
    """The K largest entries of x among those >= t (ties: lower index), ascending, into out,
    when there are between K and cap of them. Returns their count, or -1 for NaN in x.
    hint[0]: t, or, where more than 2·hint_rank − K entries reach t, the hint_rank-th largest
    entry (a tighter threshold for the next batch; hint_rank 0: never)."""
    hint[0] = t
    size = min(cap, x.shape[0], max(2 * max(K, hint_rank), 1024))  # what one pass gathers
    vals = np.empty(size, x.dtype)
    ids = np.empty(size, np.int64)
    ge = _gather_at_least(x, t, vals, ids)
    if ge < 0:
        return -1
    if ge < K or ge > cap:
        return ge
    if ge > size:  # more than one pass holds: gather them all
        vals = np.empty(ge, x.dtype)
        ids = np.empty(ge, np.int64)
        _gather_at_least(x, t, vals, ids)
    vals = vals[:ge]
    part = np.partition(vals, ge - K)
    tk = part[ge - K]  # the K-th largest
    if K < hint_rank and 2 * hint_rank - K < ge:  # the hint_rank-th largest lies below tk
        hint[0] = np.partition(part[: ge - K], ge - hint_rank)[ge - hint_rank]
    ties = K
    for p in range(ge):
        ties -= vals[p] > tk
    q = 0
    for p in range(ge):
        v = vals[p]
        if v > tk or (v == tk and ties > 0):
            if v == tk:
                ties -= 1
            out[q] = ids[p]
            q += 1
    return ge


def jit(fn, fastmath: bool = False):
    """``fn`` compiled by numba (cached beside this package; in every process where the cache
    location is not writable). Only call when numba imports (``numba_available``). fastmath
    lets sums be reordered (and vectorised): for dot products, never for a selection."""
    import numba

    opts = {"nogil": True, "boundscheck": False, "fastmath": fastmath}
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # no writable cache location: compile in every process
        return numba.njit(cache=False, **opts)(fn)


def numba_available() -> bool:
    """Whether numba imports (a dependency; without it the torch paths do all the work)."""
    global use_kernels
    try:
        import numba  # noqa: F401
    except ImportError:
        use_kernels = False
        return False
    return True


def _kernels() -> dict | None:
    """The compiled kernels (compiled, or loaded from numba's cache, on first use)."""
    global _compiled
    if _compiled is None:
        if not numba_available():
            return None
        g = globals()  # the kernels' callees, compiled first
        for name in (
            "_insert_desc",
            "_place_ascending",
            "_top_by_partition",
            "_rank_into",
            "_best_by_insertion",
            "_kth_largest",
            "_gather_at_least",
        ):
            g[name] = jit(g[name])
        _compiled = {
            "row": jit(_row_topk),
            "column": jit(_column_topk),
            "token_major": jit(_token_major),
            "at_least": jit(_top_at_least),
        }
    return _compiled


def _kernels_for(P: Tensor) -> dict | None:
    """The compiled kernels where they take P (on, available, a contiguous float32/64 CPU
    tensor without autograd), else None: the one check every entry point makes."""
    if not (
        use_kernels
        and P.device.type == "cpu"
        and P.dtype in (torch.float32, torch.float64)
        and P.dim() in (1, 2)
        and P.is_contiguous()
        and not P.requires_grad
        and P.numel() > 0
    ):
        return None
    return _kernels()


def applies(P: Tensor) -> bool:
    """Whether the kernels take P (see ``_kernels_for``)."""
    return _kernels_for(P) is not None


@torch.no_grad()
def row_topk_columns(P: Tensor, k: int) -> Tensor:
    """The columns of each row's k largest entries, (B, k) int64, ascending within a row.

    The kernel breaks ties towards the lower column; torch.topk's tie order is unspecified
    (the two agree wherever a row's k-th and (k+1)-th values differ)."""
    B, F = P.shape
    kern = _kernels_for(P)
    if kern is not None and k > 0:
        out = torch.empty(B, k, dtype=torch.int64)
        if kern["row"](
            P.numpy(), int(k), min(F, max(_MIN_LANES, _ROW_GROUPS_PER_K * int(k))), out.numpy()
        ):
            return out
    return P.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


@torch.no_grad()
def column_topk_flat(P: Tensor, capacities: Tensor) -> Tensor | None:
    """Column j's capacities[j] largest entries of a token-major P (B, F): flat indices b·F + j,
    ascending; None where the kernel does not apply (the caller's torch path selects)."""
    B, F = P.shape
    kern = _kernels_for(P)
    if kern is None:
        return None
    caps = capacities.to("cpu", torch.int64).contiguous().numpy()
    offsets = np.zeros(F + 1, np.int64)
    np.cumsum(caps, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), np.int64)
    if not kern["column"](P.numpy(), caps, min(B, _COL_GROUPS), tokens, offsets):
        return None
    out = torch.empty(tokens.shape[0], dtype=torch.int64)
    kern["token_major"](tokens, caps, offsets, F, B, out.numpy())
    return out


@torch.no_grad()
def top_k_at_least(
    x: Tensor, K: int, t: float | Tensor, cap: int, hint_rank: int = 0
) -> tuple[Tensor | None, float]:
    """(The K largest entries of a 1-D x among those ≥ t, flat indices ascending, when between K
    and ``cap`` entries reach t (Mutual Choice's candidates under a threshold), else None (fewer
    or more do, or x holds NaN); a threshold for the next call: where more than 2·hint_rank − K
    entries reached t, the hint_rank-th largest entry of x, else t). Call where ``applies(x)``."""
    kern = _kernels_for(x)
    if kern is None:
        raise RuntimeError("the selection kernels do not take this tensor; check applies(x) first")
    out = torch.empty(int(K), dtype=torch.int64)
    hint = np.empty(1, np.float64)
    count = kern["at_least"](
        x.numpy(), int(K), float(t), int(cap), out.numpy(), int(hint_rank), hint
    )
    return (out if K <= count <= cap else None), float(hint[0])
