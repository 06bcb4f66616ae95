r"""Losses (DESIGN §5). Functions of tensors; no hidden state.

NMSE        Σ‖x − x̂‖² / Σ‖x − x̄‖²          (fraction of variance unexplained, x̄ the batch mean)
L1          mean over tokens of Σ_j z_j·‖W_dec,j‖                         (the ReLU+L1 baseline)
aux         e = x − x̂ (detached); ê = ReLU(P) at an auxiliary selection on a feature set S,
            times W_dec[S] (no bias); L = Σ‖e − ê‖² / Σ‖e − ē‖², 0 when S is empty.
  aux_k     S = the dead set D, top-k_aux of S per token                  (Gao et al. 2024)
  aux_zipf  S = the underutilised set U ⊇ D, with ``deficit`` allocation (feature j ∈ U chooses
            its top-⌈B·deficit_j⌉ tokens of P[:, j]) or ``topk`` allocation (top-k_aux of U per
            token). With ``topk`` and U = D it is aux_k.

The auxiliary reconstruction runs through the sparse kernel (``sparse_ops``) when the selection
is sparse and as a dense product on the column subset when it is dense.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from .rules.feature_choice import select_feature_choice
from .selection_kernels import row_topk_columns
from .sparse_ops import DENSE_SUBSET_DENSITY, sparse_reconstruct, subset_reconstruct

_EPS = 1e-12
Allocation = Literal["deficit", "topk"]


class SAEParameters(Protocol):
    W_enc: Tensor  # (d, F)
    b_enc: Tensor  # (F,)
    W_dec: Tensor  # (F, d)
    b_dec: Tensor  # (d,)


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (x̄ the batch mean); scalar."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape.")
    x2 = x.reshape(-1, x.shape[-1])
    err = (x2 - x_hat.reshape(x2.shape)).pow(2).sum()
    var = (x2 - x2.mean(0, keepdim=True)).pow(2).sum()
    return err / var.clamp_min(_EPS)


@torch.no_grad()
def normalized_mse_and_grad(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(``normalized_mse(x, x_hat)``, its gradient with respect to x_hat: −2 (x − x̂) / Σ‖x − x̄‖²)."""
    var = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(_EPS)
    e = x - x_hat
    return e.pow(2).sum() / var, e.mul(-2.0 / var)


