r"""Sparse training kernels: a step within a small factor of the one dense product (DESIGN §10).

The dense encoder product P = (x_s − b_dec) W_enc + b_enc (2·B·d·F flops) is the only work a
training step cannot avoid: every affinity must exist before it can be selected. Everything
else is proportional to the K selected entries:

    forward    values v_i = ReLU(P[b_i, f_i])                      gather from P (no grad), O(K)
               x̂_b = Σ_{i: b_i = b} v_i W_dec[f_i] (+ b_dec)       embedding_bag by token, O(K·d)
    backward   g_i = ⟨∂L/∂x̂_{b_i}, W_dec[f_i]⟩                     sampled dot products, O(K·d)
               γ_i = g_i · 1[P[b_i, f_i] > 0]                      ∂L/∂P at the selected entries
               ∂W_dec[f] = Σ_{i: f_i = f} v_i ∂L/∂x̂_{b_i}          embedding_bag by feature, O(K·d)
               ∂W_enc[:, f] = Σ_{i: f_i = f} γ_i (x_s − b_dec)_{b_i}  embedding_bag by feature
               ∂b_enc = Σ_i γ_i e_{f_i};   ∂b_dec = Σ_b ∂L/∂x̂_b − W_enc ∂b_enc   O(K + d·F)

so no dense B×F gradient and no second or third dense product is ever formed. The naive twin
(dense codes and autograd) is ``sparsifiers.codes_from_indices(P, idx) @ W_dec + b_dec``; the
tests check values and every gradient against it for each rule and both auxiliary losses.

Selection without a full sort (same results as the naive selectors in ``sparsifiers``, ties
aside):

- Mutual Choice (top K of all B·F entries): a threshold t from a strided sample of P such that
  C = {P ≥ t} has |C| ≥ K (checked; t is lowered if not), then top-K of C. Exact: an entry
  outside C is < t ≤ every entry of C, and C holds ≥ K entries, so it cannot be in the top K.
- Feature Choice (column j keeps its top m_j): on the CPU, a threshold t_j per column from
  the first r tokens of the batch gives candidates {P[:, j] ≥ t_j} in one pass over P (no
  transposed copy of P); the same argument makes the top-m_j of the candidates exact wherever
  a column has ≥ m_j of them, and the few other columns are selected exactly on their own. On
  a GPU (or for small P), features are grouped into O(log B) buckets of similar capacity and
  each bucket runs one ``topk`` over tokens with its largest m, then keeps rank < m_j.
- The auxiliary losses select on the (few) dead or underutilised columns only; when that
  selection is dense (e.g. top-256 of 400 dead features), a dense product on the column subset
  beats any gather, and ``sparse_aux_loss`` switches to it (``_SubsetReconstruct``).

Every function is device-agnostic; under bf16 autocast the dense product runs in bf16 and the
sparse parts in the weights' dtype.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F_
from torch import Tensor

from .losses import deficit_capacities

# A selection of density above this (selected / (B · columns involved)) is reconstructed by a
# dense product on the column subset rather than by gathers. On a 2-core CPU (B=4096, d=512,
# F=8192, aux_k on 432 or 2048 features) the two cost the same at a density of about 0.15;
# the GPU value is a guess (dense products are relatively cheaper there), not a measurement.
DENSE_SUBSET_DENSITY = {"cpu": 0.15, "cuda": 0.05}

# Feature Choice: below this many entries P is simply transposed; above, thresholds from the
# first _FC_SAMPLE_ROWS tokens select candidates in one pass (no B×F copy).
_FC_SMALL = 1 << 20
_FC_SAMPLE_ROWS = 1024

# Threshold passes (Mutual and Feature Choice) compare P in blocks of this many entries.
_MASK_BLOCK = 1 << 22

# Mutual Choice threshold search: sample size and safety margin in standard deviations.
_MC_SAMPLE = 1 << 16
_MC_MARGIN_SD = 4.0


class Workspace:
    """Reusable buffers for the large per-step tensors (the B×F affinities and selection masks).

    On a CPU, allocating a fresh 100+ MB tensor each step costs page faults comparable to a
    third of the dense product; a training loop keeps one Workspace and reuses its buffers.
    A buffer handed out is overwritten by the next call with the same name."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.shape != torch.Size(shape)
            or buf.dtype != dtype
            or buf.device != torch.device(device)
        ):
            self._bufs.pop(name, None)  # free before allocating the replacement
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf

    def clear(self) -> None:
        self._bufs.clear()


