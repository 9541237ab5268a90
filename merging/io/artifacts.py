"""The artifact store: one folder per stage output, written atomically, with a manifest.

An artifact folder holds safetensors shards of tensor groups (key ``"<group>::<factor>"``)
and ``manifest.json``: the stage, method, the params that stage read, the digests of its
inputs, library versions, the cache key, the list of files and the output digest. Writes
go to a temporary folder beside the target and are renamed into place when complete, so a
reader never sees half an artifact; when two writers produce the same target, the first
complete one wins and the other is discarded. A stage that changes nothing (a method
without a decomposition) writes a manifest with ``passthrough`` naming its input instead of
copying data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.errors import ArtifactError
from merging.io.writer import remove_stale_temps, temp_sibling

__all__ = ["ArtifactWriter", "ArtifactReader", "read_manifest", "file_digest", "folder_digest", "replace_dir", "MANIFEST"]

MANIFEST = "manifest.json"
SEP = "::"


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, files: list[str]) -> str:
    """sha256 over (name, content digest) of the listed files, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(file_digest(folder / name).encode())
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete artifact; ``ArtifactError`` when missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"artifact {folder} is missing or incomplete (no {MANIFEST}); rerun the stage that makes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"artifact {folder}: unreadable {MANIFEST} ({err}); delete the folder and rerun") from None


@dataclass
class ArtifactWriter:
    """Collects tensor groups into shards in a temporary folder; ``commit`` renames it onto
    ``target`` together with the manifest."""

    target: Path
    manifest: dict[str, Any]
    max_shard_bytes: int = 1 << 30
    _tmp: Path = field(init=False)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict, init=False)
    _pending_bytes: int = field(default=0, init=False)
    _files: list[str] = field(default_factory=list, init=False)
    _groups: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.target = Path(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.target)
        self._tmp = temp_sibling(self.target)
        self._tmp.mkdir()

    @property
    def folder(self) -> Path:
        """The temporary folder (extra files may be written here before ``commit``)."""
        return self._tmp

    def add_group(self, group: str, factors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in factors.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for name, tensor in factors.items():
            self._pending[f"{group}{SEP}{name}"] = tensor.detach().to("cpu").contiguous()
        self._groups[group] = ""
        self._pending_bytes += size

    def _flush(self) -> None:
        name = f"tensors-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self._tmp / name), metadata={"format": "pt"})
        for key in self._pending:
            self._groups[key.split(SEP, 1)[0]] = name
        self._files.append(name)
        self._pending, self._pending_bytes = {}, 0

    def commit(self, extra_files: list[str] | None = None) -> Path:
        """Write the last shard and the manifest, then move the folder into place."""
        try:
            if self._pending:
                self._flush()
            files = self._files + list(extra_files or [])
            manifest = {**self.manifest, "files": sorted(files), "groups": self._groups,
                        "output_digest": folder_digest(self._tmp, files)}
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            replace_dir(self._tmp, self.target)
        except BaseException:
            self.abort()
            raise
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; an existing target is moved aside first and removed."""
    if target.exists():
        old = temp_sibling(target, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / MANIFEST).is_file():  # a concurrent writer finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise


def _resolve(artifact: Path, link: str) -> Path:
    """A path recorded in ``artifact``'s manifest: relative to the artifact folder itself."""
    return Path(link) if Path(link).is_absolute() else (artifact / link).resolve()


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
    the partial artifacts an index manifest (``parts``) lists."""

    def __init__(self, folder: str | Path) -> None:
        self.folder, self.manifest = _follow(Path(folder))
        self._where: dict[str, tuple[Path, str]] = {}  # group -> (folder, file)
        parts = [_resolve(self.folder, p) for p in self.manifest.get("parts", [])]
        for part in parts or [self.folder]:
            part_folder, part_manifest = _follow(part) if parts else (self.folder, self.manifest)
            for group, file in part_manifest.get("groups", {}).items():
                self._where[group] = (part_folder, file)
        self._handles: dict[Path, Any] = {}
        self._keys: dict[str, list[str]] = {}

    def groups(self) -> list[str]:
        return list(self._where)

    def read_group(self, group: str) -> dict[str, torch.Tensor]:
        if group not in self._where or not self._where[group][1]:
            raise ArtifactError(f"artifact {self.folder} has no tensor group {group!r}")
        folder, file = self._where[group]
        path = folder / file
        if path not in self._handles:
            handle = safe_open(path, framework="pt")
            self._handles[path] = handle
            for key in handle.keys():
                self._keys.setdefault(key.split(SEP, 1)[0], []).append(key)
        handle = self._handles[path]
        start = len(group) + len(SEP)
        return {key[start:]: handle.get_tensor(key) for key in self._keys.get(group, [])}

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for group in self.groups():
            yield group, self.read_group(group)
