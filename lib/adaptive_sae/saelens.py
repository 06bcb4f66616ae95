"""Export to and import from SAELens 6.x's folder format (DESIGN §13).

A SAELens folder holds ``cfg.json`` (the architecture and its fields), ``sae_weights.safetensors``
(W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,), and ``threshold`` (F,) for JumpReLU) and,
optionally, ``sparsity.safetensors`` ({"sparsity": log10 feature density}). What this module
writes loads with ``sae_lens.SAE.load_from_disk`` and gives the suite's inference-rule codes and
reconstructions (tests/test_saelens.py checks that against the real SAELens).

    suite rule                       SAELens architecture
    topk                             topk (k)
    mutual_choice / batch_topk       jumprelu, the global θ on every feature
    feature_choice(_zipf)            jumprelu, θ_j per feature
    relu_l1                          standard

Input scaling: a global scale s is folded into the weights (W_enc·s, W_dec/s, b_dec/s; b_enc and
thresholds unchanged, since the affinities are); per-token scaling is SAELens's
``constant_norm_rescale`` (each x to norm √d, undone on the output), the same map exactly.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from . import io
from .config import ConfigError, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
FORMAT_VERSION = "6.0.0"
"""Recorded as ``metadata.sae_lens_version``: SAELens reads folders that say < 6.0 as its old
format, so this names the 6.x format these folders follow."""
SUITE_KEY = "adaptive_sae"
"""Metadata entry holding the suite's own config and scale, so an export re-imports as it was."""
_SAELENS_FILES = {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE}


def architecture_for(cfg: SAEConfig) -> str:
    """The SAELens architecture a suite SAE exports to; ConfigError for a rule that has none."""
    from .rules import get_rule

    rule = get_rule(cfg.rule)
    if rule.name == "topk":
        return "topk"
    if rule.name == "relu_l1":
        return "standard"
    if rule.uses_thresholds:
        return "jumprelu"
    raise ConfigError(
        f"rule={cfg.rule!r} has no SAELens architecture: only topk, relu_l1 and rules whose "
        f"inference is a JumpReLU on thresholds (mutual_choice, feature_choice...) export."
    )


def is_saelens_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like a SAELens SAE folder (cfg.json + sae_weights.safetensors)."""
    d = Path(directory)
    return (d / CFG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()


# ----- export --------------------------------------------------------------------------------
@torch.no_grad()
def save_saelens(
    sae,
    directory: str | os.PathLike,
    *,
    feature_density: Tensor | None = None,
    hook_name: str | None = None,
    model_name: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` as a SAELens 6.x folder that ``sae_lens.SAE.load_from_disk`` reads.

    ``feature_density`` (F,) firing frequencies, if given, go to ``sparsity.safetensors`` as
    SAELens keeps them (log10(density + 1e-10)). ``hook_name``, ``model_name`` and ``metadata``
    (e.g. context_size, prepend_bos) fill SAELens's metadata, which tools such as SAEBench read. The folder is written beside the target and renamed into place, so a reader never
    sees half of it; an existing folder is replaced only if it holds nothing but these files.
    """
    cfg: SAEConfig = sae.cfg
    arch = architecture_for(cfg)
    d, F = cfg.d_in, cfg.n_features
    W_enc = sae.W_enc.detach().float().cpu().clone()
    b_enc = sae.b_enc.detach().float().cpu().clone()
    W_dec = sae.W_dec.detach().float().cpu().clone()
    b_dec = sae.b_dec.detach().float().cpu().clone()
    s = float(sae.input_scale)
    if cfg.input_scaling == "global":
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"input_scale={s} is not a positive number; call init_from_data.")
        W_enc *= s
        W_dec /= s
        b_dec /= s
    normalize = "constant_norm_rescale" if cfg.input_scaling == "per_token" else "none"

    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        theta = sae.thresholds.detach().float().cpu().clone()
        if not bool(torch.isfinite(theta).all()):
            raise ValueError(
                f"this {cfg.rule} SAE has no inference thresholds yet ({int((~torch.isfinite(theta)).sum())} "
                f"of {F} are not finite); train it first, since SAELens's JumpReLU needs them."
            )
        tensors["threshold"] = theta

    sl_cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": None,
            "hook_name": hook_name,
            "model_name": model_name,
            **(metadata or {}),
            SUITE_KEY: {"config": cfg.to_dict(), "input_scale": s},
        },
    }
    if arch == "topk":
        sl_cfg["k"] = int(cfg.k)
        sl_cfg["rescale_acts_by_decoder_norm"] = False

    density = None
    if feature_density is not None:
        density = torch.as_tensor(feature_density, dtype=torch.float32).detach().cpu()
        if density.shape != (F,):
            raise ValueError(f"feature_density has shape {tuple(density.shape)}; expected ({F},).")

    target = io.check_replaceable(directory, _SAELENS_FILES, "a SAELens folder")
    with io.atomic_folder(target) as tmp:
        io.save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
        io.atomic_write_text(tmp / CFG_FILE, json.dumps(sl_cfg, indent=2))
        if density is not None:
            io.save_tensors({"sparsity": torch.log10(density + 1e-10)}, tmp / SPARSITY_FILE)
    return target


