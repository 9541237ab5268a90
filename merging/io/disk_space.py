"""Free disk checked before a merge or a stage writes: fail at once, saying how much is missing,
rather than after minutes of merging with a half-written folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from merging.errors import InsufficientDiskSpaceError

__all__ = ["check_free_space", "human_bytes"]

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def human_bytes(count: int) -> str:
    """``1234567890`` -> ``"1.23 GB"`` (decimal units, as ``shard_size`` reads them)."""
    if count < 1000:
        return f"{count} B"
    value = count / 1000
    for unit in _UNITS[1:-1]:
        if value < 1000:
            return f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} {_UNITS[-1]}"


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (the file system it will be written on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(target: str | Path, needed: int, what: str) -> None:
    """Raise ``InsufficientDiskSpaceError`` when the file system that will hold ``target`` has
    less than ``needed`` bytes free (``what`` names the output in the message)."""
    free = shutil.disk_usage(_existing_ancestor(Path(target))).free
    if free < needed:
        raise InsufficientDiskSpaceError(
            f"not enough free disk to write {what} at {target}: it needs {human_bytes(needed)}, the file system has "
            f"{human_bytes(free)} free ({human_bytes(needed - free)} missing); free some space or choose another path")
