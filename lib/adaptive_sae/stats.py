"""Running feature statistics kept during training (DESIGN §6).

Densities are an exponential moving average over tokens (horizon ``density_window_tokens``,
bias-corrected so early estimates are not pulled to zero); "dead" counts tokens since a
feature's last match, in tokens, as dictionary_learning and sparsify do. The Zipf law and the
underutilised set are refitted every ``zipf_refit_every`` steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import selection_kernels, zipf


class FeatureStats:
    """Per-feature running statistics; all state is tensors (checkpointed in safetensors)."""

    def __init__(
        self,
        n_features: int,
        dead_window_tokens: int,
        density_window_tokens: int,
        gamma: float = 0.5,
        head_fraction: float = 0.5,
        device: str | torch.device = "cpu",
    ):
        F = n_features
        self.dead_window_tokens = int(dead_window_tokens)
        self.density_window_tokens = int(density_window_tokens)
        self.gamma = gamma
        self.head_fraction = head_fraction
        self.density_raw = torch.zeros(F, dtype=torch.float64, device=device)
        self.density_weight = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens_since_match = torch.zeros(F, dtype=torch.long, device=device)
        self.demand = torch.zeros(F, dtype=torch.float64, device=device)
        self.n_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.underutilised_mask = torch.zeros(F, dtype=torch.bool, device=device)
        self.deficits = torch.zeros(F, dtype=torch.float32, device=device)
        self.fit: zipf.ZipfFit | None = None

    def _decay(self, batch_size: int) -> float:
        return math.exp(-batch_size / self.density_window_tokens)

    @torch.no_grad()
    def update(self, match_counts: Tensor, batch_size: int) -> None:
        """match_counts (F,): tokens of this batch each feature matched (code > 0)."""
        a = self._decay(batch_size)
        self.density_raw.mul_(a).add_(match_counts.double() / batch_size, alpha=1 - a)
        self.density_weight.mul_(a).add_(1 - a)
        self.tokens_since_match.add_(batch_size)
        self.tokens_since_match.masked_fill_(match_counts > 0, 0)
        self.n_tokens.add_(batch_size)

    @torch.no_grad()
    def update_demand(self, topk_counts: Tensor, batch_size: int) -> None:
        """topk_counts (F,): tokens of this batch for which the feature is among the top-k."""
        a = self._decay(batch_size)
        self.demand.mul_(a).add_(topk_counts.double() / batch_size, alpha=1 - a)

    @property
    def densities(self) -> Tensor:
        """Fraction of tokens each feature matches (F,), running estimate."""
        return (self.density_raw / self.density_weight.clamp_min(1e-12)).float()

    @property
    def dead_mask(self) -> Tensor:
        """Features without a match in the last dead_window_tokens tokens (bool (F,))."""
        return self.tokens_since_match >= self.dead_window_tokens

    @torch.no_grad()
    def refit(self) -> None:
        """Refit the Zipf law and recompute the underutilised set and deficits."""
        dens = self.densities
        # the profile fit where the fast paths are on (ADAPTIVE_SAE_KERNELS=0: scipy's
        # trust-region fit, as the committed results were computed)
        method = "profile" if selection_kernels.use_kernels else "trf"
        self.fit = zipf.fit_zipf(dens, self.head_fraction, method=method)
        mask, deficit = zipf.zipf_deficits(dens, self.gamma, self.fit)
        self.underutilised_mask = mask | self.dead_mask
        self.deficits = deficit.float()

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "density_raw": self.density_raw,
            "density_weight": self.density_weight,
            "tokens_since_match": self.tokens_since_match,
            "demand": self.demand,
            "n_tokens": self.n_tokens,
            "underutilised_mask": self.underutilised_mask,
            "deficits": self.deficits,
            "fit": torch.tensor(
                [float("nan")] * 5 if self.fit is None else [float(v) for v in self.fit],
                dtype=torch.float64,
            ),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        fit = state.pop("fit").tolist()
        for name, value in state.items():
            setattr(self, name, value.to(getattr(self, name).device))
        self.fit = None if math.isnan(fit[4]) else zipf.ZipfFit(*fit[:4], int(fit[4]))

    def summary(self) -> dict[str, float]:
        return {
            "dead_pct": 100.0 * float(self.dead_mask.float().mean()),
            "underutilised_pct": 100.0 * float(self.underutilised_mask.float().mean()),
            "zipf_alpha": float("nan") if self.fit is None else self.fit.alpha,
            "zipf_r2": float("nan") if self.fit is None else self.fit.r2,
        }
