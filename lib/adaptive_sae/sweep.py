"""Run a notebook over a parameter grid with papermill, and aggregate the points.

A sweep is a YAML file (``papermill_runs/<sweep>.yaml``)::

    notebook: notebooks/sparsity_allocation.ipynb   # relative to the YAML's folder or the repo
    experiment: sparsity_allocation    # results/<experiment>/ (default: notebook name)
    parameters:                        # the same for every point
      total_tokens: 600000
    grid:                              # cartesian product: one point per combination
      input_scaling: [global, per_token]
    seeds: [0, 1, 2]
    seeds_per_point: 1                 # 1: one point per seed; all: every seed in one point
    aggregate:                         # optional: a tidy table each point writes
      table: runs                      # results/<experiment>/<run_name>/runs.csv
      by: [rule]                       # its columns that identify a row (besides seed)

and one command runs it::

    python -m adaptive_sae.sweep papermill_runs/<sweep>.yaml [--jobs N] [--shard I/N]

Each point is named from its parameters (``input_scaling=global__seed=0``). Papermill
executes the notebook with the point's parameters and ``run_name = "<sweep>/<point>"``
injected, into ``papermill_runs/<sweep>/<point>.ipynb``; the notebook writes its results to
``results/<experiment>/<sweep>/<point>/``. After a point succeeds, a done marker
(``<point>.done.json``, written atomically, recording the parameters) makes later invocations
skip it; a point whose parameters changed is run again. A failing point leaves
``<point>.failed.json`` (the error and the tail of the log) and the other points still run.

Finally every done point is aggregated into one table per sweep,
``results/<experiment>/<sweep>/summary.csv`` (mean, std and number of seeds for each metric,
grouped by the grid parameters and the ``aggregate.by`` columns), with a Markdown copy that
spells each cell as ``mean ± std`` and ``status.csv`` listing every point.

``--shard I/N`` (I in 0..N-1) runs every N-th point, for a cluster job array; run
``--aggregate-only`` once all shards are done. ``--jobs N`` runs N points at once on one machine
(each kernel then gets ``cpu_count // N`` threads).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results as _results

RUN_NAME_PARAMETER = "run_name"
"""The notebook parameter that names the run (its results folder)."""

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
}


class SweepError(ValueError):
    """A sweep file is invalid; the message names the value and the fix."""


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

    @property
    def output_dir(self) -> Path:
        """Where executed notebooks and markers go: ``<yaml folder>/<sweep name>/``."""
        return self.path.parent / self.name

    def results_dir(self) -> Path:
        return _results.results_root() / self.experiment / self.name

    def points(self) -> list[Point]:
        """Every point of the grid, in a deterministic order."""
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
                    labels = {**base, **combo}
                    params = {**self.parameters, **labels}
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
        """Done: a marker recording the same parameters and notebook, and the executed notebook
        beside it."""
        marker = self.done_marker(point)
        if not marker.is_file() or not self.notebook_output(point).is_file():
            return False
        try:
            recorded = _results.read_json(marker).get("fingerprint")
        except (OSError, ValueError):
            return False
        return recorded == point.fingerprint(self.notebook)


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


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist.")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    parameters = dict(spec.get("parameters") or {})
    grid = dict(spec.get("grid") or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{path.name}: grid.{key} must be a non-empty list of values, got {values!r}."
            )
    points_list = list(spec.get("points") or [])
    if any(not isinstance(p, dict) for p in points_list):
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
    )


def check_parameters(sweep: Sweep) -> None:
    """Fail before running anything when the sweep sets a parameter the notebook lacks."""
    import papermill

    declared = set(papermill.inspect_notebook(str(sweep.notebook)))
    if not declared:
        raise SweepError(
            f"{sweep.notebook.name} has no cell tagged 'parameters'; papermill needs one."
        )
    injected = {k for point in sweep.points() for k in point.parameters}
    missing = sorted(injected - declared)
    if missing:
        raise SweepError(
            f"sweep {sweep.name!r} sets {missing}, which {sweep.notebook.name} does not "
            f"declare in its parameters cell (it has {sorted(declared)}); fix the sweep file."
        )


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    point: Point
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    error: str = ""


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_point(sweep: Sweep, point: Point, threads: int | None = None) -> Outcome:
    """Execute one point with papermill in a subprocess; write the done or failed marker."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    out_nb = sweep.notebook_output(point)
    done, failed = sweep.done_marker(point), sweep.failed_marker(point)
    for stale in (done, failed):
        stale.unlink(missing_ok=True)
    fd, params_file = tempfile.mkstemp(
        prefix=f".{point.name}.", suffix=".yaml", dir=sweep.output_dir
    )
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_results.to_jsonable(point.parameters), fh)  # JSON is YAML
    cmd = [
        sys.executable, "-m", "papermill", str(sweep.notebook), str(out_nb),
        "-f", params_file, "--cwd", str(sweep.notebook.parent), "-k", "python3",
        "--no-progress-bar", "--log-level", "WARNING", "--request-save-on-cell-execute",
    ]  # fmt: skip
    if sweep.timeout:
        cmd += ["--execution-timeout", str(int(sweep.timeout))]
    env = dict(os.environ)
    env[_results.RESULTS_ENV] = str(_results.results_root())
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(threads))
    env.setdefault("MPLBACKEND", "Agg")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except OSError as exc:  # pragma: no cover - the interpreter itself is missing
        returncode, log = -1, repr(exc)
    finally:
        os.unlink(params_file)
    seconds = time.perf_counter() - start
    record = {
        "sweep": sweep.name,
        "point": point.name,
        "parameters": point.parameters,
        "labels": point.labels,
        "fingerprint": point.fingerprint(sweep.notebook),
        "seconds": round(seconds, 2),
        "notebook": out_nb.name,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if returncode == 0:
        _results.write_json(done, record)
        return Outcome(point, "done", seconds)
    error = _summarise_error(log) or f"papermill exited with status {returncode}"
    _results.write_json(
        failed, {**record, "returncode": returncode, "error": error, "log_tail": _tail(log)}
    )
    return Outcome(point, "failed", seconds, error)


def _summarise_error(log: str) -> str:
    """The most telling line of a papermill failure (the exception of the failing cell)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "Traceback")):
            return ln[:500]
    return lines[-1][:500] if lines else ""


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise SweepError(f"--shard {text!r}: write I/N, e.g. 0/4 (I counts from 0).") from exc
    if n < 1 or not 0 <= i < n:
        raise SweepError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (I counts from 0).")
    return i, n


def run_sweeps(
    sweeps: Sequence[Sweep],
    *,
    jobs: int = 1,
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: bool = True,
    aggregate_after: bool = True,
) -> dict[str, list[Outcome]]:
    """Run every point of these sweeps that belongs to this shard and is not done, ``jobs`` at
    a time (points of different sweeps share the pool), under one progress bar; aggregate each
    sweep; return the outcomes per sweep name, in grid order.

    The shard takes every N-th point of the sweeps' points listed one sweep after the other."""
    from tqdm.auto import tqdm

    for sweep in sweeps:
        check_parameters(sweep)
    listed = [(sweep, p) for sweep in sweeps for p in sweep.points()]
    index, count = shard
    mine = [pair for i, pair in enumerate(listed) if i % count == index]
    outcomes: dict[str, list[Outcome]] = {sweep.name: [] for sweep in sweeps}
    todo: list[tuple[Sweep, Point]] = []
    for sweep, p in mine:
        if not force and sweep.is_done(p):
            outcomes[sweep.name].append(Outcome(p, "skipped"))
        else:
            todo.append((sweep, p))
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=sweeps[0].name if len(sweeps) == 1 else f"{len(sweeps)} sweeps",
        unit="point",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    running: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def tick() -> None:  # keep the elapsed time moving while a long point runs
        while not stop.wait(1.0):
            with lock:
                bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()

    def label(sweep: Sweep, p: Point) -> str:
        return p.name if len(sweeps) == 1 else f"{sweep.name}/{p.name}"

    def work(sweep: Sweep, p: Point) -> Outcome:
        with lock:
            running.append(label(sweep, p))
            bar.set_postfix_str(", ".join(running)[:100], refresh=True)
        try:
            return run_point(sweep, p, threads=threads)
        finally:
            with lock:
                running.remove(label(sweep, p))

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(work, sweep, p): sweep for sweep, p in todo}
            for fut in as_completed(futures):
                sweep = futures[fut]
                outcome = fut.result()
                outcomes[sweep.name].append(outcome)
                with lock:
                    if outcome.status == "failed":
                        bar.write(
                            f"[{sweep.name}] FAILED {outcome.point.name} after "
                            f"{outcome.seconds:.0f} s: {outcome.error}"
                        )
                    bar.update(1)
                    bar.set_postfix_str(", ".join(running)[:100], refresh=True)
    finally:
        stop.set()
        ticker.join(timeout=2)
        bar.close()
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
    summary = _results.mean_std(rows, by, metrics, seed_col="seed")
    drop = {"point"}
    summary = summary[[c for c in summary.columns if c not in drop]]
    _results.write_csv(out / "points.csv", rows)
    path = _results.write_csv(out / "summary.csv", summary)
    title = f"# {sweep.name}: mean ± std across seeds\n\n"
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
            marker = _results.relative_to_repo(sweep.failed_marker(o.point))
            print(f"  failed {o.point.name}: {o.error} (see {marker})")
    summary = sweep.results_dir() / "summary.csv"
    if summary.is_file():
        print(f"  table: {_results.relative_to_repo(summary)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_sae.sweep",
        description="Run notebook sweeps with papermill, skipping points already done.",
    )
    parser.add_argument("sweeps", nargs="+", help="sweep YAML files (papermill_runs/*.yaml)")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument("--shard", default=None, help="I/N: run every N-th point from I (0-based)")
    parser.add_argument("--force", action="store_true", help="rerun points already done")
    parser.add_argument("--list", action="store_true", help="list the points and their state")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables")
    parser.add_argument("--results-root", default=None, help="results folder (default: results/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    if args.results_root:
        os.environ[_results.RESULTS_ENV] = str(Path(args.results_root).resolve())
    try:
        shard = parse_shard(args.shard)
        sweeps = [load_sweep(p) for p in args.sweeps]
        names = [s.name for s in sweeps]
        if len(set(names)) < len(names):
            raise SweepError(f"sweep names must differ (they name output folders): {names}")
    except SweepError as exc:
        parser.error(str(exc))
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
    t0 = time.perf_counter()
    try:
        outcomes = run_sweeps(
            sweeps, jobs=args.jobs, shard=shard, force=args.force, progress=not args.no_progress
        )
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
