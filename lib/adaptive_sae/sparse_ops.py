r"""Sparse operations of the training step (DESIGN §10): the one dense product and O(K·d) rest.

The dense encoder product P = (x_s − b_dec) W_enc + b_enc (2·B·d·F flops) is the only work a
training step cannot avoid: every affinity must exist before it can be selected. The allocation
rules (``adaptive_sae.rules``) select K entries of P; everything after is proportional to K:

    forward    values v_i = ReLU(P[b_i, f_i])                      gather from P (no grad), O(K)
               x̂_b = Σ_{i: b_i = b} v_i W_dec[f_i] (+ b_dec)       embedding_bag by token, O(K·d)
    backward   g_i = ⟨∂L/∂x̂_{b_i}, W_dec[f_i]⟩                     sampled dot products, O(K·d)
               γ_i = g_i · 1[P[b_i, f_i] > 0]                      ∂L/∂P at the selected entries
               ∂W_dec[f] = Σ_{i: f_i = f} v_i ∂L/∂x̂_{b_i}          embedding_bag by feature, O(K·d)
               ∂W_enc[:, f] = Σ_{i: f_i = f} γ_i (x_s − b_dec)_{b_i}  embedding_bag by feature
               ∂b_enc = Σ_i γ_i e_{f_i};   ∂b_dec = Σ_b ∂L/∂x̂_b − W_enc ∂b_enc   O(K + d·F)

so no dense B×F gradient and no second or third dense product is ever formed. The dense twin
(codes by scatter, autograd) is kept in ``tests/oracles.py``; the tests check values and every
gradient against it for each rule and both auxiliary losses.

When a selection is dense (e.g. the auxiliary loss's top-256 of 400 dead features), a dense
product on the column subset beats any gather: ``subset_reconstruct``. On a CPU, for small
steps, ``loss_kernel`` computes the main loss with the same gradients in one compiled pass.

Every function is device-agnostic; under bf16 autocast the dense product runs in bf16 and the
sparse parts in the weights' dtype.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor

# A selection of density above this (selected / (B · columns involved)) is reconstructed by a
# dense product on the column subset rather than by gathers. On a 2-core CPU (B=4096, d=512,
# F=8192, aux_k on 432 or 2048 features) the two cost the same at a density of about 0.15;
# the GPU value is a guess (dense products are relatively cheaper there), not a measurement.
DENSE_SUBSET_DENSITY = {"cpu": 0.15, "cuda": 0.05}

# Threshold passes (Mutual and Feature Choice) compare P in blocks of this many entries.
_MASK_BLOCK = 1 << 22


class Workspace:
    """Reusable buffers for the large per-step tensors (the B×F affinities and selection masks).

    On a CPU, allocating a fresh 100+ MB tensor each step costs page faults comparable to a
    third of the dense product; a training loop keeps one Workspace and reuses its buffers.
    A buffer handed out is overwritten by the next call with the same name."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self.hints: dict[str, Tensor] = {}
        """Small per-run state of the selections (e.g. the last threshold that bounded Mutual
        Choice's candidates); a hint only speeds a selection up, never changes its result."""

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
        self.hints.clear()


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
        return P.reshape(-1).index_select(0, flat_idx)
    rows = torch.div(flat_idx, F, rounding_mode="floor")
    return P[rows, flat_idx - rows * F]


def entries_at_least(X: Tensor, t: Tensor, ws: Workspace | None) -> Tensor:
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
def sorted_indices(idx: Tensor) -> Tensor:
    """``idx`` in ascending order (no sort when it already is)."""
    return idx if idx.numel() < 2 or bool((idx[1:] >= idx[:-1]).all()) else idx.sort().values


class SparseReconstruction(NamedTuple):
    x_hat: Tensor
    """(B, d) reconstruction Σ_i v_i W_dec[f_i] (+ b_dec), in the scaled input space."""
    values: Tensor
    """(K,) ReLU(P) at the selected entries, in the order of ``flat_idx`` (differentiable)."""


def column_order(cols: Tensor, n_cols: int) -> Tensor:
    """The permutation that sorts ``cols`` stably (entries in row order come out in (column,
    row) order). On a CPU with fewer than 2^16 columns, numpy's radix sort of 16-bit keys: about
    10x faster than a comparison sort of int64 keys at K = 8192, where that sort was a tenth
    of a small SAE's step."""
    if cols.device.type == "cpu" and n_cols <= 1 << 16 and cols.numel() > 0:
        keys = cols.numpy().astype(np.uint16)
        return torch.from_numpy(keys.argsort(kind="stable"))
    return torch.sort(cols, stable=True).indices


def exclusive_cumsum(counts: Tensor) -> Tensor:
    off = torch.zeros_like(counts)
    if counts.numel() > 1:
        torch.cumsum(counts[:-1], 0, out=off[1:])
    return off


