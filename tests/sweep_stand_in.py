"""A tiny stand-in notebook and sweep files for the sweep tests (imported as ``sweep_stand_in``:
pytest puts this folder on sys.path). The notebook can be told to fail, to fail a claim, to
record each attempt's process id, and to wait while a file exists, so that a test can kill its
worker or its kernel mid-point."""

from __future__ import annotations

from pathlib import Path

import nbformat
import yaml

PARAMETERS = """\
x = 1
seeds = [0]
lr = 0.001
rules = ["a", "b"]
attempts = ""  # a file: each attempt appends its kernel's pid
hold = ""  # a file name with {x}: the notebook waits while that file exists
run_name = "quick"
"""

BODY = """\
import os, time
from pathlib import Path
import pandas as pd
from adaptive_sae import results

if attempts:
    with open(attempts, "a") as fh:
        fh.write(f"{x} {os.getpid()}\\n")
while hold and os.path.exists(hold.format(x=x)):
    time.sleep(0.05)
if x == 2:
    raise RuntimeError("point x=2 fails on purpose")
out = results.ResultsDir("stand_in", run_name)
rows = [{"x": x, "seed": s, "rule": r, "value": 10 * x + s + (100 if r == "b" else 0)}
        for s in seeds for r in rules]
out.save_table("runs", pd.DataFrame(rows))
out.save_metrics({"value": 10 * x + sum(seeds) / len(seeds), "nested": {"twice": 20 * x},
                  "lr": lr})
(out.path / "pid.txt").write_text(str(os.getpid()))
out.save_provenance({"x": x, "seeds": seeds, "run_name": run_name})
"""

CLAIM = """\
# 1. The value stays below thirty
assert x < 3, (x, 30)
"""


def stand_in_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY), nbformat.v4.new_code_cell(CLAIM)]
    nbformat.write(nb, path)
    return path


def write_sweep(folder: Path, **spec) -> Path:
    spec = {"notebook": "stand_in.ipynb", "experiment": "stand_in", **spec}
    path = folder / f"{spec.pop('file', 'demo')}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path
