"""Prepare the book's generated pages; `make book` runs it before `jupyter-book build`.

Two products, both under ``book/_generated/`` (a build product, not tracked):

- ``runs/<sweep>/<point>.ipynb``: a copy of each executed notebook
  ``papermill_runs/<sweep>/<point>.ipynb`` whose first heading names the experiment and the
  point's parameters ("Sparsity allocation — input_scaling=per_token, seeds=0-1-2"). Sphinx
  titles a page by its first heading, and every point of a sweep shares its notebook's heading,
  so without this the navigation lists the same title once per point.
- ``tables/<name>.md``: the short tables the chapters lead with, a few key columns of the
  committed ``results/<experiment>/<sweep>/summary.csv`` spelled ``mean ± std``.
- ``verdicts/<experiment>.md``: what each chapter's verdict box shows, from the committed
  ``results/<experiment>/<sweep>/<point>/``: per point of the sweep, a scale line from its
  ``provenance.json`` (training tokens per SAE, learning rates, seeds, git commit, and that the
  SAEs are not trained to convergence) and the rows of its ``verdict.csv``.

Nothing is executed or trained: the inputs are files already on disk.

    python book/prepare.py [--root REPO] [--out REPO/book/_generated]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pandas as pd

HEADING = re.compile(r"^#[ \t]+(.+?)[ \t]*$", re.MULTILINE)


class PrepareError(RuntimeError):
    """A book input is missing or malformed; the message names the file and the fix."""


# --- titled copies of the executed notebooks -------------------------------------------------


def point_parameters(point: str) -> str:
    """``input_scaling=per_token__seeds=0-1-2`` -> ``input_scaling=per_token, seeds=0-1-2``."""
    return ", ".join(part for part in point.split("__") if part)


def short_name(heading: str) -> str:
    """The experiment's name from a notebook heading: the part before its question."""
    return heading.split(":", 1)[0].strip()


def point_title(heading: str, point: str, failed: bool = False) -> str:
    title = f"{short_name(heading)} — {point_parameters(point)}"
    return f"{title} (failed)" if failed else title


