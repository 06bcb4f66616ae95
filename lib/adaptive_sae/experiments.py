"""Experiment-level functions the notebooks call (DESIGN §9): train a grid of rules x seeds and
return tidy tables, aggregate across seeds, measure step times. No algorithm lives in a notebook;
none lives here either: this module only composes the library (``train``, ``evaluate``,
``rules``, ``zipf``, the sources) into experiments and flattens what they return into
pandas tables, one row per trained SAE.

    from adaptive_sae import experiments as ex
    src = ex.make_source("synthetic", seed=0, synthetic={"d_in": 64, "k_true": 8})
    data = ex.collect_tokens(src, 200_000)
    ev = ex.EvalSet.from_source(src, 8192)
    grid = ex.train_grid(data, variants=["topk", "mutual_choice"], seeds=[0, 1], k_values=[8],
                         widths=[512], batch_size=1024, total_tokens=200_000, eval_set=ev)
    ex.summarise(grid.table, ["variant", "k"], ["nmse", "l0_mean", "dead_pct"])
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import results, zipf
from .config import ConfigError, SAEConfig, TrainConfig
from .metrics import evaluate
from .rules import get_rule, rule_names
from .sae import SparseAutoencoder
from .trainer import TrainRun, train


def all_rules() -> list[str]:
    """Every registered allocation rule, aliases included (BatchTopK by its own name: at
    training time it is Mutual Choice, and the suite checks that they agree)."""
    return rule_names(aliases=True)


@dataclass(frozen=True)
class Variant:
    """What one trained SAE of a comparison is: a name, its allocation rule, and overrides of
    ``SAEConfig`` / ``TrainConfig`` fields. A plain rule name is the variant of that name."""

    name: str
    rule: str
    sae: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_rule(self.rule)  # an unknown rule fails here, before anything trains
        for key in ("rule", "d_in", "n_features", "k"):
            if key in self.sae:
                raise ValueError(
                    f"variant {self.name!r} sets {key!r} in its overrides; the driver sets it "
                    f"(use the variant's `rule`, or the grid's k_values / widths)."
                )


def as_variant(spec: str | Variant | Mapping[str, Any]) -> Variant:
    """A Variant from a rule name, a Variant, or a mapping of its fields."""
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, str):
        return Variant(spec, spec)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        spec.setdefault("name", spec.get("rule"))
        return Variant(**spec)
    raise TypeError(f"cannot make a variant from {spec!r}; pass a rule name or a Variant.")


# ----------------------------------------------------------------------------- data


def use_threads(threads: int) -> int:
    """Set torch's CPU thread count (0 keeps the current one); return the count in use.

    The suite's problems are small matrices: one thread is usually fastest, and on a machine
    whose cores are shared, more threads than free cores make every parallel region wait for
    a descheduled thread (measured here: 5-10x slower training with 2 threads on 2 busy cores).
    """
    if threads < 0:
        raise ValueError(f"threads={threads} must be >= 0 (0 keeps torch's default).")
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def make_source(
    source: str = "synthetic",
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    lm: Mapping[str, Any] | None = None,
):
    """An activation source by name. ``synthetic`` holds the ground-truth parameters
    (``SyntheticConfig``: d_in, n_true_features, k_true, zipf_exponent, busyness_sigma, ...),
    used only for the synthetic source; ``lm`` the parameters of a language-model source
    ("tiny", "hf", "gpt2"), used only for those."""
    from .data import activation_source

    if source == "synthetic":
        return activation_source("synthetic", seed=seed, **dict(synthetic or {}))
    params = dict(lm or {})
    params.setdefault("seed", seed)
    try:
        return activation_source(source, **params)
    except TypeError:  # a source without a seed parameter
        params.pop("seed")
        return activation_source(source, **params)


def collect_tokens(source, n_tokens: int, chunk: int = 4096) -> torch.Tensor:
    """The first ``n_tokens`` training activations of a source as one (n, d) float32 tensor.

    Training many SAEs on one tensor costs the source once (the trainer reshuffles it each
    epoch from the run's seed) instead of once per SAE."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1.")
    parts, have = [], 0
    for batch in source.batches(chunk):
        parts.append(batch[: n_tokens - have])
        have += parts[-1].shape[0]
        if have >= n_tokens:
            break
    return torch.cat(parts).float()


def training_data(source, n_tokens: int, max_gib: float = 2.0):
    """What to train on: the first ``n_tokens`` activations as one tensor when they fit in
    ``max_gib`` GiB (every SAE of a grid then shares one pass over the source), else the source
    itself, streamed afresh (and deterministically) for each SAE — e.g. GPT-2 at millions of
    tokens."""
    d_in = int(source.d_in)
    if n_tokens * d_in * 4 <= max_gib * 2**30:
        return collect_tokens(source, n_tokens)
    return source


@dataclass
class EvalSet:
    """Held-out activations, with their ground truth when the source is synthetic."""

    x: torch.Tensor
    """(N, d) held-out activations (never seen in training)."""
    n_active: torch.Tensor | None = None
    """(N,) true number of active features per token (synthetic only)."""
    true_features: torch.Tensor | None = None
    """(F_true, d) true feature directions (synthetic only)."""
    difficulty: np.ndarray | None = None
    """(N,) a per-token difficulty from a language model (e.g. its loss), when available."""

    @classmethod
    def from_source(cls, source, n_tokens: int, difficulty: bool = False) -> EvalSet:
        """``n_tokens`` held-out tokens; with their ground truth on synthetic data, and with
        ``difficulty=True`` on a language-model source, the model's loss on the next token at
        each position (``adaptive_sae.lm_eval.token_difficulty``), aligned with the vectors."""
        if hasattr(source, "sample_with_truth"):
            s = source.sample_with_truth(n_tokens)
            return cls(s.x, s.n_active, source.true_features)
        if difficulty and hasattr(source, "eval_contexts"):
            return cls._from_lm(source, n_tokens)
        return cls(source.held_out(n_tokens))

    @classmethod
    def _from_lm(cls, source, n_tokens: int, first: int = 1) -> EvalSet:
        from . import lm_eval

        per_context = source.context_len - first - 1  # positions first..T-2 have a next token
        n_contexts = max(1, -(-n_tokens // per_context))
        tokens = source.eval_contexts(n_contexts)
        acts = lm_eval.hook_activations(source.model, tokens, source.hook)[:, first:-1]
        loss = lm_eval.token_difficulty(source.model, tokens)[:, first:]
        x = acts.reshape(-1, acts.shape[-1])[:n_tokens].float()
        return cls(x, difficulty=loss.reshape(-1)[:n_tokens].double().numpy())


# ----------------------------------------------------------------------------- one SAE


@dataclass
class Trained:
    """One trained SAE with the settings that made it."""

    variant: str
    rule: str
    k: float
    n_features: int
    seed: int
    aux_loss: str
    input_scaling: str
    run: TrainRun
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        """The learning rate actually used (the library default when none was given)."""
        return float(self.run.info.get("lr", float("nan")))

    def key(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rule": self.rule,
            "k": self.k,
            "n_features": self.n_features,
            "aux_loss": self.aux_loss,
            "input_scaling": self.input_scaling,
            "lr": self.lr,
            "seed": self.seed,
            **self.extra,
        }


def train_one(
    data,
    variant: str | Variant,
    *,
    k: float,
    n_features: int,
    seed: int,
    batch_size: int,
    total_tokens: int,
    aux_loss: str = "none",
    input_scaling: str = "global",
    lr: float | None = None,
    sae_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    d_in: int | None = None,
    checkpoint_dir=None,
) -> Trained:
    """Train one SAE of ``variant`` (a rule name or a :class:`Variant`) with the library's
    recipe; ``sae_kwargs``/``train_kwargs`` pass other ``SAEConfig``/``TrainConfig`` fields
    (the variant's own overrides win)."""
    v = as_variant(variant)
    if d_in is None:
        d_in = int(data.shape[1]) if isinstance(data, torch.Tensor) else int(data.d_in)
    sae_fields = {"input_scaling": input_scaling, **dict(sae_kwargs or {}), **dict(v.sae)}
    cfg = SAEConfig(d_in=d_in, n_features=n_features, rule=v.rule, k=k, **sae_fields)
    train_fields = {"aux_loss": aux_loss, "lr": lr, **dict(train_kwargs or {}), **dict(v.train)}
    tcfg = TrainConfig(batch_size=batch_size, total_tokens=total_tokens, seed=seed, **train_fields)
    t0 = time.perf_counter()
    run = train(cfg, tcfg, data, checkpoint_dir=checkpoint_dir)
    return Trained(
        v.name,
        v.rule,
        k,
        n_features,
        seed,
        tcfg.aux_loss,
        cfg.input_scaling,
        run,
        time.perf_counter() - t0,
    )


def evaluate_trained(
    trained: Trained, eval_set: EvalSet, *, modes: Sequence[str] = ("train", "inference")
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scalar metrics of one SAE on held-out tokens under the training rule (batches of the
    training size) and the per-token inference rule; ground-truth recovery on synthetic data.

    Returns (row, arrays): ``row`` maps metric names (``metrics.Evaluation``'s, percentages end
    in ``_pct``) to numbers, inference-mode ones ending in ``_inference``; ``arrays`` holds the
    per-feature ``densities`` and per-token ``l0`` of each mode."""
    sae = trained.run.sae
    row: dict[str, Any] = {**trained.key(), "train_seconds": trained.seconds}
    arrays: dict[str, Any] = {}
    for mode in modes:
        res = evaluate(sae, eval_set.x, mode=mode)
        suffix = "" if mode == "train" else "_inference"
        row.update(res.scalars(suffix))
        arrays["densities" + suffix] = res.densities
        arrays["l0" + suffix] = res.l0_per_token
        if eval_set.n_active is not None:
            from .data.synthetic import l0_rank_correlation

            n = len(res.l0_per_token)
            row["l0_rank_correlation" + suffix] = l0_rank_correlation(
                res.l0_per_token, eval_set.n_active[:n]
            )
    if eval_set.true_features is not None:
        from .data.synthetic import fraction_recovered, mean_max_cosine

        row["mean_max_cosine"] = mean_max_cosine(sae.W_dec, eval_set.true_features)
        row["fraction_recovered"] = fraction_recovered(sae.W_dec, eval_set.true_features)
    hist = trained.run.history
    if len(hist):
        row["final_train_nmse"] = float(hist["nmse"].iloc[-1])
        row["dead_pct_train_window"] = float(hist["dead_pct"].iloc[-1])
        row["underutilised_pct_train_window"] = float(hist["underutilised_pct"].iloc[-1])
        row["max_dead_pct_during_training"] = float(hist["dead_pct"].max())
    return row, arrays


def concentration(densities: np.ndarray) -> dict[str, float]:
    """How evenly matches spread over the dictionary: the effective number of features
    (exp of the entropy of the match distribution) as a share of F, and the share of all
    matches taken by the busiest 10 % of features. A collapsed dictionary has a small
    effective share and a large top-10 % share."""
    rho = np.asarray(densities, dtype=float)
    total = rho.sum()
    if total <= 0:
        return {"effective_features_pct": 0.0, "top10pct_share": float("nan")}
    p = rho / total
    nz = p[p > 0]
    eff = float(np.exp(-(nz * np.log(nz)).sum()))
    top = np.sort(p)[::-1][: max(1, int(round(0.1 * p.size)))].sum()
    return {"effective_features_pct": 100.0 * eff / p.size, "top10pct_share": float(top)}


def checkpoint_curve(
    data,
    variant: str | Variant,
    eval_set: EvalSet,
    *,
    checkpoint_every: int,
    checkpoint_dir,
    k: float,
    n_features: int,
    seed: int,
    batch_size: int,
    total_tokens: int,
    aux_loss: str = "none",
    input_scaling: str = "global",
    lr: float | None = None,
    sae_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[pd.DataFrame, Trained]:
    """Train one SAE keeping a checkpoint every ``checkpoint_every`` steps, then evaluate each
    checkpoint on held-out tokens (training rule): NMSE, dead % (no match on those tokens),
    underutilised %, L0 spread and :func:`concentration`. One row per checkpoint."""
    from pathlib import Path

    n_steps = total_tokens // batch_size
    kwargs = {"device": device, **dict(train_kwargs or {})}
    kwargs.update(checkpoint_every=checkpoint_every, keep_checkpoints=n_steps + 1)
    trained = train_one(
        data,
        variant,
        k=k,
        n_features=n_features,
        seed=seed,
        batch_size=batch_size,
        total_tokens=total_tokens,
        aux_loss=aux_loss,
        input_scaling=input_scaling,
        lr=lr,
        sae_kwargs=sae_kwargs,
        train_kwargs=kwargs,
        checkpoint_dir=checkpoint_dir,
    )
    rows = []
    for folder in sorted(Path(checkpoint_dir).glob("step_*")):
        step = int(folder.name.split("_")[1])
        sae = SparseAutoencoder.load(folder)
        res = evaluate(sae, eval_set.x, mode="train", batch_size=batch_size)
        rows.append(
            {
                **trained.key(),
                "step": step,
                "tokens": step * batch_size,
                **res.scalars(),
                **concentration(res.densities),
            }
        )
    return pd.DataFrame(rows), trained


# ----------------------------------------------------------------------------- grids

RESAMPLE = "resample"
"""The dead-feature condition of :func:`train_grid` that resamples dead features instead of
adding an auxiliary loss."""


@dataclass
class Grid:
    """What :func:`train_grid` returns: one table row per trained SAE, the concatenated
    training histories, per-feature densities and per-token L0 (long tables), and the runs."""

    table: pd.DataFrame
    histories: pd.DataFrame
    densities: pd.DataFrame
    l0: pd.DataFrame
    runs: list[Trained]


def train_grid(
    data,
    *,
    variants: Sequence[str | Variant],
    seeds: Sequence[int],
    k_values: Sequence[float] = (8,),
    widths: Sequence[int] = (512,),
    aux_losses: Sequence[str] = ("none",),
    input_scalings: Sequence[str] = ("global",),
    batch_size: int = 1024,
    total_tokens: int = 200_000,
    eval_set: EvalSet | None = None,
    lrs: Sequence[float | None] = (None,),
    sae_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    keep_runs: bool = False,
    keep_l0: bool = False,
    progress: bool = True,
    device: str = "cpu",
    resample_every_tokens: int | None = None,
) -> Grid:
    """The one experiment driver: train every combination of variant (a rule name or a
    :class:`Variant`) x k x width x auxiliary loss x input scaling x learning rate x seed on the
    same data, evaluate each on ``eval_set``, and return tidy tables
    (:class:`Grid`). ``lrs`` holds learning rates to try (None: the library's default); pick the
    best per rule afterwards with :func:`best_lr`, so that no rule loses merely for preferring
    another learning rate. ``device`` is where the SAEs train ("cpu", "cuda", ...).

    ``aux_losses`` are the dead-feature conditions: an auxiliary loss ("none", "aux_k",
    "aux_zipf") or :data:`RESAMPLE`, no auxiliary loss and dead features re-initialised every
    ``resample_every_tokens`` tokens instead (Anthropic's 2023 recipe, the paper's "w/
    resampling" baseline); the table's ``aux_loss`` column names the condition."""
    from tqdm.auto import tqdm

    from .grid import train_many

    variants = [as_variant(v) for v in variants]
    if RESAMPLE in aux_losses and not resample_every_tokens:
        raise ConfigError(
            f"aux_losses includes {RESAMPLE!r} but resample_every_tokens={resample_every_tokens!r}"
            f"; pass resample_every_tokens=N (> 0), how often dead features are re-initialised."
        )
    combos = list(
        itertools.product(input_scalings, widths, k_values, aux_losses, variants, lrs, seeds)
    )
    # every SAE in one pass over the data (adaptive_sae.grid): the combinations are grouped by
    # what SAEs trained together must share (a variant may override it) and chunked so that
    # their parameters, optimiser state and affinities stay within ~1 GiB
    configs = []
    for scaling, width, k, aux, variant, lr, seed in combos:
        if isinstance(data, torch.Tensor):
            d_in = int(data.shape[1])
        else:
            d_in = int(data.d_in)
        sae_fields = {"input_scaling": scaling, **dict(sae_kwargs or {}), **dict(variant.sae)}
        cfg = SAEConfig(d_in=d_in, n_features=width, rule=variant.rule, k=k, **sae_fields)
        train_fields = {
            "aux_loss": aux,
            "lr": lr,
            **{"device": device, **dict(train_kwargs or {})},
            **dict(variant.train),
        }
        if aux == RESAMPLE:
            train_fields.update(aux_loss="none", resample_every_tokens=resample_every_tokens)
        tcfg = TrainConfig(
            batch_size=batch_size, total_tokens=total_tokens, seed=seed, **train_fields
        )
        configs.append((cfg, tcfg))
    shared = lambda t: (  # noqa: E731
        t.batch_size,
        t.total_tokens,
        t.device,
        t.autocast_bf16,
        t.checkpoint_every,
    )
    chunks: dict[tuple, list[list[int]]] = {}
    for i, (cfg, tcfg) in enumerate(configs):
        F, d, B = cfg.n_features, cfg.d_in, tcfg.batch_size
        cost = 16 * (2 * d * F + F + d) + (4 * B * F if tcfg.aux_loss != "none" else 0)
        runs_of = chunks.setdefault(shared(tcfg), [[]])
        if runs_of[-1] and sum(c for _, c in runs_of[-1]) + cost > 2**30:
            runs_of.append([])
        runs_of[-1].append((i, cost))
    trained_all: list[Trained | None] = [None] * len(combos)
    bar = tqdm(total=len(combos), desc="training SAEs", unit="SAE", disable=not progress)
    for runs_of in chunks.values():
        for chunk in runs_of:
            ids = [i for i, _ in chunk]
            t0 = time.perf_counter()
            runs = train_many([configs[i] for i in ids], data)
            seconds = (time.perf_counter() - t0) / len(ids)  # the grid's time, shared equally
            for i, run in zip(ids, runs):
                scaling, width, k, aux, variant, lr, seed = combos[i]
                cfg, tcfg = configs[i]
                trained_all[i] = Trained(
                    variant.name,
                    variant.rule,
                    k,
                    width,
                    seed,
                    aux,
                    cfg.input_scaling,
                    run,
                    seconds,
                )
            bar.update(len(ids))
    bar.close()
    return tabulate(trained_all, eval_set, keep_runs=keep_runs, keep_l0=keep_l0)


def tabulate(
    trained: list[Trained | None],
    eval_set: EvalSet | None,
    *,
    keep_runs: bool = False,
    keep_l0: bool = False,
) -> Grid:
    """The :class:`Grid` of trained SAEs: each evaluated on ``eval_set`` (a table row, its
    densities and, with ``keep_l0``, its per-token L0) and its history. The list is consumed
    (its entries set to None as they are tabulated, so that SAEs not kept are freed early)."""
    rows, hists, dens, l0s, kept = [], [], [], [], []
    for i in range(len(trained)):
        one, trained[i] = trained[i], None
        key = one.key()
        h = one.run.history
        # history columns that share a name with a setting hold per-step values
        h = h.rename(columns={c: f"{c}_step" for c in h.columns if c in key})
        for name, value in reversed(list(key.items())):
            h.insert(0, name, value)
        hists.append(h)
        if eval_set is not None:
            row, arrays = evaluate_trained(one, eval_set)
            rows.append(row)
            dens.append(
                pd.DataFrame(
                    {**key, "feature": np.arange(one.n_features), "density": arrays["densities"]}
                )
            )
            if keep_l0:
                frame = {**key, "token": np.arange(len(arrays["l0"])), "l0": arrays["l0"]}
                n = len(arrays["l0"])
                if len(arrays.get("l0_inference", [])) >= n:
                    frame["l0_inference"] = arrays["l0_inference"][:n]
                if eval_set.n_active is not None:
                    frame["n_active"] = eval_set.n_active[:n].numpy()
                if eval_set.difficulty is not None:
                    frame["difficulty"] = np.asarray(eval_set.difficulty)[:n]
                l0s.append(pd.DataFrame(frame))
        else:
            rows.append({**key, "train_seconds": one.seconds})
        if keep_runs:
            kept.append(one)
        del one
    return Grid(
        pd.DataFrame(rows), concat_frames(hists), concat_frames(dens), concat_frames(l0s), kept
    )


def concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The non-empty frames, concatenated (an empty frame if none)."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def best_lr(
    table: pd.DataFrame, by: Sequence[str] = ("variant", "k"), metric: str = "nmse"
) -> pd.DataFrame:
    """The rows of ``table`` whose learning rate gives the lowest mean ``metric`` (across seeds)
    within each group of ``by``; a ``lr_candidates`` column says how many were tried."""
    by = [c for c in by if c in table.columns]
    means = table.groupby([*by, "lr"], dropna=False)[metric].mean().reset_index()
    best = means.loc[means.groupby(by, dropna=False)[metric].idxmin(), [*by, "lr"]]
    n = means.groupby(by, dropna=False)["lr"].nunique().rename("lr_candidates").reset_index()
    return table.merge(best, on=[*by, "lr"]).merge(n, on=by)


def add_delta_ce(
    table: pd.DataFrame, runs: Sequence[Trained], source, n_tokens: int = 4096
) -> pd.DataFrame:
    """Add ΔCE (nats per token) and loss recovered to a :func:`train_grid` table, with each SAE
    spliced into the language model of ``source`` (``adaptive_sae.lm_eval.downstream_loss``)
    on about ``n_tokens`` held-out tokens, under the training and the inference rule."""
    from . import lm_eval

    if not hasattr(source, "model") or not hasattr(source, "eval_contexts"):
        raise ValueError(
            "ΔCE needs a language-model source (source='tiny' or 'gpt2'); synthetic data has "
            "no downstream loss."
        )
    n_contexts = max(1, -(-n_tokens // source.context_len))
    tokens = source.eval_contexts(n_contexts)
    extra = []
    for trained in runs:
        res = lm_eval.downstream_loss(source.model, trained.run.sae, tokens, source.hook)
        extra.append(
            {
                **trained.key(),
                "delta_ce": res["delta_ce_train"],
                "delta_ce_inference": res["delta_ce_inference"],
                "loss_recovered": res["loss_recovered_zero_train"],
                "loss_recovered_inference": res["loss_recovered_zero_inference"],
                "ce_clean": res["ce_clean"],
            }
        )
    keys = [c for c in runs[0].key() if c in table.columns] if runs else []
    return table.merge(pd.DataFrame(extra), on=keys, how="left") if extra else table


def summarise(
    table: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean, std (across seeds) and n of each metric, grouped by ``by``."""
    return results.mean_std(table, by, metrics, seed_col="seed")


def with_mean_std_text(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3):
    """A copy of a :func:`summarise` table whose metric columns read ``mean ± std``."""
    out = summary[[c for c in summary.columns if not c.endswith(("_mean", "_std"))]].copy()
    for m in metrics:
        out[m] = [
            results.format_mean_std(a, b, digits)
            for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])
        ]
    return out


# ----------------------------------------------------------------------------- allocation demo


def demo_affinities(
    n_tokens: int = 12, n_features: int = 16, seed: int = 0, busy_sigma: float = 0.8
) -> torch.Tensor:
    """A small affinity matrix P (B, F) for teaching: Gaussian affinities whose tokens differ in
    scale (some tokens are busy: lognormal row scales) and whose features differ in popularity
    (a Zipf-like column offset), so the rules visibly allocate differently."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(busy_sigma * torch.randn(n_tokens, 1, generator=g))  # (B, 1)
    popularity = 1.0 / torch.arange(1, n_features + 1).float() ** 0.7  # (F,)
    perm = torch.randperm(n_features, generator=g)
    base = torch.randn(n_tokens, n_features, generator=g)  # (B, F)
    return row_scale * (base + 1.5 * popularity[perm]) - 0.5


def allocate(
    P: torch.Tensor,
    k: float,
    zipf_alpha: float = 1.0,
    rules: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Codes (B, F) of each registered rule's training selection on one affinity matrix at the
    same budget K = k·B (Feature Choice capacities ranked by feature index)."""
    B, F = P.shape
    out: dict[str, torch.Tensor] = {}
    for name in rules or ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf"):
        cfg = SAEConfig(d_in=1, n_features=F, rule=name, k=k, zipf_alpha=zipf_alpha)
        out[name] = SparseAutoencoder(cfg).codes_from_pre_acts(P, "train")
    return out


def allocation_counts(codes: Mapping[str, torch.Tensor]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-token and per-feature match counts of each rule's codes: two long tables
    (rule, token, matches) and (rule, feature, matches)."""
    tok, feat = [], []
    for rule, z in codes.items():
        nz = (z > 0).long()
        tok.append(
            pd.DataFrame({"rule": rule, "token": np.arange(z.shape[0]), "matches": nz.sum(1)})
        )
        feat.append(
            pd.DataFrame({"rule": rule, "feature": np.arange(z.shape[1]), "matches": nz.sum(0)})
        )
    return pd.concat(tok, ignore_index=True), pd.concat(feat, ignore_index=True)


def allocation_summary(codes: Mapping[str, torch.Tensor], P: torch.Tensor) -> pd.DataFrame:
    """One row per rule: matches spent, L0 mean/std/min/max across tokens, features left without
    a match, and the share of the total positive affinity mass the selection captured."""
    rows = []
    positive = float(P.relu().sum())
    for rule, z in codes.items():
        nz = z > 0
        per_tok = nz.sum(1).double()
        rows.append(
            {
                "rule": rule,
                "matches": int(nz.sum()),
                "l0_mean": float(per_tok.mean()),
                "l0_std": float(per_tok.std()),
                "l0_min": int(per_tok.min()),
                "l0_max": int(per_tok.max()),
                "unused_features": int((nz.sum(0) == 0).sum()),
                "affinity_captured": float(z.sum()) / positive if positive > 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Zipf fits


def zipf_fits(
    densities: pd.DataFrame,
    by: Sequence[str] = ("rule", "seed"),
    gamma: float = 0.5,
    head_fraction: float = 0.5,
    tail_fraction: float = 0.1,
) -> pd.DataFrame:
    """A Zipf–Mandelbrot fit per group of a long density table (columns ``by`` + ``density``):
    alpha, beta, R² on the head, the share of features below gamma x the law (underutilised),
    and the tail deviation: the median ratio density / law over the lowest ``tail_fraction``
    of ranks (1 = on the law, below 1 = the tail falls under it), and the same over the head."""
    rows = []
    for key, g in densities.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rho = np.sort(g["density"].to_numpy(dtype=float))[::-1].copy()
        fit = zipf.fit_zipf(rho, head_fraction)
        ranks = np.arange(1, rho.size + 1)
        law = fit.predict(ranks)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(law > 0, rho / law, np.nan)
        n_tail = max(1, int(round(tail_fraction * rho.size)))
        n_head = max(1, fit.n_fit)
        under = zipf.underutilised(torch.as_tensor(rho), gamma, fit)
        rows.append(
            {
                **dict(zip(by, key)),
                "zipf_alpha": fit.alpha,
                "zipf_beta": fit.beta,
                "zipf_r2": fit.r2,
                "head_ratio_median": float(np.nanmedian(ratio[:n_head])),
                "tail_ratio_median": float(np.nanmedian(ratio[-n_tail:])),
                "underutilised_pct": 100.0 * float(under.double().mean()),
                "dead_pct": 100.0 * float((rho == 0).mean()),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- difficulty


def l0_by_difficulty(
    per_token: pd.DataFrame, level: str = "n_active", by: Sequence[str] = ("input_scaling", "rule")
) -> pd.DataFrame:
    """Mean and std of per-token L0 at each difficulty level (tokens of all seeds pooled), with
    the number of tokens at that level."""
    by = [c for c in by if c in per_token.columns]
    g = per_token.groupby([*by, level])["l0"]
    return g.agg(l0_mean="mean", l0_std="std", tokens="size").reset_index()


def difficulty_correlations(
    per_token: pd.DataFrame,
    difficulty: str = "n_active",
    by: Sequence[str] = ("input_scaling", "rule", "seed"),
) -> pd.DataFrame:
    """Spearman rank correlation between each token's L0 and its difficulty, per group
    (0 when L0 is constant, as for TopK: a constant carries no information)."""
    from .data.synthetic import l0_rank_correlation

    by = [c for c in by if c in per_token.columns]
    rows = []
    for key, g in per_token.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rho = l0_rank_correlation(g["l0"].to_numpy().copy(), g[difficulty].to_numpy().copy())
        rows.append({**dict(zip(by, key)), "spearman": rho, "tokens": len(g)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- thresholds


def batch_size_sensitivity(
    trained: Trained, eval_set: EvalSet, batch_sizes: Iterable[int]
) -> pd.DataFrame:
    """NMSE and L0 of one SAE under the training rule evaluated in batches of each size, and
    under the batch-independent inference rule (one row with ``eval_batch_size`` = 1)."""
    rows = []
    sae = trained.run.sae
    n = eval_set.x.shape[0]
    for b in batch_sizes:
        if b > n:
            continue
        res = evaluate(sae, eval_set.x, mode="train", batch_size=int(b))
        rows.append({"eval_mode": "train", "eval_batch_size": int(b), **res.scalars()})
    res = evaluate(sae, eval_set.x, mode="inference")
    rows.append({"eval_mode": "inference", "eval_batch_size": 1, **res.scalars()})
    key = trained.key()
    return pd.DataFrame([{**key, **r} for r in rows])


# ----------------------------------------------------------------------------- cost


def time_steps(
    rule: str,
    n_features: int,
    *,
    data: torch.Tensor,
    k: float = 8,
    batch_size: int = 1024,
    n_steps: int = 30,
    warmup_steps: int = 5,
    seed: int = 0,
    train_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Wall time per training step of one rule at one width, with the time of the dense encoder
    product B x d by d x F that every rule must pay (DESIGN §10) measured beside it, and their
    ratio. ``step_ms`` is the fastest of the ``n_steps`` timed steps (after ``warmup_steps``),
    the statistic least disturbed by other work on the machine (as ``timeit`` reports);
    ``step_ms_median`` is given too."""
    d = int(data.shape[1])
    stamps: list[float] = []
    cfg = SAEConfig(d_in=d, n_features=n_features, rule=rule, k=k)
    tcfg = TrainConfig(
        batch_size=batch_size,
        total_tokens=batch_size * (n_steps + warmup_steps),
        seed=seed,
        log_every=10**9,
        **dict(train_kwargs or {}),
    )
    train(cfg, tcfg, data, callback=lambda step, row: stamps.append(time.perf_counter()))
    steps = np.diff(np.asarray(stamps))[warmup_steps:]
    x = data[:batch_size]
    W = torch.randn(d, n_features)
    dense = []
    for _ in range(max(5, n_steps)):
        t0 = time.perf_counter()
        _ = x @ W
        dense.append(time.perf_counter() - t0)
    step_ms = 1e3 * float(np.min(steps))
    dense_ms = 1e3 * float(np.min(dense))
    return {
        "rule": rule,
        "n_features": n_features,
        "batch_size": batch_size,
        "d_in": d,
        "step_ms": step_ms,
        "step_ms_median": 1e3 * float(np.median(steps)),
        "dense_matmul_ms": dense_ms,
        "ratio_to_dense": step_ms / dense_ms if dense_ms > 0 else float("nan"),
    }


def step_time_table(
    rules: Sequence[str],
    widths: Sequence[int],
    *,
    data: torch.Tensor,
    repeats: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`time_steps` for every rule x width, the rules interleaved within each width and
    repeated ``repeats`` times, so that a change in machine load hits every rule alike."""
    from tqdm.auto import tqdm

    combos = [(r, w, i) for i in range(repeats) for w in widths for r in rules]
    rows = []
    for rule, width, i in tqdm(combos, desc="timing steps", unit="run", disable=not progress):
        rows.append({**time_steps(rule, width, data=data, **kwargs), "repeat": i})
    return pd.DataFrame(rows)


__all__ = [
    "Variant",
    "all_rules",
    "as_variant",
    "add_delta_ce",
    "EvalSet",
    "Grid",
    "RESAMPLE",
    "Trained",
    "allocate",
    "allocation_counts",
    "allocation_summary",
    "batch_size_sensitivity",
    "best_lr",
    "checkpoint_curve",
    "collect_tokens",
    "concat_frames",
    "concentration",
    "demo_affinities",
    "difficulty_correlations",
    "l0_by_difficulty",
    "evaluate_trained",
    "make_source",
    "step_time_table",
    "summarise",
    "time_steps",
    "tabulate",
    "train_grid",
    "train_one",
    "training_data",
    "use_threads",
    "with_mean_std_text",
    "zipf_fits",
]
