"""Resampling of dead features (Bricken et al. 2023, "Towards Monosemanticity"; the paper's
"w/ resampling" condition of its Table 1), applied to the current training batch.

Every ``TrainConfig.resample_every_tokens`` tokens, each dead feature j (no match in the last
``dead_window_tokens`` tokens) is re-initialised towards an input the SAE reconstructs badly:

    token t ~ p_t ∝ ‖x_t − x̂_t‖²                      (drawn with replacement, seeded)
    W_dec[j] = (x_t − b_dec) / ‖x_t − b_dec‖         unit decoder row
    W_enc[:, j] = W_dec[j] · s · mean_live ‖W_enc[:, i]‖   s = resample_scale (0.2)
    b_enc[j] = 0;  Adam moments of those rows/columns reset;  tokens-since-match reset

Under data parallelism every rank gathers the whole batch first, so every rank draws the same
tokens and the weights stay identical.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def resample_dead(trainer, x_s: Tensor, x_hat_s: Tensor) -> int:
    """Resample the trainer's dead features from this batch; returns how many."""
    sae, stats, comm = trainer.sae, trainer.stats, trainer.comm
    dead = stats.dead_mask.clone()
    n = int(dead.sum())
    if n == 0:
        return 0
    if comm.world > 1:
        x_s = comm.gather_fixed(x_s.contiguous()).reshape(-1, x_s.shape[-1])
        x_hat_s = comm.gather_fixed(x_hat_s.detach().contiguous()).reshape(-1, x_s.shape[-1])
    err = (x_s - x_hat_s.detach()).pow(2).sum(1).double()
    g = torch.Generator().manual_seed(trainer.tcfg.seed * 1_000_003 + trainer.steps_done)
    probs = (err / err.sum()).cpu() if float(err.sum()) > 0 else None
    if probs is None:
        picks = torch.randint(0, x_s.shape[0], (n,), generator=g)
    else:
        picks = torch.multinomial(probs, n, replacement=True, generator=g)
    feats = dead.nonzero().squeeze(1)
    direction = x_s[picks.to(x_s.device)] - sae.b_dec
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    live = ~dead
    enc_norm = sae.W_enc[:, live].norm(dim=0).mean() if bool(live.any()) else torch.tensor(1.0)
    sae.W_dec[feats] = direction
    sae.W_enc[:, feats] = direction.t() * (trainer.tcfg.resample_scale * enc_norm)
    sae.b_enc[feats] = 0.0
    for p, index in (
        (sae.W_dec, (feats,)),
        (sae.W_enc, (slice(None), feats)),
        (sae.b_enc, (feats,)),
    ):
        state = trainer.opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    stats.tokens_since_match[feats] = 0
    return n


__all__ = ["resample_dead"]
