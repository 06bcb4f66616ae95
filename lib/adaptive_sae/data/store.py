"""Activation store: harvests a model's activations context by context, filters them, mixes
tokens from many contexts in a shuffled buffer, and optionally caches them on disk.

Streaming mode (the anchors' mixing buffer, ANCHORS §2.5): vectors fill a buffer of
``buffer_tokens``; when it is full it is shuffled and its first half is handed out, so the buffer
is refilled each time half of it has been read. A *pass* is one sweep over the contexts the
source provides; at the end of a pass the buffer is drained (shuffled, then handed out), so
within a pass every harvested vector is yielded exactly once and never twice.

Cached mode: the first ``cache_tokens`` vectors of pass 0 (after filtering) are written once
to ``<cache_dir>/activations/<key>.npy`` (written to a temporary file, then renamed, so a
crash never leaves a half-written cache) with a JSON sidecar of provenance, and read back
memory-mapped. A pass is then one seeded permutation of the cached vectors, so a sweep
harvests once and trains many SAEs, and ``start_batch`` costs nothing.

Filters, both counted in ``describe()``:
- ``exclude_first``: drop position 0 of each context (it sees no context; the BOS-like token).
- ``outlier_multiple``: drop vectors whose norm exceeds this multiple of the median norm of
  their harvest chunk (dictionary_learning's ``max_activation_norm_multiple``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import (
    CACHE_ENV,
    FileFormatError,
    atomic_write_bytes,
    cache_root,
    read_json,
    save_npy,
    write_json,
)

HarvestFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps contexts (n, T) of token ids to activations (n, T, d)."""
ContextsFn = Callable[[int], Iterator[torch.Tensor]]
"""Maps a pass index to an iterator of context chunks (n, T); finite or infinite."""


def short_hash(obj: Any, n: int = 16) -> str:
    """First n hex digits of the sha256 of obj's canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (see adaptive_sae.io)."""
    return write_json(path, obj)


def open_cache(path: Path, d_in: int) -> tuple[np.ndarray, dict]:
    """The cached (n, d_in) float32 array at ``path`` (memory-mapped) and its JSON sidecar;
    FileFormatError naming the file, what is wrong and the fix for anything else."""
    sidecar = path.with_suffix(".json")
    fix = f"delete {path} and {sidecar.name} to harvest the activations again."

    def bad(what: str) -> FileFormatError:
        return FileFormatError(f"activation cache {path} {what}; {fix}")

    if not sidecar.is_file():
        raise bad(f"has no {sidecar.name} beside it (an interrupted build, or a foreign file)")
    meta = read_json(sidecar, fix)
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
            shape, fortran, dtype = read_header(fh)
        except (ValueError, AttributeError, EOFError) as e:
            raise bad(f"is not a .npy array ({e})") from None
        offset = fh.tell()
    if dtype.hasobject:
        raise bad("holds Python objects (dtype object), not float32 activations")
    if dtype != np.float32:
        raise bad(f"has dtype {dtype}, expected float32")
    if len(shape) != 2 or shape[1] != d_in or fortran:
        raise bad(f"has shape {shape}, expected (n, {d_in})")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise bad(f"is truncated ({size} of {expected} bytes)")
    if isinstance(meta, dict) and meta.get("n_vectors") not in (None, shape[0]):
        raise bad(f"holds {shape[0]} vectors but {sidecar.name} records {meta['n_vectors']}")
    return np.load(path, mmap_mode="r"), meta if isinstance(meta, dict) else {}


