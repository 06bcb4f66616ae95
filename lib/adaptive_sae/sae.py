r"""The sparse autoencoder (DESIGN §2-§4, §6).

    x_s = s·x                        input scaling (global s, or per token to norm √d)
    P   = (x_s − b_dec) W_enc + b_enc                     (B, F) affinities
    Z   = M ⊙ ReLU(P)                M from the allocation rule (training) or a threshold (inference)
    x̂_s = Z W_dec + b_dec,   x̂ = x̂_s / s                rows of W_dec unit-norm

Training rules are batch-level for Feature Choice and Mutual Choice. For batch-independent
inference the SAE keeps thresholds estimated during training (DESIGN §4): one global θ for
Mutual Choice (running mean of the smallest selected affinity), one θ_j per feature for Feature
Choice (running mean of column j's m_j-th largest affinity, i.e. a JumpReLU SAE).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import sparsifiers, zipf
from .config import FEATURE_CHOICE_RULES, MUTUAL_CHOICE_RULES, ConfigError, SAEConfig
from .results import atomic_write_bytes

Rule = Literal["train", "inference"]
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm for the geometric median of the rows of x (N, d)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(eps):
            return y_new
        y = y_new
    return y


class SparseAutoencoder(nn.Module):
    """A TopK / Feature Choice / Mutual Choice / ReLU+L1 sparse autoencoder."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, F = cfg.d_in, cfg.n_features
        W_dec = torch.randn(F, d, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (F, d)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("mc_threshold", torch.full((), float("nan")))
        self.register_buffer("fc_thresholds", torch.full((F,), float("nan")))
        # capacity_order[r] = the feature holding the rank-r capacity slot (Feature Choice).
        self.register_buffer("capacity_order", torch.arange(F))
        self.register_buffer("train_batch_size", torch.zeros((), dtype=torch.long))
        self._capacity_cache: dict[tuple[int, str], Tensor] = {}

    # ----- scaling -------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Estimate the input scale and initialise b_dec on a sample x (N, d) of raw inputs."""
        x = x.to(self.W_dec.device, torch.float32)
        if self.cfg.input_scaling == "global":
            ms = x.pow(2).sum(1).mean()
            if not torch.isfinite(ms) or ms <= 0:
                raise ValueError("cannot scale inputs: the sample has zero or non-finite norm.")
            self.input_scale.fill_(math.sqrt(self.cfg.d_in / ms.item()))
        xs = self.scale_input(x)
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xs))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xs.mean(0))

    def scale_input(self, x: Tensor) -> Tensor:
        if self.cfg.input_scaling == "global":
            return x * self.input_scale
        if self.cfg.input_scaling == "per_token":
            return x * (math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return x

    def unscale_output(self, x_hat_s: Tensor, x: Tensor) -> Tensor:
        if self.cfg.input_scaling == "global":
            return x_hat_s / self.input_scale
        if self.cfg.input_scaling == "per_token":
            return x_hat_s * (x.norm(dim=-1, keepdim=True) / math.sqrt(self.cfg.d_in))
        return x_hat_s

    # ----- allocation ----------------------------------------------------------------------
    def pre_acts(self, x_s: Tensor) -> Tensor:
        """Affinities P = (x_s − b_dec) W_enc + b_enc for scaled inputs (..., d) -> (..., F)."""
        return (x_s - self.b_dec) @ self.W_enc + self.b_enc

    def capacities_for(self, batch_size: int) -> Tensor:
        """Feature Choice capacities (F,) int64 for a batch of this size, by feature index."""
        cfg = self.cfg
        key = (int(batch_size), str(self.capacity_order.device))
        cached = self._capacity_cache.get(key)
        if cached is None:
            K, F = cfg.budget(batch_size), cfg.n_features
            alpha = cfg.zipf_alpha if cfg.sparsifier == "feature_choice_zipf" else 0.0
            cached = zipf.zipf_capacities(
                F, K, batch_size, alpha, cfg.zipf_beta, min_capacity=1 if K >= F else 0
            ).to(self.capacity_order.device)
            self._capacity_cache[key] = cached
        caps = torch.empty_like(cached)
        caps[self.capacity_order] = cached
        return caps

    def select(self, P: Tensor) -> Tensor:
        """Flat indices (b·F + f) of the training rule's matches in P (B, F)."""
        cfg, B = self.cfg, P.shape[0]
        if cfg.sparsifier == "topk":
            return sparsifiers.select_topk(P, int(cfg.k))
        if cfg.sparsifier in MUTUAL_CHOICE_RULES:
            return sparsifiers.select_mutual_choice(P, max(1, cfg.budget(B)))
        if cfg.sparsifier in FEATURE_CHOICE_RULES:
            return sparsifiers.select_feature_choice(P, self.capacities_for(B))
        return (P > 0).reshape(-1).nonzero().squeeze(1)  # relu_l1

    def has_thresholds(self) -> bool:
        if self.cfg.sparsifier in MUTUAL_CHOICE_RULES:
            return bool(torch.isfinite(self.mc_threshold))
        if self.cfg.sparsifier in FEATURE_CHOICE_RULES:
            return bool(torch.isfinite(self.fc_thresholds).all())
        return True

    @torch.no_grad()
    def update_thresholds(self, P: Tensor, flat_idx: Tensor) -> None:
        """EMA of the inference thresholds from one training batch's selection (DESIGN §4)."""
        m = self.cfg.threshold_momentum
        if self.cfg.sparsifier in MUTUAL_CHOICE_RULES:
            v = P.reshape(-1)[flat_idx].min()
            old = self.mc_threshold
            self.mc_threshold.copy_(torch.where(torch.isfinite(old), m * old + (1 - m) * v, v))
        elif self.cfg.sparsifier in FEATURE_CHOICE_RULES:
            F = P.shape[1]
            vals = P.reshape(-1)[flat_idx]
            col_min = torch.full((F,), float("inf"), device=P.device, dtype=P.dtype)
            col_min.scatter_reduce_(0, flat_idx % F, vals, reduce="amin")
            seen = torch.isfinite(col_min)
            old = self.fc_thresholds
            new = torch.where(torch.isfinite(old), m * old + (1 - m) * col_min, col_min)
            self.fc_thresholds.copy_(torch.where(seen, new, old))

    def codes_from_pre_acts(self, P: Tensor, rule: Rule = "train") -> Tensor:
        """Codes (B, F) from affinities under the training rule or the per-token inference rule."""
        if rule == "train":
            return sparsifiers.codes_from_indices(P, self.select(P))
        if rule != "inference":
            raise ValueError(f"rule={rule!r} is not known; use 'train' or 'inference'.")
        s = self.cfg.sparsifier
        if s == "topk":
            return sparsifiers.topk(P, int(self.cfg.k))
        if s == "relu_l1":
            return P.relu()
        if not self.has_thresholds():
            raise RuntimeError(
                f"this {s} SAE has no inference threshold yet (it was never trained); use "
                f"rule='train' on batches, or train it first."
            )
        theta = self.mc_threshold if s in MUTUAL_CHOICE_RULES else self.fc_thresholds
        return sparsifiers.threshold(P, theta)

    # ----- public encode / decode -----------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input has last dimension {x.shape[-1]} but this SAE reads d_in="
                f"{self.cfg.d_in}; pass activations of the hook it was trained on."
            )

    def encode(self, x: Tensor, rule: Rule = "train") -> Tensor:
        """Codes (..., F) for raw inputs x (..., d). The training rule treats all leading
        positions as one batch."""
        self._check_input(x)
        lead = x.shape[:-1]
        P = self.pre_acts(self.scale_input(x.reshape(-1, self.cfg.d_in)))
        return self.codes_from_pre_acts(P, rule).reshape(*lead, self.cfg.n_features)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction (..., d) from codes. In input units for global or no scaling; in
        normalised units (norm √d) for per_token scaling — use reconstruct() there."""
        x_hat_s = codes @ self.W_dec + self.b_dec
        return x_hat_s / self.input_scale if self.cfg.input_scaling == "global" else x_hat_s

    def reconstruct(self, x: Tensor, rule: Rule = "inference") -> Tensor:
        """x̂ (..., d) in the units of x, for either rule."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_in)
        x_s = self.scale_input(x2)
        codes = self.codes_from_pre_acts(self.pre_acts(x_s), rule)
        return self.unscale_output(codes @ self.W_dec + self.b_dec, x2).reshape(*lead, -1)

    forward = reconstruct

    # ----- decoder constraint ---------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component parallel to each decoder row."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ----- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Weights in safetensors and cfg.json beside them, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(dict(self.state_dict()), directory / WEIGHTS_FILE)
        atomic_write_bytes(directory / CONFIG_FILE, self.cfg.to_json().encode())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> SparseAutoencoder:
        directory = Path(directory)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"{directory / name} is missing; a saved SAE folder holds {WEIGHTS_FILE} "
                    f"and {CONFIG_FILE} (written by SparseAutoencoder.save)."
                )
        cfg = SAEConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        sae = cls(cfg)
        state = load_file(str(directory / WEIGHTS_FILE))
        missing = set(sae.state_dict()) - set(state)
        if missing:
            raise ConfigError(f"{directory / WEIGHTS_FILE} lacks tensors {sorted(missing)}.")
        sae.load_state_dict(state)
        return sae.to(device)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, n_features={c.n_features}, sparsifier={c.sparsifier}, k={c.k}"
