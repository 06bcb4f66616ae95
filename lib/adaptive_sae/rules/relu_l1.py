"""ReLU + L1 (the baseline): every positive affinity is a match; sparsity comes from the penalty
λ·mean_b Σ_j z_bj·‖W_dec,j‖ added to the loss. DESIGN §3.

λ adapts so the mean L0 settles at the SAE's k, so the baseline is compared at equal sparsity:
λ ← λ·exp(rate·clip(log(L0 / k), −1, 1)) after each step (``TrainConfig.l1_adapt_rate``; 0 keeps
λ fixed at ``l1_coefficient``). Nearly every entry is active early in training, so the step
uses dense codes while more than 1/8 of the entries are active, and the loss kernel on the
active entries once fewer are (as at the target L0).
"""

from __future__ import annotations

import math

from torch import Tensor

from .. import losses
from .base import AllocationRule, register_rule


class ReluL1(AllocationRule):
    name = "relu_l1"
    label = "ReLU + L1"
    sparse = False

    def select(self, sae, P, ws=None) -> Tensor:
        return (P > 0).reshape(-1).nonzero().squeeze(1)

    def select_mask(self, sae, P) -> Tensor:
        return P > 0  # half the entries early in training: a mask, not their indices

    def infer(self, sae, P) -> Tensor:
        return P.relu()

    def init_train_state(self, tcfg) -> dict[str, float]:
        return {"l1_coef": float(tcfg.l1_coefficient)}

    def penalty(self, sae, codes, state):
        return state["l1_coef"] * losses.l1_penalty(codes, sae.W_dec)

    def penalty_and_grads(self, sae, code_sums, batch_size, state):
        lam = state["l1_coef"]
        value, d_codes, d_W_dec = losses.l1_penalty_and_grads(
            code_sums, batch_size, sae.W_dec.detach()
        )
        return lam * value, lam * d_codes, lam * d_W_dec

    def after_step(self, state, n_matched, batch_size, cfg, tcfg) -> None:
        if tcfg.l1_adapt_rate > 0:  # multiplicative, in log space, clipped: cannot overshoot
            err = math.log(max(n_matched / batch_size, 0.05) / cfg.k)
            state["l1_coef"] *= math.exp(tcfg.l1_adapt_rate * max(-1.0, min(1.0, err)))


register_rule(ReluL1())

__all__ = ["ReluL1"]
