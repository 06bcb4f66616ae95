"""The quick comparison: every allocation rule at the same mean L0 on synthetic ground truth.

    python -m adaptive_sae.quick [--seeds 0 1 2] [--total-tokens 300000] [--jobs 2]

Fairness: every variant gets the same data, token budget, batch size and recipe; its learning
rate is picked per variant from a small grid on held-out validation tokens (seed 0, no
auxiliary loss), and the final numbers are measured on separate test tokens. ReLU+L1 reaches
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
from typing import Any

import pandas as pd
import torch

from . import results
from .config import SAEConfig, TrainConfig
from .data.synthetic import SyntheticConfig, SyntheticSource, l0_rank_correlation, recovery_metrics
from .metrics import evaluate
from .trainer import train

# name -> SAEConfig overrides. The Zipf ranking and the input scaling are the two design
# questions DESIGN §3 and §6 ask to measure rather than assume.
VARIANTS: dict[str, dict[str, Any]] = {
    "topk": {"sparsifier": "topk"},
    "feature_choice": {"sparsifier": "feature_choice"},
    "feature_choice_zipf": {"sparsifier": "feature_choice_zipf", "capacity_ranking": "demand"},
    "feature_choice_zipf_fixed": {"sparsifier": "feature_choice_zipf", "capacity_ranking": "fixed"},
    "mutual_choice": {"sparsifier": "mutual_choice"},
    "mutual_choice_per_token": {"sparsifier": "mutual_choice", "input_scaling": "per_token"},
    "relu_l1": {"sparsifier": "relu_l1"},
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


def _configs(q: QuickConfig, variant: str, aux: str, seed: int, lr: float):
    cfg = SAEConfig(d_in=q.d_in, n_features=q.n_features, k=q.k, **VARIANTS[variant])
    tcfg = TrainConfig(
        batch_size=q.batch_size,
        total_tokens=q.total_tokens,
        lr=lr,
        aux_loss=aux,
        seed=seed,
        dead_window_tokens=q.dead_window_tokens,
        density_window_tokens=q.dead_window_tokens,
        log_every=50,
    )
    return cfg, tcfg


@functools.lru_cache(maxsize=2)
def _train_tokens(q: QuickConfig) -> torch.Tensor:
    """The training tokens, generated once per process and shared by its runs."""
    src = q.source()
    n_batches = q.total_tokens // q.batch_size
    return torch.cat([b for _, b in zip(range(n_batches), src.batches(q.batch_size))])


@functools.lru_cache(maxsize=4)
def _eval_split(q: QuickConfig, split: str):
    """Validation = first eval_tokens held-out tokens, test = the next eval_tokens."""
    sample = q.source().sample_with_truth(2 * q.eval_tokens, split="val")
    sl = slice(0, q.eval_tokens) if split == "val" else slice(q.eval_tokens, None)
    return sample.x[sl], sample.n_active[sl]


def _run(job: tuple[QuickConfig, str, str, int, float, str]) -> dict[str, Any]:
    q, variant, aux, seed, lr, split = job
    torch.set_num_threads(1)
    src = q.source()
    cfg, tcfg = _configs(q, variant, aux, seed, lr)
    data = _train_tokens(q)
    t0 = time.perf_counter()
    run = train(cfg, tcfg, data)
    seconds = time.perf_counter() - t0
    x, n_active = _eval_split(q, split)
    row: dict[str, Any] = {"variant": variant, "aux": aux, "seed": seed, "lr": lr}
    for rule in ("train", "inference"):
        res = evaluate(run.sae, x, rule=rule, batch_size=q.batch_size)
        row[f"nmse_{rule}"] = res["nmse"]
        row[f"l0_mean_{rule}"] = res["l0_mean"]
        row[f"l0_std_{rule}"] = res["l0_std"]
        row[f"dead_pct_{rule}"] = 100 * res["dead_fraction"]
        row[f"underutilised_pct_{rule}"] = 100 * res["underutilised_fraction"]
        n = len(res["l0_per_token"])
        row[f"l0_corr_{rule}"] = l0_rank_correlation(res["l0_per_token"], n_active[:n])
    rec = recovery_metrics(run.sae.W_dec.detach(), src)
    row["mean_max_cos"] = rec["mean_max_cosine"]
    row["recovered_frac"] = rec["fraction_recovered"]
    row["train_seconds"] = seconds
    return row


def _map(jobs: list, n_jobs: int, desc: str) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    if n_jobs <= 1:
        return [_run(j) for j in tqdm(jobs, desc=desc)]
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(tqdm(pool.map(_run, jobs), total=len(jobs), desc=desc))


SUMMARY_METRICS = [
    "nmse_train",
    "nmse_inference",
    "l0_mean_train",
    "l0_std_train",
    "dead_pct_train",
    "underutilised_pct_train",
    "l0_corr_train",
    "mean_max_cos",
    "recovered_frac",
]


def quick_comparison(q: QuickConfig | None = None, n_jobs: int = 2) -> dict[str, pd.DataFrame]:
    """Pick each variant's learning rate on validation tokens, then train every variant ×
    auxiliary loss × seed and measure on test tokens. Returns the tables."""
    q = q or QuickConfig()
    unknown = set(q.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}.")
    grid_jobs = [(q, v, "none", q.seeds[0], lr, "val") for v in q.variants for lr in q.lr_grid]
    lr_grid = pd.DataFrame(_map(grid_jobs, n_jobs, "learning-rate grid"))
    best = lr_grid.loc[lr_grid.groupby("variant")["nmse_train"].idxmin(), ["variant", "lr"]]
    best_lr = dict(zip(best["variant"], best["lr"]))
    jobs = [
        (q, v, aux, s, best_lr[v], "test")
        for v in q.variants
        for aux in q.aux_losses
        for s in q.seeds
    ]
    runs = pd.DataFrame(_map(jobs, n_jobs, "comparison"))
    summary = results.mean_std(runs, ["variant", "aux"], SUMMARY_METRICS)
    summary.insert(2, "lr", summary["variant"].map(best_lr))
    return {"runs": runs, "summary": summary, "lr_grid": lr_grid}


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
    p.add_argument("--run-name", default="default")
    a = p.parse_args(argv)
    q = QuickConfig(
        seeds=tuple(a.seeds),
        total_tokens=a.total_tokens,
        variants=tuple(a.variants),
        aux_losses=tuple(a.aux),
    )
    t0 = time.time()
    tables = quick_comparison(q, n_jobs=a.jobs)
    out = write_tables(tables, q, a.run_name)
    pd.set_option("display.width", 200)
    print("\nLearning-rate grid (validation NMSE, training rule, seed 0, no aux loss):")
    print(tables["lr_grid"].pivot(index="variant", columns="lr", values="nmse_train").round(3))
    print(f"\nQuick comparison at mean L0 = {q.k} ({len(q.seeds)} seeds, mean ± std):")
    print(results.summary_markdown(tables["summary"].drop(columns=["lr"]), ["variant", "aux"]))
    print(f"written to {results.relative_to_repo(out.path)} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