# ----- import --------------------------------------------------------------------------------
_RULE_FOR_ARCH = {"topk": "topk", "jumprelu": "feature_choice", "standard": "relu_l1"}


@torch.no_grad()
def load_saelens(directory: str | os.PathLike, device: str = "cpu"):
    """A :class:`SparseAutoencoder` whose inference rule computes what SAELens computes for the
    folder's SAE: topk -> topk, jumprelu -> feature_choice with per-feature thresholds,
    standard -> relu_l1. A folder this suite exported comes back with its own rule and scale.
    """
    from .sae import SparseAutoencoder

    directory = Path(directory)
    if not is_saelens_dir(directory):
        raise FileNotFoundError(
            f"{directory} is not a SAELens SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}."
        )
    raw = json.loads((directory / CFG_FILE).read_text())
    state = load_file(str(directory / WEIGHTS_FILE))
    where = directory / CFG_FILE
    arch = raw.get("architecture")
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if arch is None or version is None or int(str(version).split(".")[0]) < 6:
        raise ConfigError(
            f"{where} is not in SAELens 6.x format (architecture={arch!r}, "
            f"sae_lens_version={version!r}); load it once with sae_lens.SAE.load_from_disk and "
            f"save it again with save_model to convert it."
        )
    if arch not in _RULE_FOR_ARCH:
        raise ConfigError(
            f"{where}: architecture={arch!r} is not supported; this suite reads "
            f"{sorted(_RULE_FOR_ARCH)}."
        )
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (
        ("threshold",) if arch == "jumprelu" else ()
    ):
        if name not in state:
            raise ConfigError(f"{directory / WEIGHTS_FILE} lacks tensor {name!r} ({arch} SAE).")
    W_enc, b_enc = state["W_enc"].double(), state["b_enc"].double()
    W_dec, b_dec = state["W_dec"].double(), state["b_dec"].double()
    d, F = W_enc.shape
    if (raw.get("d_in", d), raw.get("d_sae", F)) != (d, F):
        raise ConfigError(
            f"{where}: d_in={raw.get('d_in')}, d_sae={raw.get('d_sae')} but W_enc is {d}x{F}."
        )
    scale = state.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise ConfigError(
            f"{directory / WEIGHTS_FILE} has a fine-tuning scaling_factor that is not 1; fold "
            f"it with SAELens first (this suite reads plain standard/topk/jumprelu SAEs)."
        )
    if raw.get("reshape_activations", "none") != "none":
        raise ConfigError(
            f"{where}: reshape_activations={raw['reshape_activations']!r}; this suite reads "
            f"flat activations only (reshape_activations='none')."
        )

    normalize = raw.get("normalize_activations", "none")
    if normalize == "constant_norm_rescale":
        input_scaling = "per_token"
    elif normalize == "none":
        input_scaling = "none"
    elif normalize == "expected_average_only_in":
        # SAELens applies no scaling at inference for it either: the factor lives outside.
        warnings.warn(
            f"{where}: normalize_activations='expected_average_only_in' means inputs must be "
            f"scaled by a factor kept outside the folder; SAELens applies none at inference, "
            f"and neither does this import.",
            stacklevel=2,
        )
        input_scaling = "none"
    else:
        raise ConfigError(
            f"{where}: normalize_activations={normalize!r} has no equivalent in this suite; it "
            f"reads 'none', 'constant_norm_rescale' and 'expected_average_only_in'."
        )

    if not raw.get("apply_b_dec_to_input", True):
        # SAELens then encodes x W_enc + b_enc; the suite always subtracts b_dec first.
        b_enc = b_enc + b_dec @ W_enc
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)  # selection on P·‖W_dec‖: fold the norms, as SAELens does
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
    threshold = state["threshold"].double() if arch == "jumprelu" else None

    suite = (raw.get("metadata") or {}).get(SUITE_KEY)
    if suite is not None:
        cfg = SAEConfig.from_dict(suite["config"])
        s = float(suite["input_scale"])
        if cfg.input_scaling == "global":  # undo the fold: the suite's own weights again
            W_enc, W_dec, b_dec = W_enc / s, W_dec * s, b_dec * s
    else:
        k = raw.get("k", 1) if arch == "topk" else 1
        cfg = SAEConfig(
            d_in=d, n_features=F, rule=_RULE_FOR_ARCH[arch], k=k, input_scaling=input_scaling
        )
        s = 1.0

    sae = SparseAutoencoder(cfg)
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(b_enc)
    sae.W_dec.copy_(W_dec)
    sae.b_dec.copy_(b_dec)
    sae.input_scale.fill_(s)
    if threshold is not None:
        sae.thresholds.copy_(threshold)
    return sae.to(device)


def load_feature_density(directory: str | os.PathLike) -> Tensor | None:
    """Feature densities (F,) from a SAELens folder's ``sparsity.safetensors``, or None."""
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        return None
    return 10 ** load_file(str(path))["sparsity"].double()


__all__ = [
    "architecture_for",
    "is_saelens_dir",
    "load_feature_density",
    "load_saelens",
    "save_saelens",
]
