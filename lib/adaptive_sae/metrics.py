"""Evaluation of a trained SAE on held-out activations (DESIGN §8), in one vocabulary.

nmse                Σ‖x − x̂‖² / Σ‖x − x̄‖² over all evaluated tokens (x̄ their mean), input units
l0_mean, l0_std     per-token number of non-zero codes
dead_pct            % of features with no match on these tokens
underutilised_pct   % of features whose density is below γ × the Zipf–Mandelbrot law fitted to
                    these densities (dead ones included)
zipf_alpha/beta/r2  that fit

``mode`` says which encoding was scored: ``train`` (the allocation rule on batches of the
training size) or ``inference`` (the rule's batch-independent form, per token).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import zipf
from .sae import Mode, SparseAutoencoder


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: scalar metrics and per-feature / per-token arrays."""

    mode: str
    n_tokens: int
    nmse: float
    l0_mean: float
    l0_std: float
    dead_pct: float
    underutilised_pct: float
    zipf_alpha: float
    zipf_beta: float
    zipf_r2: float
    densities: np.ndarray = field(repr=False)
    """(F,) fraction of the tokens each feature matched."""
    l0_per_token: np.ndarray = field(repr=False)
    """(N,) matches of each token."""

    def scalars(self, suffix: str = "") -> dict[str, Any]:
        """The scalar metrics as a dict (keys end in ``suffix``), without ``mode``."""
        skip = {"mode", "densities", "l0_per_token"}
        return {
            f.name + suffix: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in skip
        }


def rank_correlation(a, b) -> tuple[float, float]:
    """Spearman's rank correlation (rho, p-value) of two equal-length sequences; (nan, nan)
    when either is constant or has fewer than 2 entries (the correlation is undefined, e.g.
    the L0 of a TopK SAE that gives every token exactly k)."""
    from scipy.stats import spearmanr

    a = np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64).ravel()
    b = np.asarray(torch.as_tensor(b).detach().cpu(), dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the sequences have {a.size} and {b.size} entries; pass equal lengths.")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    res = spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    x: Tensor,
    mode: Mode = "inference",
    batch_size: int | None = None,
    *,
    gamma: float = 0.5,
    head_fraction: float = 0.5,
) -> Evaluation:
    """Reconstruction and sparsity metrics of ``sae`` on raw activations ``x`` (N, d).

    In ``train`` mode tokens are processed in batches of ``batch_size`` (default: the SAE's
    training batch size; a trailing partial batch is dropped so every batch has the size the
    rule was trained with), by the same selection code that trained the SAE. ``inference`` is
    per token, so the batch size only bounds memory."""
    if x.ndim != 2 or x.shape[1] != sae.cfg.d_in:
        raise ValueError(f"x must have shape (N, d_in={sae.cfg.d_in}), got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite activations; drop inf/NaN rows before evaluating.")
    if mode not in ("train", "inference"):
        raise ValueError(f"mode={mode!r} is not known; use 'train' or 'inference'.")
    device = sae.W_dec.device
    if batch_size is None:
        trained_b = int(sae.train_batch_size)
        batch_size = trained_b if (mode == "train" and trained_b > 0) else 4096
    N = x.shape[0]
    if mode == "train":
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
        codes = sae.codes_from_pre_acts(sae.pre_acts(x_s), mode)
        x_hat = sae.unscale_output(codes @ sae.W_dec + sae.b_dec, xb)
        err += (xb - x_hat).double().pow(2).sum().cpu()
        nz = codes > 0
        counts += nz.sum(0).cpu()
        l0[i : i + xb.shape[0]] = nz.sum(1).cpu()
    xd = x.double()
    var = (xd - xd.mean(0, keepdim=True)).pow(2).sum()
    if float(var) == 0.0:
        raise ValueError(
            "the evaluated activations are constant: NMSE, relative to their variance, is "
            "undefined; evaluate on real held-out activations."
        )
    densities = counts.double() / N
    fit = zipf.fit_zipf(densities, head_fraction)
    under = zipf.underutilised(densities, gamma, fit)
    l0f = l0.double()
    return Evaluation(
        mode=mode,
        n_tokens=N,
        nmse=float(err / var),
        l0_mean=float(l0f.mean()),
        l0_std=float(l0f.std()) if N > 1 else 0.0,
        dead_pct=100.0 * float((counts == 0).double().mean()),
        underutilised_pct=100.0 * float(under.double().mean()),
        zipf_alpha=fit.alpha,
        zipf_beta=fit.beta,
        zipf_r2=fit.r2,
        densities=densities.numpy(),
        l0_per_token=l0.numpy(),
    )


__all__ = ["Evaluation", "evaluate", "rank_correlation"]