def l1_penalty(codes: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over tokens of Σ_j z_j·‖W_dec,j‖ (the ReLU+L1 baseline's sparsity term)."""
    return (codes * W_dec.norm(dim=1)).sum(-1).mean()


@torch.no_grad()
def l1_penalty_and_grads(
    code_sums: Tensor, batch_size: int, W_dec: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(``l1_penalty``, its gradient with respect to codes as an (F,) row every token shares,
    with respect to W_dec), from the codes' per-feature sums Σ_b z_bj over the batch (the
    penalty is linear in the codes): ‖W_dec,j‖ / B and (Σ_b z_bj / B) · W_dec,j / ‖W_dec,j‖."""
    B, col = batch_size, code_sums
    norms = W_dec.norm(dim=1)
    return (col * norms).sum() / B, norms / B, W_dec * (col / (B * norms)).unsqueeze(1)


def deficit_capacities(deficits: Tensor, batch_size: int) -> Tensor:
    """aux_zipf's ``deficit`` allocation: feature j may choose ⌈B·deficit_j⌉ tokens, in [1, B]."""
    return torch.ceil(batch_size * deficits.double()).long().clamp(1, batch_size)


def _topk_local(P_sub: Tensor, k: int) -> Tensor:
    """Flat (B·k,) indices into a column subset (B, n) of each row's top-k (rows ascending)."""
    B, n = P_sub.shape
    k = min(int(k), n)
    if k == n:
        return torch.arange(B * n, device=P_sub.device)
    cols = row_topk_columns(P_sub, k)  # (B, k)
    return (cols + torch.arange(B, device=P_sub.device).unsqueeze(1) * n).reshape(-1)


@torch.no_grad()
def aux_selection(
    P: Tensor,
    feature_mask: Tensor,
    allocation: Allocation,
    k_aux: int | None = None,
    deficits: Tensor | None = None,
    comm=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The auxiliary selection restricted to the features of ``feature_mask`` (under data
    parallelism, ``comm``: the deficit allocation chooses over all ranks' tokens).

    Returns (feats (n,), P_sub = P[:, feats] (B, n), flat indices into P_sub)."""
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
        world = 1 if comm is None else comm.world
        caps = deficit_capacities(deficits[feats], B * world)
        if world == 1:
            local = select_feature_choice(P_sub, caps)
        else:
            from .distributed import select_columns_global

            local = select_columns_global(P_sub.contiguous(), caps, comm)
    else:
        raise ValueError(f"allocation={allocation!r} is not known; use 'deficit' or 'topk'.")
    return feats, P_sub, local


def aux_sparse_entries(
    P: Tensor, feats: Tensor, local: Tensor, density_threshold: float | None = None
) -> Tensor | None:
    """An auxiliary selection (``aux_selection``'s feats and local indices into P[:, feats]) as
    flat indices b·F + f into P (B, F); None where it is dense enough (``density_threshold``,
    default ``DENSE_SUBSET_DENSITY``) for the product on the column subset instead."""
    B, F = P.shape
    n = feats.numel()
    if density_threshold is None:
        density_threshold = DENSE_SUBSET_DENSITY.get(P.device.type, 0.15)
    if local.numel() >= density_threshold * B * n:
        return None
    r = torch.div(local, n, rounding_mode="floor")
    return r * F + feats[local - r * n]


def aux_loss(
    residual: Tensor,
    x_s: Tensor,
    P: Tensor,
    sae: SAEParameters,
    feature_mask: Tensor,
    allocation: Allocation = "topk",
    k_aux: int | None = None,
    deficits: Tensor | None = None,
    density_threshold: float | None = None,
    comm=None,
    selection: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Normalised error of reconstructing the detached residual from the masked features
    (``selection``: ``aux_selection``'s result, where the caller has it already).

    ``x_s`` (B, d) scaled inputs and ``P`` (B, F) their affinities (no grad needed: the gradient
    reaches W_enc, b_enc and b_dec through the kernel's own backward, W_dec through ê). Under
    data parallelism (``comm``) the normaliser is over all ranks' residuals, so the losses of
    the ranks add up to the loss of the global batch."""
    if feature_mask.dtype != torch.bool or feature_mask.shape != (P.shape[1],):
        raise ValueError(
            f"feature_mask must be a bool tensor of shape ({P.shape[1]},), got "
            f"{feature_mask.dtype} {tuple(feature_mask.shape)}."
        )
    world = 1 if comm is None else comm.world
    if not bool(feature_mask.any()):  # the mask is the same on every rank
        return x_s.new_zeros(())
    B = P.shape[0]
    e = residual.detach()
    P = P.detach()
    if selection is None:
        selection = aux_selection(P, feature_mask, allocation, k_aux, deficits, comm)
    feats, P_sub, local = selection
    n = feats.numel()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    flat = aux_sparse_entries(P, feats, local, density_threshold)
    if flat is None:
        mask = torch.zeros(B * n, dtype=torch.bool, device=P.device)
        mask[local] = True
        e_hat = subset_reconstruct(x_s, *params, P_sub, feats, mask.view(B, n), False)
    else:
        e_hat = sparse_reconstruct(x_s, *params, flat, P, False).x_hat
    e = e.to(e_hat.dtype)
    if world > 1:
        from .distributed import global_variance

        return (e - e_hat).pow(2).sum() / global_variance(e, comm).clamp_min(_EPS)
    return (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(_EPS)


def aux_k_loss(residual, x_s, P, sae: SAEParameters, dead_mask: Tensor, k_aux: int) -> Tensor:
    """OpenAI's aux_k_loss: reconstruct the residual from the top-k_aux dead features per token."""
    return aux_loss(residual, x_s, P, sae, dead_mask, "topk", k_aux=k_aux)


def aux_zipf_loss(
    residual,
    x_s,
    P,
    sae: SAEParameters,
    underutilised_mask: Tensor,
    allocation: Allocation = "deficit",
    *,
    deficits: Tensor | None = None,
    k_aux: int | None = None,
) -> Tensor:
    """aux_zipf_loss: aux_k generalised to dead and underutilised features (DESIGN §5)."""
    return aux_loss(
        residual, x_s, P, sae, underutilised_mask, allocation, k_aux=k_aux, deficits=deficits
    )


__all__ = [
    "normalized_mse",
    "normalized_mse_and_grad",
    "l1_penalty",
    "l1_penalty_and_grads",
    "deficit_capacities",
    "aux_selection",
    "aux_sparse_entries",
    "aux_loss",
    "aux_k_loss",
    "aux_zipf_loss",
]
