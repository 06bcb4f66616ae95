"""adaptive_sae: TopK, Feature Choice and Mutual Choice sparse autoencoders, aux_zipf_loss,
and the experiments of Ayonrinde (2024), "Adaptive Sparse Allocation with Mutual Choice &
Feature Choice Sparse Autoencoders".

    import adaptive_sae as asae
    cfg = asae.SAEConfig(d_in=64, n_features=512, rule="mutual_choice", k=8)
    tcfg = asae.TrainConfig(batch_size=1024, total_tokens=1_000_000, aux_loss="aux_zipf")
    run = asae.train(cfg, tcfg, data)
    asae.evaluate(run.sae, x, mode="inference")
"""

from __future__ import annotations

import importlib

from .config import ConfigError, SAEConfig, TrainConfig

__version__ = "0.1.0"

# Heavier modules load on first use so `import adaptive_sae` stays fast.
_LAZY = {
    "SparseAutoencoder": ("sae", "SparseAutoencoder"),
    "train": ("trainer", "train"),
    "TrainRun": ("trainer", "TrainRun"),
    "Trainer": ("trainer", "Trainer"),
    "Evaluation": ("metrics", "Evaluation"),
    "NonFiniteError": ("trainer", "NonFiniteError"),
    "evaluate": ("metrics", "evaluate"),
    "compare_rules": ("convergence", "compare_rules"),
    "rules": ("rules", None),
    "register_rule": ("rules", "register_rule"),
    "sparse_ops": ("sparse_ops", None),
    "zipf": ("zipf", None),
    "losses": ("losses", None),
    "metrics": ("metrics", None),
    "data": ("data", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'adaptive_sae' has no attribute {name!r}")


__all__ = ["ConfigError", "SAEConfig", "TrainConfig", *_LAZY]