def _autocast_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


@torch.no_grad()
def affinities(
    x_s: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    ws: Workspace | None = None,
    layout: Literal["token_major", "feature_major"] = "token_major",
) -> Tensor:
    """P = (x_s − b_dec) W_enc + b_enc, (B, F), without autograd: the one dense product.

    ``layout="feature_major"`` computes the same matrix into an (F, B) buffer and returns its
    transpose (a (B, F) view, contiguous along tokens), which is what per-feature selection
    (Feature Choice) reads fastest. Under autocast the product runs in the autocast dtype."""
    dtype = _autocast_dtype(x_s.device, W_enc.dtype)
    B, F = x_s.shape[0], W_enc.shape[1]
    xc = (x_s - b_dec).to(dtype)
    W, b = W_enc.to(dtype), b_enc.to(dtype)
    with torch.autocast(x_s.device.type, enabled=False):
        if layout == "token_major":
            out = ws.get("P", (B, F), dtype, x_s.device) if ws is not None else None
            return torch.addmm(b, xc, W, out=out) if out is not None else torch.addmm(b, xc, W)
        if layout == "feature_major":
            out = ws.get("P", (F, B), dtype, x_s.device) if ws is not None else None
            bT = b.unsqueeze(1)
            PT = torch.addmm(bT, W.t(), xc.t(), out=out) if out is not None else None
            if PT is None:
                PT = torch.addmm(bT, W.t(), xc.t())
            return PT.t()
    raise ValueError(f"layout={layout!r} is not known; use 'token_major' or 'feature_major'.")


def values_at(P: Tensor, flat_idx: Tensor) -> Tensor:
    """P at the flat indices b·F + f, for any memory layout of P (never copies P)."""
    F = P.shape[1]
    if P.is_contiguous():
        return P.reshape(-1)[flat_idx]
    rows = torch.div(flat_idx, F, rounding_mode="floor")
    return P[rows, flat_idx - rows * F]


# ----- selection ---------------------------------------------------------------------------------
def _sorted(idx: Tensor) -> Tensor:
    return idx if idx.numel() < 2 or bool((idx[1:] >= idx[:-1]).all()) else idx.sort().values


def select_topk(P: Tensor, k: int) -> Tensor:
    """Each row's top-k entries: flat indices (B·k,) int64, ascending."""
    B, F = P.shape
    k = int(k)
    if not 0 < k <= F:
        raise ValueError(f"topk needs 0 < k <= F, got k={k}, F={F}.")
    cols = P.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k)
    return (cols + torch.arange(B, device=P.device).unsqueeze(1) * F).reshape(-1)


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


