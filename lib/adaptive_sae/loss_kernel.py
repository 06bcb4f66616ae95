r"""The reconstruction loss of a sparse step and its gradient in one compiled pass (CPU, numba).

At the suite's own sizes (d=64, F=512, B=1024) the sparse reconstruction, the normalised MSE
and their backward through autograd (``sparse_ops.sparse_reconstruct``) run some 40 small
PyTorch operations, about three dense products of time for K·d = 0.5 M multiply-adds. Their
gradient has a closed form (``sparse_ops``' module docstring), which one kernel computes:

    x̂_b = b_dec + Σ_{i: b_i = b} v_i W_dec[f_i],   v_i = ReLU(P[b_i, f_i])
    L = Σ ‖x_s − x̂‖² / Σ ‖x_s − x̄‖²                 (``losses.normalized_mse``)
    ∂L/∂x̂ = −2 (x_s − x̂) / Σ ‖x_s − x̄‖²,   then ∂W_dec, ∂W_enc, ∂b_enc, ∂b_dec as there.

The sums run in another order than torch's, so the result equals the autograd path's to float
tolerance, not bit for bit (``tests/test_loss_kernel.py`` checks it against the dense
autograd oracle). It applies on a CPU in float32 or float64, in one process, without autocast,
up to ``MAX_WORK`` multiply-adds a pass: to a sparse rule's main loss, to the auxiliary
losses' sparse selections (their gradients added to the main loss's), and to ReLU+L1 once few
of its codes are active (the entries P > 0, with the L1 penalty's gradient per code).
``ADAPTIVE_SAE_KERNELS=0`` turns it off with the selection kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import selection_kernels

_compiled = None
_NO_COUNTS = torch.zeros(0, dtype=torch.int64)
_NO_WEIGHTS = {dt: torch.zeros(0, dtype=dt) for dt in (torch.float32, torch.float64)}

MAX_WORK = 1 << 21
"""The kernel runs where K·d (selected entries × d_in) is at most this. It is one thread and
scatters into rows of the F×d gradients; torch's grouped products use every thread and stay in
cache as F·d grows. Measured (``bench/README.md``, loss kernel): 2.3× faster at K·d = 0.5 M
(B=1024, d=64, k=8), even at about 2 M, 0.3-0.6× from 8 M up."""


def _dot(a, b):  # pragma: no cover - compiled (with fastmath: the sum vectorises)
    s = a[0] * 0
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


def _row_of(flat, r, F):  # pragma: no cover - compiled
    """flat // F, from the previous entry's row r: without a division while entries ascend."""
    if flat < r * F or flat >= (r + 2) * F:
        return flat // F
    return r + 1 if flat >= (r + 1) * F else r


def _nmse_grads(x, xe, P, idx, W_encT, W_dec, b_dec, bias, x_hat, gx, gWencT, gb_enc, gW_dec,
                gb_dec, eps, counts, weights):  # fmt: skip
    # pragma: no cover - compiled
    """x: the target; xe: the encoder's input (x too, but for the auxiliary loss, whose target
    is the residual); bias: whether x̂ includes b_dec; counts: (F + B,) where the matches (the
    entries with P > 0) are counted by feature then by token, or (0,) for none; weights: (F,)
    added to the gradient of each active code of feature f (a penalty Σ w_f z_bf), or (0,)."""
    B, d = x.shape
    F = W_dec.shape[0]
    for b in range(B):
        for j in range(d):
            x_hat[b, j] = b_dec[j] if bias else 0.0
    r = 0
    for i in range(idx.shape[0]):
        r = _row_of(idx[i], r, F)
        c = idx[i] - r * F
        v = P[r, c]
        if not v <= 0:  # NaN included: it must reach the loss, whose check stops training
            for j in range(d):
                x_hat[r, j] += v * W_dec[c, j]
    # per-column sums in float64 (a loop over columns vectorises; one accumulator would not)
    mean = np.zeros(d, np.float64)
    for b in range(B):
        for j in range(d):
            mean[j] += x[b, j]
    for j in range(d):
        mean[j] /= B
    var_j = np.zeros(d, np.float64)
    err_j = np.zeros(d, np.float64)
    for b in range(B):
        for j in range(d):
            dv = x[b, j] - mean[j]
            var_j[j] += dv * dv
            e = np.float64(x[b, j] - x_hat[b, j])
            err_j[j] += e * e
    var = max(var_j.sum(), eps)
    err = err_j.sum()
    scale = x.dtype.type(-2.0 / var)
    for j in range(d):
        gb_dec[j] = 0.0
    for b in range(B):
        for j in range(d):
            g = scale * (x[b, j] - x_hat[b, j])
            gx[b, j] = g
            if bias:
                gb_dec[j] += g
    for f in range(F):
        gb_enc[f] = 0.0
        for j in range(d):
            gW_dec[f, j] = 0.0
            gWencT[f, j] = 0.0
    r = 0
    for i in range(idx.shape[0]):
        r = _row_of(idx[i], r, F)
        c = idx[i] - r * F
        v = P[r, c]
        if not v <= 0:  # an inactive entry (P <= 0) has value 0 and no gradient
            if counts.shape[0] and v > 0:
                counts[c] += 1
                counts[F + r] += 1
            g = _dot(gx[r], W_dec[c])
            if weights.shape[0]:
                g += weights[c]
            gb_enc[c] += g
            for j in range(d):
                gW_dec[c, j] += v * gx[r, j]
                gWencT[c, j] += g * (xe[r, j] - b_dec[j])
    # the encoder reads x − b_dec: b_dec's gradient through it, −W_enc ∂b_enc
    for f in range(F):
        for j in range(d):
            gb_dec[j] -= W_encT[f, j] * gb_enc[f]
    return err / var


