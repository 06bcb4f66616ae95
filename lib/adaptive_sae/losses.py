r"""Losses (DESIGN §5). Pure functions of tensors; no hidden state.

NMSE        Σ‖x − x̂‖² / Σ‖x − x̄‖²          (fraction of variance unexplained, x̄ the batch mean)
aux_k       e = x − x̂ (detached); ê = TopK_{k_aux}(ReLU(P[:, D])) W_dec[D] (no bias);
            L = Σ‖e − ê‖² / Σ‖e − ē‖², 0 when the dead set D is empty      (Gao et al. 2024)
aux_zipf    the same on the underutilised set U ⊇ D, with ``deficit`` allocation (feature j ∈ U
            chooses its top-⌈B·deficit_j⌉ tokens of P[:, j]) or ``topk`` allocation
            (top-k_aux of U per token). With ``topk`` and U = D it equals aux_k exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import sparsifiers

_EPS = 1e-12


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (x̄ the batch mean); scalar."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape.")
    x2 = x.reshape(-1, x.shape[-1])
    err = (x2 - x_hat.reshape(x2.shape)).pow(2).sum()
    var = (x2 - x2.mean(0, keepdim=True)).pow(2).sum()
    return err / var.clamp_min(_EPS)


def l1_penalty(codes: Tensor, W_dec: Tensor) -> Tensor:
    """Mean over tokens of Σ_j z_j·‖W_dec,j‖ (the ReLU+L1 baseline's sparsity term)."""
    return (codes * W_dec.norm(dim=1)).sum(-1).mean()


def deficit_capacities(deficits: Tensor, batch_size: int) -> Tensor:
    """aux_zipf's ``deficit`` allocation: feature j may choose ⌈B·deficit_j⌉ tokens, in [1, B]."""
    return torch.ceil(batch_size * deficits.double()).long().clamp(1, batch_size)


def _aux_codes(
    pre_acts_sub: Tensor,
    allocation: Literal["deficit", "topk"],
    k_aux: int | None,
    deficits_sub: Tensor | None,
) -> Tensor:
    B, n = pre_acts_sub.shape
    if allocation == "topk":
        if k_aux is None or k_aux < 1:
            raise ValueError(f"topk allocation needs k_aux >= 1, got {k_aux}.")
        return sparsifiers.topk(pre_acts_sub, min(int(k_aux), n))
    if allocation == "deficit":
        if deficits_sub is None:
            raise ValueError("deficit allocation needs `deficits` (γ·ρ* − ρ per feature).")
        return sparsifiers.feature_choice(pre_acts_sub, deficit_capacities(deficits_sub, B))
    raise ValueError(f"allocation={allocation!r} is not known; use 'deficit' or 'topk'.")


def aux_reconstruction_loss(
    residual: Tensor,
    pre_acts: Tensor,
    W_dec: Tensor,
    feature_mask: Tensor,
    allocation: Literal["deficit", "topk"] = "topk",
    k_aux: int | None = None,
    deficits: Tensor | None = None,
) -> Tensor:
    """Normalised error of reconstructing the detached residual from the masked features."""
    if feature_mask.dtype != torch.bool or feature_mask.shape != (pre_acts.shape[-1],):
        raise ValueError(
            f"feature_mask must be a bool tensor of shape ({pre_acts.shape[-1]},), got "
            f"{feature_mask.dtype} {tuple(feature_mask.shape)}."
        )
    features = feature_mask.nonzero().squeeze(1)  # (n,)
    if features.numel() == 0:
        return pre_acts.new_zeros(())
    e = residual.detach()  # (B, d)
    sub_def = deficits[features] if deficits is not None else None
    codes = _aux_codes(pre_acts[:, features], allocation, k_aux, sub_def)  # (B, n)
    e_hat = codes @ W_dec[features]  # (B, d), no bias
    return (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(_EPS)


def aux_k_loss(
    residual: Tensor, pre_acts: Tensor, W_dec: Tensor, dead_mask: Tensor, k_aux: int
) -> Tensor:
    """OpenAI's aux_k_loss: reconstruct the residual from the top-k_aux dead features per token."""
    return aux_reconstruction_loss(residual, pre_acts, W_dec, dead_mask, "topk", k_aux=k_aux)


def aux_zipf_loss(
    residual: Tensor,
    pre_acts: Tensor,
    W_dec: Tensor,
    underutilised_mask: Tensor,
    allocation: Literal["deficit", "topk"] = "deficit",
    *,
    deficits: Tensor | None = None,
    k_aux: int | None = None,
) -> Tensor:
    """aux_zipf_loss: aux_k generalised to dead and underutilised features (DESIGN §5)."""
    return aux_reconstruction_loss(
        residual, pre_acts, W_dec, underutilised_mask, allocation, k_aux=k_aux, deficits=deficits
    )


__all__ = [
    "normalized_mse",
    "l1_penalty",
    "deficit_capacities",
    "aux_reconstruction_loss",
    "aux_k_loss",
    "aux_zipf_loss",
]