def _ge_nonzero(X: Tensor, t: Tensor, ws: Workspace | None) -> Tensor:
    """Flat indices (row-major) of the entries of a contiguous (R, C) matrix with X >= t (t a
    scalar or (C,)), ascending. Blocks of rows through a small reused mask, so no R×C mask
    is ever held."""
    R, C = X.shape
    # one block on a GPU: memory is plentiful there and every block is another launch
    h = R if X.device.type != "cpu" else max(1, min(R, _MASK_BLOCK // max(1, C)))
    if ws is not None:
        buf = ws.get("ge_mask", (h * C,), torch.bool, X.device)
    else:
        buf = torch.empty(h * C, dtype=torch.bool, device=X.device)
    out = []
    for r0 in range(0, R, h):
        r1 = min(R, r0 + h)
        m = buf[: (r1 - r0) * C].view(r1 - r0, C)
        torch.ge(X[r0:r1], t, out=m)
        out.append(m.view(-1).nonzero().squeeze(1) + r0 * C)
    return torch.cat(out) if len(out) > 1 else out[0]


@torch.no_grad()
def select_mutual_choice(P: Tensor, budget: int, ws: Workspace | None = None) -> Tensor:
    """The ``budget`` largest entries of the whole (B, F) matrix: flat indices, ascending.

    A threshold from a strided sample bounds the candidates; the count is checked, so the
    result is the exact top-K (see the module docstring), whatever the sample."""
    B, F = P.shape
    n, K = B * F, int(budget)
    if not 0 < K <= n:
        raise ValueError(f"mutual_choice needs 0 < budget <= B*F = {n}, got {K}.")
    flat, fmajor = _flat_storage(P)
    if n <= 4 * _MC_SAMPLE or K * 8 > n:  # small or dense: a plain topk is as fast
        idx = flat.topk(K, sorted=False).indices
    else:
        stride = _coprime_stride(n, _MC_SAMPLE, F, B)
        sample = flat[::stride]
        s = sample.numel()
        mean = K / n * s
        r = min(s, int(math.ceil(mean + _MC_MARGIN_SD * math.sqrt(mean) + 8)))
        idx = None
        rows_of_storage = F if fmajor else B
        while idx is None:
            t = sample.topk(r, sorted=False).values.min()
            cand = _ge_nonzero(flat.view(rows_of_storage, -1), t, ws)
            if cand.numel() >= K:
                top = flat[cand].topk(K, sorted=False).indices
                keep = torch.zeros(cand.numel(), dtype=torch.bool, device=P.device)
                keep[top] = True
                idx = cand[keep]  # ascending
            elif r == s:  # the whole sample was not enough (heavy ties or NaN): sort it all
                idx = flat.topk(K, sorted=False).indices
            else:
                r = min(s, 4 * r)
    if fmajor:  # f·B + b -> b·F + f
        f = torch.div(idx, B, rounding_mode="floor")
        idx = (idx - f * B) * F + f
    return _sorted(idx)


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
    r = min(B, _FC_SAMPLE_ROWS)
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
        cand = _ge_nonzero(P, t, ws)
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
        start = _exclusive_cumsum(torch.bincount(cols_s, minlength=F))
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
        raise ValueError(f"capacities must be (F,)={F} integers in [0, B={B}].")
    if P.t().is_contiguous():
        idx = _fc_topk(P.t(), torch.arange(F, device=P.device), caps_h, F)
    elif B * F <= _FC_SMALL or P.device.type != "cpu":  # a GPU transposes P in microseconds
        idx = _fc_topk(P.t().contiguous(), torch.arange(F, device=P.device), caps_h, F)
    else:
        idx = _fc_threshold(P if P.is_contiguous() else P.contiguous(), caps_h, ws)
    return idx.sort().values


def select(sae, P: Tensor, ws: Workspace | None = None) -> Tensor:
    """The fast twin of ``SparseAutoencoder.select``: the training rule's flat indices."""
    from .config import FEATURE_CHOICE_RULES, MUTUAL_CHOICE_RULES

    cfg, B = sae.cfg, P.shape[0]
    if cfg.sparsifier == "topk":
        return select_topk(P, int(cfg.k))
    if cfg.sparsifier in MUTUAL_CHOICE_RULES:
        return select_mutual_choice(P, max(1, cfg.budget(B)), ws)
    if cfg.sparsifier in FEATURE_CHOICE_RULES:
        return select_feature_choice(P, sae.capacities_for(B), ws)
    return sae.select(P)


# ----- the sparse reconstruction kernel ------------------------------------------------------------
class SparseReconstruction(NamedTuple):
    x_hat: Tensor
    """(B, d) reconstruction Σ_i v_i W_dec[f_i] (+ b_dec), in the scaled input space."""
    values: Tensor
    """(K,) ReLU(P) at the selected entries, in the order of ``flat_idx`` (differentiable)."""


def _exclusive_cumsum(counts: Tensor) -> Tensor:
    off = torch.zeros_like(counts)
    if counts.numel() > 1:
        torch.cumsum(counts[:-1], 0, out=off[1:])
    return off


def _sampled_dots(gx: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor, row_counts: Tensor):
    """g_i = ⟨gx[rows_i], W_dec[cols_i]⟩ for rows sorted ascending (SDDMM), (K,)."""
    K = rows.numel()
    if K == 0:
        return gx.new_zeros(0)
    if gx.device.type == "cpu" and gx.dtype in (torch.float32, torch.float64):
        crow = torch.zeros(gx.shape[0] + 1, dtype=torch.long, device=gx.device)
        torch.cumsum(row_counts, 0, out=crow[1:])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow,
                cols,
                gx.new_zeros(K),
                size=(gx.shape[0], W_dec.shape[0]),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, gx, W_dec.t(), beta=0.0).values()
    out = gx.new_empty(K)
    chunk = max(1, (1 << 24) // max(1, gx.shape[1]))
    for s in range(0, K, chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        out[s : s + chunk] = (gx.index_select(0, r) * W_dec.index_select(0, c)).sum(1)
    return out


def _bag(indices: Tensor, weight: Tensor, offsets: Tensor, psw: Tensor) -> Tensor:
    """Σ over each bag of psw_i · weight[indices_i] (an embedding_bag without autograd)."""
    return F_.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=psw)


class _SparseReconstruct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, W_enc, b_enc, W_dec, b_dec, P, idx, rows, cols, decoder_bias):
        B = x_s.shape[0]
        wdt = W_dec.dtype
        if P is not None:
            pre = values_at(P, idx).to(wdt)  # (K,)
        else:  # recompute the affinities at the selected entries only
            xc = (x_s - b_dec).to(wdt)
            WeT = W_enc.t().contiguous()
            rc = torch.bincount(rows, minlength=B)
            pre = _sampled_dots(xc, WeT, rows, cols, rc) + b_enc.to(wdt)[cols]
        vals = pre.clamp_min(0)
        row_counts = torch.bincount(rows, minlength=B)
        x_hat = _bag(cols, W_dec, _exclusive_cumsum(row_counts), vals)  # (B, d)
        if decoder_bias:
            x_hat = x_hat + b_dec.to(wdt)
        ctx.decoder_bias = decoder_bias
        ctx.save_for_backward(x_s, W_enc, W_dec, b_dec, rows, cols, vals, pre > 0, row_counts)
        return x_hat, vals

    @staticmethod
    def backward(ctx, g_xhat, g_vals):
        x_s, W_enc, W_dec, b_dec, rows, cols, vals, active, row_counts = ctx.saved_tensors
        B, F = x_s.shape[0], W_dec.shape[0]
        wdt = W_dec.dtype
        need = ctx.needs_input_grad
        if g_xhat is None:
            g_xhat = torch.zeros(B, W_dec.shape[1], dtype=wdt, device=x_s.device)
        gx = g_xhat.to(wdt).contiguous()
        g = _sampled_dots(gx, W_dec, rows, cols, row_counts)  # ∂L/∂v, (K,)
        if g_vals is not None:
            g = g + g_vals.to(wdt)
        gP = g * active  # ∂L/∂P at the selected entries
        # group by feature: entries sorted by (col, row)
        perm = torch.argsort(cols * B + rows)
        rows_c = rows[perm]
        col_off = _exclusive_cumsum(torch.bincount(cols, minlength=F))
        xc = (x_s - b_dec).to(wdt)
        dW_enc = dW_dec = db_enc = db_dec = dx = None
        if need[3]:
            dW_dec = _bag(rows_c, gx, col_off, vals[perm])  # (F, d)
        if need[1]:
            dW_enc = _bag(rows_c, xc, col_off, gP[perm]).t()  # (d, F)
        db = torch.zeros(F, dtype=wdt, device=x_s.device).index_add_(0, cols, gP)
        if need[2]:
            db_enc = db
        if need[4]:
            db_dec = -(W_enc.to(wdt) @ db)
            if ctx.decoder_bias:
                db_dec = db_dec + gx.sum(0)
        if need[0]:
            dx = _bag(cols, W_enc.t().contiguous(), _exclusive_cumsum(row_counts), gP)
        return dx, dW_enc, db_enc, dW_dec, db_dec, None, None, None, None, None


def sparse_reconstruct(
    x_s: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    flat_idx: Tensor,
    P: Tensor | None = None,
    decoder_bias: bool = True,
) -> SparseReconstruction:
    """x̂ = Σ_selected ReLU(P) W_dec (+ b_dec) with an O(K·d) backward (module docstring).

    Args:
        x_s: (B, d) scaled inputs. W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,).
        flat_idx: (K,) int64 flat indices b·F + f of the selected entries, any order, no repeats.
        P: the affinities (B, F) computed without grad (``affinities``), any layout; values
            are gathered from it. None recomputes them at the selected entries (O(K·d)).
        decoder_bias: add b_dec to the output (False for the auxiliary reconstructions ê,
            whose gradient still reaches b_dec through P).

    Gradients reach x_s (if it requires grad), W_enc, b_enc, W_dec and b_dec exactly as the
    dense path ``codes_from_indices(P(x_s), flat_idx) @ W_dec + b_dec`` would give them."""
    B, F = x_s.shape[0], W_dec.shape[0]
    if P is not None and tuple(P.shape) != (B, F):
        raise ValueError(f"P has shape {tuple(P.shape)}, expected (B, F) = ({B}, {F}).")
    idx = flat_idx.to(x_s.device, torch.long)
    inv = None
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        idx, order = idx.sort()
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
    rows = torch.div(idx, F, rounding_mode="floor")
    cols = idx - rows * F
    P_d = P.detach() if P is not None else None
    with torch.autocast(x_s.device.type, enabled=False):
        x_hat, vals = _SparseReconstruct.apply(
            x_s, W_enc, b_enc, W_dec, b_dec, P_d, idx, rows, cols, decoder_bias
        )
    if inv is not None:
        vals = vals[inv]
    return SparseReconstruction(x_hat, vals)


# ----- dense product on a column subset (dense auxiliary selections) --------------------------------
class _SubsetReconstruct(torch.autograd.Function):
    """ê = (M ⊙ ReLU(P[:, S])) W_dec[S] (+ b_dec) for a column subset S with a dense mask M."""

    @staticmethod
    def forward(ctx, x_s, W_enc, b_enc, W_dec, b_dec, P_sub, feats, mask, decoder_bias):
        wdt = W_dec.dtype
        P_sub = P_sub.to(wdt)
        codes = P_sub.clamp_min(0) * mask  # (B, n)
        Wd = W_dec.index_select(0, feats)  # (n, d)
        x_hat = codes @ Wd
        if decoder_bias:
            x_hat = x_hat + b_dec.to(wdt)
        ctx.decoder_bias = decoder_bias
        ctx.save_for_backward(x_s, W_enc, b_dec, Wd, feats, codes, mask & (P_sub > 0))
        ctx.F = W_dec.shape[0]
        return x_hat

    @staticmethod
    def backward(ctx, g_xhat):
        x_s, W_enc, b_dec, Wd, feats, codes, active = ctx.saved_tensors
        F, wdt, need = ctx.F, Wd.dtype, ctx.needs_input_grad
        gx = g_xhat.to(wdt)
        gP = (gx @ Wd.t()) * active  # (B, n)
        dx = dW_enc = db_enc = dW_dec = db_dec = None
        if need[3]:
            dW_dec = torch.zeros(F, Wd.shape[1], dtype=wdt, device=gx.device)
            dW_dec[feats] = codes.t() @ gx
        We = W_enc.index_select(1, feats).to(wdt)  # (d, n)
        if need[1]:
            dW_enc = torch.zeros_like(W_enc, dtype=wdt)
            dW_enc[:, feats] = (x_s - b_dec).to(wdt).t() @ gP
        colsum = gP.sum(0)
        if need[2]:
            db_enc = torch.zeros(F, dtype=wdt, device=gx.device)
            db_enc[feats] = colsum
        if need[4]:
            db_dec = -(We @ colsum)
            if ctx.decoder_bias:
                db_dec = db_dec + gx.sum(0)
        if need[0]:
            dx = gP @ We.t()
        return dx, dW_enc, db_enc, dW_dec, db_dec, None, None, None, None


def _topk_local(P_sub: Tensor, k: int) -> Tensor:
    """Flat (B·k,) indices into a column subset (B, n) of each row's top-k (rows ascending)."""
    B, n = P_sub.shape
    k = min(int(k), n)
    if k == n:
        return torch.arange(B * n, device=P_sub.device)
    cols = P_sub.topk(k, dim=1, sorted=False).indices  # (B, k)
    return (cols + torch.arange(B, device=P_sub.device).unsqueeze(1) * n).reshape(-1)


@torch.no_grad()
def aux_selection(
    P: Tensor,
    feature_mask: Tensor,
    allocation: Literal["deficit", "topk"],
    k_aux: int | None,
    deficits: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The auxiliary losses' selection restricted to a feature set (``losses._aux_codes``).

    Returns (feats (n,), P_sub (B, n), local flat indices into P_sub)."""
    B = P.shape[0]
    feats = feature_mask.nonzero().squeeze(1)
    P_sub = P.index_select(1, feats)  # (B, n)
    if allocation == "topk":
        if k_aux is None or k_aux < 1:
            raise ValueError(f"topk allocation needs k_aux >= 1, got {k_aux}.")
        local = _topk_local(P_sub, k_aux)
    elif allocation == "deficit":
        if deficits is None:
            raise ValueError("deficit allocation needs `deficits` (γ·ρ* − ρ per feature).")
        caps = deficit_capacities(deficits[feats], B)
        local = select_feature_choice(P_sub, caps)
    else:
        raise ValueError(f"allocation={allocation!r} is not known; use 'deficit' or 'topk'.")
    return feats, P_sub, local


def sparse_aux_loss(
    residual: Tensor,
    x_s: Tensor,
    P: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    feature_mask: Tensor,
    allocation: Literal["deficit", "topk"] = "topk",
    k_aux: int | None = None,
    deficits: Tensor | None = None,
    density_threshold: float | None = None,
) -> Tensor:
    """The fast twin of ``losses.aux_reconstruction_loss`` (aux_k and aux_zipf).

    ê = codes_aux W_dec (no bias) with codes_aux = ReLU(P) at the auxiliary selection on the
    masked features; L = Σ‖e − ê‖² / Σ‖e − ē‖² with e the detached residual. Gradients reach
    W_enc, b_enc, b_dec through P and W_dec through ê. Sparse gathers when the selection is
    sparse, a dense product on the column subset when it is dense (``DENSE_SUBSET_DENSITY``)."""
    if feature_mask.dtype != torch.bool or feature_mask.shape != (P.shape[1],):
        raise ValueError(
            f"feature_mask must be a bool tensor of shape ({P.shape[1]},), got "
            f"{feature_mask.dtype} {tuple(feature_mask.shape)}."
        )
    if not bool(feature_mask.any()):
        return x_s.new_zeros(())
    B, F = P.shape
    e = residual.detach()
    feats, P_sub, local = aux_selection(P, feature_mask, allocation, k_aux, deficits)
    n = feats.numel()
    if density_threshold is None:
        density_threshold = DENSE_SUBSET_DENSITY.get(P.device.type, 0.15)
    with torch.autocast(x_s.device.type, enabled=False):
        if local.numel() >= density_threshold * B * n:
            mask = torch.zeros(B * n, dtype=torch.bool, device=P.device)
            mask[local] = True
            e_hat = _SubsetReconstruct.apply(
                x_s, W_enc, b_enc, W_dec, b_dec, P_sub, feats, mask.view(B, n), False
            )
        else:
            r = torch.div(local, n, rounding_mode="floor")
            flat = r * F + feats[local - r * n]
            e_hat = sparse_reconstruct(x_s, W_enc, b_enc, W_dec, b_dec, flat, P, False).x_hat
    e = e.to(e_hat.dtype)
    return (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


__all__ = [
    "Workspace",
    "affinities",
    "values_at",
    "select_topk",
    "select_mutual_choice",
    "select_feature_choice",
    "select",
    "SparseReconstruction",
    "sparse_reconstruct",
    "aux_selection",
    "sparse_aux_loss",
    "DENSE_SUBSET_DENSITY",
]