def _kernel():
    global _compiled, _dot, _row_of
    if _compiled is None and selection_kernels.numba_available():
        _dot = selection_kernels.jit(_dot, fastmath=True)
        _row_of = selection_kernels.jit(_row_of)
        _compiled = selection_kernels.jit(_nmse_grads)
    return _compiled


def applies(W_enc: Tensor, work: float) -> bool:
    """Whether the kernel takes a step of ``work`` = K·d multiply-adds (at most ``MAX_WORK``)
    for an SAE with these weights: kernels on and numba present, a CPU tensor in float32 or
    float64, no autocast (the affinities and batch are then too)."""
    return (
        selection_kernels.use_kernels
        and work <= MAX_WORK
        and W_enc.device.type == "cpu"
        and W_enc.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and selection_kernels.numba_available()
    )


@torch.no_grad()
def nmse_and_grads(
    x_s: Tensor,
    P: Tensor,
    flat_idx: Tensor,
    W_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    eps: float = 1e-12,
    out: dict[str, Tensor] | None = None,
    target: Tensor | None = None,
    decoder_bias: bool = True,
    counts: Tensor | None = None,
    code_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(x̂ (B, d), the normalised MSE (scalar), its gradients {"W_enc", "b_enc", "W_dec",
    "b_dec"}) of the reconstruction from the entries ``flat_idx`` (b·F + f, any order) of the
    affinities P (B, F) of x_s; the gradients are written into ``out``'s tensors where given (a
    grid's stacked gradients). ``target`` (default x_s) and ``decoder_bias`` give the
    auxiliary losses' form: the residual reconstructed without b_dec (``losses.aux_loss``).
    ``counts`` (F + B,), int64 zeros, receives the matches (selected entries with P > 0) per
    feature, then per token: what the statistics read, without gathering P again.
    ``code_weights`` (F,) adds a penalty linear in the codes, Σ_b Σ_f w_f z_bf (ReLU+L1's), to
    the gradient of each active code (its value and its W_dec gradient are the caller's: they
    need only the codes' per-feature sums). Call where :func:`applies`."""
    kern = _kernel()
    if kern is None:
        raise RuntimeError("the loss kernel needs numba; check applies() first")
    B, d = x_s.shape
    F = W_dec.shape[0]
    dt = P.dtype
    x = x_s.detach().to(dt).contiguous()
    t = x if target is None else target.detach().to(dt).contiguous()
    x_hat = torch.empty(B, d, dtype=dt)
    gx = torch.empty(B, d, dtype=dt)
    g = out or {  # each gradient in its parameter's layout, as the fused optimiser expects
        "W_enc": torch.empty_like(W_enc, dtype=dt),
        "b_enc": torch.empty(F, dtype=dt),
        "W_dec": torch.empty_like(W_dec, dtype=dt),
        "b_dec": torch.empty(d, dtype=dt),
    }
    # ∂W_enc is accumulated by feature: straight into a column-major gradient (an SAE's)
    gWencT = g["W_enc"].t()
    if not gWencT.is_contiguous():
        gWencT = torch.empty(F, d, dtype=dt)
    idx = flat_idx.to(torch.int64).contiguous()
    recon = kern(
        t.numpy(),
        x.numpy(),
        P.detach().numpy(),
        idx.numpy(),
        W_enc.detach().t().numpy(),
        W_dec.detach().contiguous().numpy(),
        b_dec.detach().contiguous().numpy(),
        bool(decoder_bias),
        x_hat.numpy(),
        gx.numpy(),
        gWencT.numpy(),
        g["b_enc"].numpy(),
        g["W_dec"].numpy(),
        g["b_dec"].numpy(),
        float(eps),
        (_NO_COUNTS if counts is None else counts).numpy(),
        (_NO_WEIGHTS[dt] if code_weights is None else code_weights.to(dt).contiguous()).numpy(),
    )
    if gWencT.data_ptr() != g["W_enc"].data_ptr():
        g["W_enc"].copy_(gWencT.t())
    return x_hat, torch.tensor(recon, dtype=dt), g


__all__ = ["applies", "nmse_and_grads"]
