"""Evaluation of a trained SAE on held-out activations (DESIGN §8).

NMSE = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all evaluated tokens (x̄ their mean), in input units.
L0 of a token = its number of non-zero codes. dead_fraction = features with no match on these
tokens. underutilised_fraction = features whose density is below γ × the Zipf–Mandelbrot law
fitted to these densities (dead ones included).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import zipf
from .sae import Rule, SparseAutoencoder


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    x: Tensor,
    rule: Rule = "inference",
    batch_size: int | None = None,
    *,
    gamma: float = 0.5,
    head_fraction: float = 0.5,
) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on raw activations ``x`` (N, d).

    Under the training rule tokens are processed in batches of ``batch_size`` (default: the
    SAE's training batch size; a trailing partial batch is dropped so every batch has the size
    the rule was trained with). The inference rule is per token, so the batch size only bounds
    memory. Returns floats plus ``densities`` (F,) and ``l0_per_token`` (N,) numpy arrays.
    """
    if x.ndim != 2 or x.shape[1] != sae.cfg.d_in:
        raise ValueError(f"x must have shape (N, d_in={sae.cfg.d_in}), got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite activations; drop inf/NaN rows before evaluating.")
    device = sae.W_dec.device
    if batch_size is None:
        trained_b = int(sae.train_batch_size)
        batch_size = trained_b if (rule == "train" and trained_b > 0) else 4096
    N = x.shape[0]
    if rule == "train":
        N = (N // batch_size) * batch_size
        if N == 0:
            raise ValueError(
                f"the training rule needs at least one batch of {batch_size} tokens, got "
                f"{x.shape[0]}; pass more tokens or a smaller batch_size."
            )
    x = x[:N]
    F = sae.cfg.n_features
    err = torch.zeros((), dtype=torch.float64)
    counts = torch.zeros(F, dtype=torch.long)
    l0 = torch.empty(N, dtype=torch.long)
    for i in range(0, N, batch_size):
        xb = x[i : i + batch_size].to(device, torch.float32)
        x_s = sae.scale_input(xb)
        codes = sae.codes_from_pre_acts(sae.pre_acts(x_s), rule)
        x_hat = sae.unscale_output(codes @ sae.W_dec + sae.b_dec, xb)
        err += (xb - x_hat).double().pow(2).sum().cpu()
        nz = codes > 0
        counts += nz.sum(0).cpu()
        l0[i : i + xb.shape[0]] = nz.sum(1).cpu()
    xd = x.double()
    var = (xd - xd.mean(0, keepdim=True)).pow(2).sum()
    densities = counts.double() / N
    fit = zipf.fit_zipf(densities, head_fraction)
    under = zipf.underutilised(densities, gamma, fit)
    l0f = l0.double()
    return {
        "rule": rule,
        "n_tokens": N,
        "nmse": float(err / var),
        "l0_mean": float(l0f.mean()),
        "l0_std": float(l0f.std()) if N > 1 else 0.0,
        "dead_fraction": float((counts == 0).double().mean()),
        "underutilised_fraction": float(under.double().mean()),
        "zipf_alpha": fit.alpha,
        "zipf_beta": fit.beta,
        "zipf_r2": fit.r2,
        "densities": densities.numpy(),
        "l0_per_token": l0.numpy(),
    }


def scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of an evaluate() result (drops per-feature/per-token arrays)."""
    return {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}


__all__ = ["evaluate", "scalar_metrics"]
