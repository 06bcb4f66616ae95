"""Settings for nbval, which executes every notebook here at its quick defaults.

The notebooks write their results into a fresh temporary folder (unless
``ADAPTIVE_SAE_RESULTS`` is set), so that an empirical verdict is never compared with the
verdict of an earlier run of other code left in ``results/<experiment>/quick/``
(``adaptive_sae.notebook.record_verdict``): a better rule cannot break the tests."""

from __future__ import annotations

import os
import shutil
import tempfile

_made = None
if not os.environ.get("ADAPTIVE_SAE_RESULTS"):
    _made = tempfile.mkdtemp(prefix="adaptive-sae-notebooks-")
    os.environ["ADAPTIVE_SAE_RESULTS"] = _made  # inherited by the kernels nbval starts
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_sessionfinish(session, exitstatus):
    if _made:
        shutil.rmtree(_made, ignore_errors=True)
