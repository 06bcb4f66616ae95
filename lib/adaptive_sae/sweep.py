"""Run a notebook over a parameter grid with papermill on Ray, and aggregate the points.

A sweep is a YAML file (``papermill_runs/<sweep>.yaml``)::

    notebook: notebooks/sparsity_allocation.ipynb   # relative to the YAML's folder or the repo
    experiment: sparsity_allocation    # results/<experiment>/ (default: notebook name)
    parameters:                        # the same for every point
      total_tokens: 600000
    grid:                              # cartesian product: one point per combination
      input_scaling: [global, per_token]
    seeds: [0, 1, 2]
    seeds_per_point: 1                 # 1: one point per seed; all: every seed in one point
    resources: {num_cpus: 1, num_gpus: 0}   # what each point asks of Ray (default: 1 CPU)
    aggregate:                         # optional: a tidy table each point writes
      table: runs                      # results/<experiment>/<run_name>/runs.csv
      by: [rule]                       # its columns that identify a row (besides seed)

and one command runs it::

    python -m adaptive_sae.sweep papermill_runs/<sweep>.yaml [--jobs N] [--address HOST:PORT]

Every point is a Ray task. Without ``--address`` the command starts a small local Ray instance
with ``--jobs`` points' worth of CPUs and stops it at the end; with ``--address`` it joins a
cluster started by ``ray start`` (each node: the same checkout and environment). ``resources``
takes Ray's ``num_cpus``, ``num_gpus``, ``memory`` (bytes) and ``resources`` (custom ones); the
kernel of a point gets ``num_cpus`` threads.

Each point is named from its parameters (``input_scaling=global__seed=0``). Before anything
runs, every parameter is checked against the notebook's parameters cell: an unknown name, or a
value of the wrong kind (a string where the notebook's default is a number or a list), fails at
once naming the file, the point and the parameter; numbers that YAML reads as strings
(``3e-3``) are converted. The worker executes the notebook with papermill, with
``run_name = "<sweep>/<point>"`` injected, in a temporary folder, and returns the executed
notebook and every results file as bytes; the driver writes them atomically
(``results/<experiment>/<sweep>/<point>/`` and ``papermill_runs/<sweep>/<point>.ipynb``), so
workers need no shared file system. Then, last, a done marker (``<point>.done.json``, recording
the parameters and the notebook's hash) makes later invocations skip the point; a point whose
parameters or notebook changed runs again. A point whose worker process or kernel dies (killed,
out of memory, a node lost) is retried, ``--retries`` times (default 3); a point whose notebook
raises leaves ``<point>.failed.json`` naming the failing cell (a claim's first comment line) and
the error, and the other points still run. Ctrl-C stops the sweep at once: running points are
cancelled and stay not done, and the same command resumes.

Finally every done point is aggregated into one table per sweep,
``results/<experiment>/<sweep>/summary.csv`` (mean, std and number of seeds for each metric,
grouped by the grid parameters and the ``aggregate.by`` columns), with a Markdown copy that
spells each cell as ``mean ± std`` and ``status.csv`` listing every point.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import results as _results

RUN_NAME_PARAMETER = "run_name"
"""The notebook parameter that names the run (its results folder)."""

DEFAULT_RETRIES = 3
"""How many times a point whose worker or kernel died is run again before it counts as failed."""

DEFAULT_RESOURCES: dict[str, Any] = {"num_cpus": 1}
"""What a point asks of Ray when its sweep names no ``resources``."""

_RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "resources"}

_KNOWN_KEYS = {
    "name",
    "notebook",
    "experiment",
    "description",
    "parameters",
    "grid",
    "points",
    "seeds",
    "seeds_per_point",
    "seed_parameter",
    "aggregate",
    "timeout",
    "resources",
}

_WORKDIR_PREFIX = "adaptive_sae_point-"
"""Temporary folders of running points: ``<prefix><worker pid>-<random>``."""

_NO_DEFAULT = object()
"""A notebook parameter whose default is an expression, not a literal: any value goes."""


class SweepError(ValueError):
    """A sweep file is invalid; the message names the value and the fix."""


class KernelDied(RuntimeError):
    """The notebook's kernel died (killed, out of memory): the point is run again."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the sweep; ``outcomes`` holds what finished before."""

    def __init__(self, outcomes: dict[str, list[Outcome]], not_done: list[str]):
        super().__init__("sweep interrupted")
        self.outcomes = outcomes
        self.not_done = not_done


# ----------------------------------------------------------------------------- parameter types


class _Mismatch(Exception):
    def __init__(self, expected: str, fix: str):
        super().__init__(expected)
        self.expected, self.fix = expected, fix


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "a list", dict: "a mapping", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _number_from_text(text: str, integer: bool) -> int | float:
    try:
        number = float(text.strip())
    except ValueError:
        raise _Mismatch("a number", "write a number, e.g. 3.0e-3 or 0.003") from None
    return int(number) if integer and number.is_integer() else number


