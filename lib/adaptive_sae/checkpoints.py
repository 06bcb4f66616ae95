"""Training checkpoints: one folder per saved step, written whole or not at all, and resume.

    <checkpoint_dir>/
        latest                  the name of the newest checkpoint ("step_00000100")
        step_00000100/          sae.safetensors, cfg.json (SparseAutoencoder.save),
                                stats.safetensors, optimizer.pt, train_cfg.json,
                                history.csv, trainer_state.json

A checkpoint folder is built beside its final place and renamed in (an existing one of the
same step is swapped out in one step), then ``latest`` is rewritten; so a kill at any moment
leaves every ``step_*`` folder complete. Should ``latest`` still name a missing or incomplete
folder (a copy written by an older version), :func:`latest_checkpoint` falls back to the
newest complete one and says so.

One folder holds one run: :func:`prepare` (called before the first step) refuses to start a
new run in a folder that holds another's checkpoints, because pruning and ``latest`` would mix
the two. Continue that run with ``resume_from``, choose another folder, or :func:`clear` it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from . import io
from .config import SAEConfig, TrainConfig

LATEST = "latest"
STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
STATS_FILE = "stats.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_CFG_FILE = "train_cfg.json"
HISTORY_FILE = "history.csv"
SAE_WEIGHTS_FILE = "sae.safetensors"
SAE_CONFIG_FILE = "cfg.json"
REQUIRED = (SAE_WEIGHTS_FILE, SAE_CONFIG_FILE, STATS_FILE, OPTIMIZER_FILE, TRAIN_CFG_FILE)
REQUIRED += (STATE_FILE,)

BOOKKEEPING_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "device")
"""TrainConfig fields that do not change what is computed: a resume may change them."""

_STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be used as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- finding


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file of a checkpoint."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED)


def step_folders(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_*`` folder under ``root``, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def holds_run(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds checkpoints of some run."""
    root = Path(root)
    return (root / LATEST).exists() or (root / STATE_FILE).exists() or bool(step_folders(root))


