"""The book as a reader sees it: built offline with Jupyter Book v1 from the real chapters and the
committed results, with executed notebooks stood in for by copies of the real notebooks carrying
papermill's metadata (two points per sweep, so that titles could collide)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

pytest.importorskip("jupyter_book")
bs4 = pytest.importorskip("bs4")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "book" / "chapters").glob("*.md"))
POINTS = {
    "sparsity_allocation": (
        "02_sparsity_allocation",
        {"input_scaling=global__seeds=0-1-2": {"input_scaling": "global"}},
        {"input_scaling=per_token__seeds=0-1-2": {"input_scaling": "per_token"}},
    ),
    "allocation_mechanisms": (
        "01_allocation_mechanisms",
        {"k=4__seeds=0-1-2": {"k": 4}},
        {"k=8__seeds=0-1-2": {"k": 8}},
    ),
    "allocation_mechanisms_tiny": (  # a variant sweep's pages join its experiment's chapter
        "01_allocation_mechanisms",
        {"source=tiny__k=8__seeds=0-1-2": {"k": 8, "source": "tiny"}},
    ),
}
SUMMARY = ROOT / "results" / "sparsity_allocation" / "sparsity_allocation" / "summary.csv"
WIDE_TABLE = pd.read_csv(SUMMARY).to_html()  # 20 columns, as a notebook displays a DataFrame


def _prepare_module():
    spec = importlib.util.spec_from_file_location("book_prepare", ROOT / "book" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


prepare = _prepare_module()


def _executed_copy(notebook: str, dst: Path, parameters: dict) -> None:
    """The real notebook as papermill leaves it: an injected-parameters cell and metadata,
    and one wide DataFrame-like HTML output."""
    nb = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
        metadata={"tags": ["injected-parameters"]},
    )
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, injected)
    table = nbformat.v4.new_code_cell("table")
    table.outputs = [nbformat.v4.new_output("display_data", {"text/html": WIDE_TABLE})]
    nb.cells.insert(at + 2, table)
    nb.metadata["papermill"] = {"parameters": parameters, "output_path": dst.name}
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def _jupyter_book() -> str:
    local = Path(sys.executable).parent / "jupyter-book"
    found = str(local) if local.is_file() else shutil.which("jupyter-book")
    if found is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")
    return found


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(
        ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_build", "_generated")
    )
    (root / "results").symlink_to(ROOT / "results", target_is_directory=True)
    for sweep, (notebook, *points) in POINTS.items():
        for point in points:
            ((name, parameters),) = point.items()
            _executed_copy(notebook, root / "papermill_runs" / sweep / f"{name}.ipynb", parameters)
    subprocess.run(
        [sys.executable, str(root / "book" / "prepare.py"), "--root", str(root)], check=True
    )
    build = subprocess.run(
        [_jupyter_book(), "build", ".", "--config", "book/_config.yml", "--toc",
         "book/_toc.yml", "--path-output", "out"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return root / "out" / "_build" / "html"


def _soup(path: Path):
    return bs4.BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _h1(soup):
    """The page's own heading (a print-only copy of it comes first in the HTML)."""
    return soup.select_one("article.bd-article h1")


def _title(soup) -> str:
    return _h1(soup).get_text(" ", strip=True).rstrip("#¶ ").strip()


def test_run_pages_are_titled_by_their_parameters(html):
    titles = {}
    for sweep, (_, *points) in POINTS.items():
        for point in points:
            ((name, _),) = point.items()
            page = html / "book" / "_generated" / "runs" / sweep / f"{name}.html"
            titles[page] = _title(_soup(page))
            assert prepare.point_parameters(name) in titles[page]
            assert " — " in titles[page]
    assert len(set(titles.values())) == len(titles), titles
    assert "Sparsity allocation — input_scaling=per_token, seeds=0-1-2" in titles.values()