def coerce_value(value: Any, default: Any) -> Any:
    """``value`` converted to the kind of the notebook's ``default`` where that is unambiguous
    (a number YAML read as a string, like ``3e-3``); raises ``_Mismatch`` where it is not."""
    if default is _NO_DEFAULT or default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false", "write true or false")
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Mismatch("a number", "write a single number")
        if isinstance(value, str):
            return _number_from_text(value, integer=isinstance(default, int))
        return value
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise _Mismatch("a string", f"write a string (quote it: '{value}')")
    if isinstance(default, (list, tuple)):
        if not isinstance(value, list):
            raise _Mismatch("a list", f"write it as a list: [{value}]")
        element = default[0] if default else _NO_DEFAULT
        if default and any(type(d) is not type(element) for d in default):
            element = _NO_DEFAULT  # a mixed default says nothing about its elements
        try:
            return [coerce_value(v, element) for v in value]
        except _Mismatch as bad:
            raise _Mismatch(f"a list of items that are each {bad.expected}", bad.fix) from None
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping", "write a mapping {name: value}")
    return value


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, tuple[Any, str]]:
    """Each parameter of the notebook's parameters cell: (its default value, its source text).
    Reads the file only; starts no kernel."""
    import papermill

    out: dict[str, tuple[Any, str]] = {}
    for name, info in papermill.inspect_notebook(str(notebook)).items():
        text = str(info.get("default", ""))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = _NO_DEFAULT
        out[name] = (value, text)
    return out


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Point:
    """One grid point: the parameters injected into the notebook and the names derived from them."""

    sweep: str
    name: str
    parameters: dict[str, Any]
    """Everything injected, ``run_name`` included."""
    labels: dict[str, Any]
    """The varying values that name the point (grid values and the seed)."""

    @property
    def run_name(self) -> str:
        return self.parameters[RUN_NAME_PARAMETER]

    def fingerprint(self, notebook: Path | None = None) -> str:
        """A hash of the injected parameters and, when given, of the notebook's content: a
        point is done only for the same parameters and the same notebook."""
        blob = json.dumps(_results.to_jsonable(self.parameters), sort_keys=True).encode()
        if notebook is not None:
            blob += hashlib.sha256(Path(notebook).read_bytes()).digest()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path
    notebook: Path
    experiment: str
    parameters: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points_list: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] | None = None
    seeds_per_point: int | None = 1
    """1: a point per seed; None: all seeds in one point; n: chunks of n seeds."""
    seed_parameter: str = "seeds"
    aggregate: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    description: str = ""
    resources: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    """What each point asks of Ray: ``num_cpus``, ``num_gpus``, ``memory``, ``resources``."""
    defaults: dict[str, tuple[Any, str]] | None = None
    """The notebook's parameters (default value, source text); None: not read yet."""

    @property
    def output_dir(self) -> Path:
        """Where executed notebooks and markers go: ``<yaml folder>/<sweep name>/``."""
        return self.path.parent / self.name

    def results_dir(self) -> Path:
        return _results.results_root() / self.experiment / self.name

    @property
    def threads(self) -> int:
        """CPU threads of a point's kernel: its ``num_cpus``, at least one."""
        return max(1, int(self.resources.get("num_cpus", 1)))

    def _coerced(self, raw_name: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.defaults is None:
            self.defaults = notebook_defaults(self.notebook)
        out = dict(params)
        for key, value in params.items():
            if key not in self.defaults:
                continue  # check_parameters names undeclared parameters
            default, text = self.defaults[key]
            try:
                out[key] = coerce_value(value, default)
            except _Mismatch as bad:
                raise SweepError(
                    f"{self.path.name}: point {raw_name}: {key}={value!r} is {_kind(value)}, "
                    f"but {self.notebook.name} expects {bad.expected} (its default is {text}); "
                    f"{bad.fix} in the sweep file."
                ) from None
        return out

    def points(self) -> list[Point]:
        """Every point of the grid, in a deterministic order, with its values converted to the
        kinds the notebook's parameters cell declares."""
        keys = list(self.grid)
        combos = [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]
        bases = self.points_list or [{}]
        seed_groups: list[list[int] | None]
        if self.seeds is None:
            seed_groups = [None]
        elif self.seeds_per_point is None:
            seed_groups = [list(self.seeds)]
        else:
            n = self.seeds_per_point
            seed_groups = [list(self.seeds[i : i + n]) for i in range(0, len(self.seeds), n)]
        out: list[Point] = []
        seen: dict[str, dict] = {}
        for base in bases:
            for combo in combos:
                for group in seed_groups:
                    raw = {**base, **combo}
                    params = self._coerced(
                        _results.run_name(raw) if raw else "default", {**self.parameters, **raw}
                    )
                    labels = {k: params[k] for k in raw}
                    if group is not None:
                        params[self.seed_parameter] = group
                        one = self.seeds_per_point == 1
                        labels["seed" if one else "seeds"] = group[0] if one else group
                    name = _results.run_name(labels) if labels else "default"
                    if name in seen:
                        raise SweepError(
                            f"sweep {self.name!r}: two points are both named {name!r}; "
                            f"make the grid/points entries distinct."
                        )
                    seen[name] = labels
                    params[RUN_NAME_PARAMETER] = f"{self.name}/{name}"
                    out.append(Point(self.name, name, params, labels))
        return out

    def notebook_output(self, point: Point) -> Path:
        return self.output_dir / f"{point.name}.ipynb"

    def done_marker(self, point: Point) -> Path:
        return self.output_dir / f"{point.name}.done.json"

    def failed_marker(self, point: Point) -> Path:
        return self.output_dir / f"{point.name}.failed.json"

    def point_results(self, point: Point) -> Path:
        return _results.results_root() / self.experiment / point.run_name

    def is_done(self, point: Point) -> bool:
        """Done: a marker recording the same parameters and notebook, the executed notebook
        beside it, and the point's results in the results folder in use (so a run into another
        ``--results-root`` runs the point there)."""
        marker = self.done_marker(point)
        if not marker.is_file() or not self.notebook_output(point).is_file():
            return False
        if not self.point_results(point).is_dir():
            return False
        try:
            recorded = _results.read_json(marker).get("fingerprint")
        except (OSError, ValueError):
            return False
        return recorded == point.fingerprint(self.notebook)

    def ray_options(self) -> dict[str, Any]:
        """The resources part of the Ray task options of one point."""
        return {k: v for k, v in self.resources.items() if k in _RESOURCE_KEYS}


def _resolve_notebook(raw: str, yaml_path: Path) -> Path:
    candidates = [yaml_path.parent / raw]
    root = _results.find_repo_root(yaml_path.parent)
    if root is not None:
        candidates.append(root / raw)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(
        f"{yaml_path.name}: notebook {raw!r} not found (looked next to the sweep file and at "
        f"the repository root); fix the 'notebook' path."
    )


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SweepError(
            f"{path}{where}: not valid YAML ({problem}); fix the syntax there."
        ) from None
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8.") from None


def _check_resources(raw: Any, path: Path) -> dict[str, Any]:
    if raw is None:
        return dict(DEFAULT_RESOURCES)
    fix = "e.g. resources: {num_cpus: 1, num_gpus: 0}"
    if not isinstance(raw, dict):
        raise SweepError(f"{path.name}: resources={raw!r} must be a mapping; {fix}.")
    unknown = set(raw) - _RESOURCE_KEYS
    if unknown:
        raise SweepError(
            f"{path.name}: resources takes {sorted(_RESOURCE_KEYS)}, not {sorted(unknown)}; {fix}."
        )

    def amount(label: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise SweepError(
                f"{path.name}: {label}={value!r} must be a number >= 0 (written without "
                f"quotes); {fix}."
            )
        return value

    out = {**DEFAULT_RESOURCES, **raw}
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in out:
            amount(f"resources.{key}", out[key])
    custom = out.get("resources")
    if custom is not None:
        if not isinstance(custom, dict):
            raise SweepError(f"{path.name}: resources.resources must map names to amounts.")
        for name, value in custom.items():
            amount(f"resources.resources.{name}", value)
    return out


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist.")
    spec = _read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"{path.name}: the file must be a mapping with at least 'notebook'.")
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        raise SweepError(
            f"{path.name}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}."
        )
    if "notebook" not in spec:
        raise SweepError(f"{path.name}: 'notebook' is missing (the notebook to run).")
    notebook = _resolve_notebook(str(spec["notebook"]), path)
    name = str(spec.get("name") or path.stem)
    experiment = str(spec.get("experiment") or notebook.stem.lstrip("0123456789_-"))
    for label, value in (("name", name), ("experiment", experiment)):
        if _results._SAFE.search(value):
            raise SweepError(f"{path.name}: {label}={value!r} may only use [A-Za-z0-9._=+-].")
    for section in ("parameters", "grid"):
        if not isinstance(spec.get(section) or {}, dict):
            raise SweepError(f"{path.name}: '{section}' must be a mapping of name: value.")
    parameters = dict(spec.get("parameters") or {})
    grid = dict(spec.get("grid") or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{path.name}: grid.{key} must be a non-empty list of values, got {values!r}."
            )
    points_list = spec.get("points") or []
    if not isinstance(points_list, list) or any(not isinstance(p, dict) for p in points_list):
        raise SweepError(f"{path.name}: 'points' must be a list of mappings.")
    seeds = spec.get("seeds")
    if seeds is not None:
        if isinstance(seeds, int):
            seeds = [seeds]
        if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
            raise SweepError(f"{path.name}: seeds must be a list of integers, got {seeds!r}.")
    spp = spec.get("seeds_per_point", 1)
    if spp in ("all", None, 0):
        spp = None
    elif not isinstance(spp, int) or spp < 1:
        raise SweepError(
            f"{path.name}: seeds_per_point={spp!r} must be a positive integer or 'all'."
        )
    seed_parameter = str(spec.get("seed_parameter", "seeds"))
    varied = set(grid) | {k for p in points_list for k in p}
    reserved = {RUN_NAME_PARAMETER} | ({seed_parameter} if seeds is not None else set())
    if varied & reserved or RUN_NAME_PARAMETER in parameters:
        raise SweepError(
            f"{path.name}: {sorted((varied | set(parameters)) & reserved)} are set by the "
            f"runner; remove them from parameters/grid/points."
        )
    aggregate = dict(spec.get("aggregate") or {})
    if set(aggregate) - {"table", "by", "metrics"}:
        raise SweepError(f"{path.name}: aggregate takes only table, by and metrics.")
    timeout = spec.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise SweepError(f"{path.name}: timeout={timeout!r} must be seconds (a number > 0).")
    return Sweep(
        name=name,
        path=path.resolve(),
        notebook=notebook,
        experiment=experiment,
        parameters=parameters,
        grid=grid,
        points_list=points_list,
        seeds=seeds,
        seeds_per_point=spp,
        seed_parameter=seed_parameter,
        aggregate=aggregate,
        timeout=float(timeout) if timeout else None,
        description=str(spec.get("description", "")),
        resources=_check_resources(spec.get("resources"), path),
    )


def check_parameters(sweep: Sweep) -> None:
    """Fail before running anything when the sweep sets a parameter the notebook lacks, or a
    value of a kind its parameters cell does not take."""
    sweep.defaults = notebook_defaults(sweep.notebook)
    declared = set(sweep.defaults)
    if not declared:
        raise SweepError(
            f"{sweep.notebook.name} has no cell tagged 'parameters'; papermill needs one."
        )
    injected = set(sweep.parameters) | set(sweep.grid) | {k for p in sweep.points_list for k in p}
    injected |= {RUN_NAME_PARAMETER} | ({sweep.seed_parameter} if sweep.seeds else set())
    missing = sorted(injected - declared)
    if missing:
        raise SweepError(
            f"sweep {sweep.name!r} sets {missing}, which {sweep.notebook.name} does not "
            f"declare in its parameters cell (it has {sorted(declared)}); fix the sweep file."
        )
    sweep.points()  # converts or rejects every value, naming the point


# ----------------------------------------------------------------------------- the worker side


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RESUMABLE = "trials"
"""A folder name, anywhere in a point's results, whose files a re-run of the point resumes from."""


def point_work_dir(sweep: Sweep, point: Point) -> Path:
    """Where a point's notebook writes its results while it runs: under the suite's cache,
    ``<cache>/sweep_work/<point>-<hash of its results folder>`` (two checkouts never share one),
    so that an interrupted or failed point resumes what its notebook caches there; removed once
    the point is done."""
    from .io import cache_root

    where = str(sweep.point_results(point).resolve())
    tag = hashlib.sha256(where.encode()).hexdigest()[:12]
    return Path(cache_root()) / "sweep_work" / f"{point.name}-{tag}"


def seed_work_dir(sweep: Sweep, point: Point) -> int:
    """Copy the ``trials/`` files of the point's results (as committed) into its work folder,
    where they are missing, so that a re-run trains only the trials they lack; returns how
    many files were copied. The trial caches key trials by data and settings, not by code: use
    it after a change to a notebook's presentation, not after one to training."""
    results_root = _results.results_root()
    work = point_work_dir(sweep, point)
    copied = 0
    for src in sorted(sweep.point_results(point).rglob("*")):
        rel = src.relative_to(results_root)
        if not src.is_file() or RESUMABLE not in rel.parts:
            continue
        dest = work / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            copied += 1
    return copied


def _remove_stale_workdirs() -> None:
    """Temporary folders left by workers that were killed (their pid is gone)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*"):
        pid = folder.name[len(_WORKDIR_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _node_id() -> str | None:
    """The Ray node this runs on; None outside Ray (a direct call neither imports nor starts
    Ray: importing it early changes how a later ``ray.init`` in this process connects)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no runtime context: no node
        return None


def _ignore_sigint() -> Any:
    """Ignore SIGINT in this thread's process; the previous handler, None off the main thread."""
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return None


class _Signals:
    """While the sweep waits on Ray, SIGINT and SIGTERM only set a flag that the loop checks
    every second: raised inside Ray's calls, or replaced by Ray's own SIGTERM handler, they
    would not stop the sweep cleanly."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread: the caller handles interruptions
                break
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _claim(source: str) -> str:
    """What a failing cell is about: its first comment line (claim cells start with one), else
    its first line."""
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("#"):
            return ln.lstrip("#").strip()
    return lines[0] if lines else ""


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def execute_point(
    notebook_name: str,
    notebook_bytes: bytes,
    parameters: dict[str, Any],
    timeout: float | None = None,
    threads: int = 1,
    notebook_dir: str | None = None,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Run on a worker: execute the notebook with papermill in a temporary folder and return the
    executed notebook and every results file as bytes, with the error of a failing cell. The
    results root is ``work_dir`` where given (kept when the point is interrupted or fails, so
    that a re-run resumes what its notebook caches there, e.g. the convergence protocol's
    finished trials; removed once the point is done), else a folder in the temporary one. A dying kernel raises :class:`KernelDied` so that Ray runs the point
    again; the kernel, a child of this process, exits by itself when this process is killed.
    The kernel runs in ``notebook_dir`` (the notebook's folder in the driver's checkout) where
    this machine has it, else in the temporary folder."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    _remove_stale_workdirs()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-") as tmp:
        folder = Path(tmp)
        source, executed, root = folder / notebook_name, folder / "executed.ipynb", folder / "out"
        if work_dir is not None:
            root = Path(work_dir)
            root.mkdir(parents=True, exist_ok=True)
            for old in list(root.rglob("*")):
                if old.is_file() and RESUMABLE not in old.relative_to(root).parts:
                    old.unlink()
        source.write_bytes(notebook_bytes)
        env = {
            _results.RESULTS_ENV: str(root),
            "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        error = log = None
        # A terminal's Ctrl-C also reaches the workers of a local instance (they share the
        # driver's process group); the driver decides, and cancels the point by killing us.
        sigint = _ignore_sigint()
        try:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                kernel_name="python3",
                progress_bar=False,
                cwd=notebook_dir if notebook_dir and os.path.isdir(notebook_dir) else str(folder),
                execution_timeout=timeout,
                request_save_on_cell_execute=True,
            )
        except PapermillExecutionError as exc:
            claim = _claim(exc.source)
            where = f"cell [{exc.exec_count}]" + (f" ({claim})" if claim else "")
            error = f"{where} failed: {exc.ename}: {_strip_ansi(str(exc.evalue))}".strip()
            log = _strip_ansi("\n".join(exc.traceback))
        except DeadKernelError as exc:
            raise KernelDied(
                f"the kernel died on {socket.gethostname()} ({exc}); killed, or out of memory"
            ) from None
        except Exception as exc:  # a timeout, a kernel that does not start: the point fails
            error = f"{type(exc).__name__}: {_strip_ansi(str(exc)).strip()[:500]}"
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        files = {}
        if error is None and root.is_dir():
            files = {
                p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file()
            }
            if work_dir is not None:
                shutil.rmtree(root, ignore_errors=True)
        return {
            "error": error,
            "log": log,
            "notebook": _portable(executed, notebook_name) if executed.is_file() else None,
            "files": files,
            "seconds": time.perf_counter() - start,
            "host": socket.gethostname(),
            "node": _node_id(),
        }


def _portable(executed: Path, notebook_name: str) -> bytes:
    """The executed notebook without this worker's temporary paths in its papermill record."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    record = nb.metadata.get("papermill", {})
    record["input_path"] = notebook_name
    record["output_path"] = None
    return nbformat.writes(nb).encode("utf-8")


# ----------------------------------------------------------------------------- the driver side


@dataclass
class Outcome:
    point: Point
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    error: str = ""


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise SweepError(f"a worker returned the file {name!r}, outside the results folder.")
    return rel


def write_outcome(
    sweep: Sweep, point: Point, result: Mapping[str, Any] | None, error: str | None, seconds: float
) -> Outcome:
    """The driver's half of a point: write what the worker returned, atomically, and the done
    marker last (so a point is done only once all its outputs are on disk), or the failed
    marker."""
    record = {
        "sweep": sweep.name,
        "point": point.name,
        "parameters": point.parameters,
        "labels": point.labels,
        "fingerprint": point.fingerprint(sweep.notebook),
        "seconds": round(seconds, 2),
        "notebook": sweep.notebook_output(point).name,
        "host": (result or {}).get("host"),
        "node": (result or {}).get("node"),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    done, failed = sweep.done_marker(point), sweep.failed_marker(point)
    done.unlink(missing_ok=True)  # not done while its files are being replaced
    if error is None and result is not None:
        root = _results.results_root()
        for name, data in result["files"].items():
            _results.atomic_write_bytes(root / _safe_relative(name), data)
    if result is not None and result.get("notebook") is not None:
        _results.atomic_write_bytes(sweep.notebook_output(point), result["notebook"])
    if error is None:
        failed.unlink(missing_ok=True)
        _results.write_json(done, record)
        return Outcome(point, "done", seconds)
    log = _tail((result or {}).get("log") or "")
    _results.write_json(failed, {**record, "error": error, "log_tail": log})
    return Outcome(point, "failed", seconds, error)


def _task_error(exc: BaseException, retries: int) -> str:
    """One line for a point Ray gave up on."""
    import ray.exceptions as rex

    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, KernelDied):
        return f"{cause} (run {retries + 1} times)"
    if isinstance(exc, rex.WorkerCrashedError):
        return f"its worker process died {retries + 1} times (killed, or out of memory)"
    if isinstance(exc, rex.NodeDiedError):
        return f"its node left the Ray cluster (run {retries + 1} times)"
    if isinstance(exc, rex.OutOfMemoryError):
        return f"Ray stopped it for lack of memory {retries + 1} times: {str(exc).splitlines()[0]}"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def _auth_token_available() -> bool:
    """A Ray cluster token is at hand (``ray start`` writes one to ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _connect(address: str | None, cpus: int) -> bool:
    """Join the cluster at ``address``, or start a small local instance; True when this call
    connected (and the caller disconnects at the end)."""
    if address and "ray" not in sys.modules and _auth_token_available():
        # `ray start` clusters use token authentication by default, and Ray reads the mode
        # when it is imported; a driver given an address must say that it has the token
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a busy machine starts a node's agents slowly; Ray's raylet gives them 15 s by default
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "60")
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                object_store_memory=256 * 2**20,
                **quiet,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--address {address}" if address else "a local Ray instance"
        raise SweepError(
            f"{where}: Ray did not start or answer ({str(exc).strip().splitlines()[0]}); "
            + (
                "start the cluster with `ray start --head` (and give this machine its token, "
                "see `ray get-auth-token`) or leave out --address."
                if address
                else "see `ray status`."
            )
        ) from None
    return True


def _check_fits(sweeps: Sequence[Sweep]) -> None:
    """Every point must fit on some node, or Ray would wait for it forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for sweep in sweeps:
        asked = {"CPU": sweep.resources.get("num_cpus", 1), "GPU": sweep.resources.get("num_gpus")}
        asked["memory"] = sweep.resources.get("memory")
        asked.update(sweep.resources.get("resources") or {})
        asked = {k: v for k, v in asked.items() if v}
        if not any(all(node.get(k, 0) >= v for k, v in asked.items()) for node in nodes):
            have = [{k: node.get(k, 0) for k in asked} for node in nodes]
            raise SweepError(
                f"{sweep.path.name}: each point asks for {asked}, which no node of the Ray "
                f"cluster has (its nodes: {have}); lower 'resources' in the sweep file, raise "
                f"--jobs for a local instance, or add a node (ray start --address ...)."
            )


def _label(sweeps: Sequence[Sweep], sweep: Sweep, p: Point) -> str:
    return p.name if len(sweeps) == 1 else f"{sweep.name}/{p.name}"


def run_sweeps(
    sweeps: Sequence[Sweep],
    *,
    jobs: int = 1,
    address: str | None = None,
    retries: int = DEFAULT_RETRIES,
    force: bool = False,
    progress: bool = True,
    aggregate_after: bool = True,
    reuse_trials: bool = False,
) -> dict[str, list[Outcome]]:
    """Run every point of these sweeps that is not done as a Ray task, write each result as it
    arrives, aggregate each sweep; return the outcomes per sweep name, in grid order.

    ``address``: a Ray cluster to join (``HOST:PORT``); None starts a local instance with
    ``jobs`` times the largest ``num_cpus`` a point asks for (an already initialised Ray is
    used as it is). ``retries``: runs of a point whose worker or kernel died, beyond the first.
    Ctrl-C cancels the running points and raises :class:`SweepInterrupted`. ``reuse_trials``:
    each point to run starts from the trial caches of its results (:func:`seed_work_dir`)."""
    from tqdm.auto import tqdm

    for sweep in sweeps:
        check_parameters(sweep)
    outcomes: dict[str, list[Outcome]] = {sweep.name: [] for sweep in sweeps}
    todo: list[tuple[Sweep, Point]] = []
    for sweep in sweeps:
        for p in sweep.points():
            if not force and sweep.is_done(p):
                outcomes[sweep.name].append(Outcome(p, "skipped"))
            else:
                todo.append((sweep, p))
                if reuse_trials:
                    seed_work_dir(sweep, p)
    total = sum(len(v) for v in outcomes.values()) + len(todo)
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=total - len(todo),
        desc=sweeps[0].name if len(sweeps) == 1 else f"{len(sweeps)} sweeps",
        unit="point",
        disable=not interactive,  # no redraws into a log file
        dynamic_ncols=True,
        file=sys.stderr,
    )
    pending: dict[Any, tuple[Sweep, Point, float]] = {}
    connected = False
    try:
        if todo:
            cpus = max(1, math.ceil(max(s.resources.get("num_cpus", 1) for s, _ in todo)))
            connected = _connect(address, cpus * max(1, jobs))
            import ray

            _check_fits(list({s.name: s for s, _ in todo}.values()))
            task = ray.remote(execute_point)
            notebooks = {s.name: ray.put(s.notebook.read_bytes()) for s, _ in todo}
            for sweep, p in todo:
                ref = task.options(
                    **sweep.ray_options(),
                    max_retries=retries,
                    retry_exceptions=[KernelDied],
                    name=f"{sweep.name}/{p.name}",
                ).remote(
                    sweep.notebook.name,
                    notebooks[sweep.name],
                    _results.to_jsonable(p.parameters),
                    sweep.timeout,
                    sweep.threads,
                    str(sweep.notebook.parent),
                    str(point_work_dir(sweep, p)),
                )
                pending[ref] = (sweep, p, time.perf_counter())
        finished = total - len(todo)
        with _Signals() as signals:
            while pending:
                signals.check()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                bar.refresh()  # the elapsed time moves while a long point runs
                for ref in ready:
                    sweep, p, started = pending[ref]
                    try:
                        result = ray.get(ref)
                        error = result["error"]
                    except ray.exceptions.RayError as exc:
                        result, error = None, _task_error(exc, retries)
                    seconds = result["seconds"] if result else time.perf_counter() - started
                    outcome = write_outcome(sweep, p, result, error, seconds)
                    del pending[ref]  # only now: an interrupted write leaves the point not done
                    outcomes[sweep.name].append(outcome)
                    finished += 1
                    line = f"[{sweep.name}] {outcome.status} {p.name} in {seconds:.0f} s"
                    if outcome.status == "failed":
                        line += f": {outcome.error}"
                    if interactive and outcome.status == "failed":
                        bar.write(line)
                    elif progress and not interactive:
                        print(f"{line} ({finished}/{total})", file=sys.stderr, flush=True)
                    bar.update(1)
    except KeyboardInterrupt:
        import ray

        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a cluster already gone has nothing to cancel
                pass
        not_done = [_label(sweeps, s, p) for s, p, _ in pending.values()]
        raise SweepInterrupted(outcomes, not_done) from None
    finally:
        bar.close()
        if connected:
            import ray

            ray.shutdown()
    for sweep in sweeps:
        order = {p.name: i for i, p in enumerate(sweep.points())}
        outcomes[sweep.name].sort(key=lambda o: order[o.point.name])
        if aggregate_after:
            try:
                aggregate(sweep)
            except (SweepError, ValueError, KeyError, OSError) as exc:
                # the points ran; a table that cannot be built must not hide their outcomes
                print(f"sweep {sweep.name}: aggregation failed: {exc}", file=sys.stderr)
                outcomes[sweep.name].append(
                    Outcome(Point(sweep.name, "(aggregation)", {}, {}), "failed", 0.0, str(exc))
                )
    return outcomes


