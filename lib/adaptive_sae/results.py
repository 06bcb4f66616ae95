"""Where experiment outputs go and what is written with them.

Every experiment writes under ``results/<experiment>/<run-name>/``: its tables (CSV), its
headline numbers (``metrics.json``), its figures (PNG and SVG) and a ``provenance.json`` that
says how the numbers were made (git commit, package versions, activation source, corpus hash,
seeds, parameters). Files are written atomically (a temporary file in the same folder, then a
rename), so an interrupted run never leaves a half-written table behind.

    from adaptive_sae import results
    out = results.ResultsDir("sparsity_allocation", run_name="quick")
    out.save_table("runs", df)
    out.save_metrics({"nmse_topk": 0.31})
    out.save_figure(fig, "pareto")
    out.save_provenance(parameters, source=src, seeds=[0, 1])
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from . import io as _io
from .io import (
    atomic_write_bytes,
    atomic_write_text,
    find_repo_root,
    to_jsonable,
    write_csv,
    write_json,
)

RESULTS_ENV = "ADAPTIVE_SAE_RESULTS"
"""Environment variable that overrides the results root (tests point it at a temporary folder)."""

PROVENANCE_PACKAGES = (
    "adaptive-sae",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "transformer-lens",
    "safetensors",
    "matplotlib",
    "seaborn",
    "papermill",
)
"""Packages whose versions are recorded with every run."""

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 120


# ----------------------------------------------------------------------------- locations


def results_root() -> Path:
    """``$ADAPTIVE_SAE_RESULTS`` if set, else ``<repo>/results`` (``./results`` outside a checkout)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).resolve()
    root = find_repo_root()
    return (root if root is not None else Path.cwd()) / "results"


def relative_to_repo(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root when inside it (for messages and provenance)."""
    p = Path(path).resolve()
    root = find_repo_root()
    if root is not None:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return p.as_posix()


# ----------------------------------------------------------------------------- naming


def format_value(value: Any) -> str:
    """A short, filesystem-safe spelling of one parameter value: ``[0, 1, 2]`` -> ``0-1-2``,
    ``0.001`` -> ``0.001``, ``1e-06`` -> ``1e-06``, ``True`` -> ``true``, ``"a b"`` -> ``a_b``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value) or "empty"
    if isinstance(value, Mapping):
        return "-".join(f"{k}{format_value(v)}" for k, v in sorted(value.items()))
    text = _SAFE.sub("_", str(value)).strip("_.")
    return text or "empty"


def run_name(parameters: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """A readable, deterministic name for a run from its parameters:
    ``{"k": 8, "seeds": [0, 1]}`` -> ``k=8__seeds=0-1``.

    ``keys`` picks (and orders) the parameters that appear; by default all, in the mapping's
    order. Names longer than 120 characters are cut and end with a hash of the full name, so
    two different parameter sets never share a name.
    """
    keys = list(parameters) if keys is None else list(keys)
    parts = [f"{_SAFE.sub('_', str(k))}={format_value(parameters[k])}" for k in keys]
    name = "__".join(parts) or "default"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 12].rstrip('_=-')}__{digest}"
    return name


def check_run_name(name: str) -> str:
    """``name`` if it can name a run folder; ValueError with the fix otherwise. Call it before
    the work whose results it will hold, not when saving them."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ValueError(
            f"run_name={name!r} must be a relative name such as 'quick' or 'sweep/k=8' "
            f"(no '..', no absolute path)."
        )
    bad = [p for p in parts if _SAFE.search(p)]
    if bad:
        raise ValueError(
            f"run_name={name!r} has characters outside [A-Za-z0-9._=+-] in {bad}; "
            f"use results.run_name(parameters) to build one."
        )
    return name


# ----------------------------------------------------------------------------- atomic writes


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a malformed one raises an error naming it."""
    return _io.read_json(path)


# ----------------------------------------------------------------------------- tables


