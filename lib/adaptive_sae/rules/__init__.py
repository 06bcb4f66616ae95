"""Allocation rules, one file each, behind one protocol (``base.AllocationRule``) and a
registry by name. ``get_rule("mutual_choice")`` returns the rule; ``rule_names()`` lists them.

    topk                 each token keeps its top-k affinities              (Gao et al. 2024)
    mutual_choice        the top K = int(k·B) entries of the batch          (alias batch_topk)
    feature_choice       feature j keeps its top-m_j tokens, uniform m      (expert choice)
    feature_choice_zipf  the same with Zipf capacities
    relu_l1              every positive affinity, sparsity from an L1 penalty (baseline)
"""

from __future__ import annotations

from . import relu_l1 as _relu_l1  # noqa: F401  (registers relu_l1)
from .base import (
    AllocationRule,
    codes_at,
    ema_thresholds,
    get_rule,
    register_rule,
    rule_names,
    unregister_rule,
)
from .feature_choice import select_feature_choice
from .mutual_choice import select_mutual_choice
from .topk import select_topk

__all__ = [
    "AllocationRule",
    "codes_at",
    "ema_thresholds",
    "get_rule",
    "register_rule",
    "rule_names",
    "unregister_rule",
    "select_topk",
    "select_mutual_choice",
    "select_feature_choice",
]
