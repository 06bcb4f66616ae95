"""Comparisons of allocation rules at convergence (DESIGN §11).

A verdict between rules is a statement about converged SAEs: short runs measure which rule
learns fastest. :func:`compare_rules` trains every rule until its comparison has converged:

    import adaptive_sae as asae
    table = asae.compare_rules(train_x, held_x, rules=["topk", "mutual_choice"], k=8,
                               n_features=512, max_tokens=8_000_000)

The protocol, at budgets T0, 2·T0, 4·T0, ... training tokens:

1. **Learning rate, bracketed.** For each rule, train the search seed (``seeds[0]``) at every
   learning rate of the grid and measure NMSE on the *validation* half of the held-out tokens.
   While the best is the smallest or the largest rate tried, extend the grid past it by
   ``lr_factor``; so the best is never at the edge. At the next budget the search starts from
   the previous best and its two neighbours.
2. **Budget, doubled.** The comparison has converged when doubling the budget changes no rule's
   validation NMSE (at its best learning rate) by more than ``tolerance`` (1 %) relative.
   When the next doubling would pass ``max_tokens`` the protocol stops with
   ``converged = False``.
3. **Seeds, on test tokens.** At the final budget every seed is trained at the rule's best
   learning rate and measured on the *test* half of the held-out tokens (never used for a
   choice): mean ± std across seeds. The search seed at that rate and budget was trained in
   step 1 already (the same training: data, seed, rate, budget); that SAE is measured on the
   test half instead of being trained again (unless the run resumed from the trial cache,
   which keeps rows, not SAEs).

Every training goes through ``experiments.train_grid``. With ``cache_dir`` each finished trial
is written there atomically, and a re-run with the same settings reuses it (resumable).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import experiments as ex
from .io import atomic_write_text, write_csv

# columns averaged over seeds in the final table (those present)
REPORTED = (
    "nmse",
    "nmse_inference",
    "l0_mean",
    "l0_std",
    "dead_pct",
    "dead_pct_inference",
    "underutilised_pct",
    "fraction_recovered",
    "mean_max_cosine",
    "l0_rank_correlation",
)


@dataclass
class Convergence:
    """What :func:`converge` returns."""

    table: pd.DataFrame
    """One row per rule at the final budget: ``<metric>_mean`` / ``_std`` across seeds on test
    tokens, ``lr`` and its bracket (``lr_below``, ``lr_above``), ``tokens``, ``converged``."""
    curve: pd.DataFrame
    """One row per rule and budget: the best learning rate and its validation NMSE (search
    seed), the relative change from the previous budget, and that budget's winner."""
    lr_trials: pd.DataFrame
    """Every learning-rate trial: rule, tokens, lr, validation metrics."""
    runs: pd.DataFrame
    """The per-seed test rows of the final budget."""
    trained: list = field(default_factory=list)
    """The final-budget SAEs (``experiments.Trained``) when ``keep_runs`` was set."""
    final: ex.Grid | None = None
    """When ``keep_runs`` was set: the final budget's :class:`experiments.Grid` (every seed of
    every rule on test tokens: table, histories, densities, per-token L0 with ``keep_l0``),
    for analyses beyond the comparison."""


def _round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


def split_held_out(held_out, eval_tokens: int | None = None) -> tuple[ex.EvalSet, ex.EvalSet]:
    """Validation and test halves of the held-out tokens (ground truth kept), as the protocol
    splits them: the first half chooses learning rates and budgets, the second is reported."""
    if isinstance(held_out, tuple) and len(held_out) == 2:
        return tuple(h if isinstance(h, ex.EvalSet) else ex.EvalSet(h) for h in held_out)
    if isinstance(held_out, torch.Tensor):
        whole = ex.EvalSet(held_out.float())
    elif isinstance(held_out, ex.EvalSet):
        whole = held_out
    elif hasattr(held_out, "held_out"):
        whole = ex.EvalSet.from_source(held_out, 2 * int(eval_tokens or 16_384))
    else:
        raise TypeError(
            f"held_out must be an (N, d) tensor, an EvalSet, a (validation, test) pair or an "
            f"activation source; got {type(held_out).__name__}."
        )
    n = whole.x.shape[0]
    if n < 4:
        raise ValueError(f"held_out holds {n} tokens; pass at least 4 (half validate, half test).")
    h = n // 2

    def part(sl: slice) -> ex.EvalSet:
        na = whole.n_active[sl] if whole.n_active is not None else None
        diff = whole.difficulty[sl] if whole.difficulty is not None else None
        return ex.EvalSet(whole.x[sl], na, whole.true_features, diff)

    return part(slice(0, h)), part(slice(h, 2 * h))


