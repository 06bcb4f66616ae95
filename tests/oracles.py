r"""Naive references the library's fast code is checked against (never imported by ``lib/``).

Each oracle is the plainest statement of its definition (DESIGN §3, §5): selections by
``torch.topk``/``torch.sort`` on the whole matrix, codes Z = M ⊙ ReLU(P) as a dense tensor,
reconstruction ``Z @ W_dec + b_dec`` with ordinary autograd, the auxiliary loss on dense codes
of the feature subset, and a training forward built from these.

Selections are returned as flat indices b·F + f in no particular order; compare them as sets
(inputs in the tests are continuous, so ties have probability zero).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = 1e-12


# ----- selections ---------------------------------------------------------------------------------
def topk_indices(P: Tensor, k: int) -> Tensor:
    """Each row's k largest entries."""
    B, F = P.shape
    cols = P.topk(int(k), dim=1).indices
    return (cols + torch.arange(B, device=P.device).unsqueeze(1) * F).reshape(-1)


def global_topk_indices(P: Tensor, K: int) -> Tensor:
    """The K largest entries of the whole matrix (Mutual Choice / BatchTopK)."""
    return P.reshape(-1).topk(int(K)).indices


def column_topk_indices(P: Tensor, capacities: Tensor) -> Tensor:
    """Column j keeps its capacities[j] largest entries (Feature Choice): one descending sort
    of every column, then rank < m_j."""
    B, F = P.shape
    rows = P.sort(dim=0, descending=True, stable=True).indices  # (B, F)
    keep = torch.arange(B, device=P.device).unsqueeze(1) < capacities.to(P.device).unsqueeze(0)
    cols = torch.arange(F, device=P.device).expand(B, F)
    return (rows * F + cols)[keep]


def positive_indices(P: Tensor) -> Tensor:
    """Every positive entry (ReLU + L1)."""
    return (P > 0).reshape(-1).nonzero().squeeze(1)


def deficit_capacities(deficits: Tensor, batch_size: int) -> Tensor:
    """aux_zipf's deficit allocation: feature j chooses ⌈B·deficit_j⌉ tokens, within [1, B]."""
    return torch.tensor(
        [min(batch_size, max(1, math.ceil(batch_size * float(d)))) for d in deficits.double()],
        dtype=torch.long,
    )


def select(sae, P: Tensor) -> Tensor:
    """The training selection of ``sae.cfg.rule`` on P, by the oracles above.

    Feature Choice takes its capacities from the rule (they are an input of the selection);
    a rule without an oracle here (one registered by a test) uses its own ``select``."""
    from adaptive_sae.rules import get_rule

    rule = get_rule(sae.cfg.rule)
    B = P.shape[0]
    if rule.name == "topk":
        return topk_indices(P, int(sae.cfg.k))
    if rule.name == "mutual_choice":
        return global_topk_indices(P, max(1, int(sae.cfg.k * B)))
    if rule.name in ("feature_choice", "feature_choice_zipf"):
        return column_topk_indices(P, rule.capacities(sae, B))
    if rule.name == "relu_l1":
        return positive_indices(P)
    return rule.select(sae, P)


# ----- codes and reconstruction ---------------------------------------------------------------------
def mask_of(flat_idx: Tensor, shape: tuple[int, int]) -> Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=flat_idx.device)
    mask[flat_idx] = True
    return mask.view(shape)


def dense_codes(P: Tensor, flat_idx: Tensor) -> Tensor:
    """Z = M ⊙ ReLU(P), differentiable in P."""
    return P.relu() * mask_of(flat_idx, tuple(P.shape))


def pre_acts(x_s: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    return (x_s - b_dec) @ W_enc + b_enc


def reconstruct(x_s, W_enc, b_enc, W_dec, b_dec, flat_idx, decoder_bias=True):
    """Dense-autograd twin of ``sparse_ops.sparse_reconstruct``: (x̂, ReLU(P) at flat_idx)."""
    P = pre_acts(x_s, W_enc, b_enc, b_dec)
    codes = dense_codes(P, flat_idx)
    x_hat = codes @ W_dec + (b_dec if decoder_bias else 0.0)
    return x_hat, codes.reshape(-1)[flat_idx]


# ----- losses ----------------------------------------------------------------------------------------
def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(0, keepdim=True)).pow(2).sum()


def aux_loss(e, P, W_dec, feature_mask, allocation, k_aux=None, deficits=None) -> Tensor:
    """The auxiliary loss on dense codes of the feature subset S: ê = Z_S W_dec[S] (no bias),
    Σ‖e − ê‖² / Σ‖e − ē‖², 0 when S is empty. ``P`` carries the gradient (autograd)."""
    feats = feature_mask.nonzero().squeeze(1)
    if feats.numel() == 0:
        return P.new_zeros(())
    B = P.shape[0]
    sub = P[:, feats]
    if allocation == "topk":
        local = topk_indices(sub.detach(), min(int(k_aux), feats.numel()))
    elif allocation == "deficit":
        local = column_topk_indices(sub.detach(), deficit_capacities(deficits[feats], B))
    else:
        raise ValueError(allocation)
    e = e.detach()
    e_hat = dense_codes(sub, local) @ W_dec[feats]
    return (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(_EPS)


# ----- the training forward (replaces Trainer._forward and Trainer._aux) ------------------------------
def trainer_forward(trainer, x_s: Tensor):
    """(x̂_s, P without grad, selected flat indices, dense codes) by dense autograd."""
    sae = trainer.sae
    P_grad = sae.pre_acts(x_s)
    P = P_grad.detach()
    idx = select(sae, P)
    codes = dense_codes(P_grad, idx)
    return codes @ sae.W_dec + sae.b_dec, P, idx, codes


def trainer_aux(trainer, e: Tensor, P: Tensor, x_s: Tensor) -> Tensor:
    """The trainer's auxiliary loss by ``aux_loss`` above (P recomputed with autograd)."""
    tcfg, stats, sae = trainer.tcfg, trainer.stats, trainer.sae
    if tcfg.aux_loss == "none":
        return x_s.new_zeros(())
    if tcfg.aux_loss == "aux_k":
        mask, alloc, deficits = stats.dead_mask, "topk", None
    else:
        mask, alloc, deficits = stats.underutilised_mask, tcfg.aux_allocation, stats.deficits
    return aux_loss(e, sae.pre_acts(x_s), sae.W_dec, mask, alloc, trainer.k_aux, deficits)


# ----- inputs and comparison helpers -------------------------------------------------------------------
def make_params(B=48, d=12, F=40, dtype=torch.float64, seed=0):
    """(x, W_enc, b_enc, W_dec, b_dec), all requiring grad; b_enc < 0 so that some selected
    entries have P <= 0 (zero codes, no gradient) as in training."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, d, generator=g, dtype=dtype)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = (W_dec.t() + 0.3 * torch.randn(d, F, generator=g, dtype=dtype)).contiguous()
    b_enc = -1.0 + 0.5 * torch.randn(F, generator=g, dtype=dtype)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=dtype)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]


def grads_of(fn, params, seed=123):
    """Outputs of fn() and the gradients of a random linear function of them w.r.t. params."""
    for p in params:
        p.grad = None
    out = fn()
    out = (out,) if isinstance(out, Tensor) else tuple(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in out
    )
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return [o.detach().clone() for o in out], grads


def as_set(idx: Tensor) -> set[int]:
    return set(idx.tolist())
