"""The artifact store: one folder per stage output, written atomically, with a manifest.

An artifact folder holds safetensors shards of tensor groups (key ``"<group>::<factor>"``)
and ``manifest.json``: the stage, method, the params that stage read, the digests of its
inputs, library versions, the cache key, the list of files and the output digest. Writes
go to a temporary folder beside the target and are renamed into place when complete, so a
reader never sees half an artifact. Artifacts live at content addresses, so two writers of one
target write the same content: the first rename wins and a later writer discards its own
folder (a complete artifact is never replaced under a reader); only an incomplete folder, or
one of another key (DVC's fixed folders), is replaced. A stage that changes nothing (a method
without a decomposition) writes a manifest with ``passthrough`` naming its input instead of
copying data.

Several processes share one store, coordinated by flock(2) locks on files beside what they
guard (the kernel releases the locks of a process that dies): ``exclusive`` for one writer at a
time (``.NAME.writer``, removed by its holder), ``lease`` for every run that uses an artifact
(``.NAME.lease``, shared); ``remove_unleased`` deletes an artifact only while no run holds a
lease on it (sweep pruning, ``mergeflow gc``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.digests import content_key, folder_digest
from merging.errors import ArtifactError, CheckpointMismatchError
from merging.io.safetensors_header import TensorSlot, read_layout, read_tensor
from merging.io.shards import StreamingShardWriter
from merging.io.writer import INDEX, commit_dir, make_temp_dir, rename_noreplace, temp_sibling

__all__ = ["ArtifactWriter", "ArtifactReader", "read_manifest", "artifact_digest", "is_current", "relative_link", "linked_folders",
           "linked_data_folder",
           "write_manifest", "MANIFEST", "acquire_lock", "release_lock", "exclusive", "lease", "is_leased", "remove_unleased"]

MANIFEST = "manifest.json"
SEP = "::"
MASK, VALUES = "@mask", "@values"  # the parts of a tensor stored sparse (a selection: mostly zeros)
SPARSE_MIN = 1 << 16
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a tensor's bits, viewed as integers


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete artifact; ``ArtifactError`` when missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"artifact {folder} is missing or incomplete (no {MANIFEST}); rerun the stage that makes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"artifact {folder}: unreadable {MANIFEST} ({err}); delete the folder and rerun") from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """``manifest.json`` of an artifact folder, in the one canonical layout."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class ArtifactWriter:
    """Writes tensor groups into byte-bounded shards in a temporary folder beside ``target`` as
    they arrive (``StreamingShardWriter``: no group is held once added); ``commit`` writes the
    manifest and renames the folder into place."""

    def __init__(self, target: Path, manifest: dict[str, Any], max_shard_bytes: int = 1 << 30) -> None:
        self.target = Path(target)
        self.manifest = manifest
        self.folder = make_temp_dir(self.target.absolute())  # extra files may be written here before ``commit``
        self._shards = StreamingShardWriter(self.folder, max_shard_bytes)
        self._groups: dict[str, str] = {}
        self._zeros: dict[str, dict[str, list]] = {}  # group -> factor -> [shape, dtype] of an all-zero tensor
        self._sparse: dict[str, dict[str, list]] = {}  # group -> factor -> [shape, dtype] of one stored as mask + values

    def add_group(self, group: str, factors: dict[str, torch.Tensor]) -> None:
        self._groups[group] = ""
        stored = {}
        for name, tensor in factors.items():
            kind = [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
            if _all_zero_bits(tensor):  # recorded by shape and dtype, no bytes (untouched tensors' deltas)
                self._zeros.setdefault(group, {})[name] = kind
            elif (parts := _sparse_parts(tensor)) is not None:  # a selection: a bit mask and the kept entries
                self._sparse.setdefault(group, {})[name] = kind
                stored[f"{group}{SEP}{name}{MASK}"], stored[f"{group}{SEP}{name}{VALUES}"] = parts
            else:
                stored[f"{group}{SEP}{name}"] = tensor
        if stored:
            self._shards.add_group(stored)

    def commit(self, extra_files: list[str] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the last shard and the manifest, then move the folder into place. A complete
        artifact of the same key already there is kept and this one discarded (keys are
        content addresses: it is the same, and a reader may be using it)."""
        try:
            files = list(extra_files or [])
            if self._groups:
                weight_map = self._shards.finalize()
                for key, file in weight_map.items():
                    self._groups[key.split(SEP, 1)[0]] = file
                files += sorted(set(weight_map.values())) + ([INDEX] if (self.folder / INDEX).is_file() else [])
            compact = {k: v for k, v in (("zeros", self._zeros), ("sparse", self._sparse)) if v}
            digest = folder_digest(self.folder, files) if not compact else content_key([folder_digest(self.folder, files), compact])
            manifest = {**self.manifest, "files": sorted(files), "groups": self._groups, **compact,
                        "output_digest": digest, **(extra or {})}
            write_manifest(self.folder, manifest)
            _install(self.folder, self.target, manifest.get("cache_key"))
        except BaseException:
            self.abort()
            raise
        return self.target

    def abort(self) -> None:
        self._shards.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _install(folder: Path, target: Path, key: str | None) -> None:
    """Move the complete artifact ``folder`` to ``target`` unless ``target`` already holds a
    complete artifact of ``key`` (then ``folder`` is removed). The rename never replaces
    anything (``rename_noreplace``), so of concurrent writers exactly one succeeds; a target
    that is not current is replaced (moved aside, then removed)."""
    for _ in range(3):
        try:
            rename_noreplace(folder, target)
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if key is not None and is_current(target, key):
            shutil.rmtree(folder, ignore_errors=True)
            return
        try:
            commit_dir(folder, target, overwrite=True)
            return
        except OSError as err:  # another writer renamed its folder in between: look at it again
            if not isinstance(err, FileExistsError) and err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise ArtifactError(f"artifact {target}: other writers keep replacing it; rerun the stage")


def is_current(folder: str | Path, key: str) -> bool:
    """Whether ``folder`` holds a complete artifact made with cache key ``key`` (its manifest
    says so and every file it lists is still there)."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return manifest.get("cache_key") == key and all((Path(folder) / f).is_file() for f in manifest.get("files", []))


def artifact_digest(folder: str | Path) -> str:
    """The content identity of an artifact (what downstream cache keys depend on)."""
    manifest = read_manifest(folder)
    if manifest.get("passthrough") or manifest.get("recipe"):
        return manifest["cache_key"]
    return manifest["output_digest"]


def relative_link(target: str | Path, artifact: str | Path) -> str:
    """``target`` relative to ``artifact``'s folder, so a moved or cloned store still reads."""
    return os.path.relpath(Path(target).resolve(), Path(artifact).resolve())


def _resolve(artifact: Path, link: str) -> Path:
    """A path recorded in ``artifact``'s manifest: relative to the artifact folder itself."""
    return Path(link) if Path(link).is_absolute() else (artifact / link).resolve()


def linked_folders(folder: str | Path) -> set[Path]:
    """An artifact folder and every folder its manifest reaches (passthrough targets, partial
    artifacts), transitively: what must be kept for it to stay readable."""
    folder = Path(folder).resolve()
    if not (folder / MANIFEST).is_file():
        return {folder}
    manifest = read_manifest(folder)
    links = [*manifest.get("parts", []), *([manifest["passthrough"]] if manifest.get("passthrough") else [])]
    return {folder}.union(*(linked_folders(_resolve(folder, link)) for link in links))


def linked_data_folder(folder: str | Path) -> Path:
    """The folder holding the data of an artifact (its own, or its passthrough's, transitively)."""
    return _follow(Path(folder))[0]


def _follow(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding the data of an artifact, following ``passthrough`` manifests."""
    manifest = read_manifest(folder)
    seen = {folder.resolve()}
    while manifest.get("passthrough"):
        folder = _resolve(folder, manifest["passthrough"])
        if folder.resolve() in seen:
            raise ArtifactError(f"artifact {folder}: passthrough cycle")
        seen.add(folder.resolve())
        manifest = read_manifest(folder)
    return folder, manifest


class ArtifactReader:
    """Reads tensor groups of an artifact, following ``passthrough`` manifests and joining
    the partial artifacts an index manifest (``parts``) lists. Tensors are read with positional
    reads (``safetensors_header.read_tensor``): nothing stays mapped, threads may read at once."""

    def __init__(self, folder: str | Path) -> None:
        self.folder, self.manifest = _follow(Path(folder))
        if self.manifest.get("recipe"):
            raise ArtifactError(f"artifact {self.folder} is a recipe of stage {self.manifest.get('stage')!r}: it stores no "
                                "tensors, its readers compute them (merging.pipeline)")
        self._where: dict[str, tuple[Path, str]] = {}  # group -> (folder, file)
        self._zeros: dict[str, dict[str, list]] = {}
        self._sparse: dict[str, dict[str, list]] = {}
        parts = [_resolve(self.folder, p) for p in self.manifest.get("parts", [])]
        for part in parts or [self.folder]:
            part_folder, part_manifest = _follow(part) if parts else (self.folder, self.manifest)
            for group, file in part_manifest.get("groups", {}).items():
                self._where[group] = (part_folder, file)
            self._zeros.update(part_manifest.get("zeros", {}))
            self._sparse.update(part_manifest.get("sparse", {}))
        self._files: dict[Path, tuple[int, dict[str, dict[str, TensorSlot]]]] = {}  # fd, group -> factor -> slot
        self._lock = threading.Lock()

    def _open(self, path: Path) -> tuple[int, dict[str, dict[str, TensorSlot]]]:
        with self._lock:
            if path not in self._files:
                try:
                    layout = read_layout(path, f"artifact {self.folder}")
                except CheckpointMismatchError as err:
                    raise ArtifactError(f"{err}; rerun the stage that makes it") from None
                groups: dict[str, dict[str, TensorSlot]] = {}
                for key, slot in sorted(layout.items()):  # by name, as safe_open's keys() lists them
                    group, _, factor = key.partition(SEP)
                    groups.setdefault(group, {})[factor] = slot
                self._files[path] = (os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), groups)
            return self._files[path]

    def read_group(self, group: str) -> dict[str, torch.Tensor]:
        zeros = {factor: torch.zeros(shape, dtype=getattr(torch, dtype))
                 for factor, (shape, dtype) in self._zeros.get(group, {}).items()}
        if group not in self._where or not (self._where[group][1] or zeros):
            raise ArtifactError(f"artifact {self.folder} has no tensor group {group!r}")
        folder, file = self._where[group]
        if not file:
            return zeros
        fd, groups = self._open(folder / file)
        where = f"artifact {self.folder}, group {group!r} in {file}"
        stored = {factor: read_tensor(fd, slot, where) for factor, slot in groups.get(group, {}).items()}
        for factor, (shape, dtype) in self._sparse.get(group, {}).items():
            stored[factor] = _from_sparse_parts(stored.pop(factor + MASK), stored.pop(factor + VALUES), shape, getattr(torch, dtype))
        return {name: stored[name] if name in stored else zeros[name] for name in sorted({*stored, *zeros})}

    def close(self) -> None:
        with self._lock:
            while self._files:
                os.close(self._files.popitem()[1][0])

    def __del__(self) -> None:
        files = getattr(self, "_files", None)
        while files:
            os.close(files.popitem()[1][0])


def _sparse_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the bit mask of its non-zero entries, packed; those entries) of a CPU tensor of at least
    ``SPARSE_MIN`` entries at most half of which are non-zero bit patterns (-0.0 counts as
    non-zero, so it round-trips), else None. A dense prefix decides early, at the cost of a prefix."""
    as_int = _SAME_SIZE_INT.get(tensor.element_size()) if tensor.element_size() > 1 else None
    if as_int is None or tensor.numel() < SPARSE_MIN or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return None
    flat = tensor.reshape(-1)
    if int((flat[:4096].view(as_int) != 0).sum()) * 4 > 3 * min(4096, flat.numel()):
        return None
    nonzero = flat.view(as_int) != 0
    if int(nonzero.sum()) * 2 > flat.numel():
        return None
    return torch.from_numpy(np.packbits(nonzero.numpy())), flat[nonzero]


def _from_sparse_parts(mask: torch.Tensor, values: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``_sparse_parts`` split, bit for bit."""
    numel = math.prod(shape)
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).view(np.bool_))
    out = torch.zeros(numel, dtype=dtype)
    out[keep] = values
    return out.reshape(shape)


def _all_zero_bits(tensor: torch.Tensor) -> bool:
    """Every element of ``tensor`` is +0 bit for bit (-0.0 is not: it must round-trip)."""
    if tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    as_int = _SAME_SIZE_INT.get(tensor.element_size())
    if as_int is None:
        return False
    bits = tensor.view(as_int).reshape(-1)
    return not bool(bits[:4096].any()) and not bool(bits.any())  # a dense tensor is told apart by its first entries


# --- locks ------------------------------------------------------------------------------------

def acquire_lock(path: Path, *, shared: bool = False, timeout: float | None = None) -> int | None:
    """An open descriptor of ``path`` (created if missing) holding an flock(2) lock, exclusive
    or ``shared``; waits up to ``timeout`` seconds (None: as long as it takes, 0: not at all)
    and returns None when the lock stayed taken. The holder of an exclusive lock may remove the
    file (``release_lock``): a waiter that then gets the lock of the removed file tries again
    on the path's new file, so two holders never hold locks on different files of one path."""
    deadline = None if timeout is None else time.monotonic() + timeout
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if deadline is None:
                fcntl.flock(fd, mode)
            else:
                while not _try_flock(fd, mode):
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return None
                    time.sleep(0.05)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:  # removed by its last holder while we waited: take the new one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def release_lock(fd: int, path: Path | None = None) -> None:
    """Release a lock from ``acquire_lock``; with ``path`` (exclusive holders only) remove its
    file first, so lock files do not pile up."""
    try:
        if path is not None:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _sibling(target: Path, kind: str) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.{kind}"


@contextlib.contextmanager
def exclusive(target: str | Path) -> Iterator[None]:
    """Held by the one process at a time that writes ``target`` (a file or folder; the lock
    is ``.NAME.writer`` beside it, whose parent is created)."""
    path = _sibling(Path(target), "writer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = acquire_lock(path)
    try:
        yield
    finally:
        release_lock(fd, path)


@contextlib.contextmanager
def lease(folder: str | Path) -> Iterator[None]:
    """Held by a run for as long as it uses the artifact ``folder`` (present or still to be
    made): ``remove_unleased`` leaves it alone meanwhile. Waits only while a remover is
    deleting the folder (a run then finds it missing and recomputes it)."""
    path = _sibling(Path(folder), "lease")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = acquire_lock(path, shared=True)
    try:
        yield
    finally:
        release_lock(fd)


def is_leased(folder: str | Path) -> bool:
    """Whether a run holds a lease on ``folder`` now."""
    path = _sibling(Path(folder), "lease")
    if not path.exists():
        return False
    fd = acquire_lock(path, timeout=0)
    if fd is None:
        return True
    release_lock(fd)
    return False


def remove_unleased(folder: str | Path) -> bool:
    """Delete the artifact ``folder`` (and its lease file) unless a run holds a lease on it;
    returns whether it was deleted. Runs asking for a lease meanwhile wait for the removal."""
    path = _sibling(Path(folder), "lease")
    fd = acquire_lock(path, timeout=0)
    if fd is None:
        return False
    try:
        if Path(folder).is_dir():
            aside = temp_sibling(Path(folder).absolute(), "old")  # one rename: never half a folder at its name
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        release_lock(fd, path)
    return True
