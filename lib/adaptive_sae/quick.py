"""The quick comparison: every allocation rule at the same mean L0 on synthetic ground truth.

    python -m adaptive_sae.quick [--seeds 0 1 2] [--total-tokens 300000] [--jobs 2]

Fairness: every variant gets the same data, token budget, batch size and recipe; its learning
rate is picked per variant on held-out validation tokens (seed 0, no auxiliary loss) by the
convergence protocol at the quick budget (``adaptive_sae.compare_rules``: the grid is
extended until the best is bracketed), and the final numbers are measured on separate test
tokens. One budget is not a converged comparison; notebook 09 doubles it until it is. ReLU+L1 reaches
the same mean L0 through its adaptive L1 coefficient (TrainConfig.l1_adapt_rate). The table
reports NMSE under the training rule (batches of the training size) and under the per-token
inference rule, L0 mean and spread across tokens, dead and underutilised features, and
recovery of the true features. The learning-rate grid is written too, because the ranking of
the rules moves with the learning rate and the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pandas as pd
import torch

from . import results
from .config import AUX_LOSSES, ConfigError
from .data.synthetic import SyntheticConfig, SyntheticSource
from .experiments import EvalSet, Variant, train_grid

# The Zipf ranking and the input scaling are the two design questions DESIGN §3 and §6 ask to
# measure rather than assume.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("topk", "topk"),
        Variant("feature_choice", "feature_choice"),
        Variant("feature_choice_zipf", "feature_choice_zipf", {"capacity_ranking": "demand"}),
        Variant("feature_choice_zipf_fixed", "feature_choice_zipf", {"capacity_ranking": "fixed"}),
        Variant("mutual_choice", "mutual_choice"),
        Variant("mutual_choice_per_token", "mutual_choice", {"input_scaling": "per_token"}),
        Variant("relu_l1", "relu_l1"),
    )
}


@dataclass(frozen=True)
class QuickConfig:
    """Scale of the quick comparison (defaults: a few minutes on 2 CPU cores)."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    """Which variants of VARIANTS to train."""
    aux_losses: tuple[str, ...] = ("none", "aux_k", "aux_zipf")
    """Auxiliary losses crossed with every variant."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """SAE seeds (initialisation and data order); the data-generating seed is fixed."""
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    """Learning rates tried per variant on validation tokens."""
    d_in: int = 64
    """Activation dimension of the synthetic data."""
    n_true_features: int = 512
    """Ground-truth features (> d_in: superposition)."""
    k_true: float = 6.0
    """Mean number of true features active per token."""
    busyness_sigma: float = 0.7
    """Spread of the per-token activity multiplier: some tokens are much busier than others."""
    noise_std: float = 0.02
    """Gaussian noise added to every activation."""
    n_features: int = 512
    """SAE width F."""
    k: float = 6.0
    """Mean L0 every variant is trained at."""
    batch_size: int = 512
    """Tokens per step."""
    total_tokens: int = 300_000
    """Training budget of every run."""
    dead_window_tokens: int = 50_000
    """Tokens without a match before a feature counts as dead during training."""
    eval_tokens: int = 16_384
    """Validation tokens (learning-rate choice) and, separately, test tokens."""
    data_seed: int = 1234
    """Seed of the synthetic data (shared by all runs)."""

    def source(self) -> SyntheticSource:
        return SyntheticSource(
            SyntheticConfig(
                d_in=self.d_in,
                n_true_features=self.n_true_features,
                k_true=self.k_true,
                busyness_sigma=self.busyness_sigma,
                noise_std=self.noise_std,
                seed=self.data_seed,
            )
        )


@functools.lru_cache(maxsize=2)
def _train_tokens(q: QuickConfig) -> torch.Tensor:
    """The training tokens, generated once per process and shared by its runs."""
    src = q.source()
    n_batches = q.total_tokens // q.batch_size
    return torch.cat([b for _, b in zip(range(n_batches), src.batches(q.batch_size))])


@functools.lru_cache(maxsize=4)
def _eval_set(q: QuickConfig, split: str) -> EvalSet:
    """Validation = first eval_tokens held-out tokens, test = the next eval_tokens."""
    src = q.source()
    sample = src.sample_with_truth(2 * q.eval_tokens, split="val")
    sl = slice(0, q.eval_tokens) if split == "val" else slice(q.eval_tokens, None)
    return EvalSet(sample.x[sl], sample.n_active[sl], src.true_features)


def _run(job: tuple[QuickConfig, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One variant: its learning rate by the convergence protocol at the quick budget
    (``convergence.converge``: bracketed on validation tokens, seed 0, no auxiliary loss),
    then every auxiliary loss x seed at that rate on test tokens. Returns (lr trials, runs)."""
    from .convergence import converge

    q, variant = job
    torch.set_num_threads(1)
    v = VARIANTS[variant]
    common = dict(
        k=q.k,
        n_features=q.n_features,
        batch_size=q.batch_size,
        input_scaling=v.sae.get("input_scaling", "global"),
        train_kwargs={
            "dead_window_tokens": q.dead_window_tokens,
            "density_window_tokens": q.dead_window_tokens,
            "log_every": 50,
        },
    )
    conv = converge(
        _train_tokens(q),
        (_eval_set(q, "val"), _eval_set(q, "test")),
        rules=[v],
        seeds=q.seeds,
        start_tokens=q.total_tokens,
        max_tokens=q.total_tokens,
        lrs=q.lr_grid,
        **common,
    )
    runs = [conv.runs] if "none" in q.aux_losses else []
    others = [a for a in q.aux_losses if a != "none"]
    if others:
        grid = train_grid(
            _train_tokens(q),
            variants=[v],
            seeds=q.seeds,
            k_values=[q.k],
            widths=[q.n_features],
            aux_losses=others,
            input_scalings=[common["input_scaling"]],
            lrs=[float(conv.table["lr"].iloc[0])],
            batch_size=q.batch_size,
            total_tokens=q.total_tokens,
            eval_set=_eval_set(q, "test"),
            train_kwargs=common["train_kwargs"],
            progress=False,
        )
        runs.append(grid.table)
    lr_trials = conv.lr_trials.assign(converged=bool(conv.table["converged"].iloc[0]))
    return lr_trials, pd.concat(runs, ignore_index=True)


