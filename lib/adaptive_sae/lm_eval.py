"""Evaluations that need the language model (DESIGN §8): downstream loss with the SAE spliced in,
top-activating contexts of a feature, and per-token L0 against token difficulty.

Splicing. The SAE's reconstruction replaces the activation at its hook (``run_with_hooks``)
and the model runs on. Positions before ``first`` (default 1: the first position of each
context, which the activation store leaves out of training) keep their clean activation under
every intervention, and the cross-entropy is averaged over the predictions made from positions
``first`` onwards, so every intervention is scored on the same predictions. Loss units are nats.

    ce_clean             the model as it is
    ce_sae[mode]         activation -> sae.reconstruct(activation, mode)
    ce_zero, ce_mean     activation -> 0, or -> its mean over the evaluated tokens
    delta_ce[mode]            = ce_sae − ce_clean
    loss_recovered_zero[mode] = (ce_zero − ce_sae) / (ce_zero − ce_clean)   (SAELens, SAEBench)
    loss_recovered_mean[mode] = (ce_mean − ce_sae) / (ce_mean − ce_clean)   (BatchTopK)

Under the training rule (batch-level for Feature Choice and Mutual Choice) the spliced tokens
are shuffled with a fixed permutation and reconstructed in batches of the SAE's training batch
size, as in training; the inference rule is per token.

Difficulty. ``token_difficulty`` gives, for each position t, the model's loss on the next byte
(token t + 1), the prediction that the activation at t serves, in bits. ``l0_vs_difficulty``
reports the Spearman rank correlation of each token's L0 with it and with the squared
reconstruction error that a reference SAE (e.g. TopK) leaves on the token.

``python -m adaptive_sae.lm_eval`` trains an SAE of every rule on the embedded model's
activations and prints (and writes) NMSE and ΔCE under both rules: see ``lm_comparison``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .data.tiny import activations_at

Mode = Literal["train", "inference"]
ModeArg = Mode | Literal["both"] | Sequence[Mode]


class SpliceableSAE(Protocol):
    """What the evaluations need from an SAE."""

    def encode(self, x: Tensor, mode: Mode = "train") -> Tensor: ...

    def reconstruct(self, x: Tensor, mode: Mode = "inference") -> Tensor: ...


class IdentitySAE:
    """A stand-in "SAE" that reconstructs its input exactly (codes = the input itself)."""

    def __init__(self, d_in: int) -> None:
        self.d_in = d_in

    def encode(self, x: Tensor, mode: Mode = "train") -> Tensor:
        return x

    def reconstruct(self, x: Tensor, mode: Mode = "inference") -> Tensor:
        return x


def _modes(mode: ModeArg) -> list[Mode]:
    if mode == "both":
        return ["train", "inference"]
    if isinstance(mode, str):
        if mode not in ("train", "inference"):
            raise ValueError(f"mode={mode!r} is not known; use 'train', 'inference' or 'both'.")
        return [mode]  # type: ignore[list-item]
    return [m for m in _modes("both") if m in mode]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _train_batch_size(sae: Any) -> int:
    b = getattr(sae, "train_batch_size", None)
    return int(b) if b is not None and int(b) > 0 else 4096


@torch.no_grad()
def hook_activations(model, tokens: Tensor, hook: str, batch_size: int = 64) -> Tensor:
    """Activations (n, T, d) at `hook` for contexts (n, T), in float32 on the CPU."""
    dev = _device(model)
    out = [
        activations_at(model, tokens[i : i + batch_size].to(dev), hook).float().cpu()
        for i in range(0, tokens.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def sae_apply(
    sae: SpliceableSAE,
    x: Tensor,
    mode: Mode,
    what: Literal["reconstruct", "encode"] = "reconstruct",
    seed: int = 0,
) -> Tensor:
    """sae.reconstruct (or encode) of tokens x (N, d). Under the training rule, x is shuffled
    with a fixed permutation and processed in batches of the SAE's training batch size, and the
    result is put back in the original order; under the inference rule, in plain chunks."""
    fn = getattr(sae, what)
    dev = getattr(getattr(sae, "W_dec", None), "device", x.device)
    B = _train_batch_size(sae)
    if mode == "train":
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        xs = x[perm]
    else:
        perm, xs = None, x
    outs = [fn(xs[i : i + B].to(dev), mode=mode).float().cpu() for i in range(0, x.shape[0], B)]
    y = torch.cat(outs)
    if perm is not None:
        y = y[torch.argsort(perm)]
    return y


@torch.no_grad()
def _spliced_losses(
    model, tokens: Tensor, hook: str, replacement: Tensor, first: int, batch_size: int
) -> Tensor:
    """Per-token next-token losses (n, T-1) with positions >= first at `hook` replaced."""
    dev = _device(model)
    losses = []
    for i in range(0, tokens.shape[0], batch_size):
        rep = replacement[i : i + batch_size].to(dev)

        def splice(act: Tensor, hook: Any = None, rep: Tensor = rep) -> Tensor:
            act = act.clone()
            act[:, first:] = rep[:, first:].to(act.dtype)
            return act

        x = tokens[i : i + batch_size].to(dev)
        per_tok = model.run_with_hooks(
            x, fwd_hooks=[(hook, splice)], return_type="loss", loss_per_token=True
        )
        losses.append(per_tok.float().cpu())
    return torch.cat(losses)


@torch.no_grad()
def token_losses(model, tokens: Tensor, batch_size: int = 64) -> Tensor:
    """Next-token losses (n, T-1) in nats: entry t is the loss on token t+1 given tokens <= t."""
    dev = _device(model)
    out = [
        model(tokens[i : i + batch_size].to(dev), return_type="loss", loss_per_token=True)
        .float()
        .cpu()
        for i in range(0, tokens.shape[0], batch_size)
    ]
    return torch.cat(out)


def _nmse(x: Tensor, x_hat: Tensor) -> float:
    xd = x.double()
    return float((xd - x_hat.double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())


@torch.no_grad()
def downstream_loss(
    model,
    sae: SpliceableSAE,
    tokens: Tensor,
    hook: str,
    mode: ModeArg = "both",
    batch_size: int = 32,
    first: int = 1,
) -> dict[str, Any]:
    """Cross-entropy (nats) of the model on `tokens` (n, T) clean, with the SAE spliced in at
    `hook` under each rule, and with zero- and mean-ablation; ΔCE and loss recovered (see the
    module docstring). Also the NMSE and mean L0 of the SAE on the spliced activations."""
    if tokens.ndim != 2 or tokens.shape[1] <= first + 1:
        raise ValueError(
            f"tokens must be (n, T) with T > first + 1 = {first + 1}; got {tuple(tokens.shape)}."
        )
    acts = hook_activations(model, tokens, hook, batch_size)  # (n, T, d)
    n, T, d = acts.shape
    spliced = acts[:, first:].reshape(-1, d)  # the tokens an intervention touches
    clean = token_losses(model, tokens, batch_size)[:, first:]

    def ce(replacement: Tensor) -> float:
        return float(
            _spliced_losses(model, tokens, hook, replacement, first, batch_size)[:, first:]
            .double()
            .mean()
        )

    ce_clean = float(clean.double().mean())
    ce_zero = ce(torch.zeros_like(acts))
    mean = spliced.double().mean(0).float()
    ce_mean = ce(mean.expand_as(acts))
    out: dict[str, Any] = {
        "n_contexts": n,
        "context_len": T,
        "n_tokens_scored": int(clean.numel()),
        "first_spliced_position": first,
        "units": "nats",
        "ce_clean": ce_clean,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
    }
    for r in _modes(mode):
        x_hat = sae_apply(sae, spliced, r)
        codes = sae_apply(sae, spliced, r, what="encode")
        rep = acts.clone()
        rep[:, first:] = x_hat.view(n, T - first, d)
        ce_sae = ce(rep)
        out[f"ce_sae_{r}"] = ce_sae
        out[f"delta_ce_{r}"] = ce_sae - ce_clean
        out[f"loss_recovered_zero_{r}"] = _recovered(ce_zero, ce_sae, ce_clean)
        out[f"loss_recovered_mean_{r}"] = _recovered(ce_mean, ce_sae, ce_clean)
        out[f"nmse_{r}"] = _nmse(spliced, x_hat)
        out[f"l0_{r}"] = float((codes != 0).sum(-1).double().mean())
    return out


def _recovered(ce_ablate: float, ce_sae: float, ce_clean: float) -> float:
    gap = ce_ablate - ce_clean
    return (ce_ablate - ce_sae) / gap if gap != 0 else float("nan")


# ----- features ---------------------------------------------------------------------------------
def default_decoder(model) -> Callable[[list[int]], str]:
    """Token ids -> text: the model's tokenizer when it has one, else UTF-8 bytes."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return lambda ids: tok.decode(ids)
    return lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _visible(s: str) -> str:
    return s.replace("\x00", "␀").replace("\n", "⏎").replace("\t", "⇥")