def _numeric_columns(df, exclude: Sequence[str]) -> list[str]:
    import pandas as pd

    return [
        c
        for c in df.columns
        if c not in exclude
        and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
    ]


def mean_std(df, by: Sequence[str], metrics: Sequence[str] | None = None, seed_col: str = "seed"):
    """Group ``df`` by ``by`` and give ``<metric>_mean``, ``<metric>_std`` (sample std across
    rows, NaN for a single row) and ``n`` (rows: seeds) for each metric column."""
    import pandas as pd

    by = [c for c in by if c in df.columns]
    metrics = list(metrics) if metrics else _numeric_columns(df, [*by, seed_col])
    if df.empty:
        return pd.DataFrame(
            columns=[*by, *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "n"]
        )
    keyed = df.copy()
    for c in by:  # lists (e.g. widths) cannot be group keys
        keyed[c] = keyed[c].map(lambda v: format_value(v) if isinstance(v, (list, dict)) else v)
    grouped = keyed.groupby(by, dropna=False, sort=False) if by else keyed.groupby(lambda _: 0)
    rows = []
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key)) if by else {}
        for m in metrics:
            values = pd.to_numeric(g[m], errors="coerce")
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_std"] = values.std(ddof=1) if values.count() > 1 else float("nan")
        row["n"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.1234, 0.0056`` -> ``0.123 ± 0.0056``; a single value has no ``±`` part."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}g}"
    if abs(std) <= 1e-9 * abs(mean):  # identical values up to rounding
        std = 0.0
    return f"{mean:.{digits}g} ± {std:.2g}"


def summary_markdown(summary, by: Sequence[str]) -> str:
    """A Markdown table of a :func:`mean_std` result, cells spelled ``mean ± std``."""
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    header = [*by, *metrics, "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[c]) for c in by]
        cells += [format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]
        cells.append(str(int(row["n"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- provenance


def git_state(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the checkout and whether tracked files other than the results
    (``results/``, which a sweep itself rewrites point by point) differ from it."""
    root = Path(root) if root is not None else find_repo_root()
    state: dict[str, Any] = {"commit": None, "dirty": None}
    if root is None:
        return state
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            state["commit"] = commit.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if status.returncode == 0:
            state["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def package_versions(packages: Iterable[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None for one that is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _scrub_paths(obj: Any) -> Any:
    """Replace absolute paths inside strings by repository-relative or home-relative ones."""
    root = find_repo_root()
    home = str(Path.home())
    prefixes = [(str(root) + os.sep, ""), (str(root), ".")] if root is not None else []
    prefixes += [(home + os.sep, "~/"), (home, "~")] if home not in ("/", "") else []

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            for prefix, repl in prefixes:
                v = v.replace(prefix, repl)
            return v
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        return v

    return scrub(obj)


def describe_source(source: Any) -> dict[str, Any] | None:
    """What an activation source says about itself (its ``describe()``), as JSON types."""
    if source is None:
        return None
    if isinstance(source, (str, Mapping)):
        desc: Any = source
    elif hasattr(source, "describe"):
        desc = source.describe()
    else:
        desc = repr(source)
    desc = to_jsonable(desc)
    return desc if isinstance(desc, dict) else {"description": desc}


def corpus_hash_of(source: Any, description: Mapping[str, Any] | None = None) -> str | None:
    """The hash of the text corpus behind a language-model source, where it has one."""
    for name in ("corpus_hash", "corpus_sha256"):
        value = getattr(source, name, None)
        if callable(value):
            value = value()
        if value:
            return str(value)
        if description and description.get(name):
            return str(description[name])
    return None


def provenance(
    parameters: Mapping[str, Any],
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    source: Any = None,
    seeds: Iterable[int] | None = None,
    corpus_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to know how a result was made.

    Git commit (and whether the tree was dirty), package versions, Python and platform, the
    activation source's own description, the corpus hash (language-model sources), seeds,
    the notebook parameters, and the UTC time.
    """
    description = describe_source(source)
    if seeds is None and "seeds" in parameters:
        seeds = parameters["seeds"]
    record = {
        "experiment": experiment,
        "run_name": run_name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "source": description,
        "corpus_hash": corpus_hash or corpus_hash_of(source, description),
        "seeds": list(seeds) if seeds is not None else None,
        "parameters": dict(parameters),
    }
    try:
        import torch

        record["torch_threads"] = torch.get_num_threads()
        record["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if extra:
        record["extra"] = dict(extra)
    return _scrub_paths(to_jsonable(record))


# ----------------------------------------------------------------------------- a run folder


class ResultsDir:
    """The output folder of one experiment run: ``<results root>/<experiment>/<run_name>/``.

    ``run_name`` may contain ``/`` (a sweep writes ``<sweep>/<point>``). Everything is written
    atomically; ``files`` lists what this object wrote.
    """

    def __init__(
        self, experiment: str, run_name: str = "quick", root: str | os.PathLike | None = None
    ):
        if not experiment or _SAFE.search(experiment):
            raise ValueError(f"experiment={experiment!r} must be a plain name like 'zipf_density'.")
        self.experiment = experiment
        self.run_name = check_run_name(run_name)
        self.root = Path(root) if root is not None else results_root()
        self.path = self.root / experiment / run_name
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def __repr__(self) -> str:
        return f"ResultsDir({relative_to_repo(self.path)!r})"

    def _record(self, path: Path) -> Path:
        if path not in self.files:
            self.files.append(path)
        return path

    def save_table(self, name: str, df, compress: bool = False) -> Path:
        """``<name>.csv`` from a DataFrame (``<name>.csv.gz`` with ``compress``, for tables of
        one row per token that would otherwise be megabytes; pandas reads either)."""
        suffix = ".csv.gz" if compress else ".csv"
        return self._record(write_csv(self.path / f"{name}{suffix}", df))

    def save_json(self, name: str, obj: Any) -> Path:
        return self._record(write_json(self.path / f"{name}.json", obj))

    def save_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """``metrics.json``: the headline numbers (flat name -> number is what sweeps aggregate)."""
        return self.save_json("metrics", metrics)

    def load_metrics(self) -> dict[str, Any]:
        return read_json(self.path / "metrics.json")

    def save_figure(
        self, fig, name: str, formats: Iterable[str] = ("png", "svg"), dpi: int = 150
    ) -> None:
        """``<name>.png`` and ``<name>.svg`` from a matplotlib figure (written atomically)."""
        import io

        for fmt in formats:
            buf = io.BytesIO()
            save_kwargs: dict[str, Any] = {"format": fmt, "bbox_inches": "tight"}
            if fmt == "png":
                save_kwargs["dpi"] = dpi
            if fmt == "svg":
                save_kwargs["metadata"] = {"Date": None}  # reproducible bytes
            fig.savefig(buf, **save_kwargs)
            self._record(atomic_write_bytes(self.path / f"{name}.{fmt}", buf.getvalue()))

    def save_provenance(self, parameters: Mapping[str, Any], **kwargs: Any) -> Path:
        """``provenance.json``: see :func:`provenance`."""
        record = provenance(
            parameters, experiment=self.experiment, run_name=self.run_name, **kwargs
        )
        record["files"] = sorted(p.name for p in self.files)
        return self._record(write_json(self.path / "provenance.json", record))


__all__ = [
    "format_mean_std",
    "mean_std",
    "summary_markdown",
    "RESULTS_ENV",
    "ResultsDir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_run_name",
    "corpus_hash_of",
    "describe_source",
    "find_repo_root",
    "format_value",
    "git_state",
    "package_versions",
    "provenance",
    "read_json",
    "relative_to_repo",
    "results_root",
    "run_name",
    "to_jsonable",
    "write_csv",
    "write_json",
]