def run_sweep(sweep: Sweep, **kwargs: Any) -> list[Outcome]:
    """:func:`run_sweeps` for one sweep."""
    return run_sweeps([sweep], **kwargs)[sweep.name]


# ----------------------------------------------------------------------------- aggregation


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            out[key] = v
    return out


def collect(sweep: Sweep):
    """Every done point's rows: its ``aggregate.table`` (or its ``metrics.json`` as one row),
    with the point's grid values and seed as columns. Also a status table of every point."""
    import pandas as pd

    frames, status = [], []
    for p in sweep.points():
        row = {
            "point": p.name,
            **{
                k: _results.format_value(v) if isinstance(v, list) else v
                for k, v in p.labels.items()
            },
        }
        if sweep.is_done(p):
            marker = _results.read_json(sweep.done_marker(p))
            row.update(status="done", seconds=marker.get("seconds"))
        elif sweep.failed_marker(p).is_file():
            marker = _results.read_json(sweep.failed_marker(p))
            row.update(status="failed", seconds=marker.get("seconds"), error=marker.get("error"))
        else:
            row.update(status="pending")
        status.append(row)
        if row["status"] != "done":
            continue
        folder = sweep.point_results(p)
        table = sweep.aggregate.get("table")
        if table:
            csv = folder / f"{table}.csv"
            if not csv.is_file():
                raise SweepError(
                    f"point {p.name} is done but wrote no {_results.relative_to_repo(csv)}; "
                    f"check aggregate.table in {sweep.path.name}."
                )
            df = pd.read_csv(csv)
        else:
            metrics_file = folder / "metrics.json"
            if not metrics_file.is_file():
                raise SweepError(
                    f"point {p.name} is done but wrote no metrics.json; the notebook must call "
                    f"ResultsDir.save_metrics (or set aggregate.table in {sweep.path.name})."
                )
            df = pd.DataFrame([_flatten(_results.read_json(metrics_file))])
        seeds = p.parameters.get(sweep.seed_parameter)
        if "seed" not in df.columns and isinstance(seeds, list) and len(seeds) == 1:
            df.insert(0, "seed", seeds[0])
        for k, v in reversed(list(p.labels.items())):
            if k in ("seed", "seeds"):
                continue
            value = _results.format_value(v) if isinstance(v, list) else v
            if k in df.columns:  # the table already records this parameter: it must agree
                if not (df[k].astype(str) == str(value)).all():
                    raise SweepError(
                        f"point {p.name}: its table's column {k!r} disagrees with the point's "
                        f"value {value!r}."
                    )
                continue
            df.insert(0, k, value)
        df.insert(0, "point", p.name)
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows, pd.DataFrame(status)