@torch.no_grad()
def top_activating_contexts(
    model,
    sae: SpliceableSAE,
    tokens: Tensor,
    hook: str,
    feature: int,
    n: int = 10,
    window: tuple[int, int] = (24, 8),
    mode: Mode = "inference",
    first: int = 1,
    batch_size: int = 64,
    decode: Callable[[list[int]], str] | None = None,
) -> list[dict[str, Any]]:
    """The n (context, position) pairs where `feature` is largest, each shown as text with the
    activating token marked «like this»; `window` = tokens shown before and after it. Newlines
    show as ⏎, tabs as ⇥, document starts as ␀. Positions before `first` are skipped."""
    decode = decode or default_decoder(model)
    acts = hook_activations(model, tokens, hook, batch_size)
    n_ctx, T, d = acts.shape
    codes = sae_apply(sae, acts[:, first:].reshape(-1, d), mode, what="encode")
    values = codes[:, feature].view(n_ctx, T - first)
    flat = values.flatten()
    k = min(n, int((flat > 0).sum()))
    top = torch.topk(flat, k)
    before, after = window
    out = []
    for v, idx in zip(top.values.tolist(), top.indices.tolist()):
        c, p = divmod(idx, T - first)
        p += first
        ids = tokens[c].tolist()
        left = decode(ids[max(0, p - before) : p])
        mid = decode(ids[p : p + 1])
        right = decode(ids[p + 1 : p + 1 + after])
        out.append(
            {
                "context": c,
                "position": p,
                "activation": v,
                "text": f"{_visible(left)}«{_visible(mid)}»{_visible(right)}",
            }
        )
    return out


