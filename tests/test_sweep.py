"""The sweep runner without running anything: point names, parameter kinds checked against the
notebook before any kernel starts, bad sweep files named with the fix, aggregation (mean ± std).
The runs themselves (on Ray) are in test_sweep_ray.py."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
from adaptive_sae import results, sweep
from sweep_stand_in import stand_in_notebook, write_sweep


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "results"))
    stand_in_notebook(tmp_path / "stand_in.ipynb")
    return tmp_path


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
        write_sweep(workdir, grid={"rules": [["a", "b"]]}, seeds=[0, 1, 2], seeds_per_point="all")
    )
    (p,) = s.points()
    assert p.name == "rules=a-b__seeds=0-1-2"
    assert p.parameters["seeds"] == [0, 1, 2]


def test_run_name_is_safe_and_bounded():
    assert results.run_name({"k": 8, "rule": "mutual choice", "lr": 1e-4}) == (
        "k=8__rule=mutual_choice__lr=0.0001"
    )
    long = results.run_name({f"p{i}": i for i in range(60)})
    assert len(long) <= 120
    assert long != results.run_name({f"p{i}": i + 1 for i in range(60)})


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


# ----------------------------------------------------------------------------- issue 13, item 11


def test_yaml_numbers_read_as_strings_are_converted_before_naming(workdir):
    # YAML 1.1 reads 3e-3 and 1e4 as strings; the notebook's defaults are numbers.
    path = workdir / "demo.yaml"
    path.write_text(
        "notebook: stand_in.ipynb\nparameters:\n  lr: 3e-3\ngrid:\n  x: [1e4, 2]\n",
        encoding="utf-8",
    )
    s = sweep.load_sweep(path)
    sweep.check_parameters(s)
    first, second = s.points()
    assert first.parameters["lr"] == 0.003 and isinstance(first.parameters["lr"], float)
    assert first.parameters["x"] == 10000 and isinstance(first.parameters["x"], int)
    assert (first.name, second.name) == ("x=10000", "x=2")


def test_a_string_where_the_notebook_takes_a_list_names_file_point_and_parameter(workdir):
    s = sweep.load_sweep(write_sweep(workdir, grid={"x": [1, 2]}, parameters={"rules": "b"}))
    with pytest.raises(sweep.SweepError) as err:
        sweep.check_parameters(s)
    message = str(err.value)
    for part in ("demo.yaml", "point x=1", "rules='b'", "a list", "[b]"):
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("fast", "a number"), (True, "a number"), ([1], "a number")],
)
def test_values_that_cannot_be_numbers_are_rejected(workdir, value, expected):
    s = sweep.load_sweep(write_sweep(workdir, grid={"x": [value]}))
    with pytest.raises(sweep.SweepError, match=f"expects {expected}"):
        sweep.check_parameters(s)


def test_list_elements_are_converted_to_the_default_elements_kind():
    assert sweep.coerce_value(["1e-3", 0.01], [0.003]) == [0.001, 0.01]
    assert sweep.coerce_value(["4", 8], [4, 8]) == [4, 8]
    assert sweep.coerce_value(None, [1]) is None  # null stays null
    with pytest.raises(sweep._Mismatch):
        sweep.coerce_value(["topk", 3], ["topk", "mutual_choice"])


def test_malformed_yaml_is_one_line_naming_file_and_line(workdir, capsys):
    path = workdir / "broken.yaml"
    path.write_text("notebook: stand_in.ipynb\ngrid:\n  x: [1, 2\nseeds: [0]\n", encoding="utf-8")
    with pytest.raises(sweep.SweepError, match=r"broken\.yaml, line \d+, column \d+: not valid"):
        sweep.load_sweep(path)
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.yaml, line" in err[0] and "Traceback" not in err[0]


def test_resources_are_checked(workdir):
    s = sweep.load_sweep(write_sweep(workdir, resources={"num_cpus": 2, "num_gpus": 0.5}))
    assert s.ray_options() == {"num_cpus": 2, "num_gpus": 0.5} and s.threads == 2
    assert sweep.load_sweep(write_sweep(workdir)).ray_options() == {"num_cpus": 1}
    for bad, match in (
        ({"cpus": 1}, "resources takes"),
        ({"num_cpus": "1"}, "must be a number"),
        ({"num_gpus": -1}, "must be a number"),
        (4, "must be a mapping"),
    ):
        with pytest.raises(sweep.SweepError, match=match):
            sweep.load_sweep(write_sweep(workdir, resources=bad))


def test_the_removed_shard_option_points_to_ray(workdir, capsys):
    with pytest.raises(SystemExit):
        sweep.main([str(write_sweep(workdir)), "--shard", "0/2"])
    assert "--address" in capsys.readouterr().err


def test_claim_of_a_failing_cell():
    assert sweep._claim("# 4. Mutual Choice captures the most\nassert a >= b") == (
        "4. Mutual Choice captures the most"
    )
    assert sweep._claim("x = 1\nassert x") == "x = 1"


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


def test_a_point_resumes_from_the_trials_of_an_interrupted_attempt(tmp_path):
    """A point's work folder outlives a failed attempt: its trials/ files are there for the
    next attempt, every other file of the failed one is gone, and the folder is removed once
    the point is done."""
    import nbformat
    from adaptive_sae.sweep import execute_point

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell("fail = True")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "from adaptive_sae import results\n"
        "out = results.ResultsDir('exp', 'run')\n"
        "trials = out.path / 'trials'\n"
        "trials.mkdir(parents=True, exist_ok=True)\n"
        "n = len(list(trials.glob('*.csv')))\n"
        "(trials / f't{n}.csv').write_text(str(n))\n"
        "if fail:\n"
        "    (out.path / 'stale.txt').write_text('from the failed attempt')\n"
        "    raise RuntimeError('fails on purpose')\n"
        "out.save_metrics({'trials_seen': n + 1})\n"
    )
    nb.cells = [params, body]
    blob = nbformat.writes(nb).encode()
    work = tmp_path / "work"
    first = execute_point("p.ipynb", blob, {"fail": True}, 120, 1, None, str(work))
    assert "fails on purpose" in first["error"] and first["files"] == {}
    assert (work / "exp" / "run" / "trials" / "t0.csv").is_file()
    assert (work / "exp" / "run" / "stale.txt").is_file()
    second = execute_point("p.ipynb", blob, {"fail": False}, 120, 1, None, str(work))
    assert second["error"] is None
    files = second["files"]
    assert {"exp/run/trials/t0.csv", "exp/run/trials/t1.csv", "exp/run/metrics.json"} <= set(files)
    assert not any(name.endswith("stale.txt") for name in files)
    assert b'"trials_seen": 2' in files["exp/run/metrics.json"]
    assert not work.exists()
    # a direct call neither imports nor starts Ray (either would disturb later Ray tests)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_seed_work_dir_copies_the_committed_trials_only(workdir):
    """--reuse-trials: the trials/ files of a point's results go to its work folder where
    missing (the work folder's own are newer and stay), nothing else is copied."""
    s = sweep.load_sweep(write_sweep(workdir, grid={"x": [1]}, seeds=[0]))
    (p,) = s.points()
    res = s.point_results(p)
    (res / "trials" / "abc").mkdir(parents=True)
    (res / "trials" / "abc" / "trials.csv").write_text("committed")
    (res / "trials" / "abc" / "settings.json").write_text("{}")
    (res / "table.csv").write_text("not a trial")
    work = sweep.point_work_dir(s, p)
    rel = res.relative_to(workdir / "results")
    (work / rel / "trials" / "abc").mkdir(parents=True)
    (work / rel / "trials" / "abc" / "trials.csv").write_text("newer, in the work folder")
    try:
        assert sweep.seed_work_dir(s, p) == 1
        assert (work / rel / "trials" / "abc" / "settings.json").read_text() == "{}"
        assert (work / rel / "trials" / "abc" / "trials.csv").read_text().startswith("newer")
        assert not (work / rel / "table.csv").exists()
        assert sweep.seed_work_dir(s, p) == 0
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def test_aggregation_names_metrics_no_point_measured(workdir):
    """A metric the sweep file asks for that no done point's table has (ground-truth recovery
    on a language model) is left out and named in summary.md, not a failure of the sweep."""
    import json

    s = sweep.load_sweep(
        write_sweep(
            workdir,
            grid={"x": [1]},
            seeds=[0],
            aggregate={"metrics": ["value", "mean_max_cosine"]},
        )  # fmt: skip
    )
    (p,) = s.points()
    res = s.point_results(p)
    res.mkdir(parents=True)
    (res / "metrics.json").write_text(json.dumps({"value": 3.0}))
    s.notebook_output(p).parent.mkdir(parents=True, exist_ok=True)
    s.notebook_output(p).write_text("{}")
    s.done_marker(p).write_text(json.dumps({"fingerprint": p.fingerprint(s.notebook)}))
    path = sweep.aggregate(s)
    summary = pd.read_csv(path)
    assert summary["value_mean"].tolist() == [3.0]
    assert not any(c.startswith("mean_max_cosine") for c in summary.columns)
    text = (path.parent / "summary.md").read_text()
    assert "Not measured on these points: mean_max_cosine." in text


def test_a_point_is_done_only_where_its_results_are(workdir, monkeypatch):
    """The done marker and executed notebook live beside the sweep file; the results in the
    results folder. Another results folder (``--results-root``) has not got them: not done."""
    s = sweep.load_sweep(write_sweep(workdir, grid={"x": [1]}))
    (p,) = s.points()
    s.output_dir.mkdir(parents=True, exist_ok=True)
    s.notebook_output(p).write_text("{}")
    results.write_json(s.done_marker(p), {"fingerprint": p.fingerprint(s.notebook)})
    assert not s.is_done(p)  # no results yet
    s.point_results(p).mkdir(parents=True)
    assert s.is_done(p)
    monkeypatch.setenv(results.RESULTS_ENV, str(workdir / "elsewhere"))
    assert not s.is_done(p)
