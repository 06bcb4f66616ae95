"""TopK (Gao et al. 2024): every token keeps its k largest affinities. DESIGN §3.

Per token, so the training and inference rules are the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError
from ..selection_kernels import row_topk_columns
from .base import AllocationRule, register_rule


@torch.no_grad()
def select_topk(P: Tensor, k: int) -> Tensor:
    """Each row's top-k entries: flat indices (B·k,) int64, ascending."""
    B, F = P.shape
    k = int(k)
    if not 0 < k <= F:
        raise ConfigError(f"topk needs 0 < k <= F, got k={k}, F={F}; lower k.")
    cols = row_topk_columns(P, k)  # (B, k), ascending
    return (cols + torch.arange(B, device=P.device).unsqueeze(1) * F).reshape(-1)


class TopK(AllocationRule):
    name = "topk"
    label = "TopK"

    def check(self, cfg) -> None:
        if int(cfg.k) != cfg.k:
            raise ConfigError(f"k={cfg.k}: topk needs an integer number of matches per token.")

    def select(self, sae, P, ws=None) -> Tensor:
        return select_topk(P, int(sae.cfg.k))


register_rule(TopK())
