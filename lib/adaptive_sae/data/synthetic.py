"""Synthetic activations with known features, and the metrics that compare an SAE with them.

The ground truth (DESIGN §7.1): F_true unit directions f_j in R^d (F_true > d: superposition).
Token i carries feature j with probability

    p_ij = min(1, p_j * u_i),    p_j ∝ (j + 1)^-a  (Zipf, a = zipf_exponent),

where the p_j are scaled so that sum_j p_j = k_true (those above 1 are clipped to 1 and the rest
rescaled), and u_i = exp(s z_i - s^2 / 2), z_i ~ N(0, 1), is a per-token busyness multiplier with
mean 1 (s = busyness_sigma; s = 0 is plain independent Bernoulli). The activation is

    x_i = sum_j c_ij f_j + noise_std * eps_i,    c_ij ~ U(magnitude_min, magnitude_max] if active,

so n_active_i = #{j : c_ij > 0} varies from token to token: the case adaptive allocation is for
(it can be 0, and then x_i is pure noise).
With s > 0 the clipping at 1 makes the mean number of active features slightly less than k_true.

The token stream is a fixed sequence cut into chunks of CHUNK_TOKENS tokens; chunk c of a stream
is drawn from its own generator seeded by (seed, stream, c). A batch of B tokens is a slice of
that sequence, so batches(B, start_batch=s) starts anywhere at the cost of one chunk, is
bit-identical to iterating up to batch s, and is the same data whatever B. The training stream
("train") and the held-out stream ("val") are separate seed streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ..config import ConfigError, _JsonMixin

CHUNK_TOKENS = 256
"""Tokens per independently seeded chunk of a stream (part of the data's identity)."""
_STREAMS = {"features": 0, "train": 1, "val": 2}
_COSINE_BLOCK = 1 << 22  # max elements of one (T_chunk, F) cosine block (16 MiB in float32)


@dataclass
class SyntheticConfig(_JsonMixin):
    """Parameters of the synthetic ground-truth source (DESIGN §7.1)."""

    d_in: int = 64
    """Dimension d of the activations."""
    n_true_features: int = 1024
    """Number of true feature directions F_true (F_true > d_in gives superposition)."""
    k_true: float = 8.0
    """Mean number of active features per token: sum_j p_j = k_true."""
    zipf_exponent: float = 1.0
    """Exponent a of the feature probabilities p_j ∝ (j + 1)^-a (0: all equally frequent)."""
    busyness_sigma: float = 0.0
    """Log-std s of the per-token multiplier u_i (lognormal, mean 1); 0: independent Bernoulli."""
    magnitude_min: float = 0.5
    """Lower end of the magnitudes of active features, drawn from U(min, max]."""
    magnitude_max: float = 1.5
    """Upper end of the magnitudes of active features."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every activation."""
    seed: int = 0
    """Seed of the feature directions and of every token stream."""

    def __post_init__(self) -> None:
        for name in ("d_in", "n_true_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer.")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer.")
        if not (math.isfinite(self.k_true) and 0 < self.k_true <= self.n_true_features):
            raise ConfigError(
                f"k_true={self.k_true} must be in (0, n_true_features={self.n_true_features}]; "
                f"lower k_true or raise n_true_features."
            )
        for name in ("zipf_exponent", "busyness_sigma", "noise_std", "magnitude_min"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}={v} must be finite and >= 0.")
        if not (math.isfinite(self.magnitude_max) and self.magnitude_max > 0):
            raise ConfigError(f"magnitude_max={self.magnitude_max} must be finite and > 0.")
        if self.magnitude_max < self.magnitude_min:
            raise ConfigError(
                f"magnitude_max={self.magnitude_max} < magnitude_min={self.magnitude_min}; "
                f"swap them or raise magnitude_max."
            )


class SyntheticSample(NamedTuple):
    """Activations with their ground truth."""

    x: torch.Tensor  # (n, d) float32
    n_active: torch.Tensor  # (n,) int64: true number of active features per token
    codes: torch.Tensor  # (n, F_true) sparse COO float32: true magnitudes c_ij


def zipf_probabilities(n: int, k: float, exponent: float) -> np.ndarray:
    """p_j ∝ (j + 1)^-exponent with sum k and every p_j <= 1 (clipped ones set to 1, the rest
    rescaled until none exceeds 1). Returns (n,) float64, non-increasing."""
    w = (np.arange(n, dtype=np.float64) + 1.0) ** -exponent  # (n,)
    clipped = np.zeros(n, dtype=bool)
    p = np.ones(n)
    while not clipped.all():
        scale = (k - clipped.sum()) / w[~clipped].sum()
        p = np.where(clipped, 1.0, w * scale)
        over = p > 1.0
        if not over.any():
            break
        clipped |= over
    return np.minimum(p, 1.0)


def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, _STREAMS[stream], index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class SyntheticSource:
    """Streams synthetic activations x = sum_j c_ij f_j (+ noise) with known f_j and c_ij.

    The source interface of the suite: ``d_in``, ``describe()``, ``batches(B, start_batch)``,
    ``held_out(n)``; and for ground truth ``true_features``, ``feature_probabilities`` and
    ``sample_with_truth(n, split)``.
    """

    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else SyntheticConfig()
        self.d_in = self.cfg.d_in
        g = _generator(self.cfg.seed, "features", 0)
        f = torch.randn(self.cfg.n_true_features, self.d_in, generator=g)  # (F_true, d)
        self.true_features = f / f.norm(dim=1, keepdim=True)  # (F_true, d) unit rows
        p = zipf_probabilities(self.cfg.n_true_features, self.cfg.k_true, self.cfg.zipf_exponent)
        self.feature_probabilities = torch.from_numpy(p).float()  # (F_true,)

    def describe(self) -> dict[str, Any]:
        """Provenance: the name, every parameter, and the chunking that fixes the stream."""
        return {"name": "synthetic", **self.cfg.to_dict(), "chunk_tokens": CHUNK_TOKENS}

    def _chunk(self, stream: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk c of a stream: activations (C, d) and dense true codes (C, F_true)."""
        cfg, g = self.cfg, _generator(self.cfg.seed, stream, c)
        s = cfg.busyness_sigma
        u = torch.exp(s * torch.randn(CHUNK_TOKENS, 1, generator=g) - s * s / 2)  # (C, 1)
        p = torch.clamp(self.feature_probabilities * u, max=1.0)  # (C, F_true)
        active = torch.rand(p.shape, generator=g) < p  # (C, F_true)
        n = int(active.sum())
        mags = 1.0 - torch.rand(n, generator=g)  # (nnz,) in (0, 1]
        codes = torch.zeros(p.shape)  # (C, F_true)
        codes[active] = cfg.magnitude_min + (cfg.magnitude_max - cfg.magnitude_min) * mags
        x = codes @ self.true_features  # (C, d)
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(x.shape, generator=g)
        return x, codes

    def _tokens(self, stream: str, start: int, with_codes: bool) -> Iterator[tuple[Any, ...]]:
        """Chunks of a stream from token ``start`` on (the first one cut at ``start``)."""
        c, offset = divmod(start, CHUNK_TOKENS)
        while True:
            x, codes = self._chunk(stream, c)
            yield (x[offset:], codes[offset:]) if with_codes else (x[offset:],)
            c, offset = c + 1, 0

    def _take(self, stream: str, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, start + n) of a stream: activations (n, d), sparse codes (n, F_true)."""
        if n < 1:
            raise ValueError(f"n_tokens={n} must be >= 1.")
        xs, cs, have = [], [], 0
        for x, codes in self._tokens(stream, start, with_codes=True):
            xs.append(x[: n - have])
            cs.append(codes[: n - have].to_sparse())
            have += len(xs[-1])
            if have >= n:
                break
        return torch.cat(xs), torch.cat(cs).coalesce()

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless float32 batches (batch_size, d_in) of the training stream, from batch
        ``start_batch`` on. Batch b holds tokens [b * B, (b + 1) * B) of a fixed sequence."""
        if batch_size < 1 or start_batch < 0:
            raise ValueError(
                f"batch_size={batch_size} must be >= 1, start_batch={start_batch} >= 0."
            )
        return self._batches(batch_size, start_batch * batch_size)

    def _batches(self, batch_size: int, start: int) -> Iterator[torch.Tensor]:
        buf: list[torch.Tensor] = []
        have = 0
        for (x,) in self._tokens("train", start, with_codes=False):
            buf.append(x)
            have += len(x)
            while have >= batch_size:
                flat = torch.cat(buf)  # (have, d)
                yield flat[:batch_size].clone()
                buf, have = [flat[batch_size:]], have - batch_size

    def held_out(self, n_tokens: int) -> torch.Tensor:
        """The first n_tokens of the validation stream, (n, d_in) float32; never in batches()."""
        return self._take("val", 0, n_tokens)[0]

    def sample_with_truth(
        self, n_tokens: int, split: Literal["val", "train"] = "val"
    ) -> SyntheticSample:
        """The first n_tokens of a stream with their ground truth. split='val' gives the tokens of
        held_out(n); split='train' gives those of the first batches of batches()."""
        if split not in ("val", "train"):
            raise ValueError(f"split={split!r} must be 'val' or 'train'.")
        x, codes = self._take(split, 0, n_tokens)
        n_active = torch.bincount(codes.indices()[0], minlength=n_tokens)  # (n,) int64
        return SyntheticSample(x, n_active, codes)


# ---------------------------------------------------------------------------- ground-truth metrics


def max_cosine_per_feature(W_dec: torch.Tensor, true_features: torch.Tensor) -> torch.Tensor:
    """For each true feature, the largest signed cosine with any decoder row: (F_true,).

    Signed, not absolute: codes are ReLU'd and true magnitudes positive, so a decoder row -f_j
    cannot represent f_j. Computed in blocks of true features so F_true x F never materialises.
    """
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (F, d)
    T = true_features.detach().float().to(W.device)
    T = T / T.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (F_true, d)
    step = max(1, _COSINE_BLOCK // max(1, W.shape[0]))
    out = [(T[i : i + step] @ W.T).amax(dim=1) for i in range(0, T.shape[0], step)]
    return torch.cat(out).cpu()  # (F_true,)


def mean_max_cosine(W_dec: torch.Tensor, true_features: torch.Tensor) -> float:
    """Mean over true features of the max signed cosine with the SAE's decoder rows (F, d)."""
    return float(max_cosine_per_feature(W_dec, true_features).mean())


def fraction_recovered(
    W_dec: torch.Tensor, true_features: torch.Tensor, threshold: float = 0.9
) -> float:
    """Fraction of true features whose max signed cosine with a decoder row exceeds threshold."""
    return float((max_cosine_per_feature(W_dec, true_features) > threshold).float().mean())


def l0_rank_correlation(
    l0: torch.Tensor | np.ndarray, n_active: torch.Tensor | np.ndarray
) -> float:
    """Spearman correlation between each token's L0 and its true number of active features
    (``metrics.rank_correlation``: NaN when either side is constant)."""
    from ..metrics import rank_correlation

    return rank_correlation(l0, n_active)[0]


def recovery_metrics(
    W_dec: torch.Tensor,
    source: SyntheticSource,
    threshold: float = 0.9,
    l0: torch.Tensor | None = None,
    n_active: torch.Tensor | None = None,
) -> dict[str, float]:
    """Ground-truth metrics of an SAE decoder (F, d) against a synthetic source (DESIGN §8):
    mean_max_cosine, fraction_recovered (cosine > threshold), and l0_rank_correlation when the
    per-token L0 of the SAE and the true n_active of the same tokens are given."""
    cos = max_cosine_per_feature(W_dec, source.true_features)  # (F_true,)
    out = {
        "mean_max_cosine": float(cos.mean()),
        "fraction_recovered": float((cos > threshold).float().mean()),
    }
    if l0 is not None and n_active is not None:
        out["l0_rank_correlation"] = l0_rank_correlation(l0, n_active)
    return out


__all__ = [
    "CHUNK_TOKENS",
    "SyntheticConfig",
    "SyntheticSource",
    "SyntheticSample",
    "zipf_probabilities",
    "max_cosine_per_feature",
    "mean_max_cosine",
    "fraction_recovered",
    "l0_rank_correlation",
    "recovery_metrics",
]
