"""Files on disk: atomic writes, whole-folder saves, reading with errors that name the file,
and the repository and cache roots.

Every write goes to a temporary sibling and is renamed into place, so a reader (or a run
killed half-way) sees the old file or the new one, never a mixture. Files are 0644 and folders
0755 (minus the umask), whatever the temporary-file functions would have given them.

    from adaptive_sae import io
    io.write_json("results/x/metrics.json", {"nmse": 0.3})
    with io.atomic_folder("ckpt/step_00000100") as tmp:   # appears whole, or not at all
        io.save_tensors(tensors, tmp / "sae.safetensors")
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

CACHE_ENV = "ADAPTIVE_SAE_CACHE"
"""Environment variable that overrides the cache root (activation caches, tiny models)."""

TMP_PREFIX = ".tmp_"
"""Temporary siblings of folders being saved start with this; a killed save leaves one behind."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Mode of every file written here (0644 under the usual umask 022)."""
DIR_MODE = 0o777 & ~_umask()


class FileFormatError(ValueError):
    """A file exists but cannot be read: the message names the file, the problem and the fix."""


# ----------------------------------------------------------------------------- roots


def find_repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    this project (a ``pyproject.toml`` beside ``lib/adaptive_sae``); falls back to the folder
    the package is installed from; None when neither is a checkout."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "lib" / "adaptive_sae").is_dir():
            return folder
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / "pyproject.toml").is_file():
        return package_root
    return None


def cache_root() -> Path:
    """``$ADAPTIVE_SAE_CACHE``, else ``.cache/adaptive_sae`` in the repository root, else in
    the working directory."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    root = find_repo_root()
    return (root if root is not None else Path.cwd()) / ".cache" / "adaptive_sae"


# ----------------------------------------------------------------------------- writing


def check_writable(directory: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``directory`` if needed and prove a file can be written in it; raise
    PermissionError naming the folder and the fix otherwise (before hours of work, not after)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            f"cannot write in the {what} {directory} ({e.strerror or e}); choose a folder you "
            f"can write to, or fix its permissions."
        ) from e
    return directory


def _tmp_prefix(path: Path) -> str:
    # the writer's process id in the name tells a killed write from a running one
    return f".{path.name}.p{os.getpid()}."


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors,
    torch, numpy); renamed onto ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, dataclasses, paths and sets into JSON types.
    Non-finite floats become None (JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    if hasattr(obj, "_asdict"):
        return to_jsonable(obj._asdict())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV (no index), atomically; gzip-compressed when the name
    ends in ``.gz`` (with no timestamp in the header, so equal tables give equal bytes)."""
    text = df.to_csv(index=False, float_format="%.8g")
    if str(path).endswith(".gz"):
        import gzip

        return atomic_write_bytes(path, gzip.compress(text.encode(), mtime=0))
    return atomic_write_text(path, text)


def save_tensors(tensors: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a dict of tensors as safetensors (moved to the CPU, made contiguous), atomically."""
    from safetensors.torch import save_file

    with _atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (optimizer state)."""
    import torch

    with _atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_npy(array: Any, path: str | os.PathLike) -> Path:
    """``numpy.save`` atomically."""
    import numpy as np

    with _atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
    return Path(path)


# ----------------------------------------------------------------------------- whole folders


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def replace_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put folder ``src`` at ``dest``. An existing ``dest`` is swapped out in one step where the
    system allows it, else renamed aside first; it is deleted only once ``src`` is in place."""
    src, dest = Path(src), Path(dest)
    if not dest.exists():
        os.replace(src, dest)
        return dest
    if _exchange(src, dest):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old contents
        return dest
    old = dest.with_name(f"{TMP_PREFIX}old_{dest.name}.p{os.getpid()}.x")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh sibling temporary folder; when the block succeeds it replaces ``dest``
    as one unit (two concurrent saves give one whole folder or the other, never a mixture)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{dest.name}.p{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(folder: str | os.PathLike, own: Iterable[str], what: str) -> Path:
    """Refuse to replace ``folder`` (as ``atomic_folder`` does) when it holds anything but the
    files named in ``own`` (hidden files aside): a save must not delete a user's other files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose another path.")
    if folder.is_dir():
        own = set(own)
        other = sorted(
            p.name for p in folder.iterdir() if p.name not in own and not p.name.startswith(".")
        )
        if other:
            raise FileExistsError(
                f"{folder} holds other files ({', '.join(other[:5])}); a save replaces the whole "
                f"folder, so save {what} into a new folder or one holding only an earlier save."
            )
    return folder


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what killed writes left in ``directory``: ``.tmp_*`` folders and ``.*.tmp`` files
    of processes that no longer run (a live writer's temporaries are left alone)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not (p.name.startswith(TMP_PREFIX) or (p.name.startswith(".") and ".tmp" in p.name)):
            continue
        if _owner_alive(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


_PID = re.compile(r"\.p(\d+)\.|_(\d+)$")


def _owner_alive(name: str) -> bool:
    """Whether a temporary's name carries the id of a running process other than this one;
    names without one (older versions) belong to nobody alive."""
    m = _PID.search(name)
    if m is None:
        return False
    pid = int(m.group(1) or m.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, another user's
    except (OSError, OverflowError):
        return False
    return True


# ----------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """Parse a JSON file; a malformed one raises FileFormatError naming it and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(
            f"{path} is not valid JSON ({e}); {fix or 'restore or delete the file.'}"
        ) from e


def load_tensors(path: str | os.PathLike, fix: str = "", device: str = "cpu") -> dict:
    """Read a safetensors file; a truncated or foreign one raises FileFormatError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or was not "
            f"written by this package. {fix or 'Restore or delete the file.'}"
        ) from e


def load_torch(path: str | os.PathLike, fix: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load`` (weights only) with an error naming a truncated or foreign file."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise FileFormatError(
            f"{path} is not a readable torch file ({type(e).__name__}: {e}); it is truncated "
            f"or was not written by this package. {fix or 'Restore or delete the file.'}"
        ) from e


__all__ = [
    "CACHE_ENV",
    "DIR_MODE",
    "FILE_MODE",
    "FileFormatError",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_root",
    "check_writable",
    "find_repo_root",
    "load_tensors",
    "load_torch",
    "read_json",
    "remove_stale_temporaries",
    "replace_folder",
    "save_npy",
    "save_tensors",
    "save_torch",
    "to_jsonable",
    "write_csv",
    "write_json",
]
