"""Configuration dataclasses for the SAE and its training run.

Every choice the paper leaves open is a named field here, with a one-line docstring and a
validation in ``__post_init__`` that names the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

AuxLossName = Literal["none", "aux_k", "aux_zipf"]
AUX_LOSSES: tuple[str, ...] = get_args(AuxLossName)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not known; choose one of {list(choices)}.")


def _scalar(value: Any) -> Any:
    """numpy and torch scalars (and 0-d arrays) as the Python number they hold."""
    if not isinstance(value, (bool, int, float, str)) and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _spelled(name: str, value: Any, kind: str) -> str:
    """The 'not a string / not a bool' part of an error, with how to write the value."""
    if isinstance(value, str):
        return f"{name}={value!r} is a string; pass {kind} (write {name}={value}, unquoted)"
    if isinstance(value, bool):
        return f"{name}={value!r} is a bool; pass {kind}"
    return f"{name}={value!r} ({type(value).__name__}) must be {kind}"


def _integer(name: str, value: Any, minimum: int, why: str = "") -> int:
    """An int (numpy ints and integral floats such as 8.0 accepted and converted) >= minimum."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(_spelled(name, value, "an integer") + ".")
    if not math.isfinite(value) or int(value) != value:
        raise ConfigError(f"{name}={value!r} must be a whole number; round it.")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}{why}.")
    return int(value)


def _real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> int | float:
    """A finite number (numpy numbers accepted and converted) inside the given range."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(_spelled(name, value, "a number") + ".")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        if low is None:
            span = f"a finite number <= {high}"
        elif high is None:
            span = f"a finite number {'>' if low_open else '>='} {low}"
        else:
            span = f"in {lo}{hi}"
        raise ConfigError(f"{name}={value!r} must be {span}{why}.")
    return value


def _boolean(name: str, value: Any) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise ConfigError(_spelled(name, value, "True or False") + ".")
    return value


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {sorted(unknown)}; known fields: {sorted(names)}."
            )
        return cls(**d)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


@dataclass
class SAEConfig(_JsonMixin):
    """Architecture of one sparse autoencoder and its allocation rule (DESIGN §2-§4, §6)."""

    d_in: int
    """Dimension of the activations the SAE reads."""
    n_features: int
    """Number of dictionary features F."""
    rule: str = "topk"
    """Allocation rule, any name in ``adaptive_sae.rules.rule_names()``: topk, mutual_choice
    (alias batch_topk), feature_choice (uniform capacities), feature_choice_zipf, relu_l1
    (baseline), or one registered with ``adaptive_sae.rules.register_rule``."""
    k: float = 8.0
    """Mean number of matches per token: the budget is K = int(k * B). For relu_l1 it is the
    target mean L0 that the adaptive L1 coefficient steers towards."""
    input_scaling: Literal["global", "per_token", "none"] = "global"
    """global: one factor s with E||s x||^2 = d estimated on a sample; per_token: each x scaled
    to norm sqrt(d) (OpenAI/BatchTopK style); none: raw activations."""
    zipf_alpha: float = 1.0
    """Exponent alpha of the Zipf capacity profile m_r ∝ (r + 1 + beta)^-alpha (feature_choice_zipf)."""
    zipf_beta: float = 0.0
    """Mandelbrot offset beta of the Zipf capacity profile (feature_choice_zipf)."""
    capacity_ranking: Literal["fixed", "demand"] = "demand"
    """How features are ranked to receive Zipf capacities. fixed: rank = feature index from the
    start (training moves the most common direction into the largest slot). demand: rank by a
    running average of how often the feature is among a token's top-k affinities, re-ranked
    every TrainConfig.demand_rerank_every steps. demand is the default because it was measured
    better: on the quick synthetic comparison (3 seeds, same budget and per-rule learning rate)
    test NMSE 0.222 ± 0.004 for demand against 0.271 ± 0.006 for fixed, and more true features
    recovered (0.46 against 0.42); uniform capacities gave 0.385."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference thresholds (Mutual Choice: one global theta; Feature
    Choice: one theta_j per feature). DESIGN §4."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias: geometric median (Weiszfeld) or mean of a sample, or zeros."""

    def __post_init__(self) -> None:
        _check_choice("input_scaling", self.input_scaling, ("global", "per_token", "none"))
        _check_choice("capacity_ranking", self.capacity_ranking, ("fixed", "demand"))
        _check_choice("b_dec_init", self.b_dec_init, ("geometric_median", "mean", "zeros"))
        self.d_in = _integer("d_in", self.d_in, 1)
        self.n_features = _integer("n_features", self.n_features, 1)
        self.k = _real("k", self.k, 0, low_open=True, why=" (matches per token)")
        if self.k > self.n_features:
            raise ConfigError(
                f"k={self.k} exceeds n_features={self.n_features}: a token cannot match more "
                f"features than exist; lower k or raise n_features."
            )
        self.zipf_alpha = _real("zipf_alpha", self.zipf_alpha, 0)
        self.zipf_beta = _real("zipf_beta", self.zipf_beta, 0)
        self.threshold_momentum = _real(
            "threshold_momentum", self.threshold_momentum, 0, 1, high_open=True
        )
        from .rules import get_rule  # the rules import this module

        get_rule(self.rule).check(self)

    def budget(self, batch_size: int) -> int:
        """K = int(k * B): the total number of matches a batch of B tokens may spend."""
        return int(self.k * batch_size)


