"""The fetch stage: every model of ``params.yaml`` resolved to a local folder.

Local folders are referenced, never copied; Hugging Face ids are downloaded at their pinned
revision (``merging.io.sources.resolve_source``) and the resolved commit is recorded; GGUF
files are converted once into ``<store>/gguf/<name>``. The artifact is ``models.json``:
per model its folder, commit and ``model_digest`` (cached by file size and mtime, so
unchanged multi-GB checkpoints are hashed once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merging.digests import model_digest
from merging.io.sources import resolve_source
from merging.pipeline_params import PipelineParams

__all__ = ["fetch_models", "fetched_models", "fetched_folders", "model_sources", "local_state", "MODELS_FILE"]

MODELS_FILE = "models.json"


def _portable(folder: Path) -> str:
    """A folder inside the working directory is recorded relative to it (clones, DVC temp
    workspaces); anything else absolutely."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder.resolve())


def model_sources(params: PipelineParams) -> list[str]:
    """Every model source, as written in the params (local paths and hub ids)."""
    return [ref.source for ref in (params.models.base, *params.models.inputs)]


def local_state(params: PipelineParams) -> list[Any] | None:
    """(path, size, mtime) of every file of the local sources: a cheap stand-in for their
    content in fetch's key. None when a hub source has no pinned revision (it may move)."""
    state: list[Any] = []
    for ref in (params.models.base, *params.models.inputs):
        path = Path(ref.source).expanduser()
        if not path.exists():
            if ref.revision is None:
                return None
            continue
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                stat = file.stat()
                state.append([str(file), stat.st_size, stat.st_mtime_ns])
    return state


def fetch_models(params: PipelineParams, inputs: dict[str, Path], folder: Path, store: Path, code: str = "") -> list[str]:
    """Write ``models.json`` into ``folder``; returns the file names written."""
    entries = {}
    for ref in (params.models.base, *params.models.inputs):
        local, commit = resolve_source(ref.source, ref.revision)
        if ref.format == "gguf" or local.suffix == ".gguf":
            from merging.io.gguf import import_gguf  # needs transformers: imported only for GGUF sources

            local = import_gguf(local, ref.gguf_file, store / "gguf" / ref.name)
        entries[ref.name] = {"source": ref.source, "revision": ref.revision, "commit": commit,
                             "folder": _portable(local), "digest": model_digest(local, store / ".digests.json")}
    (folder / MODELS_FILE).write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return [MODELS_FILE]


def fetched_models(fetch_dir: str | Path) -> dict[str, dict]:
    """Model name -> {folder, digest, commit, ...}, from a fetch artifact."""
    return json.loads((Path(fetch_dir) / MODELS_FILE).read_text())


def fetched_folders(fetch_dir: str | Path) -> dict[str, str]:
    """Model name -> local folder, from a fetch artifact."""
    return {name: e["folder"] for name, e in fetched_models(fetch_dir).items()}
