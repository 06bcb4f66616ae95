"""The paper's setting (DESIGN §7.3): GPT-2 small's residual stream on web text.

GPT-2 small is loaded with ``TransformerBridge.boot_transformers("gpt2")``; activations are read
at ``blocks.8.hook_resid_pre`` by default (the layer of OpenAI's and BatchTopK's GPT-2 SAEs);
text is streamed from a Hugging Face dataset (default ``Skylion007/openwebtext``). Documents are
tokenised, joined with the end-of-text token, and cut into windows of ``context_len`` tokens that
each start with it (SAELens's BOS convention; ``exclude_first`` then drops that position). One
document in a hundred (by the hash of its text) is held out for ``held_out``.

This source needs the network (or a local Hugging Face cache of the model and a local dataset)
and ideally a GPU. Without them it fails within seconds, before any download is attempted, with
one ``SourceUnavailable`` error that says what is missing and names the offline sources.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..config import ConfigError
from .store import ActivationStore, StoreConfig
from .tiny import activations_at, check_hook

OFFLINE_HINT = (
    "Offline, use activation_source('tiny') (a byte-level model the suite trains on the "
    "standard library's docstrings) or activation_source('synthetic') (ground-truth features)."
)
_TRUTHY = {"1", "true", "yes", "on"}


class SourceUnavailable(RuntimeError):
    """An activation source cannot run here; the message says what is missing and the fix."""


def _offline_env() -> list[str]:
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return [n for n in names if os.environ.get(n, "").strip().lower() in _TRUTHY]


def _model_cached(model_name: str) -> bool:
    """Whether the model's config and weights are in the local Hugging Face cache."""
    if Path(model_name).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if not isinstance(try_to_load_from_cache(model_name, "config.json"), str):
        return False
    return any(
        isinstance(try_to_load_from_cache(model_name, f), str)
        for f in ("model.safetensors", "pytorch_model.bin")
    )


def hub_reachable(timeout: float = 2.0) -> bool:
    """A TCP connection to the Hugging Face endpoint opens within `timeout` seconds (name
    resolution included: the check runs in a thread that is abandoned when it is late)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def check_available(model_name: str = "gpt2", dataset: str = "Skylion007/openwebtext") -> None:
    """Raise SourceUnavailable (quickly, without downloading) when the source cannot run."""
    missing: list[str] = []
    if importlib.util.find_spec("datasets") is None:
        missing.append(
            "the Hugging Face `datasets` package is not installed (pip install datasets)"
        )
    local_data = Path(dataset).exists()
    cached = _model_cached(model_name)
    offline = _offline_env()
    if offline:
        if not cached:
            missing.append(
                f"model {model_name!r} is not in the local Hugging Face cache and "
                f"{'/'.join(offline)}=1 forbids downloading it"
            )
        if not local_data:
            missing.append(
                f"dataset {dataset!r} is streamed from the Hub, which {'/'.join(offline)}=1 "
                f"forbids (pass a local dataset folder instead)"
            )
    elif not (cached and local_data) and not hub_reachable():
        what = [] if cached else [f"model {model_name!r} (not in the local cache)"]
        what += [] if local_data else [f"dataset {dataset!r} (streamed)"]
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        missing.append(
            f"no network: {host} cannot be reached, so {' and '.join(what)} cannot be loaded"
        )
    if missing:
        raise SourceUnavailable(
            f"the gpt2 activation source cannot run here: {'; '.join(missing)}. {OFFLINE_HINT}"
        )


def in_held_out(text: str, fraction: float = 0.01) -> bool:
    """True for the documents held out of training (by the sha256 of their text)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")
    return h / 2**64 < fraction


