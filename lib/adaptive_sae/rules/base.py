"""The protocol every allocation rule implements, and the registry of rules by name.

A rule decides which (token, feature) pairs of a batch are matched (DESIGN §3), how a trained
SAE encodes one token without a batch (DESIGN §4), and what state that needs. Adding a rule is
one file: subclass :class:`AllocationRule`, implement ``select`` (and ``infer`` if the rule is
batch-level), and call :func:`register_rule` on an instance. Every experiment, table and plot
then takes it by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..config import ConfigError

if TYPE_CHECKING:
    from ..config import SAEConfig, TrainConfig
    from ..sae import SparseAutoencoder
    from ..sparse_ops import Workspace
    from ..stats import FeatureStats


class AllocationRule:
    """One allocation rule. Instances are stateless; per-SAE state lives in the SAE's buffers
    (declared by :meth:`buffers`), per-run state in the trainer (:meth:`init_train_state`)."""

    name: ClassVar[str] = ""
    """The name an ``SAEConfig(rule=...)`` uses."""
    aliases: ClassVar[tuple[str, ...]] = ()
    """Other names of the same rule (they train identically and are reported by their own name)."""
    label: ClassVar[str] = ""
    """How tables and plots call it."""
    batch_level: ClassVar[bool] = False
    """Whether the training selection depends on the whole batch (then ``infer`` differs)."""
    uses_thresholds: ClassVar[bool] = False
    """Whether inference is a JumpReLU on the ``thresholds`` (F,) buffer kept during training."""
    sparse: ClassVar[bool] = True
    """Whether the training step reconstructs through the sparse kernel (False: dense codes)."""

    # ----- configuration ---------------------------------------------------------------------
    def check(self, cfg: SAEConfig) -> None:
        """Raise ConfigError (naming the field and the fix) if ``cfg`` cannot use this rule."""

    def check_training(self, cfg: SAEConfig, tcfg: TrainConfig) -> None:
        """Cross-checks between the SAE and its training run (budget against batch size...)."""
        if self.batch_level and cfg.budget(tcfg.batch_size) < 1:
            raise ConfigError(
                f"k * batch_size = {cfg.k} * {tcfg.batch_size} < 1: the batch has no match to "
                f"spend; raise batch_size or k."
            )

    def buffers(self, cfg: SAEConfig) -> dict[str, Tensor]:
        """State the SAE keeps for this rule (saved with its weights)."""
        if self.uses_thresholds:
            return {"thresholds": torch.full((cfg.n_features,), float("nan"))}
        return {}

    # ----- training rule ---------------------------------------------------------------------
    def select(self, sae: SparseAutoencoder, P: Tensor, ws: Workspace | None = None) -> Tensor:
        """Flat indices b·F + f (ascending, int64) of the matches in the affinities P (B, F)."""
        raise NotImplementedError

    def select_mask(self, sae: SparseAutoencoder, P: Tensor) -> Tensor | None:
        """Rules with dense codes (``sparse = False``) may give their matches as a boolean
        (B, F) mask instead of flat indices, when most entries match and indexing them would
        cost more than the step; ``observe`` then receives the mask as ``idx``. It must be
        per token (no data-parallel selection is run for it). None: use ``select``."""
        return None

    def select_global(self, sae: SparseAutoencoder, P: Tensor, ws, comm) -> Tensor:
        """Data-parallel selection: this rank's matches of the rule applied to all ranks'
        tokens together (``adaptive_sae.distributed``); P is this rank's (B/W, F) block."""
        if comm.world == 1 or not self.batch_level:
            return self.select(sae, P, ws)
        raise ConfigError(
            f"rule {self.name!r} depends on the whole batch but has no data-parallel selection; "
            f"implement select_global (see adaptive_sae.distributed) or train in one process."
        )

    @torch.no_grad()
    def observe(
        self,
        sae: SparseAutoencoder,
        P: Tensor,
        idx: Tensor,
        stats: FeatureStats,
        step: int,
        tcfg: TrainConfig,
        comm=None,
    ) -> None:
        """Update the rule's state from one training batch (after the optimiser step). Under
        data parallelism ``comm`` reduces over ranks (``distributed.LocalComm`` otherwise)."""

    # ----- the rule's own loss term and its controller (ReLU+L1) -------------------------------
    def init_train_state(self, tcfg: TrainConfig) -> dict[str, float]:
        return {}

    def penalty(self, sae: SparseAutoencoder, codes: Tensor, state: dict[str, float]):
        """An extra loss term on dense codes, or None."""
        return None

    def penalty_and_grads(
        self, sae: SparseAutoencoder, code_sums: Tensor, batch_size: int, state: dict[str, float]
    ):
        """For a penalty linear in the codes, Σ_b Σ_j w_j z_bj (w may depend on W_dec): its
        value, its gradient with respect to each code as the (F,) row w, and with respect to
        W_dec, from the codes' per-feature sums over the batch (F,), without autograd; None
        if the rule has no penalty. A rule whose ``penalty`` is not matched here trains
        through autograd (``has_closed_form``)."""
        return None

    def has_closed_form(self) -> bool:
        """Whether a dense-code step can take its gradient in closed form: the rule has no
        penalty, or gives the penalty's gradients (``penalty_and_grads``)."""
        own = type(self)
        return (
            own.penalty is AllocationRule.penalty
            or own.penalty_and_grads is not AllocationRule.penalty_and_grads
        )

    def after_step(self, state: dict[str, float], n_matched: int, batch_size: int, cfg, tcfg):
        """Update ``state`` after a step (e.g. an adaptive penalty coefficient)."""

    # ----- inference rule --------------------------------------------------------------------
    def ready(self, sae: SparseAutoencoder) -> bool:
        """Whether the batch-independent inference rule can be used (state estimated)."""
        if self.uses_thresholds:
            return bool(torch.isfinite(sae.thresholds).all())
        return True

    def infer(self, sae: SparseAutoencoder, P: Tensor) -> Tensor:
        """Codes (N, F) per token, batch independent. Default: JumpReLU on the thresholds for
        threshold rules, else the training rule applied to the given rows."""
        if self.uses_thresholds:
            return P.relu() * (P > sae.thresholds)
        return codes_at(P, self.select(sae, P))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label or self.name, "aliases": self.aliases}


