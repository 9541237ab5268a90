"""Content digests, the one place mergeflow hashes anything.

* ``file_digest``: sha256 of a file's bytes.
* ``content_key``: sha256 of a JSON-able value in canonical form (cache keys).
* ``folder_digest``: an artifact's files, by name and content.
* ``model_digest``: a model's identity: every tensor by name, dtype, shape and bytes
  (independent of how the tensors are split into shards or ordered in a file), plus its
  config and tokenizer files. Re-sharding a model keeps its digest; a changed tokenizer or
  config changes it. Tensors are read with the one checkpoint reader (``io.checkpoint``: no
  pickle unless allowed); their digests are cached by the weight files' (size, mtime), so
  multi-GB checkpoints are hashed once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def _tensor_digests(reader) -> dict[str, str]:
    """name -> sha256 of (dtype, shape, bytes) of every tensor a reader holds."""
    import torch

    out = {}
    for name in reader.keys():
        tensor = reader.get(name)
        h = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
        out[name] = h.hexdigest()
    return out


def model_digest(folder: str | Path, cache_file: Path | None = None) -> str:
    """The identity of a model folder (see the module docstring); the tensors' part is cached
    in ``cache_file`` by the weight files' names, sizes and mtimes."""
    from merging.io.checkpoint import CheckpointReader

    folder = Path(folder)
    reader = CheckpointReader(folder)  # validates every weight file before anything is read
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in reader.files()]
    try:
        cache = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    key = str(folder.resolve())
    entry = cache.get(key)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp and isinstance(entry[1], dict)):
        cache[key] = [stamp, _tensor_digests(reader)]
        if cache_file is not None:
            atomic_write_text(cache_file, json.dumps(cache))
    files = {name: file_digest(folder / name) for name in IDENTITY_FILES if (folder / name).is_file()}
    return content_key({"tensors": cache[key][1], "files": files})