def _training_tensor(train, data_tokens: int):
    if isinstance(train, torch.Tensor):
        if train.ndim != 2:
            raise ValueError(f"train must be (N, d), got shape {tuple(train.shape)}.")
        return train.float()
    if hasattr(train, "batches"):
        return ex.training_data(train, data_tokens)
    raise TypeError(
        f"train must be an (N, d) tensor or an activation source; got {type(train).__name__}."
    )


def _fingerprint(data, settings: Mapping[str, Any]) -> str:
    """A short hash of the settings and the data (shape and a few sums), naming a cache."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if isinstance(data, torch.Tensor):
        d = data.double()
        h.update(str((tuple(data.shape), float(d.sum()), float(d.pow(2).sum()))).encode())
    return h.hexdigest()[:16]


class _Trials:
    """Finished trials, keyed by (variant, split, tokens, lr, seed), optionally on disk."""

    KEY = ("variant", "split", "tokens", "lr", "seed")

    def __init__(self, folder: Path | None):
        self.path = folder / "trials.csv" if folder is not None else None
        self.rows: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists():
            self.rows = pd.read_csv(self.path).to_dict("records")

    def _key(self, row: Mapping[str, Any]) -> tuple:
        return (
            row["variant"],
            row["split"],
            int(row["tokens"]),
            _round_lr(row["lr"]),
            int(row["seed"]),
        )

    def get(self, variant: str, split: str, tokens: int, lr: float, seed: int):
        want = (variant, split, int(tokens), _round_lr(lr), int(seed))
        for row in self.rows:
            if self._key(row) == want:
                return row
        return None

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        if self.path is not None:
            write_csv(self.path, pd.DataFrame(self.rows))


def converge(
    train,
    held_out,
    *,
    rules: Sequence[str | ex.Variant],
    k: float,
    n_features: int,
    batch_size: int = 1024,
    seeds: Sequence[int] = (0, 1, 2),
    max_tokens: int | None = None,
    start_tokens: int | None = None,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    lr_factor: float = 3.0,
    max_lr_extensions: int = 6,
    tolerance: float = 0.01,
    aux_loss: str = "none",
    input_scaling: str = "global",
    sae_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_tokens: int | None = None,
    data_tokens: int | None = None,
    cache_dir: str | Path | None = None,
    keep_runs: bool = False,
    keep_l0: bool = False,
    resample_every_tokens: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    fit: Callable[..., Any] = ex.train_grid,
) -> Convergence:
    """Train every rule until the comparison has converged; return its tables.

    See the module docstring for the protocol. ``train`` is an (N, d) tensor or an activation
    source (then its first ``data_tokens`` tokens, default ``max_tokens`` or 2**22, are
    collected once; longer budgets repeat epochs). ``held_out`` is an (N, d) tensor, an
    ``EvalSet``, a source or a (validation, test) pair; a single set is split in halves.
    ``aux_loss`` may be ``experiments.RESAMPLE`` (with ``resample_every_tokens``). With
    ``keep_runs`` the final budget's SAEs and :class:`experiments.Grid` are returned
    (``trained``, ``final``; ``keep_l0`` adds per-token L0 to it) for further analyses.
    ``fit`` is the training driver (``experiments.train_grid``), replaceable in tests."""
    if not rules:
        raise ValueError("rules is empty; name at least one allocation rule.")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=(0,).")
    if not lrs or any(not (lr > 0) for lr in lrs):
        raise ValueError(f"lrs={list(lrs)} must be positive learning rates.")
    if lr_factor <= 1:
        raise ValueError(f"lr_factor={lr_factor} must be > 1 (the grid extends by it).")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance} must be > 0 (a relative change, e.g. 0.01).")
    variants = [ex.as_variant(r) for r in rules]
    start = int(start_tokens or 128 * batch_size)
    if max_tokens is not None and max_tokens < start:
        raise ValueError(
            f"max_tokens={max_tokens} is below the first budget start_tokens={start}; raise "
            f"max_tokens or lower start_tokens."
        )
    data = _training_tensor(train, int(data_tokens or max_tokens or 2**22))
    val, test = split_held_out(held_out, eval_tokens)
    say = log or (lambda msg: None)

    settings = {
        "rules": [(v.name, v.rule, dict(v.sae), dict(v.train)) for v in variants],
        "k": k,
        "n_features": n_features,
        "batch_size": batch_size,
        "aux_loss": aux_loss,
        **({"resample_every_tokens": resample_every_tokens} if resample_every_tokens else {}),
        "input_scaling": input_scaling,
        "sae_kwargs": dict(sae_kwargs or {}),
        "train_kwargs": dict(train_kwargs or {}),
        "val_tokens": int(val.x.shape[0]),
    }
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / _fingerprint(data, settings)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "settings.json", json.dumps(settings, default=str, indent=1))
    trials = _Trials(folder)
    # the search seed's SAEs of the current budget, by (rule, tokens, lr): the final budget's
    # search seed at its best rate is one of them, and is measured on test tokens, not retrained
    searched: dict[tuple[str, int, float], ex.Trained] = {}

    def run(variant: ex.Variant, lr_list, seed_list, tokens, split, keep=False):
        """Rows (and SAEs) of the trials not done yet, through the driver; a learning rate
        that diverges gets NMSE = inf, so the bracket lies below it."""
        eval_set = val if split == "val" else test
        rows, kept, grids = [], [], []
        todo = [
            (lr, s)
            for lr in lr_list
            for s in seed_list
            if keep or trials.get(variant.name, split, tokens, lr, s) is None
        ]
        for lr in dict.fromkeys(lr for lr, _ in todo):
            s_todo = [s for lr2, s in todo if lr2 == lr]
            done: list[ex.Grid] = []
            key = (variant.name, int(tokens), _round_lr(lr))
            reused = searched.pop(key, None) if split == "test" else None
            if reused is not None and reused.seed in s_todo:  # trained while bracketing
                s_todo.remove(reused.seed)
                done.append(
                    ex.tabulate([reused], eval_set, keep_runs=keep, keep_l0=keep and keep_l0)
                )
            table: list[dict[str, Any]] = []
            kwargs = dict(
                variants=[variant],
                seeds=s_todo,
                k_values=[k],
                widths=[n_features],
                aux_losses=[aux_loss],
                input_scalings=[input_scaling],
                lrs=[lr],
                batch_size=batch_size,
                total_tokens=int(tokens),
                eval_set=eval_set,
                sae_kwargs=sae_kwargs,
                train_kwargs=train_kwargs,
                keep_runs=keep or split == "val",
                progress=False,
                device=device,
            )
            if keep and keep_l0:
                kwargs["keep_l0"] = True
            if resample_every_tokens:
                kwargs["resample_every_tokens"] = resample_every_tokens
            try:
                if s_todo:
                    done.append(fit(data, **kwargs))
            except FloatingPointError as err:  # NonFiniteError: diverged
                say(f"{variant.name} lr={lr:g}: diverged ({str(err).splitlines()[0]})")
                table = [{"seed": s, "nmse": math.inf, "diverged": True} for s in s_todo]
            for grid in done:
                table.extend(grid.table.to_dict("records"))
                if split == "val":
                    for tr in getattr(grid, "runs", []):
                        searched[key] = tr
                if keep:
                    kept.extend(getattr(grid, "runs", []))
                    grids.append(grid)
            for row in table:
                row.update(variant=variant.name, split=split, tokens=int(tokens), lr=lr)
            rows.extend(table)
        trials.add(rows)
        if keep:
            return rows, (kept, grids)
        out = [trials.get(variant.name, split, tokens, lr, s) for lr in lr_list for s in seed_list]
        return out, (kept, grids)

    def bracket(variant, tokens, candidates):
        """Learning rate -> validation NMSE of the search seed, extended until the best has a
        tried rate on each side; returns (tried, best, bracketed)."""
        tried: dict[float, float] = {}
        cands = [_round_lr(c) for c in candidates]
        for _ in range(max_lr_extensions + 1):
            rows, _ = run(variant, [c for c in cands if c not in tried], seeds[:1], tokens, "val")
            tried.update({_round_lr(r["lr"]): float(r["nmse"]) for r in rows})
            order = sorted(tried)
            best = min(order, key=lambda lr: (tried[lr], lr))
            if not math.isfinite(tried[best]):
                raise FloatingPointError(
                    f"rule {variant.name!r} diverged at every learning rate tried "
                    f"{order} at {tokens} tokens; pass smaller lrs."
                )
            if best == order[0]:
                cands = [_round_lr(best / lr_factor)]
            elif best == order[-1]:
                cands = [_round_lr(best * lr_factor)]
            else:
                return tried, best, True
        return tried, best, False

    curve_rows: list[dict[str, Any]] = []
    grids: dict[str, dict[float, float]] = {}
    tokens, prev, converged = start, None, False
    while True:
        for key in [key for key in searched if key[1] < tokens]:
            del searched[key]  # an earlier budget's SAEs: never final now
        now: dict[str, float] = {}
        for v in variants:
            if v.name in grids:  # start from the previous best and its neighbours
                order = sorted(grids[v.name])
                best_prev = min(order, key=lambda lr: (grids[v.name][lr], lr))
                i = order.index(best_prev)
                cands = order[max(0, i - 1) : i + 2]
            else:
                cands = list(lrs)
            tried, best, bracketed = bracket(v, tokens, cands)
            grids[v.name] = tried
            now[v.name] = tried[best]
            order = sorted(tried)
            i = order.index(best)
            curve_rows.append(
                {
                    "rule": v.name,
                    "tokens": tokens,
                    "lr": best,
                    "lr_below": order[i - 1] if i > 0 else float("nan"),
                    "lr_above": order[i + 1] if i + 1 < len(order) else float("nan"),
                    "lr_tried": len(tried),
                    "bracketed": bracketed,
                    "nmse_val": tried[best],
                    "change": (
                        abs(tried[best] - prev[v.name]) / prev[v.name] if prev else float("nan")
                    ),
                }
            )
        say(
            f"{tokens:,} tokens: "
            + ", ".join(
                f"{r['rule']} {r['nmse_val']:.4f} (lr {r['lr']:g})"
                for r in curve_rows[-len(variants) :]
            )
        )
        last = curve_rows[-len(variants) :]
        all_bracketed = all(r["bracketed"] for r in last)
        if prev is not None and all_bracketed and max(r["change"] for r in last) <= tolerance:
            converged = True
            break
        if max_tokens is not None and 2 * tokens > max_tokens:
            break
        prev, tokens = now, 2 * tokens

    curve = pd.DataFrame(curve_rows)
    winners = curve.loc[curve.groupby("tokens")["nmse_val"].idxmin(), ["tokens", "rule"]]
    curve = curve.merge(winners.rename(columns={"rule": "winner"}), on="tokens")

    # the final budget: every seed at the best rate, on test tokens
    per_seed, trained, final_grids = [], [], []
    final = curve[curve["tokens"] == tokens].set_index("rule")
    for v in variants:
        rows, (kept, grids) = run(
            v, [final.loc[v.name, "lr"]], list(seeds), tokens, "test", keep_runs
        )
        per_seed.extend(rows)
        trained.extend(kept)
        final_grids.extend(grids)
    runs = pd.DataFrame(per_seed)
    metrics = [m for m in REPORTED if m in runs.columns]
    grouped = runs.groupby("variant", sort=False)[metrics]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std"))
    table = table.reindex([v.name for v in variants]).reset_index()
    table = table.rename(columns={"variant": "rule"})
    table = table[["rule", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]]]
    table.insert(1, "seeds", len(seeds))
    for col in ("lr", "lr_below", "lr_above", "bracketed", "change"):
        table[col] = table["rule"].map(final[col])
    table = table.rename(columns={"change": "nmse_change_last_doubling"})
    table["lr_search_seed"] = seeds[0]
    table["tokens"] = tokens
    table["epochs"] = tokens / int(data.shape[0])
    table["converged"] = converged
    table.attrs["converged"] = converged
    trials_table = pd.DataFrame([r for r in trials.rows if r["split"] == "val"])
    if folder is not None:
        write_csv(folder / "curve.csv", curve)
        write_csv(folder / "table.csv", table)
    final_grid = concat_grids(final_grids) if keep_runs else None
    return Convergence(table, curve, trials_table, runs, trained, final_grid)


def concat_grids(grids: Sequence[ex.Grid]) -> ex.Grid:
    """One :class:`experiments.Grid` holding the rows and SAEs of several."""
    names = ("table", "histories", "densities", "l0")
    tables = [ex.concat_frames([getattr(g, n) for g in grids]) for n in names]
    return ex.Grid(*tables, [r for g in grids for r in g.runs])


def compare_rules(
    train,
    held_out,
    *,
    rules: Sequence[str | ex.Variant],
    k: float,
    n_features: int,
    batch_size: int = 1024,
    seeds: Sequence[int] = (0, 1, 2),
    max_tokens: int | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Compare allocation rules at convergence: one row per rule with ``nmse_mean``,
    ``nmse_std`` (across ``seeds``, on test tokens), ``lr``, ``tokens``, ``converged``, and
    L0, dead % (and ground-truth recovery on synthetic data), each as ``_mean``/``_std``.

    Converged means: each rule's learning rate is bracketed (its best is never at the edge of
    the grid tried: the grid is extended by ``lr_factor`` until it is not), and doubling the
    budget changes no rule's held-out NMSE by more than ``tolerance`` = 1 % relative. If the
    next doubling would pass ``max_tokens`` the protocol stops and ``converged`` is False.
    The learning rate is searched with one seed (``seeds[0]``) on the validation half of the
    held-out tokens; the reported numbers come from every seed on the test half.

    ``train``/``held_out`` are (N, d) tensors or activation sources. Other keyword arguments
    (``lrs``, ``start_tokens``, ``tolerance``, ``aux_loss``, ``train_kwargs``, ``cache_dir``,
    ...) are :func:`converge`'s, which also returns the learning-rate trials and the NMSE
    curve against the budget."""
    conv = converge(
        train,
        held_out,
        rules=rules,
        k=k,
        n_features=n_features,
        batch_size=batch_size,
        seeds=seeds,
        max_tokens=max_tokens,
        **kwargs,
    )
    table = conv.table
    table.attrs["curve"] = conv.curve
    return table


