"""Atomic checkpoints: readers see a complete old checkpoint or a complete new one, never torn.

Each checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name with ``os.replace`` (atomic on POSIX), and the directory is fsynced so
the rename itself survives a power cut. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
_TEMP_PREFIX = ".ckpt-"
_TEMP_SUFFIX = ".tmp"
FORMAT = 1


class CheckpointError(Exception):
    """No usable checkpoint, or one made by a different run configuration."""


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return directory / f"ckpt-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as ``step``'s checkpoint atomically; prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        with contextlib.suppress(OSError):
            old.unlink()
    return final


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temporary files a killed writer left behind; returns how many."""
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint (tensors and plain containers only: ``weights_only``)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise CheckpointError(f"{path} is not a wattwarden checkpoint (format {FORMAT})")
    return state


def load_latest(
    directory: Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint in ``directory``, or None if there is none.

    An unreadable newest checkpoint (a disk error: rename makes torn writes impossible) is
    skipped with a warning in favour of the one before it.
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None