def test_navigation_lists_no_title_twice(html):
    nav = _soup(html / "book" / "chapters" / "sparsity_allocation.html").select("nav.bd-docs-nav a")
    labels = [a.get_text(" ", strip=True) for a in nav]
    assert len(labels) >= len(CHAPTERS) + 4
    assert len(labels) == len(set(labels)), labels
    assert "Sparsity allocation — input_scaling=global, seeds=0-1-2" in labels


def test_variant_sweeps_pages_are_sections_of_their_chapter(html):
    page = html / "book" / "chapters" / "allocation_mechanisms.html"
    labels = [a.get_text(" ", strip=True) for a in _soup(page).select("nav.bd-docs-nav a")]
    assert "Allocation mechanisms — k=8, seeds=0-1-2" in labels
    assert "Allocation mechanisms — source=tiny, k=8, seeds=0-1-2" in labels


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_leads_with_verdict_then_figure(html, chapter):
    page = html / "book" / "chapters" / f"{chapter}.html"
    h1 = _h1(_soup(page))
    first, second = h1.find_next_siblings(True, limit=2)
    assert "verdict" in first.get("class", []), f"{chapter}: first block is {first.name}"
    assert first.select_one(".admonition-title").get_text(strip=True).startswith("Verdict")
    assert second.name == "figure", f"{chapter}: second block is {second.name}"
    src = second.find("img")["src"]
    assert (page.parent / src).is_file(), f"{chapter}: figure {src} missing from the build"


def _scroll_classes() -> set[str]:
    """Single-class selectors that book.css gives ``overflow-x: auto``."""
    css = (ROOT / "book" / "_static" / "book.css").read_text(encoding="utf-8")
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    classes = set()
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", css):
        if re.search(r"overflow-x:\s*auto", body):
            classes |= {s.strip()[1:] for s in selectors.split(",") if re.fullmatch(r"\s*\.[\w-]+\s*", s)}  # fmt: skip
    return classes


def test_every_table_sits_in_a_scrolling_container(html):
    scroll = _scroll_classes()
    assert {"pst-scrollable-table-container", "output"} <= scroll
    pages = sorted((html / "book").rglob("*.html"))
    runs = sum(len(points) for _, *points in POINTS.values())
    assert len(pages) == len(CHAPTERS) + 1 + runs  # chapters, introduction, run pages
    n_tables = 0
    for page in pages:
        soup = _soup(page)
        assert soup.find("link", href=re.compile(r"_static/book\.css")), f"{page.name}: no CSS"
        for table in soup.find_all("table"):
            n_tables += 1
            boxes = {c for parent in table.parents for c in parent.get("class", [])}
            assert boxes & scroll, f"{page.relative_to(html)}: a table outside a scroll box"
    assert n_tables >= 2 * len(CHAPTERS)  # a short and a full table per chapter at least
    assert (html / "_static" / "book.css").is_file()


# --- the build step's parts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "std", "n", "text"),
    [
        (0.37994384, 0.0015223032, 3, "0.380 ± 0.002"),
        (38.606771, 0.49152541, 3, "38.6 ± 0.5"),
        (151.2, 26.1, 3, "151 ± 26"),
        (0.0188, 0.0004, 3, "0.0188 ± 0.0004"),
        (0.0, 0.0, 3, "0 ± 0"),
        (1.01, float("nan"), 1, "1.01"),
    ],
)
def test_mean_std_shows_three_significant_digits(mean, std, n, text):
    assert prepare.mean_std(mean, std, n) == text


def test_point_title_names_parameters_and_failure():
    heading = "Sparsity allocation: who wins at equal sparsity?"
    assert (
        prepare.point_title(heading, "input_scaling=per_token__seeds=0-1-2")
        == "Sparsity allocation — input_scaling=per_token, seeds=0-1-2"
    )
    assert prepare.point_title(heading, "k=4", failed=True).endswith("k=4 (failed)")


