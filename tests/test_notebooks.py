"""The experiment notebooks: stored without outputs, one plain-literal parameters cell that
papermill can override, one setup call, figures drawn from saved tables, claim cells that name
their claim, sweeps that match them. (Executing every notebook is nbval's job:
``pytest --nbval-lax notebooks`` runs them at their quick defaults and fails on a claim cell.)"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SWEEPS = sorted((ROOT / "papermill_runs").glob("*.yaml"))
REQUIRED_PARAMETERS = {"source", "seeds", "run_name"}


def test_there_is_a_notebook_per_experiment():
    names = {p.stem.split("_", 1)[1] for p in NOTEBOOKS}
    assert names == {
        "allocation_mechanisms",
        "sparsity_allocation",
        "zipf_density",
        "aux_zipf_ablation",
        "dead_features",
        "adaptive_computation",
        "inference_thresholds",
        "cost_scaling",
        "convergence",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: the kernel must be 'python3' (custom kernel names break papermill)"
    )


def _parameters(nb) -> tuple[int, dict]:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {tagged}"
    cell = nb.cells[tagged[0]]
    values = {}
    for stmt in ast.parse(cell.source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.unparse(stmt)
        assert isinstance(stmt.targets[0], ast.Name), ast.unparse(stmt)
        # plain literals only: derived values belong in the next cell
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    return tagged[0], values


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_are_plain_literals_and_complete(path):
    import papermill

    nb = nbformat.read(path, as_version=4)
    index, values = _parameters(nb)
    assert REQUIRED_PARAMETERS <= set(values), sorted(REQUIRED_PARAMETERS - set(values))
    assert values["run_name"] == "quick" and values["source"] == "synthetic"
    assert isinstance(values["seeds"], list) and values["seeds"]
    # papermill reads every parameter (a comment with '=' or an odd expression breaks it)
    assert set(papermill.inspect_notebook(str(path))) == set(values)
    sources = "\n".join(c.source for c in nb.cells[index + 1 :] if c.cell_type == "code")
    assert "assert " in sources, "the notebook must end with claim cells that assert"
    assert "save_provenance" in sources and "save_metrics" in sources and "save_figure" in sources


def _code_after_parameters(nb) -> list[str]:
    index, _ = _parameters(nb)
    return [c.source for c in nb.cells[index + 1 :] if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_experiment_layout(path):
    """One setup call, figures drawn from saved tables, claim cells that name their claim, and
    empirical verdicts recorded rather than asserted."""
    nb = nbformat.read(path, as_version=4)
    cells = _code_after_parameters(nb)
    assert "notebook.start(" in cells[0], f"{path.name}: the cell after the parameters calls start"
    for src in cells:
        if "save_figure" in src:
            assert "plots." in src and "read_csv(" in src, (
                f"{path.name}: a figure is drawn by a plots function from a saved table:\n{src}"
            )
        if "assert " in src:
            assert src.lstrip().startswith("# Claim:"), (
                f"{path.name}: a cell that asserts starts with '# Claim: ...':\n{src}"
            )
            for stmt in ast.walk(ast.parse(src)):
                if isinstance(stmt, ast.Assert):
                    assert stmt.msg is not None, (
                        f"{path.name}: the assertion names its claim: {ast.unparse(stmt)}"
                    )
                    text = ast.unparse(stmt.test)
                    assert not any(w in text for w in ("_ms", "seconds", "relative_to_topk")), (
                        f"{path.name}: no claim asserts a wall-clock time: {text}"
                    )
    joined = "\n".join(cells)
    assert "record_verdict(" in joined, f"{path.name}: empirical verdicts go to record_verdict"
    assert "SCALE" not in joined and "total_tokens <" not in joined, (
        f"{path.name}: no claim depends on a scale threshold"
    )


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweeps_name_real_notebook_parameters(path):
    from adaptive_sae import sweep

    s = sweep.load_sweep(path)
    sweep.check_parameters(s)
    assert s.name == s.experiment or s.name.startswith(f"{s.experiment}_"), (
        "sweep files are named after their experiment (<experiment>.yaml, or "
        "<experiment>_<variant>.yaml for the same notebook on another source)"
    )
    assert s.points()


def test_papermill_injects_parameters(tmp_path):
    """Run the cheapest notebook with overridden parameters and check that they took effect."""
    import papermill

    src = ROOT / "notebooks" / "01_allocation_mechanisms.ipynb"
    out = tmp_path / "executed.ipynb"
    overrides = {
        "seeds": [3],
        "total_tokens": 4096,
        "batch_size": 512,
        "n_features": 128,
        "k": 4,
        "toy_k": 2,
        "run_name": "papermill_test",
    }
    env = {"ADAPTIVE_SAE_RESULTS": str(tmp_path / "results"), "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(
            str(src),
            str(out),
            parameters=overrides,
            kernel_name="python3",
            cwd=str(src.parent),
            progress_bar=False,
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "toy_k = 2" in injected[0].source
    folder = tmp_path / "results" / "allocation_mechanisms" / "papermill_test"
    prov = json.loads((folder / "provenance.json").read_text())
    for key, value in overrides.items():
        assert prov["parameters"][key] == value, key
    assert prov["seeds"] == [3] and prov["source"]["name"] == "synthetic"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["budget"] == 4 * 512  # k x batch_size from the injected values
    for name in ("toy_masks.png", "toy_masks.svg", "batch_summary.csv"):
        assert (folder / name).is_file(), name
