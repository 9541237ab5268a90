"""Content digests, the one place mergeflow hashes anything.

* ``file_digest``: sha256 of a file's bytes.
* ``content_key``: sha256 of a JSON-able value in canonical form (cache keys).
* ``folder_digest``: an artifact's files, by name and content.
* ``model_digest``: a model's identity: every tensor by name, dtype, shape and bytes
  (independent of how the tensors are split into shards or ordered in a file), plus its
  config and tokenizer files. Re-sharding a model keeps its digest; a changed tokenizer or
  config changes it. Per-file results are cached by (size, mtime) so multi-GB checkpoints are
  hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from merging.errors import ArtifactError
from merging.io.writer import atomic_write_text

__all__ = ["file_digest", "content_key", "folder_digest", "model_digest", "TOKENIZER_FILES", "IDENTITY_FILES"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.txt", "spiece.model",
)
IDENTITY_FILES = ("config.json", "generation_config.json", "adapter_config.json", *TOKENIZER_FILES)
_CHUNK = 1 << 22


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def content_key(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys; non-JSON values as ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: Path, files: list[str]) -> str:
    """sha256 over (name, content digest) of the listed files, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(file_digest(folder / name).encode())
    return h.hexdigest()


def _tensor_digests(path: Path) -> dict[str, str]:
    """name -> sha256 of (dtype, shape, bytes) of every tensor of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ArtifactError(f"{path}: not a safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", head)
        if length > os.path.getsize(path):
            raise ArtifactError(f"{path}: not a safetensors file (header length {length} exceeds the file)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors header ({err})") from None
        start = 8 + length
        out = {}
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
            if name == "__metadata__":
                continue
            h = hashlib.sha256(f"{meta['dtype']}:{meta['shape']}".encode())
            begin, end = meta["data_offsets"]
            f.seek(start + begin)
            remaining = end - begin
            while remaining > 0:
                block = f.read(min(_CHUNK, remaining))
                if not block:
                    raise ArtifactError(f"{path}: tensor {name!r} is truncated")
                h.update(block)
                remaining -= len(block)
            out[name] = h.hexdigest()
    return out


def model_digest(folder: str | Path, cache_file: Path | None = None) -> str:
    """The identity of a model folder (see the module docstring)."""
    folder = Path(folder)
    cache: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    changed = False

    def cached(path: Path, compute):
        nonlocal changed
        stat = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        value = compute(path)
        cache[key] = [stat.st_size, stat.st_mtime_ns, value]
        changed = True
        return value

    tensors: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(cached(path, _tensor_digests))
    files = {name: cached(folder / name, file_digest) for name in IDENTITY_FILES if (folder / name).is_file()}
    if not tensors:  # a pickle checkpoint (allow_pickle) is identified by its files
        files |= {p.name: cached(p, file_digest) for p in sorted(folder.glob("*.bin"))}
    if cache_file is not None and changed:
        atomic_write_text(cache_file, json.dumps(cache))
    return content_key({"tensors": tensors, "files": files})
