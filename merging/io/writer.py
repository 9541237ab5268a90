"""Writing files and folders atomically (models, artifacts, reports).

``atomic_output_dir`` yields a temporary folder beside the target and renames it into place
only when the body completes; on any error the temporary folder is removed and an existing
target is left untouched. (The safetensors shards written into it: ``merging.io.shards``.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from merging.errors import OutputExistsError, OutputWriteError

__all__ = ["atomic_output_dir", "atomic_write", "atomic_write_text", "commit_dir", "make_temp_dir", "parse_size", "temp_sibling", "remove_stale_temps", "rename_noreplace", "refuse_overlap", "INDEX"]

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
