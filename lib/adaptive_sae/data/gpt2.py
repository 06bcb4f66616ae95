"""The paper's setting (DESIGN §7.3): GPT-2 small's residual stream on web text.

A preset of the ``hf`` source (hf.py): model ``gpt2``, hook ``blocks.8.hook_resid_pre`` (the
layer of OpenAI's and BatchTopK's GPT-2 SAEs), OpenWebText streamed from the Hub
(``Skylion007/openwebtext``), 128-token windows led by ``<|endoftext|>``, one document in a
hundred held out. Every other ``hf`` option can be passed too (a local ``dataset``, ``cache``,
``device``, ...).

It needs the network (or GPT-2 in the local Hugging Face cache and a local dataset) and ideally
a GPU. Without them it fails within seconds, before any download is attempted, with one
``SourceUnavailable`` error that says what is missing and names the offline sources.
"""

from __future__ import annotations

from typing import Any

from .hf import (
    OFFLINE_HINT,
    HFSource,
    SourceUnavailable,
    check_available,
    hub_reachable,
    in_held_out,
)

MODEL = "gpt2"
HOOK = "blocks.8.hook_resid_pre"
DATASET = "Skylion007/openwebtext"


class GPT2Source(HFSource):
    """GPT-2 small residual-stream activations on streamed web text (the ``gpt2`` source)."""

    source_name = "gpt2"

    def __init__(
        self,
        hook: str = HOOK,
        context_len: int = 128,
        seed: int = 0,
        *,
        model: Any = MODEL,
        dataset: str = DATASET,
        **options: Any,
    ) -> None:
        super().__init__(model, hook, dataset, context_len=context_len, seed=seed, **options)


__all__ = [
    "DATASET",
    "GPT2Source",
    "HOOK",
    "MODEL",
    "OFFLINE_HINT",
    "SourceUnavailable",
    "check_available",
    "hub_reachable",
    "in_held_out",
]