def sampled_dots(gx: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor, row_counts: Tensor):
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
            pre = sampled_dots(xc, WeT, rows, cols, rc) + b_enc.to(wdt)[cols]
        vals = pre.clamp_min(0)
        row_counts = torch.bincount(rows, minlength=B)
        x_hat = _bag(cols, W_dec, exclusive_cumsum(row_counts), vals)  # (B, d)
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
        g = sampled_dots(gx, W_dec, rows, cols, row_counts)  # ∂L/∂v, (K,)
        if g_vals is not None:
            g = g + g_vals.to(wdt)
        gP = g * active  # ∂L/∂P at the selected entries
        # group by feature: entries (in row order) sorted stably by column, i.e. by (col, row)
        perm = column_order(cols, F)
        rows_c = rows.index_select(0, perm)
        col_off = exclusive_cumsum(torch.bincount(cols, minlength=F))
        xc = (x_s - b_dec).to(wdt)
        dW_enc = dW_dec = db_enc = db_dec = dx = None
        if need[3]:
            dW_dec = _bag(rows_c, gx, col_off, vals.index_select(0, perm))  # (F, d)
        if need[1]:
            dW_enc = _bag(rows_c, xc, col_off, gP.index_select(0, perm)).t()  # (d, F)
        db = torch.zeros(F, dtype=wdt, device=x_s.device).index_add_(0, cols, gP)
        if need[2]:
            db_enc = db
        if need[4]:
            db_dec = -(W_enc.to(wdt) @ db)
            if ctx.decoder_bias:
                db_dec = db_dec + gx.sum(0)
        if need[0]:
            dx = _bag(cols, W_enc.t().contiguous(), exclusive_cumsum(row_counts), gP)
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
    dense path (codes by scatter, then ``codes @ W_dec + b_dec``) would give them."""
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


# ----- many SAEs of one width at once (adaptive_sae.grid) -------------------------------------------
class _StackedReconstruct(torch.autograd.Function):
    """The kernel above for n SAEs whose parameters are stacked: W_enc (n, d, F), b_enc (n, F),
    W_dec (n, F, d), b_dec (n, d), x_s (n, B, d); entries on global rows s·B + b and global
    features s·F + f. Per entry and per feature the sums run in the order a lone SAE's do."""

    @staticmethod
    def forward(ctx, x_s, W_enc, b_enc, W_dec, b_dec, pre, rows, cols):
        n, B, d = x_s.shape
        F = W_dec.shape[1]
        wdt = W_dec.dtype
        vals = pre.to(wdt).clamp_min(0)
        row_counts = torch.bincount(rows, minlength=n * B)
        x_hat = _bag(cols, W_dec.reshape(n * F, d), exclusive_cumsum(row_counts), vals)
        x_hat = x_hat.view(n, B, d) + b_dec.to(wdt).unsqueeze(1)
        ctx.save_for_backward(x_s, W_enc, W_dec, b_dec, rows, cols, vals, pre > 0, row_counts)
        return x_hat

    @staticmethod
    def backward(ctx, g_xhat):
        x_s, W_enc, W_dec, b_dec, rows, cols, vals, active, row_counts = ctx.saved_tensors
        n, B, d = x_s.shape
        F = W_dec.shape[1]
        wdt = W_dec.dtype
        gx = g_xhat.to(wdt).reshape(n * B, d).contiguous()
        g = sampled_dots(gx, W_dec.reshape(n * F, d), rows, cols, row_counts)
        gP = g * active
        perm = column_order(cols, n * F)  # entries are in row order: (col, row) order
        rows_c = rows.index_select(0, perm)
        col_off = exclusive_cumsum(torch.bincount(cols, minlength=n * F))
        xc = (x_s - b_dec.unsqueeze(1)).to(wdt).reshape(n * B, d)
        dW_dec = _bag(rows_c, gx, col_off, vals.index_select(0, perm)).view(n, F, d)
        dW_enc = _bag(rows_c, xc, col_off, gP.index_select(0, perm)).view(n, F, d)
        dW_enc = dW_enc.transpose(1, 2)
        db = torch.zeros(n * F, dtype=wdt, device=x_s.device).index_add_(0, cols, gP).view(n, F)
        gx3 = gx.view(n, B, d)
        db_dec = torch.stack([gx3[s].sum(0) - W_enc[s].to(wdt) @ db[s] for s in range(n)])
        return None, dW_enc, db, dW_dec, db_dec, None, None, None


def stacked_reconstruct(
    x_s: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    slots: list[int],
    flat_idx: list[Tensor],
    pre: list[Tensor],
) -> Tensor:
    """x̂ (n, B, d) of n SAEs of one width with stacked parameters (W_enc (n, d, F)...):
    SAE ``slots[i]`` reconstructs from its selection ``flat_idx[i]`` (ascending b·F + f) with
    the affinities ``pre[i]`` at those entries; slots not listed have no entry (x̂ = b_dec).
    Gradients reach the stacked W_enc, b_enc, W_dec and b_dec as :func:`sparse_reconstruct`'s
    reach each SAE's own; x_s gets none."""
    n, B, _ = x_s.shape
    F = W_dec.shape[1]
    rows, cols = [], []
    for s, idx in zip(slots, flat_idx):
        r = torch.div(idx, F, rounding_mode="floor")
        rows.append(r + s * B)
        cols.append(idx - r * F + s * F)
    with torch.autocast(x_s.device.type, enabled=False):
        return _StackedReconstruct.apply(
            x_s.detach(),
            W_enc,
            b_enc,
            W_dec,
            b_dec,
            torch.cat(pre).detach(),
            torch.cat(rows),
            torch.cat(cols),
        )


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


def subset_reconstruct(
    x_s: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    P_sub: Tensor,
    feats: Tensor,
    mask: Tensor,
    decoder_bias: bool = False,
) -> Tensor:
    """ê = (mask ⊙ ReLU(P[:, feats])) W_dec[feats] (+ b_dec) by a dense product on the column
    subset, with the same gradients as the dense path (for dense selections)."""
    with torch.autocast(x_s.device.type, enabled=False):
        return _SubsetReconstruct.apply(
            x_s, W_enc, b_enc, W_dec, b_dec, P_sub, feats, mask, decoder_bias
        )


__all__ = [
    "Workspace",
    "affinities",
    "values_at",
    "entries_at_least",
    "sorted_indices",
    "exclusive_cumsum",
    "column_order",
    "SparseReconstruction",
    "sparse_reconstruct",
    "subset_reconstruct",
    "stacked_reconstruct",
    "DENSE_SUBSET_DENSITY",
]