class GPT2Source:
    """GPT-2 small residual-stream activations on streamed web text (the ``gpt2`` source)."""

    def __init__(
        self,
        hook: str = "blocks.8.hook_resid_pre",
        context_len: int = 128,
        seed: int = 0,
        *,
        model_name: str = "gpt2",
        dataset: str = "Skylion007/openwebtext",
        dataset_split: str = "train",
        text_field: str = "text",
        device: str | None = None,
        harvest_contexts: int = 32,
        shuffle_buffer_docs: int = 10_000,
        held_out_fraction: float = 0.01,
        buffer_tokens: int = 262_144,
        exclude_first: bool = True,
        outlier_multiple: float | None = 10.0,
        cache: bool = False,
        cache_tokens: int = 10_000_000,
        cache_dir: str | None = None,
    ) -> None:
        check_available(model_name, dataset)
        if context_len < 2:
            raise ConfigError(f"context_len={context_len} must be >= 2.")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            from transformer_lens.model_bridge import TransformerBridge

            self.model = TransformerBridge.boot_transformers(model_name, device=self.device)
        except Exception as e:  # a loader error of any kind: say what failed and what to do
            raise SourceUnavailable(
                f"the gpt2 activation source could not load model {model_name!r} "
                f"({type(e).__name__}: {e}). {OFFLINE_HINT}"
            ) from e
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        check_hook(self.model, hook)
        self.hook, self.context_len, self.seed = hook, int(context_len), int(seed)
        self.model_name, self.dataset, self.dataset_split = model_name, dataset, dataset_split
        self.text_field, self.harvest_contexts = text_field, int(harvest_contexts)
        self.shuffle_buffer_docs, self.held_out_fraction = shuffle_buffer_docs, held_out_fraction
        self.tokenizer = self.model.tokenizer
        self.bos = int(self.tokenizer.bos_token_id)
        self.d_in = int(self.model.cfg.d_model)
        store_cfg = StoreConfig(
            buffer_tokens=buffer_tokens,
            exclude_first=exclude_first,
            outlier_multiple=outlier_multiple,
            cache=cache,
            cache_tokens=cache_tokens,
            cache_dir=cache_dir,
        )
        self.store = ActivationStore(
            self.harvest,
            self._contexts,
            self.d_in,
            store_cfg,
            seed=seed,
            provenance=self._identity(),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "source": "gpt2",
            "model": self.model_name,
            "hook": self.hook,
            "dataset": self.dataset,
            "dataset_split": self.dataset_split,
            "context_len": self.context_len,
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
        }

    def _documents(self, pass_idx: int) -> Iterator[str]:
        try:
            import datasets
        except ImportError as e:
            raise SourceUnavailable(
                f"the gpt2 source streams text with `datasets` (pip install datasets). {OFFLINE_HINT}"
            ) from e
        try:
            ds = datasets.load_dataset(self.dataset, split=self.dataset_split, streaming=True)
            ds = ds.shuffle(seed=self.seed + pass_idx, buffer_size=self.shuffle_buffer_docs)
        except Exception as e:
            raise SourceUnavailable(
                f"the gpt2 source could not stream dataset {self.dataset!r} "
                f"({type(e).__name__}: {e}). {OFFLINE_HINT}"
            ) from e
        for ex in ds:
            yield ex[self.text_field]

    def _windows(self, pass_idx: int, held_out: bool) -> Iterator[torch.Tensor]:
        """Chunks (harvest_contexts, T) of BOS-led token windows."""
        T = self.context_len
        buf: list[int] = []
        batch: list[list[int]] = []
        texts: list[str] = []

        def flush_texts() -> Iterator[torch.Tensor]:
            nonlocal buf, batch
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                buf.extend([self.bos, *ids])
                while len(buf) >= T - 1:
                    batch.append([self.bos, *buf[: T - 1]])
                    buf = buf[T - 1 :]
                    if len(batch) == self.harvest_contexts:
                        yield torch.tensor(batch)
                        batch = []

        for text in self._documents(pass_idx):
            if in_held_out(text, self.held_out_fraction) != held_out:
                continue
            texts.append(text)
            if len(texts) == 64:
                yield from flush_texts()
                texts = []
        if texts:
            yield from flush_texts()

    def _contexts(self, pass_idx: int) -> Iterator[torch.Tensor]:
        return self._windows(pass_idx, held_out=False)

    def harvest(self, contexts: torch.Tensor) -> torch.Tensor:
        """Activations (n, T, d) at the hook, on the CPU in float32."""
        return activations_at(self.model, contexts.to(self.device), self.hook).float().cpu()

    def eval_contexts(self, n_contexts: int) -> torch.Tensor:
        """The first n held-out windows (n, T)."""
        out: list[torch.Tensor] = []
        n = 0
        for w in self._windows(0, held_out=True):
            out.append(w)
            n += w.shape[0]
            if n >= n_contexts:
                break
        return torch.cat(out)[:n_contexts]

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, d_in) float32 batches from the shuffled buffer."""
        return self.store.batches(batch_size, start_batch)

    def held_out(self, n_tokens: int) -> torch.Tensor:
        """(n_tokens, d_in) float32 from held-out documents, filtered like training data."""
        probe = ActivationStore(self.harvest, self._contexts, self.d_in, self.store.cfg)
        out, n = [], 0
        for w in self._windows(0, held_out=True):
            v = probe.filter(self.harvest(w))
            out.append(v)
            n += v.shape[0]
            if n >= n_tokens:
                return torch.cat(out)[:n_tokens]
        raise ValueError(f"the held-out documents gave only {n} vectors; ask for fewer.")

    def describe(self) -> dict[str, Any]:
        return {**self._identity(), "d_in": self.d_in, **self.store.describe()}


__all__ = ["GPT2Source", "SourceUnavailable", "check_available", "hub_reachable", "in_held_out"]