def latest_checkpoint(root: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``root`` itself when it is one, else the folder that
    ``root/latest`` names; when that is missing or incomplete, the newest complete ``step_*``
    folder (with a warning saying so)."""
    root = Path(root)
    if (root / STATE_FILE).exists():
        return root
    pointer = root / LATEST
    named = None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = [p for _, p in step_folders(root) if is_complete(p)]
    if not complete:
        if named is not None:
            raise CheckpointError(
                f"{pointer} names {named.name}, which is missing or incomplete, and {root} "
                f"holds no other complete checkpoint; start the run again."
            )
        raise FileNotFoundError(
            f"no checkpoint in {root}: expected a '{LATEST}' file written by train(..., "
            f"checkpoint_dir={str(root)!r})."
        )
    chosen = complete[-1]
    why = f"names {named.name}, which is missing or incomplete" if named else "is missing"
    warnings.warn(
        f"{pointer} {why}; resuming from the newest complete checkpoint {chosen}.",
        stacklevel=2,
    )
    return chosen


# ----------------------------------------------------------------------------- before a run


def prepare(
    root: str | os.PathLike,
    *,
    resume_from: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Make ``root`` ready for a run's checkpoints; call it before the first training step.

    Checks that ``root`` can be written (so a bad folder fails now, not after training),
    removes what killed saves left behind, and refuses a new run in a folder holding another
    run's checkpoints unless ``overwrite`` (then those are deleted). Resuming into the folder
    one resumes from is always allowed.
    """
    root = Path(root)
    io.check_writable(root, "checkpoint_dir")
    io.remove_stale_temporaries(root)
    same = resume_from is not None and _same_run_folder(root, Path(resume_from))
    if same or not holds_run(root):
        return root
    if overwrite:
        clear(root)
        return root
    steps = [s for s, _ in step_folders(root)]
    held = f"checkpoints of steps {steps}" if steps else "a checkpoint"
    raise CheckpointError(
        f"checkpoint_dir {root} already holds {held} of another run; a new run there would "
        f"mix the two. Continue that run with train(..., resume_from={str(root)!r}), write to "
        f"another checkpoint_dir, or delete its checkpoints first with "
        f"adaptive_sae.checkpoints.clear({str(root)!r})."
    )


def _same_run_folder(root: Path, resume_from: Path) -> bool:
    resume_from = resume_from.resolve()
    root = root.resolve()
    return resume_from == root or resume_from.parent == root


def clear(root: str | os.PathLike) -> None:
    """Delete the checkpoints (``latest``, ``step_*``, temporaries) in ``root``; other files
    stay."""
    root = Path(root)
    for _, folder in step_folders(root):
        shutil.rmtree(folder)
    (root / LATEST).unlink(missing_ok=True)
    io.remove_stale_temporaries(root)


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    sae: Any,
    stats_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    tcfg: TrainConfig,
    trainer_state: dict[str, Any],
    history: Any = None,
) -> Path:
    """Write ``root/step_<step>`` as one unit, point ``latest`` at it, and keep the
    ``tcfg.keep_checkpoints`` newest steps up to this one. ``history`` (a DataFrame) is
    written as CSV for reading; resume uses ``trainer_state``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries(root)
    name = step_name(step)
    with io.atomic_folder(root / name) as tmp:
        sae.save(tmp)  # first: a save that replaces its folder must not drop the others
        io.save_tensors(stats_state, tmp / STATS_FILE)
        io.save_torch(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        io.atomic_write_text(tmp / TRAIN_CFG_FILE, tcfg.to_json())
        if history is not None:
            io.write_csv(tmp / HISTORY_FILE, history)
        # plain json: NaN stays NaN, so a resumed history equals an uninterrupted one
        io.atomic_write_text(tmp / STATE_FILE, json.dumps({**trainer_state, "step": step}))
    io.atomic_write_text(root / LATEST, name)
    _prune(root, step, tcfg.keep_checkpoints)
    return root / name


def _prune(root: Path, current: int, keep: int) -> None:
    """Keep the ``keep`` newest steps at or below ``current`` (never ``current`` itself)."""
    older = [p for s, p in step_folders(root) if s <= current]
    for folder in older[: max(0, len(older) - max(1, keep))]:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def load_checkpoint(
    where: str | os.PathLike,
    sae: Any,
    stats: Any,
    optimizer: torch.optim.Optimizer,
    cfg: SAEConfig,
    tcfg: TrainConfig,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load the checkpoint at ``where`` (a run folder or one step folder) into ``sae``,
    ``stats`` and ``optimizer`` (on ``device``, whatever device wrote it) and return the
    trainer state (``step`` and the trainer's own entries). The saved configurations must
    match ``cfg`` and ``tcfg`` except for the bookkeeping fields (BOOKKEEPING_FIELDS)."""
    root = Path(where)
    ckpt = latest_checkpoint(root)
    fix = _fix_for(ckpt)
    saved_tcfg = io.read_json(ckpt / TRAIN_CFG_FILE, fix)
    diff = config_differences(saved_tcfg, tcfg, ignore=BOOKKEEPING_FIELDS)
    if diff:
        raise CheckpointError(
            f"checkpoint {ckpt} was written with a different TrainConfig ({diff}); resume with "
            f"the checkpoint's values (only {', '.join(BOOKKEEPING_FIELDS)} may change)."
        )
    saved_cfg = io.read_json(ckpt / SAE_CONFIG_FILE, fix)
    diff = config_differences(saved_cfg, cfg)
    if diff:
        raise CheckpointError(
            f"checkpoint {ckpt} holds an SAE with a different SAEConfig ({diff}); resume "
            f"with the checkpoint's SAEConfig."
        )
    state = io.load_tensors(ckpt / SAE_WEIGHTS_FILE, fix)
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{ckpt / SAE_WEIGHTS_FILE} lacks tensors {sorted(missing)}; {fix}")
    sae.load_state_dict(state)
    stats.load_state_dict(io.load_tensors(ckpt / STATS_FILE, fix))
    optimizer.load_state_dict(io.load_torch(ckpt / OPTIMIZER_FILE, fix, map_location=device))
    trainer_state = io.read_json(ckpt / STATE_FILE, fix)
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
        raise io.FileFormatError(f"{ckpt / STATE_FILE} has no integer 'step'; {fix}")
    return trainer_state


def _fix_for(ckpt: Path) -> str:
    """What to do when a file of ``ckpt`` is damaged: resume from the previous checkpoint."""
    earlier = [p for _, p in step_folders(ckpt.parent) if p != ckpt and is_complete(p)]
    if _STEP_DIR.match(ckpt.name) and earlier:
        return (
            f"resume from the previous checkpoint instead: resume_from={str(earlier[-1])!r} "
            f"(or delete {ckpt} and resume from {str(ckpt.parent)!r})."
        )
    return "this checkpoint cannot be used; start the run again."


def config_differences(saved: dict[str, Any], current: Any, ignore: tuple[str, ...] = ()) -> str:
    """``"lr: checkpoint 0.001, now 0.002; ..."`` for the fields where the saved dict and the
    current config differ (saved fields the config no longer has are ignored)."""
    now = current.to_dict()
    known = {k: v for k, v in saved.items() if k in now}
    try:
        then = type(current).from_dict(known).to_dict()  # same normalisation (lists, numbers)
    except ValueError:
        then = known
    parts = [
        f"{k}: checkpoint {then[k]!r}, now {now[k]!r}"
        for k in now
        if k not in ignore and k in then and then[k] != now[k]
    ]
    return "; ".join(parts)


__all__ = [
    "BOOKKEEPING_FIELDS",
    "CheckpointError",
    "clear",
    "config_differences",
    "holds_run",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare",
    "save_checkpoint",
    "step_folders",
    "step_name",
]
