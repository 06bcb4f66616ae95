"""A damaged activation cache is named with what is wrong and the fix (issue 13, item 9)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from adaptive_sae.data.store import ActivationStore, StoreConfig
from adaptive_sae.io import FileFormatError

D = 4


def _store(tmp_path) -> ActivationStore:
    def harvest(ctx: torch.Tensor) -> torch.Tensor:  # (n, T) ids -> (n, T, D)
        g = torch.Generator().manual_seed(int(ctx.sum()))
        return torch.randn(*ctx.shape, D, generator=g)

    def contexts(pass_idx: int):
        for i in range(10):
            yield torch.full((2, 6), i + 1)

    cfg = StoreConfig(buffer_tokens=16, cache=True, cache_tokens=80, cache_dir=str(tmp_path))
    return ActivationStore(harvest, contexts, D, cfg, seed=0, provenance={"probe": 1})


@pytest.fixture
def cache(tmp_path):
    store = _store(tmp_path)
    path = store.build_cache()
    assert store.load_cache().shape == (80, D)
    return path


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(path):
    np.save(path, np.array([{"not": "activations"}], dtype=object), allow_pickle=True)


def _short(path):
    np.save(path, np.load(path)[:50])


def _wrong_width(path):
    np.save(path, np.zeros((80, D + 1), dtype=np.float32))


def _wrong_dtype(path):
    np.save(path, np.load(path).astype(np.float64))


def _garbage(path):
    path.write_bytes(pickle.dumps({"x": 1}))


@pytest.mark.parametrize(
    "damage,what",
    [
        (_truncate, "truncated"),
        (_foreign, "object"),
        (_short, "holds 50 vectors"),
        (_wrong_width, "shape"),
        (_wrong_dtype, "float64"),
        (_garbage, "not a .npy"),
    ],
)
def test_a_damaged_cache_names_the_file_and_says_delete_it(cache, tmp_path, damage, what):
    damage(cache)
    with pytest.raises(FileFormatError) as err:
        _store(tmp_path).load_cache()
    message = str(err.value)
    assert str(cache) in message and what in message and "delete" in message


def test_an_array_without_its_sidecar_is_not_used(cache, tmp_path):
    cache.with_suffix(".json").unlink()
    with pytest.raises(FileFormatError, match="interrupted"):
        _store(tmp_path).load_cache()


def test_a_damaged_sidecar_is_named(cache, tmp_path):
    cache.with_suffix(".json").write_text("{nonsense")
    with pytest.raises(FileFormatError, match=str(cache.with_suffix(".json"))):
        _store(tmp_path).load_cache()


def test_the_cache_is_written_0644(cache):
    from adaptive_sae.io import FILE_MODE

    assert cache.stat().st_mode & 0o777 == FILE_MODE
    assert cache.with_suffix(".json").stat().st_mode & 0o777 == FILE_MODE