def verdict_changes(curve: pd.DataFrame) -> pd.DataFrame:
    """The budgets at which the winner (lowest validation NMSE) differs from the previous
    budget's: (tokens, winner, previous winner)."""
    w = curve.drop_duplicates("tokens").sort_values("tokens")[["tokens", "winner"]]
    w["previous"] = w["winner"].shift()
    return w[w["previous"].notna() & (w["winner"] != w["previous"])].reset_index(drop=True)


def mean_std_text(table: pd.DataFrame, metrics: Sequence[str] = ("nmse",), digits: int = 3):
    """The table with ``<metric>`` columns spelled ``mean ± std``."""
    from .results import format_mean_std

    out = table.copy()
    for m in metrics:
        if f"{m}_mean" in out:
            out[m] = [
                format_mean_std(a, b, digits) for a, b in zip(out[f"{m}_mean"], out[f"{m}_std"])
            ]
    return out


def study(
    source: str,
    out,
    *,
    rules: Sequence[str],
    k: float,
    n_features: int,
    batch_size: int,
    seeds: Sequence[int],
    max_tokens: int,
    start_tokens: int,
    lrs: Sequence[float],
    data_tokens: int,
    eval_tokens: int,
    synthetic: Mapping[str, Any] | None = None,
    lm: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> Convergence:
    """:func:`converge` on a named source (its training stream and held-out tokens), with the
    trial cache and the tables (``table``, ``curve``, ``lr_trials``, ``runs``) written
    atomically under the ``out`` folder: an interrupted study resumes where it stopped."""
    src = ex.make_source(source, seed=0, synthetic=synthetic, lm=lm)
    out = Path(out)
    conv = converge(
        src,
        src,
        rules=rules,
        k=k,
        n_features=n_features,
        batch_size=batch_size,
        seeds=seeds,
        max_tokens=max_tokens,
        start_tokens=start_tokens,
        lrs=lrs,
        data_tokens=data_tokens,
        eval_tokens=eval_tokens,
        cache_dir=out / "trials",
        log=log,
    )
    for name in ("table", "curve", "lr_trials", "runs"):
        write_csv(out / f"{name}.csv", getattr(conv, name))
    params = dict(
        source=source, rules=list(rules), k=k, n_features=n_features, batch_size=batch_size,
        seeds=list(seeds), max_tokens=max_tokens, start_tokens=start_tokens, lrs=list(lrs),
        data_tokens=data_tokens, eval_tokens=eval_tokens, synthetic=dict(synthetic or {}),
        lm=dict(lm or {}),
    )  # fmt: skip
    write_report(out, params, src)
    return conv


def write_report(out, parameters: Mapping[str, Any], source: Any = None) -> None:
    """Figures (NMSE against the budget, the final learning-rate brackets), ``summary.md``
    (mean ± std per rule, budget, bracket, converged) and ``provenance.json`` in the folder of
    a finished :func:`study`, drawn from its saved tables."""
    from . import extrapolation, plots, results

    out = Path(out)
    curve, table = pd.read_csv(out / "curve.csv"), pd.read_csv(out / "table.csv")
    trials = pd.read_csv(out / "lr_trials.csv")
    plots.set_style()
    rd = results.ResultsDir(out.parent.name, out.name, root=out.parent.parent)
    limits = extrapolation.limits(curve)
    rd.save_table("limits", limits)
    rd.save_figure(plots.convergence_curve(curve, limits=limits), "nmse_vs_tokens")
    rd.save_figure(plots.lr_bracket(trials, int(table["tokens"].iloc[0])), "lr_bracket")
    metrics = ["nmse", "nmse_inference", "dead_pct", "l0_std"]
    text = mean_std_text(table, metrics)
    cols = ["rule", *metrics, "lr", "lr_below", "lr_above", "tokens", "epochs", "converged"]
    lines = [
        f"Final budget {int(table['tokens'].iloc[0]):,} tokens, {int(table['seeds'].iloc[0])} "
        f"seeds on test tokens; converged: {bool(table['converged'].all())}.",
        "",
        text[[c for c in cols if c in text]].to_markdown(index=False),
        "",
        "Validation NMSE (search seed) at each budget and its best learning rate:",
        "",
        curve.pivot(index="tokens", columns="rule", values="nmse_val").to_markdown(),
        "",
        curve.pivot(index="tokens", columns="rule", values="lr").to_markdown(),
        "",
        "Fitted NMSE(T) = limit + b·(T/T_last)^(−c) over the last budgets "
        "(adaptive_sae.extrapolation; estimates from the search seed's curve):",
        "",
        limits.drop(columns=["why"]).to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    rd._record(atomic_write_text(out / "summary.md", "\n".join(lines)))
    rd.save_provenance(dict(parameters), source=source, seeds=parameters.get("seeds"))


__all__ = [
    "Convergence",
    "compare_rules",
    "concat_grids",
    "converge",
    "mean_std_text",
    "split_held_out",
    "study",
    "write_report",
    "verdict_changes",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m adaptive_sae.convergence --source synthetic --out DIR [...]``"""
    import argparse

    p = argparse.ArgumentParser(description=study.__doc__)
    p.add_argument("--source", default="synthetic")
    p.add_argument("--out", required=True)
    p.add_argument("--rules", nargs="+", default=["topk", "mutual_choice", "feature_choice_zipf"])
    p.add_argument("--k", type=float, default=6)
    p.add_argument("--n-features", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-tokens", type=int, default=2**23)
    p.add_argument("--start-tokens", type=int, default=2**17)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--data-tokens", type=int, default=2**21)
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--synthetic", default="{}", help="JSON of SyntheticConfig fields")
    p.add_argument("--lm", default="{}", help="JSON of the language-model source's parameters")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    ex.use_threads(a.threads)
    conv = study(
        a.source,
        a.out,
        rules=a.rules,
        k=a.k,
        n_features=a.n_features,
        batch_size=a.batch_size,
        seeds=a.seeds,
        max_tokens=a.max_tokens,
        start_tokens=a.start_tokens,
        lrs=a.lrs,
        data_tokens=a.data_tokens,
        eval_tokens=a.eval_tokens,
        synthetic=json.loads(a.synthetic),
        lm=json.loads(a.lm),
        log=lambda msg: print(msg, flush=True),
    )
    print(mean_std_text(conv.table, ("nmse", "dead_pct")).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