def _map(jobs: list, n_jobs: int, desc: str) -> list:
    from tqdm.auto import tqdm

    if n_jobs <= 1:
        return [_run(j) for j in tqdm(jobs, desc=desc)]
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(tqdm(pool.map(_run, jobs), total=len(jobs), desc=desc))


SUMMARY_METRICS = [
    "nmse",
    "nmse_inference",
    "l0_mean",
    "l0_std",
    "dead_pct",
    "underutilised_pct",
    "l0_rank_correlation",
    "mean_max_cosine",
    "fraction_recovered",
]


def quick_comparison(q: QuickConfig | None = None, n_jobs: int = 2) -> dict[str, pd.DataFrame]:
    """Each variant's learning rate bracketed on validation tokens at the quick budget (the
    convergence protocol with ``max_tokens = total_tokens``, so ``converged`` is False: a
    quick table answers "who learns fastest" at this budget), then every variant x auxiliary
    loss x seed measured on test tokens. Returns the tables."""
    q = q or QuickConfig()
    check_quick(q)
    out = _map([(q, v) for v in q.variants], n_jobs, "comparison")
    lr_grid = pd.concat([t for t, _ in out], ignore_index=True)
    best = lr_grid.loc[lr_grid.groupby("variant")["nmse"].idxmin(), ["variant", "lr"]]
    best_lr = dict(zip(best["variant"], best["lr"]))
    runs = pd.concat([r for _, r in out], ignore_index=True).rename(columns={"aux_loss": "aux"})
    keep = [c for c in runs.columns if c not in ("split", "tokens", "diverged")]
    runs = runs[keep]
    summary = results.mean_std(runs, ["variant", "aux"], SUMMARY_METRICS)
    summary.insert(2, "lr", summary["variant"].map(best_lr))
    summary["tokens"] = q.total_tokens
    summary["converged"] = False
    return {"runs": runs, "summary": summary, "lr_grid": lr_grid}


def check_quick(q: QuickConfig, run_name: str | None = None) -> None:
    """Reject unknown variants, auxiliary losses and bad run names before anything trains."""
    unknown = set(q.variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}.")
    bad_aux = set(q.aux_losses) - set(AUX_LOSSES)
    if bad_aux:
        raise ConfigError(f"unknown auxiliary losses {sorted(bad_aux)}; choose from {AUX_LOSSES}.")
    if run_name is not None:
        results.run_name({"run": run_name})  # raises on unsafe characters
        results.ResultsDir("quick", run_name)  # the folder must be creatable


def write_tables(
    tables: dict[str, pd.DataFrame], q: QuickConfig, run_name: str
) -> results.ResultsDir:
    out = results.ResultsDir("quick", run_name)
    for name, df in tables.items():
        out.save_table(name, df)
    md = results.summary_markdown(tables["summary"].drop(columns=["lr"]), ["variant", "aux"])
    results.atomic_write_text(out.path / "summary.md", md)
    s = tables["summary"].set_index(["variant", "aux"])
    out.save_metrics(
        {f"{v}/{a}/{m}": s.loc[(v, a), f"{m}_mean"] for v, a in s.index for m in SUMMARY_METRICS}
    )
    out.save_provenance(dataclasses.asdict(q), source=q.source(), seeds=list(q.seeds))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(QuickConfig.seeds))
    p.add_argument("--total-tokens", type=int, default=QuickConfig.total_tokens)
    p.add_argument("--variants", nargs="+", default=list(QuickConfig.variants))
    p.add_argument("--aux", nargs="+", default=list(QuickConfig.aux_losses))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument(
        "--run-name",
        default="local",
        help="results/quick/<run-name>/ (the committed results are under 'default')",
    )
    a = p.parse_args(argv)
    q = QuickConfig(
        seeds=tuple(a.seeds),
        total_tokens=a.total_tokens,
        variants=tuple(a.variants),
        aux_losses=tuple(a.aux),
    )
    check_quick(q, a.run_name)
    t0 = time.time()
    tables = quick_comparison(q, n_jobs=a.jobs)
    out = write_tables(tables, q, a.run_name)
    pd.set_option("display.width", 200)
    print("\nLearning-rate grid (validation NMSE, training rule, seed 0, no aux loss):")
    print(tables["lr_grid"].pivot(index="variant", columns="lr", values="nmse").round(3))
    print(f"\nQuick comparison at mean L0 = {q.k} ({len(q.seeds)} seeds, mean ± std):")
    print(results.summary_markdown(tables["summary"].drop(columns=["lr"]), ["variant", "aux"]))
    print(f"written to {results.relative_to_repo(out.path)} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
