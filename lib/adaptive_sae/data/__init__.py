"""Activation sources (DESIGN §7): one interface, a name registry.

    from adaptive_sae.data import activation_source
    src = activation_source("synthetic", d_in=64, n_true_features=1024, k_true=8)
    x = next(src.batches(1024))  # (1024, 64) float32

Every source has ``d_in``, ``describe()`` (JSON-serialisable provenance),
``batches(batch_size, start_batch=0)`` (endless float32 (B, d_in) batches) and
``held_out(n_tokens)`` ((n, d_in) float32 from a stream ``batches`` never yields).
The language-model sources are imported only when asked for, so importing this package does
not import transformer_lens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import ConfigError
from .synthetic import SyntheticConfig, SyntheticSource


@runtime_checkable
class ActivationSource(Protocol):
    """What the suite needs from a source of activations."""

    d_in: int

    def describe(self) -> dict[str, Any]: ...

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]: ...

    def held_out(self, n_tokens: int) -> torch.Tensor: ...


def _synthetic(**params: Any) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(**params))


def _tiny(**params: Any) -> ActivationSource:
    from .tiny import TinyLMSource

    return TinyLMSource(**params)


def _gpt2(**params: Any) -> ActivationSource:
    from .gpt2 import GPT2Source

    return GPT2Source(**params)


def _hf(**params: Any) -> ActivationSource:
    from .hf import HFSource

    return HFSource(**params)


_SOURCES: dict[str, Callable[..., ActivationSource]] = {
    "synthetic": _synthetic,
    "tiny": _tiny,
    "gpt2": _gpt2,
    "hf": _hf,
}


def register_source(
    name: str, factory: Callable[..., ActivationSource], replace: bool = False
) -> None:
    """Make ``activation_source(name, **params)`` call ``factory(**params)``."""
    if name in _SOURCES and not replace:
        raise ConfigError(
            f"source {name!r} is already registered; pick another name or pass replace=True."
        )
    _SOURCES[name] = factory


def source_names() -> list[str]:
    """Names that activation_source accepts."""
    return sorted(_SOURCES)


def activation_source(name: str, **params: Any) -> ActivationSource:
    """The source registered under ``name``, built from ``params``."""
    if name not in _SOURCES:
        raise ConfigError(
            f"activation source {name!r} is not known; choose one of {source_names()}."
        )
    return _SOURCES[name](**params)


__all__ = [
    "ActivationSource",
    "SyntheticConfig",
    "SyntheticSource",
    "activation_source",
    "register_source",
    "source_names",
]