@dataclass
class StoreConfig:
    """How activations are mixed, filtered and cached."""

    buffer_tokens: int = 65_536
    """Vectors held in the shuffle buffer; half of it is handed out per refill."""
    exclude_first: bool = True
    """Drop position 0 of every context."""
    outlier_multiple: float | None = 10.0
    """Drop vectors with norm > this multiple of the chunk's median norm (None: keep all)."""
    cache: bool = False
    """Harvest once to disk (memory-mapped .npy) and train from the cache."""
    cache_tokens: int = 1_000_000
    """Vectors to harvest into the cache (at most one pass of the source)."""
    cache_dir: str | None = None
    """Root of the cache (default: cache_root())."""

    def __post_init__(self) -> None:
        if self.buffer_tokens < 2:
            raise ValueError(f"buffer_tokens={self.buffer_tokens} must be >= 2.")
        if self.outlier_multiple is not None and not self.outlier_multiple > 1.0:
            raise ValueError(
                f"outlier_multiple={self.outlier_multiple} must be > 1 (or None to keep all)."
            )
        if self.cache_tokens < 1:
            raise ValueError(f"cache_tokens={self.cache_tokens} must be >= 1.")


class ActivationStore:
    """Filtered, shuffled activation vectors from a harvest function over contexts.

    ``batches(batch_size, start_batch)`` is an infinite iterator of (batch_size, d) float32
    tensors, a deterministic function of ``seed`` (and of the model and contexts).
    """

    def __init__(
        self,
        harvest: HarvestFn,
        contexts: ContextsFn,
        d_in: int,
        cfg: StoreConfig | None = None,
        *,
        seed: int = 0,
        provenance: dict | None = None,
    ) -> None:
        self.harvest, self.contexts, self.d_in = harvest, contexts, int(d_in)
        self.cfg = cfg or StoreConfig()
        self.seed = int(seed)
        self.provenance = provenance or {}
        self.counts = {"harvested": 0, "dropped_first_position": 0, "dropped_outliers": 0}
        self._cache: np.ndarray | None = None
        self._cache_meta: dict | None = None

    # -- harvesting and filtering -----------------------------------------------------------
    def filter(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, T, d) activations -> (m, d) vectors that pass the filters; updates the counts."""
        n, T, d = acts.shape
        self.counts["harvested"] += n * T
        if self.cfg.exclude_first:
            acts = acts[:, 1:]
            self.counts["dropped_first_position"] += n
        flat = acts.reshape(-1, d).float()
        if self.cfg.outlier_multiple is not None and flat.shape[0] > 0:
            norms = flat.norm(dim=-1)
            keep = norms <= self.cfg.outlier_multiple * norms.median()
            self.counts["dropped_outliers"] += int((~keep).sum())
            flat = flat[keep]
        return flat.contiguous()

    def stream(self, pass_idx: int) -> Iterator[torch.Tensor]:
        """Filtered vectors of one pass in context order, one chunk per harvest call."""
        for ctx in self.contexts(pass_idx):
            # (never yield inside no_grad: the caller would run with gradients off)
            with torch.no_grad():
                chunk = self.filter(self.harvest(ctx))
            yield chunk

    # -- shuffled streaming -------------------------------------------------------------------
    def _generator(self, pass_idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * pass_idx + 1)

    def _shuffled_pass(self, pass_idx: int) -> Iterator[torch.Tensor]:
        """One pass through the mixing buffer: each vector of the pass exactly once."""
        gen = self._generator(pass_idx)
        cap = self.cfg.buffer_tokens
        buf = torch.empty(0, self.d_in)
        for chunk in self.stream(pass_idx):
            buf = torch.cat([buf, chunk])
            while buf.shape[0] >= cap:
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                half = cap // 2
                yield buf[:half]
                buf = buf[half:]
        if buf.shape[0]:
            yield buf[torch.randperm(buf.shape[0], generator=gen)]

    def _cached_chunks(self, pass_idx: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """From the cache: one seeded permutation per pass, starting `skip` vectors in."""
        data = self.load_cache()
        perm = torch.randperm(data.shape[0], generator=self._generator(pass_idx)).numpy()
        step = max(1, self.cfg.buffer_tokens // 2)
        for i in range(skip, len(perm), step):
            yield torch.from_numpy(np.asarray(data[perm[i : i + step]], dtype=np.float32))

    def vectors(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Chunks of shuffled vectors, pass after pass, forever. `start` (cached mode only)
        skips that many vectors of the stream without reading them."""
        p, skip = 0, 0
        if start:
            if not self.cfg.cache:
                raise ValueError("vectors(start=...) needs cache=True; stream and skip instead.")
            p, skip = divmod(start, self.load_cache().shape[0])
        while True:
            empty = True
            chunks = self._cached_chunks(p, skip) if self.cfg.cache else self._shuffled_pass(p)
            for chunk in chunks:
                empty = empty and chunk.shape[0] == 0
                yield chunk
            if empty and not skip:
                raise RuntimeError(
                    "the source yielded no activation in a whole pass; check the contexts and "
                    "the filters (exclude_first drops everything when contexts have length 1)."
                )
            p, skip = p + 1, 0

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Infinite iterator of (batch_size, d_in) float32 batches: consecutive slices of the
        vector stream. `start_batch` skips that many batches (by position in cached mode, by
        harvesting and discarding otherwise), so batches(B, s) equals batches(B)[s:]."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if start_batch < 0:
            raise ValueError(f"start_batch={start_batch} must be >= 0.")
        skip_batches = start_batch
        stream = self.vectors()
        if self.cfg.cache and start_batch:
            stream, skip_batches = self.vectors(start_batch * batch_size), 0
        pending: list[torch.Tensor] = []
        n_pending, produced = 0, 0
        for chunk in stream:
            pending.append(chunk)
            n_pending += chunk.shape[0]
            if n_pending < batch_size:
                continue
            allv = torch.cat(pending)
            n_full = allv.shape[0] // batch_size
            for i in range(n_full):
                if produced >= skip_batches:
                    yield allv[i * batch_size : (i + 1) * batch_size]
                produced += 1
            rest = allv[n_full * batch_size :]
            pending, n_pending = [rest], rest.shape[0]

    # -- disk cache -----------------------------------------------------------------------------
    def cache_key(self) -> str:
        filt = {
            k: v
            for k, v in asdict(self.cfg).items()
            if k in ("exclude_first", "outlier_multiple", "cache_tokens")
        }
        return short_hash({"provenance": self.provenance, "filters": filt, "d_in": self.d_in})

    def cache_path(self) -> Path:
        root = Path(self.cfg.cache_dir) if self.cfg.cache_dir else cache_root()
        return root / "activations" / f"{self.cache_key()}.npy"

    def build_cache(self) -> Path:
        """Harvest up to cache_tokens vectors of pass 0 into the disk cache (atomic)."""
        path = self.cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.counts = {k: 0 for k in self.counts}
        chunks, n = [], 0
        for chunk in self.stream(0):
            chunks.append(chunk[: self.cfg.cache_tokens - n])
            n += chunks[-1].shape[0]
            if n >= self.cfg.cache_tokens:
                break
        if n == 0:
            raise RuntimeError("no activation was harvested for the cache; check the source.")
        data = torch.cat(chunks).numpy().astype(np.float32)
        meta = {
            "n_vectors": int(data.shape[0]),
            "d_in": self.d_in,
            "counts": dict(self.counts),
            "provenance": self.provenance,
            "store": asdict(self.cfg),
        }
        # the sidecar first: an array without its sidecar is an interrupted build
        atomic_write_json(path.with_suffix(".json"), meta)
        save_npy(data, path)
        return path

    def load_cache(self) -> np.ndarray:
        """The cached vectors, memory-mapped (built first when missing)."""
        if self._cache is None:
            path = self.cache_path()
            if not path.is_file():
                self.build_cache()
            self._cache, self._cache_meta = open_cache(path, self.d_in)
        return self._cache

    def describe(self) -> dict:
        """Store settings and what each filter dropped (from the cache when cached)."""
        d: dict[str, Any] = {"store": asdict(self.cfg), "seed": self.seed}
        if self.cfg.cache:
            self.load_cache()
            meta = self._cache_meta or {}
            d["filter_counts"] = meta.get("counts", {})
            d["cache_file"] = self.cache_path().name
            d["cache_vectors"] = meta.get("n_vectors")
        else:
            d["filter_counts"] = dict(self.counts)
        return d


__all__ = [
    "ActivationStore",
    "StoreConfig",
    "cache_root",
    "short_hash",
    "atomic_write_bytes",
    "atomic_write_json",
    "CACHE_ENV",
]
