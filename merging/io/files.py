"""Opening the files of an input model folder without trusting them.

Every file mergeflow reads from a model folder (weights, index, config, tokenizer) goes
through ``model_file``: it must be a regular file (no FIFO, device, directory or symlink
loop), and it must resolve inside the model folder or inside a cache that legitimately
links model files from elsewhere: the Hugging Face hub cache (snapshots link to
``../../blobs``) or a DVC cache (``dvc checkout`` with symlink links). An index entry such
as ``../../other/model.safetensors``, an absolute path, or a tokenizer file symlinked to
``~/.ssh/id_rsa`` is refused. JSON files are read with a size cap.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from merging.errors import CheckpointMismatchError, CheckpointNotFoundError

__all__ = ["model_file", "read_json_object", "allowed_roots", "MAX_JSON_BYTES"]

MAX_JSON_BYTES = 64 * 2**20  # an index of a 400B-parameter model is a few MB


def _hub_cache() -> Path | None:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    return Path(HF_HUB_CACHE).expanduser().resolve()


def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may live once symlinks are followed: the folder itself,
    the Hugging Face hub cache, and the DVC cache of any project the folder sits in."""
    folder = Path(folder).absolute()
    roots = [folder.resolve()]
    hub = _hub_cache()
    if hub is not None:
        roots.append(hub)
    for parent in (folder, *folder.parents):
        cache = parent / ".dvc" / "cache"
        if cache.is_dir():
            roots.append(cache.resolve())
    return roots


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def model_file(folder: Path, name: str, owner: str, *, required: bool = True) -> Path | None:
    """``folder / name`` checked: a relative name, a regular file that resolves inside
    ``allowed_roots(folder)``. ``None`` when it is absent and not ``required``.

    Raises:
        CheckpointMismatchError: an escaping name or link, or a file that is not regular.
        CheckpointNotFoundError: a required file is missing.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointMismatchError(f"{owner}: file name {name!r} must be a relative path inside {folder} "
                                      "(no absolute paths, no '..')")
    path = Path(folder) / name
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointMismatchError(f"{owner}: {path} is a dangling symlink (to {os.readlink(path)})") from None
        if required:
            raise CheckpointNotFoundError(f"{owner}: {path} does not exist") from None
        return None
    except OSError as err:  # ELOOP, EACCES, ENAMETOOLONG
        raise CheckpointMismatchError(f"{owner}: cannot open {path}: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "device or special file"
        raise CheckpointMismatchError(f"{owner}: {path} is a {kind}, not a regular file")
    resolved = path.resolve()
    if not any(_inside(resolved, root) for root in allowed_roots(folder)):
        raise CheckpointMismatchError(
            f"{owner}: {path} resolves to {resolved}, outside the model folder and the Hugging Face / DVC caches; "
            "copy the file into the folder if it belongs to the model")
    return path


def read_json_object(path: Path, owner: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON file that must hold an object (``config.json``, an index), size-capped."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointMismatchError(f"{owner}: {path} is {size} bytes, more than the {max_bytes}-byte limit of a JSON file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointMismatchError(f"{owner}: {path} is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointMismatchError(f"{owner}: {path} must hold a JSON object, got {type(data).__name__}")
    return data