@dataclass
class TrainConfig(_JsonMixin):
    """One training run: data budget, optimiser, auxiliary loss, statistics (DESIGN §5-§6)."""

    batch_size: int = 1024
    """Tokens per step B. Batch rules spend K = int(k * B) matches per step."""
    total_tokens: int = 1_000_000
    """Training budget in tokens; steps = total_tokens // batch_size."""
    lr: float | None = None
    """Adam learning rate; None uses 3.5e-3 / sqrt(F / 2**14) (1.6e-2 at F = 768), the
    1/sqrt(F) scaling of dictionary_learning and sparsify at a constant measured for short runs
    and small dictionaries: on the synthetic source (d 48, 384 true features, F 768, k 6,
    B 1024, global scaling, default warm-up and decay) its validation NMSE is within 5 percent
    of that of the learning rate compare_rules brackets at the same budget, for TopK / Mutual
    Choice / Feature Choice Zipf: +4.3 / -5.9 / +1.3 percent at 400k tokens, +1.2 / +1.9 /
    +2.7 percent at 1.6M; the former 2e-4 / sqrt(F / 2**14) gave +73 / +135 / +117 percent at
    400k and +26 / +63 / +66 percent at 1.6M."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_fraction: float = 0.05
    """Fraction of steps with a linear learning-rate warm-up from 0."""
    decay_fraction: float = 0.2
    """Fraction of steps at the end with a linear decay to 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (<= 0 disables)."""
    aux_loss: AuxLossName = "none"
    """Auxiliary loss: none, aux_k (Gao et al., dead features) or aux_zipf (dead and
    underutilised features)."""
    aux_coef: float = 1.0 / 32
    """Weight alpha_aux of the auxiliary loss."""
    k_aux: int | None = None
    """Per-token matches of the auxiliary codes; None uses min(512, d_in // 2)."""
    aux_allocation: Literal["deficit", "topk"] = "deficit"
    """aux_zipf only: deficit (each underutilised feature chooses tokens up to its deficit) or
    topk (top-k_aux of the underutilised set per token)."""
    dead_window_tokens: int = 100_000
    """A feature is dead after this many tokens without a match (tokens, not steps)."""
    density_window_tokens: int = 100_000
    """Horizon of the running density estimate (an EMA with decay exp(-B / window))."""
    gamma: float = 0.5
    """Underutilised: density below gamma x the fitted Zipf law at the feature's rank."""
    zipf_head_fraction: float = 0.5
    """The Zipf-Mandelbrot law is fitted on this leading fraction of the ranked live features."""
    zipf_refit_every: int = 25
    """Steps between refits of the Zipf law (and the underutilised set)."""
    demand_rerank_every: int = 25
    """Steps between re-rankings of Zipf capacities by demand (capacity_ranking='demand')."""
    l1_coefficient: float = 1e-2
    """relu_l1 only: initial L1 coefficient lambda (the loss is NMSE + lambda * mean L1)."""
    l1_adapt_rate: float = 0.01
    """relu_l1 only: lambda <- lambda * exp(rate * clip(log(L0 / k), -1, 1)) each step, steering
    the mean L0 to k so the baseline is compared at equal sparsity; 0 keeps lambda fixed."""
    resample_every_tokens: int = 0
    """Resample dead features every this many tokens (0: never). The paper's "w/ resampling"
    baseline, Anthropic's 2023 recipe applied to the current batch: each dead feature's decoder
    row becomes the direction of a token drawn with probability proportional to its squared
    reconstruction error, its encoder column that direction scaled to resample_scale x the mean
    encoder norm of the live features, its b_enc 0, and its Adam state is reset."""
    resample_scale: float = 0.2
    """Encoder norm of a resampled feature, as a fraction of the live features' mean."""
    init_sample_tokens: int = 8192
    """Tokens used to estimate the input scale and initialise b_dec."""
    seed: int = 0
    """Seed of initialisation and data order; on the CPU a run is bit-for-bit repeatable."""
    log_every: int = 10
    """Steps between history rows."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end, when a checkpoint_dir is given)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep on disk."""
    device: str = "cpu"
    """Torch device ('cpu', 'cuda', 'cuda:1', ...)."""
    autocast_bf16: bool = False
    """Run the SAE forward in bfloat16 autocast (GPU); weights and optimiser stay fp32."""

    def __post_init__(self) -> None:
        _check_choice("aux_loss", self.aux_loss, AUX_LOSSES)
        _check_choice("aux_allocation", self.aux_allocation, ("deficit", "topk"))
        # NMSE divides by the variance of the batch around its mean: zero for one token
        self.batch_size = _integer(
            "batch_size", self.batch_size, 2, " (the NMSE of one token has no variance)"
        )
        self.total_tokens = _integer("total_tokens", self.total_tokens, 1)
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"total_tokens={self.total_tokens} is less than one batch "
                f"(batch_size={self.batch_size}); raise total_tokens."
            )
        if self.lr is not None:
            self.lr = _real("lr", self.lr, 0, low_open=True, why=" (or None for the default)")
        betas = _scalar(self.adam_betas)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ConfigError(f"adam_betas={betas!r} must be two numbers, e.g. (0.9, 0.999).")
        self.adam_betas = tuple(  # JSON gives a list
            float(_real(f"adam_betas[{i}]", b, 0, 1, high_open=True)) for i, b in enumerate(betas)
        )
        for name in ("warmup_fraction", "decay_fraction"):
            setattr(self, name, _real(name, getattr(self, name), 0, 1))
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ConfigError(
                f"warmup_fraction + decay_fraction = "
                f"{self.warmup_fraction + self.decay_fraction} > 1; lower one of them."
            )
        self.grad_clip = _real("grad_clip", self.grad_clip, why=" (0 disables clipping)")
        self.aux_coef = _real("aux_coef", self.aux_coef, 0)
        if self.k_aux is not None:
            self.k_aux = _integer("k_aux", self.k_aux, 1, " (or None for min(512, d_in // 2))")
        for name in ("dead_window_tokens", "density_window_tokens", "init_sample_tokens"):
            setattr(self, name, _integer(name, getattr(self, name), 1))
        self.gamma = _real("gamma", self.gamma, 0, 1, low_open=True)
        self.zipf_head_fraction = _real(
            "zipf_head_fraction", self.zipf_head_fraction, 0, 1, low_open=True
        )
        for name in ("zipf_refit_every", "demand_rerank_every", "log_every"):
            setattr(self, name, _integer(name, getattr(self, name), 1))
        self.l1_coefficient = _real("l1_coefficient", self.l1_coefficient, 0)
        self.l1_adapt_rate = _real(
            "l1_adapt_rate", self.l1_adapt_rate, 0, why=" (0 keeps it fixed)"
        )
        self.resample_every_tokens = _integer(
            "resample_every_tokens", self.resample_every_tokens, 0, " (0: never)"
        )
        self.resample_scale = _real("resample_scale", self.resample_scale, 0, low_open=True)
        self.seed = _integer("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ConfigError(f"seed={self.seed} must be < 2**63 (a torch seed).")
        self.checkpoint_every = _integer(
            "checkpoint_every", self.checkpoint_every, 0, " (0: only at the end)"
        )
        self.keep_checkpoints = _integer(
            "keep_checkpoints",
            self.keep_checkpoints,
            1,
            " (at least the newest checkpoint stays; checkpoint_dir=None writes none)",
        )
        self.device = _device(self.device)
        self.autocast_bf16 = _boolean("autocast_bf16", self.autocast_bf16)

    @property
    def n_steps(self) -> int:
        return self.total_tokens // self.batch_size


def _device(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(_spelled("device", value, "a device name such as 'cpu' or 'cuda:0'"))
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device={value!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:<index>'."
        ) from None
    return value


def resolve_lr(tcfg: TrainConfig, n_features: int) -> float:
    """The learning rate to use: tcfg.lr, or 3.5e-3 / sqrt(F / 2**14) (see TrainConfig.lr)."""
    return tcfg.lr if tcfg.lr is not None else 3.5e-3 / math.sqrt(n_features / 2**14)


def resolve_k_aux(tcfg: TrainConfig, d_in: int) -> int:
    """k_aux: tcfg.k_aux, or min(512, d/2) as in Gao et al. appendix B.1."""
    return tcfg.k_aux if tcfg.k_aux is not None else max(1, min(512, d_in // 2))


def check_compatible(cfg: SAEConfig, tcfg: TrainConfig) -> None:
    """Cross-checks between the SAE and its training run; raises ConfigError with the fix."""
    from .rules import get_rule

    get_rule(cfg.rule).check_training(cfg, tcfg)


__all__ = [
    "SAEConfig",
    "TrainConfig",
    "ConfigError",
    "AUX_LOSSES",
    "resolve_lr",
    "resolve_k_aux",
    "check_compatible",
]
