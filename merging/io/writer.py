"""Writing folders atomically, and byte-bounded safetensors shards (models and artifacts).

``atomic_output_dir`` yields a temporary folder beside the target and renames it into place
only when the body completes; on any error the temporary folder is removed and an existing
target is left untouched. ``ShardedWriter`` flushes a shard to disk as soon as the next
tensor would push it past ``max_shard_bytes``, so at most one shard is held in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from merging.errors import OutputExistsError, OutputWriteError

__all__ = ["atomic_output_dir", "atomic_write", "atomic_write_text", "commit_dir", "make_temp_dir", "ShardedWriter", "parse_size", "temp_sibling", "remove_stale_temps", "rename_noreplace", "refuse_overlap", "INDEX"]

INDEX = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MiB"``, ``"100M"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"cannot read size {value!r}; use bytes or e.g. '5GB', '500MiB'")
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    if unit in ("K", "M", "G", "T"):
        unit += "B"
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError, OverflowError):
        raise ValueError(f"cannot read size {value!r}; use bytes or e.g. '5GB', '500MiB'") from None


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>-<random>`` beside ``target`` (the pid lets later runs tell
    leftovers of killed writers from folders still being written)."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(target: Path) -> None:
    """Remove temporary and set-aside siblings of ``target`` left by writers that were killed."""
    for path in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        try:
            pid = int(path.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _alive(pid):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, symlink or folder tree, whichever ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _libc_renameat2():
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _libc_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists, checked by the rename itself
    (``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere, or on file systems without it, under
    a lock file beside ``dst`` that every mergeflow writer takes). Raises ``FileExistsError``."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(dst))
    lock = dst.parent / f".{dst.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:  # a lock left by a killed writer
                holder = int(lock.read_text() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and _alive(holder):
                raise FileExistsError(errno.EEXIST, f"{dst} is being written by process {holder}", str(dst)) from None
            lock.unlink(missing_ok=True)
    else:
        raise FileExistsError(errno.EEXIST, f"cannot lock {dst}", str(dst))
    try:
        os.write(fd, str(os.getpid()).encode())
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through a temporary sibling and rename it into place: readers see the old
    or the new content, never half of it, and a hardlinked earlier version is never rewritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _exists_error(target: Path) -> OutputExistsError:
    what = f"a symlink to {os.readlink(target)}" if target.is_symlink() else "a file" if not target.is_dir() else "a folder"
    return OutputExistsError(f"output {target} already exists ({what}); choose another path or pass --overwrite")


def commit_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete folder ``tmp`` onto ``target``. The rename itself refuses an
    existing target (so of two concurrent writers exactly one wins); with ``overwrite`` the
    existing target (folder, file or symlink) is first moved aside, removed after the rename."""
    try:
        try:
            rename_noreplace(tmp, target)
            return
        except FileExistsError:
            if not overwrite:
                raise _exists_error(target) from None
        old = temp_sibling(target, "old")
        try:
            target.rename(old)
        except FileNotFoundError:
            old = None
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            if old is not None:  # another writer got there in between: theirs stays, ours is dropped
                _remove(old)
            raise _exists_error(target) from None
        if old is not None:
            _remove(old)
    except OSError as err:
        if isinstance(err, OutputExistsError):
            raise
        raise OutputWriteError(f"cannot write {target}: {err.strerror or err} (nothing was changed)") from None


def make_temp_dir(target: Path) -> Path:
    """A new temporary folder beside ``target`` (its parent created; leftovers of killed
    writers removed), or an ``OutputWriteError`` saying why it cannot be made."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(f"cannot write {target}: cannot create its parent folder {parent} ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {target}: no write permission on {parent}")
    remove_stale_temps(target)
    tmp = temp_sibling(target)
    try:
        tmp.mkdir()
    except OSError as err:
        raise OutputWriteError(f"cannot create a temporary folder in {parent}: {err.strerror or err}") from None
    return tmp


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder that becomes ``target`` when the ``with`` body completes; on any
    error (or signal-raised exception) it is removed and an existing target is untouched.
    Running out of space (or quota, or a read-only file system) is an ``OutputWriteError``."""
    target = Path(target).absolute()
    if os.path.lexists(target) and not overwrite:
        raise _exists_error(target)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        commit_dir(tmp, target, overwrite)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OutputWriteError | OutputExistsError) or err.errno not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(f"cannot write {target}: {err.strerror} (nothing was written)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_overlap(target: str | Path, inputs: dict[str, Path]) -> None:
    """Refuse an output that is, contains, or lies inside an input (after symlinks): with
    ``--overwrite`` it would destroy the input, without it the input would be written into."""
    out = Path(target).absolute().resolve()
    for name, folder in inputs.items():
        source = Path(folder).absolute().resolve()
        relation = ("is" if out == source else "lies inside" if source in out.parents
                    else "contains" if out in source.parents else None)
        if relation is not None:
            raise OutputExistsError(f"output {target} {relation} the input {name} ({folder}); "
                                    "write the merged model somewhere else")


class ShardedWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (a single tensor larger
    than that gets a shard of its own) and writes the Hugging Face index at ``finalize``."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        # one metadata key only: safetensors writes a multi-key map in arbitrary order,
        # which would make identical merges differ byte-wise
        self.metadata = {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that must share a shard (a tensor group's factors)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for name, tensor in tensors.items():
            self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_group({name: tensor})

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.safetensors.partial"
        try:
            save_file(self._pending, str(path), metadata=self.metadata)
        except SafetensorError as err:  # the library reports I/O errors as text: keep their errno
            found = re.search(r"os error (\d+)", str(err))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from None
        path.chmod(0o644)
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finalize(self) -> dict[str, str]:
        """Write the last shard, name the shards, write the index (when there are several);
        returns the weight map, tensor name -> file name."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return dict.fromkeys(self._shards[0][1], "model.safetensors")
        weight_map: dict[str, str] = {}
        for i, (path, tensors) in enumerate(self._shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