def test_titled_copy_without_heading_gets_one(tmp_path):
    src = tmp_path / "sweep" / "k=4.ipynb"
    src.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), src)
    (src.parent / "k=4.failed.json").write_text("{}")
    title = prepare.titled_copy(src, tmp_path / "out.ipynb", "dead_features")
    assert title == "Dead features — k=4 (failed)"
    first = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0]
    assert first.cell_type == "markdown" and first.source == f"# {title}"


def test_titled_copy_keeps_the_question_under_the_new_title(tmp_path):
    src = tmp_path / "k=8.ipynb"
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# Name: a question?\n\nText")]
    )
    nbformat.write(nb, src)
    prepare.titled_copy(src, tmp_path / "out.ipynb", "s")
    source = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].source
    assert source.startswith("# Name — k=8\n\n**A question?** One point of the sweep")
    assert source.endswith("\n\nText") and source.count("\n# ") == 0


def test_unreadable_notebook_is_named(tmp_path):
    src = tmp_path / "k=4.ipynb"
    src.write_text("{not json")
    with pytest.raises(prepare.PrepareError, match=r"k=4\.ipynb.*re-execute"):
        prepare.titled_copy(src, tmp_path / "out.ipynb", "s")


def test_short_table_names_a_missing_column_and_the_file(tmp_path):
    (tmp_path / "summary.csv").write_text("rule,nmse_mean,nmse_std,n\ntopk,0.3,0.01,3\n")
    spec = prepare.ShortTable("t", "summary.csv", {"rule": "rule"}, {"dead_pct": "dead %"})
    with pytest.raises(prepare.PrepareError, match=r"summary\.csv.*dead_pct_mean"):
        prepare.short_table(spec, tmp_path)
    ok = prepare.ShortTable("t", "summary.csv", {"rule": "rule"}, {"nmse": "NMSE"})
    assert (
        prepare.short_table(ok, tmp_path)
        == "| rule | NMSE |\n| --- | --- |\n| TopK | 0.300 ± 0.010 |\n"
    )


def test_short_tables_read_every_committed_summary(tmp_path):
    written = prepare.write_tables(ROOT / "results", tmp_path)
    assert {p.stem for p in written} == {s.name for s in prepare.SHORT_TABLES}
    for path in written:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) >= 3 and len(lines) <= 10, path.name  # short: a screen at most
        assert "nan" not in path.read_text(encoding="utf-8")


# --- verdict boxes ---------------------------------------------------------------------------

VERDICT_CSV = """\
claim,k,holds,detail,input_scaling
adaptive beats TopK at equal k,4,True,NMSE 0.33 vs TopK 0.35 (-5.8%),per_token
adaptive beats TopK at equal k,8,False,NMSE 0.23 vs TopK 0.22 (+3.3%),per_token
"more budget, better reconstruction",8,true,falls for 2/2 variants | all,per_token
"""
VALUES_CSV = """\
variant,zipf_alpha,zipf_r2,claim,holds,tail_ratio_median
topk,0.97806404,0.99262184,below the law at the low end,True,0.018728272
mutual_choice,20,0.94693414,a Zipf law fits the head (R² > 0.9),False,
"""


def _point(results: Path, point: str, verdict: str | None = VERDICT_CSV, **params) -> Path:
    """A hand-built ``results/exp/exp/<point>/`` with a verdict and a provenance."""
    folder = results / "exp" / "exp" / point
    folder.mkdir(parents=True)
    if verdict is not None:
        (folder / "verdict.csv").write_text(verdict, encoding="utf-8")
    provenance = {
        "git": {"commit": "db442e16e6127fa108fd7ad53ab62838058bec94", "dirty": False},
        "seeds": [0, 1],
        "parameters": {"total_tokens": 150000, "seeds": [0, 1], **params},
    }
    (folder / "provenance.json").write_text(json.dumps(provenance), encoding="utf-8")
    return folder