def aggregate(sweep: Sweep) -> Path | None:
    """Write ``summary.csv``, ``summary.md``, ``points.csv`` and ``status.csv`` for the sweep
    under ``results/<experiment>/<sweep>/``; returns the summary path (None with no done point)."""
    rows, status = collect(sweep)
    out = sweep.results_dir()
    _results.write_csv(out / "status.csv", status)
    if rows.empty:
        return None
    grid_keys = [
        k for k in dict.fromkeys([*(k for p in sweep.points_list for k in p), *sweep.grid])
    ]
    by = [*grid_keys, *sweep.aggregate.get("by", [])]
    metrics = sweep.aggregate.get("metrics")
    absent = [m for m in metrics or () if m not in rows.columns]
    if metrics:  # e.g. ground-truth recovery, which a language-model source does not measure
        metrics = [m for m in metrics if m in rows.columns]
    summary = _results.mean_std(rows, by, metrics or None, seed_col="seed")
    drop = {"point"}
    summary = summary[[c for c in summary.columns if c not in drop]]
    _results.write_csv(out / "points.csv", rows)
    path = _results.write_csv(out / "summary.csv", summary)
    title = f"# {sweep.name}: mean ± std across seeds\n\n"
    if absent:
        title += f"Not measured on these points: {', '.join(absent)}.\n\n"
    _results.atomic_write_text(
        out / "summary.md",
        title + _results.summary_markdown(summary, [c for c in by if c in summary.columns]),
    )
    return path