def titled_copy(src: Path, dst: Path, sweep: str) -> str:
    """Write ``src`` to ``dst`` with its first heading replaced by the point's title (the
    original question follows as a line of text); returns the title."""
    try:
        nb = nbformat.read(src, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for a bad file
        raise PrepareError(
            f"{src}: not a readable notebook ({exc}); delete it and its .done.json marker, then "
            f"run the sweep again to re-execute this point."
        ) from exc
    point = src.stem
    failed = src.with_name(f"{point}.failed.json").is_file()
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        match = HEADING.search(cell.source)
        if match is None:
            continue
        heading = match.group(1)
        title = point_title(heading, point, failed)
        question = heading.split(":", 1)[1].strip() if ":" in heading else ""
        lead = f"**{question[:1].upper()}{question[1:]}** " if question else ""
        where = (
            f"{lead}One point of the sweep `papermill_runs/{sweep}.yaml`, executed with "
            f"`{point_parameters(point)}`."
        )
        cell.source = (
            cell.source[: match.start()] + f"# {title}\n\n{where}" + cell.source[match.end() :]
        )
        break
    else:
        title = point_title(sweep.replace("_", " ").capitalize(), point, failed)
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    return title


def titled_runs(runs_dir: Path, out: Path) -> dict[str, list[str]]:
    """Titled copies of every ``runs_dir/<sweep>/<point>.ipynb`` under ``out``; the titles
    by sweep."""
    if out.exists():
        shutil.rmtree(out)
    titles: dict[str, list[str]] = {}
    if not runs_dir.is_dir():
        return titles
    for sweep_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        for src in sorted(sweep_dir.glob("*.ipynb")):
            dst = out / sweep_dir.name / src.name
            titles.setdefault(sweep_dir.name, []).append(titled_copy(src, dst, sweep_dir.name))
    return titles


# --- short tables from the committed summaries -----------------------------------------------


@dataclass(frozen=True)
class ShortTable:
    """Key columns of one committed summary table."""

    name: str
    """Output file ``tables/<name>.md``."""
    csv: str
    """The summary, relative to ``results/``."""
    index: dict[str, str]
    """Identifying columns kept, and their headers."""
    metrics: dict[str, str]
    """Metrics kept (``<metric>_mean``/``_std`` in the CSV), and their headers."""
    pivot: str | None = None
    """A column whose values become columns (then exactly one metric)."""
    keep: dict[str, list] = field(default_factory=dict)
    """Rows kept: column -> values, in the order shown."""


def _decimals(value: float) -> int:
    """Decimals that show three significant digits of ``value`` (at most four)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return min(4, max(0, 2 - math.floor(math.log10(abs(value)))))


def mean_std(mean: float, std: float, n: int) -> str:
    """``0.37994, 0.00152`` -> ``0.380 ± 0.002``; the mean alone for a single seed."""
    if pd.isna(mean):
        return "–"
    d = _decimals(mean) if mean != 0 else _decimals(std)
    if n <= 1 or pd.isna(std):
        return f"{mean:.{d}f}"
    return f"{mean:.{d}f} ± {std:.{d}f}"


def short_table(spec: ShortTable, results: Path) -> str:
    path = results / spec.csv
    if not path.is_file():
        raise PrepareError(
            f"{path}: missing; the chapter's table is drawn from it. Run the sweep "
            f"(python -m adaptive_sae.sweep papermill_runs/<sweep>.yaml) or restore it from git."
        )
    df = pd.read_csv(path)
    needed = [*spec.index, *(f"{m}_{s}" for m in spec.metrics for s in ("mean", "std")), "n"]
    if spec.pivot:
        needed.append(spec.pivot)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PrepareError(
            f"{path}: no column {missing}; update the ShortTable {spec.name!r} in book/prepare.py "
            f"to the summary's columns ({', '.join(df.columns)})."
        )
    for column, values in spec.keep.items():
        df = df[df[column].isin(values)].copy()
        df[column] = pd.Categorical(df[column], categories=values, ordered=True)
    for metric in spec.metrics:
        df[metric] = [
            mean_std(m, s, n)
            for m, s, n in zip(df[f"{metric}_mean"], df[f"{metric}_std"], df["n"], strict=True)
        ]
    if spec.pivot:
        (metric,) = spec.metrics
        df = df.pivot(index=list(spec.index), columns=spec.pivot, values=metric).reset_index()
        df.columns = [str(c) for c in df.columns]
        headers = list(spec.index.values()) + [str(c) for c in df.columns[len(spec.index) :]]
    else:
        df = df.sort_values(list(spec.keep), kind="stable") if spec.keep else df
        df = df[[*spec.index, *spec.metrics]]
        headers = [*spec.index.values(), *spec.metrics.values()]
    headers = [LABELS.get(h, h) for h in headers]
    rows = [
        " | ".join(LABELS.get(str(v), str(v)) for v in row) for row in df.itertuples(index=False)
    ]
    lines = [" | ".join(headers), " | ".join("---" for _ in headers), *rows]
    return "\n".join(f"| {line} |" for line in lines) + "\n"


LABELS = {
    "topk": "TopK",
    "batch_topk": "BatchTopK",
    "mutual_choice": "Mutual Choice",
    "feature_choice": "Feature Choice",
    "feature_choice_zipf": "Feature Choice (Zipf)",
    "relu_l1": "ReLU + L1",
    "ground_truth": "ground truth",
    "per_token": "per-token",
}
"""How the tables spell the rules (and the other values they show) for a reader."""

RULES = ["topk", "mutual_choice", "feature_choice", "feature_choice_zipf"]

SHORT_TABLES = [
    ShortTable(
        "allocation_mechanisms",
        "allocation_mechanisms/allocation_mechanisms/summary.csv",
        {"k": "k", "rule": "rule"},
        {
            "affinity_captured": "affinity captured",
            "l0_std": "L0 std across tokens",
            "l0_max": "largest L0",
            "unused_features": "unused features",
        },
        keep={"k": [4, 8], "rule": RULES},
    ),
    ShortTable(
        "sparsity_allocation",
        "sparsity_allocation/sparsity_allocation/summary.csv",
        {"input_scaling": "input scaling", "k": "k"},
        {"nmse": "NMSE"},
        pivot="rule",
        keep={"input_scaling": ["per_token", "global"], "rule": RULES},
    ),
    ShortTable(
        "zipf_density",
        "zipf_density/zipf_density/summary.csv",
        {"rule": "rule"},
        {
            "zipf_alpha": "α",
            "zipf_r2": "R² (head)",
            "tail_ratio_median": "tail density / law",
            "underutilised_pct": "underutilised %",
            "dead_pct": "dead %",
        },
        keep={"rule": ["ground_truth", "topk", "mutual_choice", "feature_choice_zipf"]},
    ),
    ShortTable(
        "aux_zipf_dead",
        "aux_zipf_ablation/aux_zipf_ablation/summary.csv",
        {"rule": "dead % (held-out)"},
        {"dead_pct": "dead %"},
        pivot="aux_loss",
        keep={"rule": [*RULES, "relu_l1"], "aux_loss": ["none", "aux_k", "aux_zipf", "resample"]},
    ),
    ShortTable(
        "aux_zipf_underutilised",
        "aux_zipf_ablation/aux_zipf_ablation/summary.csv",
        {"rule": "underutilised % (held-out)"},
        {"underutilised_pct": "underutilised %"},
        pivot="aux_loss",
        keep={"rule": [*RULES, "relu_l1"], "aux_loss": ["none", "aux_k", "aux_zipf", "resample"]},
    ),
    ShortTable(
        "dead_features",
        "dead_features/dead_features/summary.csv",
        {"rule": "rule"},
        {
            "first_nmse": "NMSE, first checkpoint",
            "final_nmse": "NMSE, end",
            "peak_dead_pct_train_window": "peak dead % (training)",
            "final_dead_pct": "dead %, end",
            "final_effective_features_pct": "effective features %, end",
        },
        keep={"rule": RULES},
    ),
    ShortTable(
        "adaptive_computation",
        "adaptive_computation/adaptive_computation/summary.csv",
        {"rule": "ρ(L0, true active features)"},
        {"spearman": "Spearman ρ"},
        pivot="input_scaling",
        keep={"rule": RULES, "input_scaling": ["global", "per_token"]},
    ),
    ShortTable(
        "inference_thresholds",
        "inference_thresholds/inference_thresholds/summary.csv",
        {"rule": "rule"},
        {
            "nmse": "NMSE, training rule",
            "nmse_inference": "NMSE, thresholds",
            "nmse_ratio": "ratio",
            "l0_mean_inference": "L0, thresholds",
        },
        keep={"rule": RULES},
    ),
    ShortTable(
        "cost_scaling",
        "cost_scaling/cost_scaling/summary.csv",
        {"rule": "step time (ms) at width F"},
        {"step_ms": "step ms"},
        pivot="n_features",
        keep={"rule": [*RULES, "relu_l1"]},
    ),
]


def write_tables(results: Path, out: Path, specs: list[ShortTable] = SHORT_TABLES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in specs:
        path = out / f"{spec.name}.md"
        path.write_text(short_table(spec, results), encoding="utf-8")
        written.append(path)
    return written


# --- verdict boxes from the committed verdicts and provenance --------------------------------


@dataclass(frozen=True)
class VerdictSource:
    """Where one chapter's verdict comes from."""

    name: str
    """The chapter (``chapters/<name>.md``) and the output file ``verdicts/<name>.md``."""
    sweep: str
    """The sweeps' folders of points, relative to ``results/`` (a glob: ``<name>/<name>*``
    takes in the sweeps that run the same notebook on other sources)."""
    tokens: str = "total_tokens"
    """The notebook parameter that holds the training tokens per SAE."""


VERDICTS = [
    VerdictSource(name, f"{name}/{name}*")
    for name in (
        "allocation_mechanisms",
        "sparsity_allocation",
        "zipf_density",
        "aux_zipf_ablation",
        "dead_features",
        "adaptive_computation",
        "inference_thresholds",
        "cost_scaling",
    )
]
"""The chapters whose verdicts come from the short-budget sweeps (every chapter but the
convergence study, whose verdict is about converged SAEs)."""

NOT_CONVERGED = (
    "These SAEs are not trained to convergence, so this is not a converged comparison: which "
    "rule reconstructs best can change with a longer training budget"
)
"""The fixed sentence of every scale line; a reference to the Convergence chapter follows."""

KEY_COLUMNS = ("k", "n_features")
"""Numeric verdict columns that identify a row rather than measure something."""

RERUN = (
    "restore it from git (git checkout -- <file>) or re-run the sweep "
    "(python -m adaptive_sae.sweep papermill_runs/<sweep>.yaml)"
)


def _number(value: float) -> str:
    """Three significant digits; integers as integers."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.{max(_decimals(value), 0)}f}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = "–" if math.isnan(value) else _number(value)
    else:
        text = str(value)
    text = LABELS.get(text, text)
    return text.replace("|", "\\|").replace("\n", " ")


def _holds(value, path: Path) -> str:
    text = str(value).strip().lower()
    if text in ("true", "1", "1.0"):
        return "holds"
    if text in ("false", "0", "0.0"):
        return "does not hold"
    raise PrepareError(f"{path}: holds is {value!r}, not True or False; fix the row or {RERUN}.")


def verdict_table(path: Path) -> str:
    """The rows of one ``verdict.csv`` as a markdown table: claim, the columns that tell the
    rows apart (rule or variant always), holds, and the detail (the ``detail`` column, else
    the measured values)."""
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises several unrelated types for a bad file
        raise PrepareError(f"{path}: not a readable CSV ({exc}); {RERUN}.") from exc
    missing = [c for c in ("claim", "holds") if c not in df.columns]
    if missing or df.empty:
        what = f"no column {missing}" if missing else "no rows"
        raise PrepareError(
            f"{path}: {what}; a notebook's verdict table has a claim and a holds column per "
            f"row; {RERUN}."
        )
    rest = [c for c in df.columns if c not in ("claim", "holds", "detail")]
    numeric = [c for c in rest if pd.api.types.is_numeric_dtype(df[c]) and c not in KEY_COLUMNS]
    keys = [
        c
        for c in rest
        if c not in numeric and (c in ("rule", "variant") or df[c].nunique(dropna=False) > 1)
    ]
    headers = ["claim", *(c.replace("_", " ") for c in keys), "holds", "detail"]
    rows = []
    for row in df.to_dict("records"):
        if "detail" in df.columns:
            detail = _cell(row["detail"])
        else:
            values = [(c, row[c]) for c in numeric if not pd.isna(row[c])]
            detail = ", ".join(_cell(v) if c == "value" else f"{c} = {_cell(v)}" for c, v in values)
        cells = [_cell(row["claim"]), *(_cell(row[c]) for c in keys)]
        rows.append([*cells, _holds(row["holds"], path), detail or "–"])
    return _markdown(headers, rows)


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells."""
    lines = [headers, ["---"] * len(headers), *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines) + "\n"


def _committed(git: dict) -> str:
    """``abc1234`` (and whether the tree was dirty) from a provenance's ``git`` record."""
    dirty = " with uncommitted changes" if git.get("dirty") else ""
    return f"`{(git.get('commit') or '')[:7]}`{dirty}"


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A committed table with at least one row and these columns, else PrepareError."""
    if not path.is_file():
        raise PrepareError(f"{path}: missing; {RERUN}.")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises several unrelated types for a bad file
        raise PrepareError(f"{path}: not a readable CSV ({exc}); {RERUN}.") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing or df.empty:
        raise PrepareError(f"{path}: no rows or no column {missing}; {RERUN}.")
    return df


def _provenance(path: Path) -> dict:
    if not path.is_file():
        raise PrepareError(f"{path}: missing; the verdict's scale line is read from it; {RERUN}.")
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: not readable JSON ({exc}); {RERUN}.") from exc
    if not isinstance(prov, dict) or not isinstance(prov.get("parameters"), dict):
        raise PrepareError(f"{path}: no parameters object; {RERUN}.")
    return prov


def _learning_rates(params: dict, point: Path) -> str:
    """The learning rates tried; with several, whether the best ones (``runs.csv``) sit at the
    edge of the grid, i.e. whether the learning rate is bracketed."""
    lrs = params.get("learning_rates", params.get("lr"))
    if lrs is None:
        return "learning rate: the library's default for the width (not searched)"
    lrs = sorted(lrs) if isinstance(lrs, list) else [lrs]
    if len(lrs) == 1:
        return f"learning rate {lrs[0]:g} (not searched)"
    text = f"learning rates tried {', '.join(f'{lr:g}' for lr in lrs)}"
    runs = point / "runs.csv"
    if runs.is_file():
        try:
            kept = pd.read_csv(runs, usecols=lambda c: c == "lr")
        except Exception as exc:  # pandas raises several unrelated types for a bad file
            raise PrepareError(f"{runs}: not a readable CSV ({exc}); {RERUN}.") from exc
        if "lr" in kept.columns and len(kept):
            n = len(kept)
            edges = [
                f"the {end} tried in {count} of {n} runs"
                for end, lr in (("smallest", lrs[0]), ("largest", lrs[-1]))
                if (count := int((kept["lr"] == lr).sum()))
            ]
            if edges:
                text += f" (the best was {' and '.join(edges)}: not bracketed)"
            else:
                text += " (the best was inside the grid in every run: bracketed)"
    return text


def _protocol(point: Path, params: dict) -> tuple[int, str, str] | None:
    """A point run through the convergence protocol (``protocol.csv``: one row per compared
    rule): its final budget, its learning-rate text and its convergence sentence."""
    path = point / "protocol.csv"
    if not path.is_file():
        return None
    df = _read_csv(path, ["tokens", "bracketed", "converged", "nmse_change_last_doubling"])
    grid = params.get("learning_rates")
    first = f" (first grid {', '.join(f'{lr:g}' for lr in grid)})" if grid else ""
    lrs = (
        f"learning rate bracketed on validation tokens by the convergence protocol for "
        f"{int(df['bracketed'].astype(bool).sum())} of {len(df)} comparisons{first}"
    )
    tokens = int(df["tokens"].max())
    change = df["nmse_change_last_doubling"].max()
    if bool(df["converged"].astype(bool).all()):
        sentence = "Converged: doubling the budget moved no rule's NMSE by more than 1 %"
    elif pd.notna(change):
        sentence = (
            f"Not converged: the last doubling of the budget still moved a rule's NMSE by "
            f"{change:.0%}, so which rule reconstructs best can change with a longer budget"
        )
    else:
        sentence = f"{NOT_CONVERGED} (one budget, not doubled)"
    return tokens, lrs, sentence


def scale_line(point: Path, tokens: str = "total_tokens", convergence: bool = False) -> str:
    """The scale one point of a sweep was measured at, from its ``provenance.json`` (and its
    ``protocol.csv`` where the point ran the convergence protocol)."""
    path = point / "provenance.json"
    prov = _provenance(path)
    params = prov["parameters"]
    n_tokens = params.get(tokens)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise PrepareError(
            f"{path}: parameters.{tokens} is {n_tokens!r}, not a positive number of tokens; "
            f"{RERUN}, or name the notebook's parameter in book/prepare.py's VERDICTS."
        )
    seeds = params.get("seeds", prov.get("seeds"))
    if not isinstance(seeds, list) or not seeds:
        raise PrepareError(f"{path}: no seeds (parameters.seeds); {RERUN}.")
    git = prov.get("git") if isinstance(prov.get("git"), dict) else {}
    commit = git.get("commit")
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        raise PrepareError(f"{path}: no git commit (git.commit is {commit!r}); {RERUN}.")
    where = "[Convergence](convergence.md)" if convergence else "the Convergence chapter"
    protocol = _protocol(point, params)
    if protocol is None:
        lrs, sentence = _learning_rates(params, point), NOT_CONVERGED
    else:
        n_tokens, lrs, sentence = protocol
    return (
        f"**{point_parameters(point.name)}.** Scale: {n_tokens:,} training tokens per SAE; "
        f"{lrs}; seeds {', '.join(str(s) for s in seeds)}; "
        f"results of commit {_committed(git)}. {sentence} (see {where}).\n"
    )


def verdict_page(spec: VerdictSource, results: Path, convergence: bool = False) -> str:
    """Per point of the sweep (the folders with a ``verdict.csv``), its scale line and its
    verdict table; a sweep without verdicts gets the scale line of each point."""
    sweep = results / spec.sweep
    points = sorted(p for s in results.glob(spec.sweep) for p in s.glob("*") if p.is_dir())
    judged = [p for p in points if (p / "verdict.csv").is_file()]
    shown = judged or [p for p in points if (p / "provenance.json").is_file()]
    if not shown:
        raise PrepareError(
            f"{sweep}: no point with a verdict.csv or a provenance.json; the chapter "
            f"{spec.name!r} draws its verdict from them; {RERUN}."
        )
    parts = []
    for point in shown:
        parts.append(scale_line(point, spec.tokens, convergence))
        if point in judged:
            parts.append(verdict_table(point / "verdict.csv"))
        if (point / "protocol.csv").is_file():
            table = _read_csv(
                point / "protocol.csv",
                ["rule", "seeds", "nmse_mean", "nmse_std", "dead_pct_mean", "lr"],
            )
            parts.append("At the final budget, on test tokens (mean ± std across seeds):\n")
            parts.append(comparison_table(table))
    return "\n".join(parts)


def write_verdicts(
    results: Path, out: Path, chapters: Path, specs: list[VerdictSource] = VERDICTS
) -> list[Path]:
    """``out/<name>.md`` per chapter; the scale lines link the convergence chapter when
    ``chapters/convergence.md`` exists."""
    convergence = (chapters / "convergence.md").is_file()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in specs:
        path = out / f"{spec.name}.md"
        path.write_text(verdict_page(spec, results, convergence), encoding="utf-8")
        written.append(path)
    return written


# --- the convergence chapter ------------------------------------------------------------------

CONVERGENCE_SWEEP = "convergence/convergence"
"""The points of the convergence sweep (notebook 09), relative to ``results/``; sweeps of the
same experiment named ``convergence_<variant>`` (e.g. a longer cap) join it."""


SETTINGS = ("k", "input_scaling", "aux_loss", "n_features")
"""Columns of a ``protocol.csv`` that name the setting a comparison ran at (the notebook's
``over``): each setting's rules are compared with its own TopK."""


def comparison_table(table: pd.DataFrame) -> str:
    """The protocol's final comparison, one row per setting and rule: NMSE on test tokens (mean ±
    std across seeds), against TopK at the same setting, the inference rule's NMSE, dead % and
    the learning rate (columns of ``table.csv`` / ``protocol.csv``)."""
    settings = [c for c in SETTINGS if c in table.columns]
    keyed = table.set_index([*settings, "rule"])
    headers = [*settings, "rule", "NMSE (test)", "vs TopK", "NMSE, inference rule", "dead %", "lr"]
    rows = []
    for r in table.to_dict("records"):
        n = int(r["seeds"])
        at = tuple(r[c] for c in settings)
        ref = keyed["nmse_mean"].get((*at, "topk")) if settings else keyed["nmse_mean"].get("topk")
        vs = "–" if ref is None or r["rule"] == "topk" else f"{r['nmse_mean'] / ref - 1:+.1%}"
        inf = (
            mean_std(r["nmse_inference_mean"], r["nmse_inference_std"], n)
            if "nmse_inference_mean" in r
            else "–"
        )
        rows.append(
            [
                *(f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in settings),
                LABELS.get(r["rule"], r["rule"]),
                mean_std(r["nmse_mean"], r["nmse_std"], n),
                vs,
                inf,
                mean_std(r["dead_pct_mean"], r.get("dead_pct_std", float("nan")), n),
                f"{r['lr']:g}",
            ]
        )
    return _markdown(headers, rows)


def convergence_point(point: Path) -> str:
    """One source of the convergence sweep: its scale, the final comparison on test tokens
    (mean ± std across seeds, against TopK) and the budgets where the winner changed."""
    table = _read_csv(
        point / "table.csv",
        ["rule", "seeds", "nmse_mean", "nmse_std", "dead_pct_mean", "lr", "tokens", "epochs",
         "converged", "bracketed", "nmse_change_last_doubling"],
    )  # fmt: skip
    curve = _read_csv(point / "curve.csv", ["rule", "tokens", "nmse_val", "winner"])
    prov = _provenance(point / "provenance.json")
    tokens, epochs = int(table["tokens"].max()), float(table["epochs"].max())
    change = float(table["nmse_change_last_doubling"].max())
    if bool(table["converged"].astype(bool).all()):
        status = f"**converged** (the last doubling moved no rule's NMSE by more than {change:.1%})"
    else:
        status = (
            f"**not converged**: the protocol stopped at its largest budget, and the last "
            f"doubling still moved a rule's NMSE by {change:.1%}"
        )
    bracketed = bool(table["bracketed"].astype(bool).all())
    sweep = point.parent.name
    label = point_parameters(point.name)
    if sweep != Path(CONVERGENCE_SWEEP).name:
        label = f"{sweep}: {label}"
    lines = [
        f"**{label}.** Final budget {tokens:,} training tokens per SAE "
        f"({epochs:g} epoch{'' if epochs == 1 else 's'} of its training tokens), {status}; "
        f"learning rates "
        f"{'bracketed for every rule' if bracketed else 'NOT bracketed for every rule'}; "
        f"{int(table['seeds'].iloc[0])} seeds on test tokens; results of commit "
        f"{_committed(prov.get('git') or {})}.",
        "",
    ]
    lines.append(comparison_table(table).rstrip("\n"))
    winners = curve.drop_duplicates("tokens").sort_values("tokens")[["tokens", "winner"]]
    changes = [
        f"{LABELS.get(b, b)} from {t:,} tokens"
        for (t, b), a in zip(
            winners.itertuples(index=False, name=None), [None, *winners["winner"][:-1]]
        )
        if a is not None and a != b
    ]
    first = LABELS.get(winners["winner"].iloc[0], winners["winner"].iloc[0])
    lines += [
        "",
        f"Best validation NMSE by budget (search seed): {first} at {int(winners['tokens'].iloc[0]):,}"
        f" tokens" + (f", then {', then '.join(changes)}." if changes else ", at every budget."),
        "",
        limits_text(curve),
    ]
    return "\n".join(lines)


def limits_text(curve: pd.DataFrame) -> str:
    """Where each rule's curve is heading (``adaptive_sae.extrapolation``): the fitted limit of
    NMSE(T) = limit + b·(T/T_last)^(−c) over the last budgets, what is still to go, the budget
    for a doubling within 1 %, and the limit against TopK's (settled beyond two standard
    errors); or why there is no fit."""
    from adaptive_sae import extrapolation

    limits = extrapolation.limits(curve)
    if not limits["fit_ok"].all():
        why = "; ".join(
            f"{LABELS.get(r, r)}: {w}" for r, w in zip(limits["rule"], limits["why"]) if w
        )
        return f"No power-law fit of where the curves are heading ({why}).\n"
    verdicts = (
        extrapolation.limit_verdicts(limits).set_index("rule")
        if "topk" in set(limits["rule"])
        else pd.DataFrame()
    )
    rows = []
    for r in limits.to_dict("records"):
        v = verdicts.loc[r["rule"]] if r["rule"] in verdicts.index else None
        against = (
            "–"
            if v is None
            else f"{v['difference']:+.1%} ± {v['difference_se']:.1%} "
            f"({v['verdict'].replace('topk', 'TopK')})"
        )
        to_go = r["tokens_to_tolerance"]
        rows.append(
            [
                LABELS.get(r["rule"], r["rule"]),
                f"{r['nmse_last']:.4f}",
                f"{r['limit']:.4f} ± {r['limit_se']:.4f}",
                f"{r['remaining']:.1%}",
                f"{r['exponent']:.2f}",
                "already" if to_go <= r["last_tokens"] else f"{to_go:.2g}",
                against,
            ]
        )
    n, first = int(limits["budgets_fitted"].min()), int(limits["first_tokens"].min())
    headers = ["rule", "NMSE, last budget", "fitted limit", "still to go", "exponent c",
               "tokens for a doubling within 1 %", "limit vs TopK"]  # fmt: skip
    return (
        f"Where the curves are heading: NMSE(T) = limit + b·(T/T_last)^(−c) fitted to each "
        f"rule's last {n} budgets from {first:,} tokens (search seed, validation tokens; "
        f"estimates with their standard errors, `adaptive_sae.extrapolation`). A difference "
        f"from TopK's limit is settled only beyond two standard errors.\n\n"
        + _markdown(headers, rows)
    )


def convergence_page(results: Path) -> str:
    """Every source of the convergence sweep (``results/convergence/convergence/<point>``),
    then those of its variants (``results/convergence/convergence_<variant>/<point>``)."""
    sweep = results / CONVERGENCE_SWEEP
    sweeps = [sweep, *sorted(sweep.parent.glob(f"{sweep.name}_*"))]
    points = [p for s in sweeps for p in sorted(s.glob("*")) if (p / "table.csv").is_file()]
    if not points:
        raise PrepareError(
            f"{sweep}: no point with a table.csv; the convergence chapter is drawn from them; "
            f"run python -m adaptive_sae.sweep papermill_runs/convergence.yaml."
        )
    return "\n".join(convergence_point(p) for p in points)


def prepare(root: Path, out: Path) -> dict[str, list[str]]:
    """Write the titled run pages, the short tables and the verdicts; returns the run titles
    by sweep."""
    titles = titled_runs(root / "papermill_runs", out / "runs")
    write_tables(root / "results", out / "tables")
    write_verdicts(root / "results", out / "verdicts", root / "book" / "chapters")
    if (root / "book" / "chapters" / "convergence.md").is_file():
        (out / "convergence.md").write_text(convergence_page(root / "results"), encoding="utf-8")
    return titles


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=here.parent, help="repository root")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/book/_generated")
    args = parser.parse_args(argv)
    out = args.out or args.root / "book" / "_generated"
    try:
        titles = prepare(args.root, out)
    except PrepareError as exc:
        print(f"book/prepare.py: {exc}", file=sys.stderr)
        return 2
    pages = sum(len(t) for t in titles.values())
    print(json.dumps({"run_pages": pages, "sweeps": sorted(titles)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