def test_verdict_table_rows_from_a_hand_built_csv(tmp_path):
    (tmp_path / "verdict.csv").write_text(VERDICT_CSV, encoding="utf-8")
    assert prepare.verdict_table(tmp_path / "verdict.csv") == (
        "| claim | k | holds | detail |\n"
        "| --- | --- | --- | --- |\n"
        "| adaptive beats TopK at equal k | 4 | holds | NMSE 0.33 vs TopK 0.35 (-5.8%) |\n"
        "| adaptive beats TopK at equal k | 8 | does not hold | NMSE 0.23 vs TopK 0.22 (+3.3%) |\n"
        "| more budget, better reconstruction | 8 | holds | falls for 2/2 variants \\| all |\n"
    )  # input_scaling is the same in every row: the point's name says it


def test_verdict_table_without_detail_shows_the_measured_values(tmp_path):
    (tmp_path / "verdict.csv").write_text(VALUES_CSV, encoding="utf-8")
    assert prepare.verdict_table(tmp_path / "verdict.csv") == (
        "| claim | variant | holds | detail |\n"
        "| --- | --- | --- | --- |\n"
        "| below the law at the low end | TopK | holds | zipf_alpha = 0.978, zipf_r2 = 0.993, "
        "tail_ratio_median = 0.0187 |\n"
        "| a Zipf law fits the head (R² > 0.9) | Mutual Choice | does not hold | "
        "zipf_alpha = 20, zipf_r2 = 0.947 |\n"
    )


def test_verdict_page_gives_each_point_its_scale_and_rows(tmp_path):
    results = tmp_path / "results"
    one = _point(results, "input_scaling=global__seeds=0-1", learning_rates=[0.01, 0.001, 0.003])
    (one / "runs.csv").write_text("variant,lr,nmse\ntopk,0.01,0.3\nmutual_choice,0.003,0.2\n")
    _point(results, "input_scaling=per_token__seeds=0-1", lr=0.003)
    _point(results, "no_verdict_here", verdict=None)  # not a judged point: left out
    spec = prepare.VerdictSource("exp", "exp/exp")
    page = prepare.verdict_page(spec, results)
    scale, table, scale2, table2 = page.split("\n\n")[:4]
    assert scale == (
        "**input_scaling=global, seeds=0-1.** Scale: 150,000 training tokens per SAE; "
        "learning rates tried 0.001, 0.003, 0.01 (the best was the largest tried in 1 of 2 "
        "runs: not bracketed); seeds 0, 1; results of commit `db442e1`. "
        f"{prepare.NOT_CONVERGED} (see the Convergence chapter)."
    )
    assert table == prepare.verdict_table(one / "verdict.csv").rstrip("\n")
    assert scale2.startswith("**input_scaling=per_token, seeds=0-1.** Scale: 150,000 training")
    assert "learning rate 0.003 (not searched); seeds 0, 1;" in scale2
    assert table2.startswith("| claim | k | holds | detail |")
    assert "no_verdict_here" not in page
    linked = prepare.verdict_page(spec, results, convergence=True)
    assert "(see [Convergence](convergence.md))" in linked


PROTOCOL_CSV = (
    "rule,k,lr,bracketed,tokens,converged,nmse_change_last_doubling\n"
    "topk,4,0.01,True,1048576,{c},0.031\n"
    "mutual_choice,4,0.003,True,1048576,{c},0.052\n"
    "topk,8,0.01,False,1048576,{c},0.004\n"
)


@pytest.mark.parametrize("converged", [False, True])
def test_scale_line_of_a_point_run_through_the_convergence_protocol(tmp_path, converged):
    """Budget, bracket and convergence come from protocol.csv, not from total_tokens."""
    point = _point(tmp_path, "input_scaling=global__seeds=0-1", learning_rates=[0.001, 0.01])
    (point / "protocol.csv").write_text(PROTOCOL_CSV.format(c=converged), encoding="utf-8")
    line = prepare.scale_line(point)
    assert line.startswith(
        "**input_scaling=global, seeds=0-1.** Scale: 1,048,576 training tokens per SAE; learning "
        "rate bracketed on validation tokens by the convergence protocol for 2 of 3 comparisons "
        "(first grid 0.001, 0.01); seeds 0, 1; results of commit `db442e1`. "
    )
    if converged:
        assert "Converged: doubling the budget moved no rule's NMSE by more than 1 %" in line
    else:
        assert (
            "Not converged: the last doubling of the budget still moved a rule's NMSE by 5%" in line
        )
        assert prepare.NOT_CONVERGED not in line
    (point / "protocol.csv").write_text("rule,tokens\ntopk,5\n", encoding="utf-8")
    with pytest.raises(prepare.PrepareError, match=r"protocol\.csv: no rows or no column"):
        prepare.scale_line(point)


