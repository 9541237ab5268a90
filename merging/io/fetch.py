"""Fetching models: local folders are referenced (never copied); Hugging Face ids are
downloaded with ``snapshot_download`` at a pinned revision and the resolved commit is
recorded. Weight digests are cached by (path, size, mtime) so that unchanged
multi-GB checkpoints are hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from merging.errors import CheckpointNotFoundError
from merging.io.artifacts import file_digest
from merging.io.sources import HUB_PATTERNS

__all__ = ["fetch_folder", "weights_digest"]

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
WEIGHT_NAMES = ("adapter_config.json", "config.json")


def fetch_folder(source: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder for ``source`` and, for hub sources, the resolved commit."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve(), None
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CheckpointNotFoundError(f"model source {source!r}: {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, missing repo, auth: all mean "cannot fetch"
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = ("HF_HUB_OFFLINE is set: unset it to download, or download the model elsewhere "
                f"(huggingface-cli download {source}" + (f" --revision {revision}" if revision else "") + ") "
                "and point 'source' at the local folder") if offline else "check the id, revision and your network/token"
        raise CheckpointNotFoundError(f"model {source!r}@{revision or 'main'} could not be fetched ({type(err).__name__}); {hint}") from None
    return folder, folder.name


def weights_digest(folder: Path, cache_file: Path | None = None) -> str:
    """sha256 over the weight files (and configs) of a model folder, cached by stat."""
    cache: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    h = hashlib.sha256()
    changed = False
    for file in sorted(folder.iterdir()):
        if not (file.suffix in WEIGHT_SUFFIXES or file.name in WEIGHT_NAMES) or not file.is_file():
            continue
        stat = file.stat()
        key = str(file.resolve())
        entry = cache.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            digest = entry[2]
        else:
            digest = file_digest(file)
            cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
            changed = True
        h.update(file.name.encode())
        h.update(digest.encode())
    if cache_file is not None and changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return h.hexdigest()
