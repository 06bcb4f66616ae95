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

import math
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from . import io
from .config import ConfigError, SAEConfig
from .rules import codes_at, get_rule

Mode = Literal["train", "inference"]
"""train: the allocation rule on the batch given; inference: its batch-independent form."""
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


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
    """A sparse autoencoder whose allocation rule is ``cfg.rule`` (any registered rule)."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.rule = get_rule(cfg.rule)
        d, F = cfg.d_in, cfg.n_features
        W_dec = torch.randn(F, d, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (F, d)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("train_batch_size", torch.zeros((), dtype=torch.long))
        for name, value in self.rule.buffers(cfg).items():
            self.register_buffer(name, value)

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

    def codes_from_pre_acts(self, P: Tensor, mode: Mode = "train") -> Tensor:
        """Codes (B, F) from affinities: the training rule on P as one batch, or the rule's
        per-token inference rule (DESIGN §4). No autograd (training uses ``sparse_ops``)."""
        if mode == "train":
            return codes_at(P, self.rule.select(self, P.detach()))
        if mode != "inference":
            raise ValueError(f"mode={mode!r} is not known; use 'train' or 'inference'.")
        if not self.rule.ready(self):
            raise RuntimeError(
                f"this {self.cfg.rule} SAE has no inference threshold yet (it was never "
                f"trained); use mode='train' on batches, or train it first."
            )
        return self.rule.infer(self, P.detach())

    # ----- public encode / decode -----------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input has last dimension {x.shape[-1]} but this SAE reads d_in="
                f"{self.cfg.d_in}; pass activations of the hook it was trained on."
            )

    def encode(self, x: Tensor, mode: Mode = "train") -> Tensor:
        """Codes (..., F) for raw inputs x (..., d). The training rule treats all leading
        positions as one batch; the inference rule is per token."""
        self._check_input(x)
        lead = x.shape[:-1]
        P = self.pre_acts(self.scale_input(x.reshape(-1, self.cfg.d_in)))
        return self.codes_from_pre_acts(P, mode).reshape(*lead, self.cfg.n_features)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction (..., d) from codes. In input units for global or no scaling; in
        normalised units (norm √d) for per_token scaling — use reconstruct() there."""
        x_hat_s = codes @ self.W_dec + self.b_dec
        return x_hat_s / self.input_scale if self.cfg.input_scaling == "global" else x_hat_s

    def reconstruct(self, x: Tensor, mode: Mode = "inference") -> Tensor:
        """x̂ (..., d) in the units of x, under the training or the inference rule."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_in)
        x_s = self.scale_input(x2)
        codes = self.codes_from_pre_acts(self.pre_acts(x_s), mode)
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
    def save(self, directory: str | os.PathLike, format: str = "suite", **kwargs) -> Path:
        """Weights in safetensors and cfg.json beside them, the folder written as one unit.
        format="saelens" writes SAELens 6.x's folder instead (``saelens.save_saelens``; kwargs
        go there)."""
        if format == "saelens":
            from .saelens import save_saelens

            return save_saelens(self, directory, **kwargs)
        if format != "suite":
            raise ValueError(f"format={format!r} is not known; use 'suite' or 'saelens'.")
        if kwargs:
            raise TypeError(f"save() takes {sorted(kwargs)} only with format='saelens'.")
        directory = io.check_replaceable(directory, (WEIGHTS_FILE, CONFIG_FILE), "the SAE")
        # one unit: a concurrent reader or saver sees one whole save or another, never a mix
        with io.atomic_folder(directory) as tmp:
            io.save_tensors(dict(self.state_dict()), tmp / WEIGHTS_FILE)
            io.atomic_write_text(tmp / CONFIG_FILE, self.cfg.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> SparseAutoencoder:
        """A folder written by save(), or a SAELens folder (``saelens.load_saelens``)."""
        directory = Path(directory)
        from .saelens import is_saelens_dir, load_saelens

        if not (directory / WEIGHTS_FILE).exists() and is_saelens_dir(directory):
            return load_saelens(directory, device=device)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"{directory / name} is missing; a saved SAE folder holds {WEIGHTS_FILE} "
                    f"and {CONFIG_FILE} (written by SparseAutoencoder.save)."
                )
        fix = "the folder is damaged: save the SAE again or restore the folder."
        cfg = SAEConfig.from_dict(io.read_json(directory / CONFIG_FILE, fix))
        sae = cls(cfg)
        state = io.load_tensors(directory / WEIGHTS_FILE, fix)
        missing = set(sae.state_dict()) - set(state)
        if missing:
            raise ConfigError(f"{directory / WEIGHTS_FILE} lacks tensors {sorted(missing)}.")
        sae.load_state_dict(state)
        return sae.to(device)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, n_features={c.n_features}, rule={c.rule}, k={c.k}"