def test_sweep_without_verdicts_gets_its_scale_lines(tmp_path):
    _point(tmp_path, "seeds=0-1", verdict=None)
    page = prepare.verdict_page(prepare.VerdictSource("exp", "exp/exp"), tmp_path)
    assert page.startswith("**seeds=0-1.** Scale: 150,000 training tokens per SAE;")
    assert "|" not in page and prepare.NOT_CONVERGED in page


def test_write_verdicts_links_the_convergence_chapter_only_when_it_exists(tmp_path):
    _point(tmp_path / "results", "seeds=0-1")
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    specs = [prepare.VerdictSource("exp", "exp/exp")]
    (path,) = prepare.write_verdicts(tmp_path / "results", tmp_path / "out", chapters, specs)
    assert "the Convergence chapter" in path.read_text(encoding="utf-8")
    (chapters / "convergence.md").write_text("# Convergence\n")
    prepare.write_verdicts(tmp_path / "results", tmp_path / "out", chapters, specs)
    assert "[Convergence](convergence.md)" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "provenance.json").unlink(), r"seeds=0-1.provenance\.json: missing"),
        (lambda p: (p / "provenance.json").write_text("{"), r"provenance\.json: not readable"),
        (
            lambda p: (p / "provenance.json").write_text('{"parameters": {"seeds": [0]}}'),
            r"provenance\.json: parameters\.total_tokens is None",
        ),
        (
            lambda p: (p / "verdict.csv").write_text("claim,detail\nx,y\n"),
            r"verdict\.csv: no column",
        ),
        (
            lambda p: (p / "verdict.csv").write_text("claim,holds\nx,maybe\n"),
            r"verdict\.csv: holds is 'maybe'",
        ),
    ],
)
def test_bad_verdict_inputs_name_the_file_and_the_fix(tmp_path, damage, message):
    damage(_point(tmp_path, "seeds=0-1"))
    with pytest.raises(prepare.PrepareError, match=message) as error:
        prepare.verdict_page(prepare.VerdictSource("exp", "exp/exp"), tmp_path)
    assert "restore it from git" in str(error.value)


def test_missing_sweep_is_named(tmp_path):
    with pytest.raises(prepare.PrepareError, match=r"exp.exp: no point with a verdict\.csv"):
        prepare.verdict_page(prepare.VerdictSource("exp", "exp/exp"), tmp_path)


# The convergence study's chapter (when it exists) has converged SAEs and its own verdict.
SHORT_BUDGET_CHAPTERS = [c for c in CHAPTERS if c != "convergence"]
VERDICT_BOX = re.compile(r"^:::\{admonition\} Verdict:.*?^:::$", re.M | re.S)
INCLUDE = re.compile(r"^```\{include\} (\S+)\n```$", re.M)


def _verdict_box(chapter: str) -> str:
    text = (ROOT / "book" / "chapters" / f"{chapter}.md").read_text(encoding="utf-8")
    box = VERDICT_BOX.search(text)
    assert box, f"{chapter}: no Verdict admonition"
    return box.group(0)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    prepare.prepare(ROOT, out)
    return out