# ----------------------------------------------------------------------------- command line


def _print_summary(sweep: Sweep, outcomes: list[Outcome]) -> None:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    run_time = sum(o.seconds for o in outcomes)
    print(
        f"sweep {sweep.name}: {len(outcomes)} points: {counts['done']} done, "
        f"{counts['skipped']} skipped, {counts['failed']} failed ({run_time:.0f} s of notebook time)"
    )
    for o in outcomes:
        if o.status == "failed":
            marker = sweep.failed_marker(o.point)
            see = f" (see {_results.relative_to_repo(marker)})" if marker.is_file() else ""
            print(f"  failed {o.point.name}: {o.error}{see}")
    summary = sweep.results_dir() / "summary.csv"
    if summary.is_file():
        print(f"  table: {_results.relative_to_repo(summary)}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_sae.sweep",
        description="Run notebook sweeps with papermill as Ray tasks, skipping points already done.",
    )
    parser.add_argument("sweeps", nargs="+", help="sweep YAML files (papermill_runs/*.yaml)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="points at once on the local Ray instance (default 1; ignored with --address)",
    )
    parser.add_argument(
        "--address", default=None, help="HOST:PORT of a Ray cluster to join (from `ray start`)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=f"reruns of a point whose worker or kernel died (default {DEFAULT_RETRIES})",
    )
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="rerun points already done")
    parser.add_argument(
        "--reuse-trials",
        action="store_true",
        help="start each point from the trials/ caches of its results (after a change to a "
        "notebook's presentation; not after one to training)",
    )
    parser.add_argument("--list", action="store_true", help="list the points and their state")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables")
    parser.add_argument("--results-root", default=None, help="results folder (default: results/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.shard is not None:
        parser.error(
            "--shard is gone: start a Ray cluster (ray start --head, then ray start --address "
            "on the other machines) and pass --address HOST:PORT; Ray spreads the points."
        )
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    if args.retries < 0:
        parser.error(f"--retries {args.retries}: must be at least 0")
    if args.results_root:
        os.environ[_results.RESULTS_ENV] = str(Path(args.results_root).resolve())
    try:
        sweeps = [load_sweep(p) for p in args.sweeps]
        names = [s.name for s in sweeps]
        if len(set(names)) < len(names):
            raise SweepError(f"sweep names must differ (they name output folders): {names}")
        if args.list:
            for sweep in sweeps:
                for p in sweep.points():
                    state = "done" if sweep.is_done(p) else "todo"
                    if state == "todo" and sweep.failed_marker(p).is_file():
                        state = "failed"
                    print(f"{sweep.name}\t{p.name}\t{state}")
            return 0
        if args.aggregate_only:
            for sweep in sweeps:
                path = aggregate(sweep)
                where = _results.relative_to_repo(path) if path else "no done point"
                print(f"sweep {sweep.name}: {where}")
            return 0
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    restore = None
    try:
        restore = signal.signal(signal.SIGTERM, _raise_interrupt)  # stop like Ctrl-C
    except ValueError:  # not the main thread
        pass
    try:
        outcomes = run_sweeps(
            sweeps,
            jobs=args.jobs,
            address=args.address,
            retries=args.retries,
            force=args.force,
            progress=not args.no_progress,
            reuse_trials=args.reuse_trials,
        )
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as stop:
        done = sum(o.status == "done" for outs in stop.outcomes.values() for o in outs)
        again = " ".join(["python -m adaptive_sae.sweep", *(argv or sys.argv[1:])])
        print(
            f"interrupted: {done} points finished in this run and are kept; "
            f"{len(stop.not_done)} stopped and are not done ({', '.join(stop.not_done[:5])}"
            f"{', ...' if len(stop.not_done) > 5 else ''}).\n"
            f"resume with the same command; finished points are skipped:\n  {again}",
            file=sys.stderr,
        )
        return 130
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    seconds = time.perf_counter() - t0
    for sweep in sweeps:
        _print_summary(sweep, outcomes[sweep.name])
    every = [o for outs in outcomes.values() for o in outs]
    if len(sweeps) > 1:
        counts = {s: sum(o.status == s for o in every) for s in ("done", "skipped", "failed")}
        print(
            f"all {len(sweeps)} sweeps: {len(every)} points: {counts['done']} done, "
            f"{counts['skipped']} skipped, {counts['failed']} failed in {seconds:.0f} s"
        )
    else:
        print(f"time: {seconds:.0f} s")
    any_failed = any(o.status == "failed" for o in every)
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
