"""Shared test settings. The naive references live in ``tests/oracles.py`` (imported as
``oracles``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from hypothesis import settings

# One intra-op thread for the whole session (a test module used to set it at import, which
# applied it to every test anyway): on small shared CI runners more threads only contend.
torch.set_num_threads(1)

# Property tests build tensors and SAEs; their first call can be slow, so no per-example deadline.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")