def test_every_chapter_includes_its_generated_verdict(generated):
    assert {s.name for s in prepare.VERDICTS} == set(SHORT_BUDGET_CHAPTERS)
    for chapter in SHORT_BUDGET_CHAPTERS:
        includes = INCLUDE.findall(_verdict_box(chapter))
        assert includes == [f"../_generated/verdicts/{chapter}.md"], chapter
        page = (generated / "verdicts" / f"{chapter}.md").read_text(encoding="utf-8")
        assert "training tokens per SAE" in page, chapter
        assert prepare.NOT_CONVERGED in page or "onverged" in page, chapter  # says which
        assert "results of commit `" in page, chapter


@pytest.mark.parametrize("chapter", SHORT_BUDGET_CHAPTERS)
def test_verdict_prose_states_no_number(chapter):
    """The numbers of a verdict come from the committed results, through the include (the
    names L0 and L1 are not numbers)."""
    prose = re.sub(r"\bL[01]\b", "", INCLUDE.sub("", _verdict_box(chapter)))
    digits = re.findall(r".{0,30}\d.{0,30}", prose)
    assert not digits, f"{chapter}: hand-written numbers in the verdict: {digits}"


def test_verdicts_show_every_committed_verdict_row(generated):
    for spec in prepare.VERDICTS:
        page = (generated / "verdicts" / f"{spec.name}.md").read_text(encoding="utf-8")
        verdicts = sorted((ROOT / "results").glob(f"{spec.sweep}/*/verdict.csv"))
        rows = sum(len(pd.read_csv(v)) for v in verdicts)
        tables, run = [], []  # a table is a run of lines starting with |
        for line in [*page.splitlines(), ""]:
            if line.startswith("|"):
                run.append(line)
            elif run:
                tables.append(run)
                run = []
        claims = [t for t in tables if t[0].startswith("| claim")]
        shown = sum(len(t) - 2 for t in claims)
        assert shown == rows and len(claims) == len(verdicts), spec.name
        assert page.count("Scale: ") == max(len(verdicts), 1), spec.name


def _convergence_point(results: Path, converged: bool) -> Path:
    point = results / "convergence" / "convergence" / "source=synthetic__seeds=0-1"
    point.mkdir(parents=True)
    (point / "table.csv").write_text(
        "rule,seeds,nmse_mean,nmse_std,nmse_inference_mean,nmse_inference_std,dead_pct_mean,"
        "dead_pct_std,lr,tokens,epochs,converged,bracketed,nmse_change_last_doubling\n"
        f"topk,2,0.2,0.002,0.2,0.002,10.0,1.0,0.01,4194304,2.0,{converged},True,0.004\n"
        f"mutual_choice,2,0.18,0.004,0.19,0.003,80.5,2.5,0.03,4194304,2.0,{converged},True,0.008\n",
        encoding="utf-8",
    )
    (point / "curve.csv").write_text(
        "rule,tokens,nmse_val,winner\n"
        "topk,1048576,0.3,topk\nmutual_choice,1048576,0.31,topk\n"
        "topk,2097152,0.25,mutual_choice\nmutual_choice,2097152,0.24,mutual_choice\n"
        "topk,4194304,0.2,mutual_choice\nmutual_choice,4194304,0.18,mutual_choice\n",
        encoding="utf-8",
    )
    prov = {"git": {"commit": "cbb99cd0" * 5, "dirty": False}, "parameters": {"seeds": [0, 1]}}
    (point / "provenance.json").write_text(json.dumps(prov), encoding="utf-8")
    return point