def codes_at(P: Tensor, flat_idx: Tensor) -> Tensor:
    """Dense codes Z (B, F): ReLU(P) at the selected entries, 0 elsewhere (no autograd)."""
    flat = P.detach().reshape(-1)
    out = torch.zeros_like(flat)
    out[flat_idx] = flat[flat_idx].clamp_min(0)
    return out.view(P.shape)


@torch.no_grad()
def ema_thresholds(sae: SparseAutoencoder, values: Tensor, seen: Tensor | None = None) -> None:
    """θ ← m·θ + (1 − m)·values where seen (θ takes the first value it sees), m the SAE's
    ``threshold_momentum``. DESIGN §4."""
    m = sae.cfg.threshold_momentum
    old = sae.thresholds
    values = values.to(old.dtype)
    new = torch.where(torch.isfinite(old), m * old + (1 - m) * values, values)
    sae.thresholds.copy_(new if seen is None else torch.where(seen, new, old))


_RULES: dict[str, AllocationRule] = {}


def register_rule(rule: AllocationRule, *, replace: bool = False) -> AllocationRule:
    """Make ``rule`` available by its name and aliases everywhere (configs, experiments, plots)."""
    if not rule.name:
        raise ValueError(f"{type(rule).__name__} has no name; set the class attribute `name`.")
    for n in (rule.name, *rule.aliases):
        if n in _RULES and not replace and _RULES[n] is not rule:
            raise ValueError(f"a rule named {n!r} is already registered; pass replace=True.")
    for n in (rule.name, *rule.aliases):
        _RULES[n] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Remove a rule (and its aliases) from the registry."""
    rule = _RULES.get(name)
    if rule is not None:
        for n in (rule.name, *rule.aliases):
            _RULES.pop(n, None)


def get_rule(name: str) -> AllocationRule:
    """The rule registered under ``name``; ConfigError listing the known names otherwise."""
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"rule={name!r} is not known; choose one of {rule_names(aliases=True)} or register "
            f"yours with adaptive_sae.rules.register_rule."
        ) from None


# The order of tables and plots: the built-in rules first, then others as registered.
BUILTIN_ORDER = (
    "topk",
    "batch_topk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_zipf",
    "relu_l1",
)


def rule_names(aliases: bool = True) -> list[str]:
    """Registered names, built-in rules first in ``BUILTIN_ORDER``, then the others in
    registration order; ``aliases`` includes names like batch_topk."""
    names = [n for n, r in _RULES.items() if n == r.name or aliases]
    rank = {n: i for i, n in enumerate(BUILTIN_ORDER)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))
