"""What every experiment notebook does around its experiment: one call to set up (parameters,
results folder, threads, source, data, held-out tokens, plot style) and one to record an
empirical verdict.

    nb = start("sparsity_allocation", globals())   # right after the parameters cell
    ...
    record_verdict(nb, verdict_table, key=["k"])   # printed; compared with a committed re-run

Claims split in two (DESIGN §9): what must hold at any scale (budgets spent, BatchTopK equals
Mutual Choice, batch independence) is asserted in the notebook; which rule wins is an empirical
verdict, computed into a table, printed and saved as ``verdict.csv``. When the results folder
already holds a verdict from a run with the same parameters (a reproduction point re-run), the
new verdict must agree with it: CPU runs are bit-for-bit repeatable, so a disagreement means the
code changed the science, and the reproduction must be re-run and committed. Tests write to a
fresh results folder, so a better rule never breaks them.
"""

from __future__ import annotations

import itertools
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from . import experiments as ex
from . import results

# Names IPython puts in a notebook's namespace; never parameters.
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
_LITERALS = (bool, int, float, str, list, tuple, dict, type(None))


def parameters_of(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-literal variables of a namespace (a notebook's ``globals()`` right after its
    parameters cell): its parameters, as papermill set them."""
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if isinstance(value, types.ModuleType) or not isinstance(value, _LITERALS):
            continue
        out[name] = value
    return out


@dataclass
class Setup:
    """What :func:`start` returns to a notebook."""

    experiment: str
    params: dict[str, Any]
    out: results.ResultsDir
    source: Any
    data: Any
    eval_set: ex.EvalSet | None
    is_lm: bool

    def save_provenance(self, **kwargs: Any):
        seeds = self.params.get("seeds")
        return self.out.save_provenance(self.params, source=self.source, seeds=seeds, **kwargs)


def start(
    experiment: str,
    namespace: Mapping[str, Any],
    *,
    eval_difficulty: bool = False,
    training_tokens: int | None = None,
) -> Setup:
    """Set up an experiment notebook from its parameters (read from ``namespace``): the results
    folder ``results/<experiment>/<run_name>/``, torch threads, plot style, the activation
    source (synthetic parameters d_in, n_true_features, k_true, busyness_sigma when present;
    a language-model source's parameters in an ``lm`` mapping, e.g. model, hook and dataset for
    ``hf``),
    its training tokens (``total_tokens``, or ``training_tokens``) and ``eval_tokens``
    held-out tokens (with the model's per-token loss when ``eval_difficulty``)."""
    from . import plots

    params = parameters_of(namespace)
    out = results.ResultsDir(experiment, params.get("run_name", "quick"))
    plots.set_style()
    ex.use_threads(int(params.get("threads", 1)))
    source_name = params.get("source", "synthetic")
    synthetic = {
        key: params[key]
        for key in ("d_in", "n_true_features", "k_true", "busyness_sigma")
        if key in params
    }
    lm = params.get("lm") or {}  # e.g. {"model": ..., "hook": ..., "dataset": ...} for "hf"
    src = ex.make_source(source_name, seed=0, synthetic=synthetic, lm=lm)
    n_train = training_tokens if training_tokens is not None else params.get("total_tokens")
    data = ex.training_data(src, int(n_train)) if n_train else None
    n_eval = params.get("eval_tokens")
    eval_set = ex.EvalSet.from_source(src, int(n_eval), eval_difficulty) if n_eval else None
    return Setup(experiment, params, out, src, data, eval_set, source_name != "synthetic")


@dataclass
class Converged:
    """What :func:`converge` returns: the convergence protocol run once per combination of the
    ``over`` settings, its tables concatenated (each with those settings as columns)."""

    runs: pd.DataFrame
    """Every seed at its rule's bracketed learning rate and the final budget, on test tokens."""
    protocol: pd.DataFrame
    """Per rule (and setting): lr and its bracket, tokens, converged, mean ± std columns."""
    curve: pd.DataFrame
    lr_trials: pd.DataFrame
    final: ex.Grid
    """The final budget's SAEs and long tables (densities, per-token L0, histories)."""
    test_set: ex.EvalSet
    """The test half of the notebook's held-out tokens: the only tokens no choice has seen."""
    by_setting: dict[tuple, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.protocol["tokens"].max())

    @property
    def converged(self) -> bool:
        return bool(self.protocol["converged"].all())

    def lr(self, variant: str, **setting: Any) -> float:
        """The bracketed learning rate of ``variant`` (at the given ``over`` setting)."""
        rows = self.protocol[self.protocol["rule"] == variant]
        for name, value in setting.items():
            rows = rows[rows[name] == value]
        if len(rows) != 1:
            raise KeyError(f"no single protocol row for {variant!r} at {setting}.")
        return float(rows["lr"].iloc[0])


def converge(
    nb: Setup,
    *,
    over: Mapping[str, Sequence[Any]] | None = None,
    keep_runs: bool = True,
    keep_l0: bool = False,
    **kwargs: Any,
) -> Converged:
    """Run the convergence protocol (``adaptive_sae.convergence.converge``) on the notebook's
    data and held-out tokens, once per combination of the ``over`` settings (e.g.
    ``{"k": k_values}`` or ``{"aux_loss": aux_losses}``), and save its tables (``protocol``,
    ``curve``, ``lr_trials``) in the results folder. Its arguments default to the notebook's
    parameters: ``variants`` (the rules), ``k``, ``n_features``, ``batch_size``, ``seeds``,
    ``start_tokens`` (else ``total_tokens``: one budget), ``total_tokens`` (the largest
    budget), ``learning_rates`` (the first grid), ``input_scaling``, ``aux_loss``,
    ``resample_every_tokens`` and ``device``; ``kwargs`` override them. Finished trials are
    cached under ``<results>/trials``, so an interrupted notebook resumes."""
    from . import convergence

    p = nb.params
    base: dict[str, Any] = {
        "rules": p.get("variants"),
        "k": p.get("k"),
        "n_features": p.get("n_features"),
        "batch_size": p.get("batch_size"),
        "seeds": p.get("seeds"),
        "max_tokens": p.get("total_tokens"),
        "start_tokens": p.get("start_tokens", p.get("total_tokens")),
        "lrs": p.get("learning_rates"),
        "input_scaling": p.get("input_scaling"),
        "aux_loss": p.get("aux_loss"),
        "device": p.get("device"),
    }
    base = {key: value for key, value in base.items() if value is not None}
    base.update(kwargs)
    over = dict(over or {})
    out: dict[tuple, Any] = {}
    for values in itertools.product(*over.values()):
        setting = dict(zip(over, values))
        args = {**base, **setting}
        if args.get("aux_loss") == ex.RESAMPLE:
            args.setdefault("resample_every_tokens", p.get("resample_every_tokens"))
        out[values] = convergence.converge(
            nb.data,
            nb.eval_set,
            cache_dir=nb.out.path / "trials",
            keep_runs=keep_runs,
            keep_l0=keep_l0,
            log=print,
            **args,
        )

    def tagged(name: str) -> pd.DataFrame:  # each setting's table, with the setting as columns
        return ex.concat_frames(
            [getattr(c, name).assign(**dict(zip(over, v))) for v, c in out.items()]
        )

    final = convergence.concat_grids([c.final for c in out.values() if c.final is not None])
    result = Converged(
        tagged("runs"),
        tagged("table"),
        tagged("curve"),
        tagged("lr_trials"),
        final,
        convergence.split_held_out(nb.eval_set)[1],
        out,
    )
    nb.out.save_table("protocol", result.protocol)
    nb.out.save_table("curve", result.curve)
    nb.out.save_table("lr_trials", result.lr_trials)
    print(
        f"final budget {result.tokens:,} tokens per SAE; converged: {result.converged}\n"
        + result.protocol[
            [c for c in ["rule", *over, "lr", "lr_below", "lr_above", "tokens", "converged"]
             if c in result.protocol]
        ].to_string(index=False)
    )  # fmt: skip
    return result


def record_verdict(
    nb: Setup, verdict: pd.DataFrame, *, key: list[str], holds: str = "holds"
) -> pd.DataFrame:
    """Print and save an empirical verdict (one row per ``key``, a boolean ``holds`` column);
    if the results folder holds a verdict of a run with the same parameters, assert that this
    one agrees with it (see the module docstring)."""
    if holds not in verdict.columns:
        raise ValueError(f"the verdict table needs a boolean {holds!r} column.")
    table = verdict.reset_index() if any(k not in verdict.columns for k in key) else verdict
    path = nb.out.path / "verdict.csv"
    prov = nb.out.path / "provenance.json"
    if path.exists() and prov.exists():
        before = json.loads(prov.read_text()).get("parameters")
        if before == json.loads(json.dumps(results.to_jsonable(nb.params))):
            old = pd.read_csv(path)
            merged = table[[*key, holds]].merge(old[[*key, holds]], on=key, suffixes=("", "_was"))
            changed = merged[merged[holds].astype(bool) != merged[f"{holds}_was"].astype(bool)]
            assert changed.empty, (
                f"the verdict of {results.relative_to_repo(path)} changed for {changed[key]}: "
                f"the code changed the result; re-run this sweep and commit its results."
            )
            print(f"verdict agrees with the committed run ({len(merged)} rows)")
    nb.out.save_table("verdict", table)
    print(table.to_string(index=False))
    return table


__all__ = ["Converged", "Setup", "converge", "parameters_of", "record_verdict", "start"]