@pytest.mark.parametrize("converged", [True, False])
def test_convergence_page_from_hand_built_tables(tmp_path, converged):
    _convergence_point(tmp_path, converged)
    page = prepare.convergence_page(tmp_path)
    status = (
        "**converged** (the last doubling moved no rule's NMSE by more than 0.8%)"
        if converged
        else "**not converged**: the protocol stopped at its largest budget, and the last "
        "doubling still moved a rule's NMSE by 0.8%"
    )
    assert page.startswith(
        "**source=synthetic, seeds=0-1.** Final budget 4,194,304 training tokens per SAE "
        f"(2 epochs of its training tokens), {status}; learning rates bracketed for every rule; "
        "2 seeds on test tokens; results of commit `cbb99cd`.\n"
    )
    assert "| TopK | 0.200 ± 0.002 | – | 0.200 ± 0.002 | 10.0 ± 1.0 | 0.01 |" in page
    assert "| Mutual Choice | 0.180 ± 0.004 | -10.0% | 0.190 ± 0.003 | 80.5 ± 2.5 | 0.03 |" in page
    assert (
        "Best validation NMSE by budget (search seed): TopK at 1,048,576 tokens, then Mutual "
        "Choice from 2,097,152 tokens.\n" in page
    )
    assert page.rstrip().endswith(
        "No power-law fit of where the curves are heading (TopK: 3 finite budgets; the fit "
        "needs 5; Mutual Choice: 3 finite budgets; the fit needs 5)."
    )


def test_convergence_page_fits_where_the_curves_are_heading(tmp_path):
    """Exact power laws NMSE = limit + b·(T/T_last)^(−1/2) on 6 budgets: the fitted limits come
    back, and Mutual Choice's limit (0.1 against TopK's 0.15) is settled below TopK's."""
    point = _convergence_point(tmp_path, False)
    last = 2**22
    rows = ["rule,tokens,nmse_val,winner"]
    for i in range(6):
        t = last // 2 ** (5 - i)
        for rule, limit in (("topk", 0.15), ("mutual_choice", 0.1)):
            rows.append(f"{rule},{t},{limit + 0.05 * (t / last) ** -0.5},mutual_choice")
    (point / "curve.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    page = prepare.convergence_page(tmp_path)
    assert "fitted to each rule's last 6 budgets from 131,072 tokens" in page
    assert "| TopK | 0.2000 | 0.1500 ± 0.0000 | 25.0% | 0.50 |" in page
    assert "| Mutual Choice | 0.1500 | 0.1000 ± 0.0000 | 33.3% | 0.50 |" in page
    assert "-33.3% ± 0.0% (below TopK) |" in page


def test_convergence_page_adds_the_variant_sweeps_after_the_main_one(tmp_path):
    import shutil

    point = _convergence_point(tmp_path, False)
    longer = point.parent.parent / "convergence_long" / point.name
    shutil.copytree(point, longer)
    page = prepare.convergence_page(tmp_path)
    first = page.index("**source=synthetic, seeds=0-1.** Final budget")
    second = page.index("**convergence_long: source=synthetic, seeds=0-1.** Final budget")
    assert first < second


def test_convergence_page_names_a_missing_table(tmp_path):
    with pytest.raises(prepare.PrepareError, match="no point with a table.csv"):
        prepare.convergence_page(tmp_path)
    point = _convergence_point(tmp_path, True)
    (point / "curve.csv").unlink()
    with pytest.raises(prepare.PrepareError, match=r"curve\.csv: missing"):
        prepare.convergence_page(tmp_path)


def test_comparison_table_compares_each_setting_with_its_own_topk():
    table = pd.DataFrame(
        {
            "k": [4, 4, 8, 8],
            "rule": ["topk", "mutual_choice", "topk", "mutual_choice"],
            "seeds": 3,
            "nmse_mean": [0.4, 0.3, 0.2, 0.25],
            "nmse_std": 0.01,
            "dead_pct_mean": [1.0, 50.0, 2.0, 60.0],
            "dead_pct_std": 0.5,
            "lr": [0.01, 0.003, 0.01, 0.03],
        }
    )
    md = prepare.comparison_table(table)
    assert (
        md.splitlines()[0]
        == "| k | rule | NMSE (test) | vs TopK | NMSE, inference rule | dead % | lr |"
    )
    assert "| 4 | Mutual Choice | 0.300 ± 0.010 | -25.0% | – | 50.0 ± 0.5 | 0.003 |" in md
    assert "| 8 | Mutual Choice | 0.250 ± 0.010 | +25.0% | – | 60.0 ± 0.5 | 0.03 |" in md
    assert "| 8 | TopK | 0.200 ± 0.010 | – |" in md