# ----- difficulty ---------------------------------------------------------------------------------
@torch.no_grad()
def token_difficulty(
    model, tokens: Tensor, batch_size: int = 64, unit: Literal["bits", "nats"] = "bits"
) -> Tensor:
    """(n, T-1) difficulty of each position t: the model's loss on token t+1, in `unit`."""
    loss = token_losses(model, tokens, batch_size)
    return loss / math.log(2) if unit == "bits" else loss


def rank_correlation(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> tuple[float, float]:
    """Spearman's rank correlation (rho, p-value) of two equal-length sequences; (nan, nan)
    when either is constant (e.g. the L0 of a TopK SAE)."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    res = spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


@torch.no_grad()
def l0_vs_difficulty(
    model,
    sae: SpliceableSAE,
    tokens: Tensor,
    hook: str,
    mode: Mode = "inference",
    reference_sae: SpliceableSAE | None = None,
    first: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Per-token L0 of `sae` at positions first..T-2 against (a) the model's next-token loss
    (bits) and (b) the squared reconstruction error ‖x − x̂‖² of `reference_sae` (when given),
    with Spearman rank correlations. Arrays are returned flattened in (context, position) order."""
    acts = hook_activations(model, tokens, hook, batch_size)[:, first:-1]  # positions first..T-2
    n, P, d = acts.shape
    x = acts.reshape(-1, d)
    l0 = (sae_apply(sae, x, mode, what="encode") != 0).sum(-1).double()
    loss = token_difficulty(model, tokens, batch_size)[:, first:].reshape(-1).double()
    rho, p = rank_correlation(l0, loss)
    out: dict[str, Any] = {
        "n_tokens": int(l0.numel()),
        "mode": mode,
        "spearman_l0_vs_lm_loss": rho,
        "p_l0_vs_lm_loss": p,
        "l0": l0.numpy(),
        "lm_loss_bits": loss.numpy(),
    }
    if reference_sae is not None:
        err = (x - sae_apply(reference_sae, x, "inference")).double().pow(2).sum(-1)
        rho_e, p_e = rank_correlation(l0, err)
        out.update(
            spearman_l0_vs_ref_error=rho_e,
            p_l0_vs_ref_error=p_e,
            spearman_ref_error_vs_lm_loss=rank_correlation(err, loss)[0],
            ref_error=err.numpy(),
        )
    return out


# ----- the comparison table -----------------------------------------------------------------------
RULES = ("topk", "feature_choice", "feature_choice_zipf", "mutual_choice", "relu_l1")


def lm_comparison(
    variants: Sequence[Any] = RULES,
    *,
    n_features: int = 1024,
    k: float = 8.0,
    batch_size: int = 1024,
    total_tokens: int = 500_000,
    eval_tokens: int = 32_768,
    eval_contexts: int = 128,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    start_tokens: int | None = None,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    source: Any = None,
    out_dir: str | None = None,
    log: Callable[[str], None] | None = print,
) -> Any:
    """Compare the variants (rule names or ``experiments.Variant``) on the embedded model's
    activations (harvested once into the disk cache) with the convergence protocol
    (``adaptive_sae.compare_rules``: learning rates bracketed, budgets doubled from
    ``start_tokens`` (default total_tokens / 4) up to ``total_tokens``, ``seeds`` (default
    ``[seed]``) on test tokens), and report NMSE on held-out activations and downstream loss
    in both modes, averaged over seeds, with ``converged``. Returns a DataFrame; writes
    ``table.csv``, ``metrics.json`` and ``provenance.json`` under
    ``results/lm_comparison/<run>/`` (or `out_dir`)."""
    from adaptive_sae.data import activation_source

    from . import experiments as ex
    from . import results
    from .convergence import converge

    seeds = list(seeds) if seeds is not None else [seed]
    src = source or activation_source("tiny", seed=seed, cache=True, cache_tokens=total_tokens)
    ctx = src.eval_contexts(eval_contexts)
    conv = converge(
        src,
        ex.EvalSet(src.held_out(eval_tokens)),
        rules=variants,
        k=k,
        n_features=n_features,
        batch_size=batch_size,
        seeds=seeds,
        max_tokens=total_tokens,
        start_tokens=start_tokens or max(batch_size, total_tokens // 4),
        lrs=lrs,
        data_tokens=total_tokens,
        keep_runs=True,
        log=log,
    )
    per_seed = []
    for (_, row), trained in zip(conv.runs.iterrows(), conv.trained):
        row = row.to_dict()
        ds = downstream_loss(src.model, trained.run.sae, ctx, src.hook, mode="both")
        row.update({key: ds[key] for key in ("ce_clean", "ce_zero", "ce_mean")})
        for m, suffix in (("train", ""), ("inference", "_inference")):
            row["delta_ce" + suffix] = ds[f"delta_ce_{m}"]
            row["loss_recovered" + suffix] = ds[f"loss_recovered_zero_{m}"]
            row["loss_recovered_mean" + suffix] = ds[f"loss_recovered_mean_{m}"]
        diff = l0_vs_difficulty(src.model, trained.run.sae, ctx, src.hook, mode="inference")
        row["spearman_l0_vs_lm_loss"] = diff["spearman_l0_vs_lm_loss"]
        per_seed.append(row)
    seed_rows = pd.DataFrame(per_seed)
    numeric = seed_rows.select_dtypes("number").columns.drop(["seed", "lr", "tokens"], "ignore")
    rows = []
    for name in [ex.as_variant(v).name for v in variants]:
        g = seed_rows[seed_rows["variant"] == name]
        t = conv.table.set_index("rule").loc[name]
        row = {"variant": name, "rule": g["rule"].iloc[0], **g[numeric].mean().to_dict()}
        row.update({f"{c}_std": float(g[c].std()) for c in ("delta_ce", "dead_pct") if c in g})
        row.update(
            nmse_std=float(g["nmse"].std()),
            seeds=len(g),
            lr=float(t["lr"]),
            tokens=int(t["tokens"]),
            converged=bool(t["converged"]),
        )
        rows.append(row)
        if log:
            log(
                f"{name:>20}: NMSE {row['nmse']:.3f}/{row['nmse_inference']:.3f}  "
                f"ΔCE {row['delta_ce']:.4f}/{row['delta_ce_inference']:.4f} nats "
                f"(train/inference mode), lr {row['lr']:g}, {row['tokens']:,} tokens, "
                f"{'converged' if row['converged'] else 'not converged'}"
            )
    df = pd.DataFrame(rows)
    params = {
        "variants": [ex.as_variant(v).name for v in variants],
        "n_features": n_features,
        "k": k,
        "batch_size": batch_size,
        "total_tokens": total_tokens,
        "eval_tokens": eval_tokens,
        "eval_contexts": eval_contexts,
        "seeds": seeds,
        "start_tokens": start_tokens,
        "lrs": list(lrs),
    }
    rd = results.ResultsDir("lm_comparison", run_name="tiny", root=out_dir)
    rd.save_table("table", df)
    rd.save_metrics(
        {
            f"{r['variant']}_{key}": v
            for r in rows
            for key, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    rd.save_provenance(params, source=src, seeds=seeds)
    if log:
        cols = [
            "variant",
            "nmse",
            "nmse_inference",
            "l0_mean",
            "l0_mean_inference",
            "delta_ce",
            "delta_ce_inference",
            "loss_recovered_inference",
            "spearman_l0_vs_lm_loss",
        ]
        log(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        log(f"written to {results.relative_to_repo(rd.path)}")
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train an SAE of every rule on the embedded model and compare NMSE and ΔCE."
    )
    p.add_argument(
        "--tokens", type=int, default=500_000, help="the largest training budget per SAE"
    )
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--k", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds on test tokens (default: --seed)"
    )
    p.add_argument(
        "--start-tokens",
        type=int,
        default=None,
        help="the protocol's first budget, doubled up to --tokens (default: a quarter of it)",
    )
    p.add_argument("--rules", nargs="+", default=list(RULES), help="registered rule names")
    a = p.parse_args(argv)
    lm_comparison(
        a.rules,
        n_features=a.features,
        k=a.k,
        batch_size=a.batch_size,
        total_tokens=a.tokens,
        seed=a.seed,
        seeds=a.seeds,
        start_tokens=a.start_tokens,
    )


__all__ = [
    "IdentitySAE",
    "SpliceableSAE",
    "downstream_loss",
    "hook_activations",
    "l0_vs_difficulty",
    "lm_comparison",
    "rank_correlation",
    "sae_apply",
    "token_difficulty",
    "token_losses",
    "top_activating_contexts",
]


if __name__ == "__main__":
    main()
