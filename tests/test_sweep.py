"""The sweep runner on a two-point grid with a tiny stand-in notebook: naming, skipping done
points, a failing point recorded while the rest run, and aggregation with mean ± std."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from adaptive_sae import results, sweep

STAND_IN_PARAMETERS = """\
x = 1
seeds = [0]
run_name = "quick"
"""

STAND_IN_BODY = """\
import pandas as pd
from adaptive_sae import results

if x == 2:
    raise RuntimeError("point x=2 fails on purpose")
out = results.ResultsDir("stand_in", run_name)
rows = [{"x": x, "seed": s, "rule": r, "value": 10 * x + s + (100 if r == "b" else 0)}
        for s in seeds for r in ("a", "b")]
out.save_table("runs", pd.DataFrame(rows))
out.save_metrics({"value": 10 * x + sum(seeds) / len(seeds), "nested": {"twice": 20 * x}})
out.save_provenance({"x": x, "seeds": seeds, "run_name": run_name})
"""


def stand_in_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell(STAND_IN_PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(STAND_IN_BODY)]
    nbformat.write(nb, path)
    return path


def write_sweep(folder: Path, **spec) -> Path:
    spec = {"notebook": "stand_in.ipynb", "experiment": "stand_in", **spec}
    path = folder / f"{spec.pop('file', 'demo')}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "results"))
    stand_in_notebook(tmp_path / "stand_in.ipynb")
    return tmp_path


# ----------------------------------------------------------------------------- no execution


def test_point_names_come_from_the_parameters(workdir):
    s = sweep.load_sweep(
        write_sweep(workdir, grid={"x": [1, 2]}, seeds=[0, 1], parameters={"lr": 0.001})
    )
    names = [p.name for p in s.points()]
    assert names == ["x=1__seed=0", "x=1__seed=1", "x=2__seed=0", "x=2__seed=1"]
    first = s.points()[0]
    assert first.parameters == {"lr": 0.001, "x": 1, "seeds": [0], "run_name": "demo/x=1__seed=0"}
    assert s.notebook_output(first) == workdir / "demo" / "x=1__seed=0.ipynb"
    assert s.point_results(first) == workdir / "results" / "stand_in" / "demo" / "x=1__seed=0"


def test_all_seeds_in_one_point_and_list_values(workdir):
    s = sweep.load_sweep(
        write_sweep(workdir, grid={"widths": [[256, 512]]}, seeds=[0, 1, 2], seeds_per_point="all")
    )
    (p,) = s.points()
    assert p.name == "widths=256-512__seeds=0-1-2"
    assert p.parameters["seeds"] == [0, 1, 2]


def test_run_name_is_safe_and_bounded():
    assert results.run_name({"k": 8, "rule": "mutual choice", "lr": 1e-4}) == (
        "k=8__rule=mutual_choice__lr=0.0001"
    )
    long = results.run_name({f"p{i}": i for i in range(60)})
    assert len(long) <= 120
    assert long != results.run_name({f"p{i}": i + 1 for i in range(60)})


def test_shards_partition_the_grid(workdir):
    s = sweep.load_sweep(write_sweep(workdir, grid={"x": [1, 2, 3]}, seeds=[0, 1]))
    names = [p.name for p in s.points()]
    shards = [[p.name for i, p in enumerate(s.points()) if i % 4 == j] for j in range(4)]
    assert sorted(n for sh in shards for n in sh) == sorted(names)
    assert sweep.parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_shard(bad)


def test_bad_sweep_files_say_what_to_fix(workdir):
    with pytest.raises(sweep.SweepError, match="unknown keys"):
        sweep.load_sweep(write_sweep(workdir, grdi={"x": [1]}))
    with pytest.raises(sweep.SweepError, match="not found"):
        sweep.load_sweep(write_sweep(workdir, notebook="missing.ipynb"))
    with pytest.raises(sweep.SweepError, match="non-empty list"):
        sweep.load_sweep(write_sweep(workdir, grid={"x": 3}))
    with pytest.raises(sweep.SweepError, match="set by the runner"):
        sweep.load_sweep(write_sweep(workdir, grid={"seeds": [[0]]}, seeds=[0]))
    s = sweep.load_sweep(write_sweep(workdir, grid={"y": [1]}))
    with pytest.raises(sweep.SweepError, match=r"sets \['y'\]"):
        sweep.check_parameters(s)


def test_mean_std_aggregation():
    df = pd.DataFrame(
        {"rule": ["a", "a", "b"], "seed": [0, 1, 0], "nmse": [0.1, 0.3, 0.5], "l0": [4, 4, 6]}
    )
    out = results.mean_std(df, ["rule"]).set_index("rule")
    assert out.loc["a", "nmse_mean"] == pytest.approx(0.2)
    assert out.loc["a", "nmse_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(out.loc["b", "nmse_std"]) and out.loc["b", "n"] == 1
    assert "seed_mean" not in out.columns
    assert results.format_mean_std(0.2, 0.14142) == "0.2 ± 0.14"
    assert results.format_mean_std(0.5, float("nan")) == "0.5"


# ----------------------------------------------------------------------------- execution


def test_two_point_sweep_runs_skips_records_failures_and_aggregates(workdir, capsys):
    # Two points (x=1, x=2), each running seeds 0 and 1; the x=2 point fails on purpose.
    spec = write_sweep(
        workdir,
        grid={"x": [1, 2]},
        seeds=[0, 1],
        seeds_per_point="all",
        aggregate={"table": "runs", "by": ["rule"]},
    )
    code = sweep.main([str(spec), "--jobs", "2", "--no-progress"])
    assert code == 1, "a failed point must make the command fail at the end"
    assert "2 points: 1 done, 0 skipped, 1 failed" in capsys.readouterr().out

    s = sweep.load_sweep(spec)
    ok, bad = s.points()
    assert (ok.name, bad.name) == ("x=1__seeds=0-1", "x=2__seeds=0-1")
    assert s.is_done(ok) and not s.is_done(bad)
    assert s.notebook_output(ok).is_file() and s.notebook_output(bad).is_file()
    failed = json.loads(s.failed_marker(bad).read_text())
    assert "fails on purpose" in failed["error"]
    assert not s.done_marker(bad).exists()

    # The notebook received the injected parameters and wrote where the run name says.
    prov = json.loads((s.point_results(ok) / "provenance.json").read_text())
    assert prov["parameters"] == {"x": 1, "seeds": [0, 1], "run_name": "demo/x=1__seeds=0-1"}
    assert prov["git"].keys() >= {"commit", "dirty"} and prov["packages"]["torch"]

    # Aggregation: mean ± std over the two seeds of the done point, per rule.
    agg_dir = workdir / "results" / "stand_in" / "demo"
    summary = pd.read_csv(agg_dir / "summary.csv")
    assert list(summary["x"]) == [1, 1] and list(summary["rule"]) == ["a", "b"]
    row = summary.set_index("rule").loc["a"]
    assert row["value_mean"] == pytest.approx(10.5)
    assert row["value_std"] == pytest.approx(math.sqrt(0.5))
    assert row["n"] == 2
    assert "10.5 ± 0.71" in (agg_dir / "summary.md").read_text()
    status = pd.read_csv(agg_dir / "status.csv").set_index("point")
    assert status.loc["x=2__seeds=0-1", "status"] == "failed"
    assert status.loc["x=1__seeds=0-1", "status"] == "done"

    # Second invocation: the done point is skipped (not re-executed), the failed one retried.
    before = s.done_marker(ok).stat().st_mtime_ns
    assert sweep.main([str(spec), "--no-progress"]) == 1
    assert "2 points: 0 done, 1 skipped, 1 failed" in capsys.readouterr().out
    assert s.done_marker(ok).stat().st_mtime_ns == before

    # A point whose parameters changed in the sweep file is stale again.
    changed = sweep.load_sweep(
        write_sweep(
            workdir, grid={"x": [1]}, seeds=[0, 1], seeds_per_point="all", parameters={"extra": 1}
        )
    )
    assert changed.points()[0].name == "x=1__seeds=0-1" and not changed.is_done(changed.points()[0])

    # So is a point whose notebook changed.
    assert s.is_done(ok)
    nb = nbformat.read(s.notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("An edit."))
    nbformat.write(nb, s.notebook)
    assert not s.is_done(ok)


def test_points_per_seed_aggregate_their_metrics(workdir, capsys):
    spec = write_sweep(workdir, file="per_seed", grid={"x": [3]}, seeds=[4, 6])
    assert sweep.main([str(spec), "--no-progress"]) == 0
    assert "2 points: 2 done" in capsys.readouterr().out
    summary = pd.read_csv(workdir / "results" / "stand_in" / "per_seed" / "summary.csv")
    assert list(summary["x"]) == [3] and list(summary["n"]) == [2]
    assert summary.loc[0, "value_mean"] == 35 and summary.loc[0, "value_std"] == pytest.approx(
        math.sqrt(2), rel=1e-6
    )
    assert summary.loc[0, "nested.twice_mean"] == 60
    assert os.path.isfile(workdir / "per_seed" / "x=3__seed=6.done.json")
