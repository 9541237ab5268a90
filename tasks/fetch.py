"""fetch: resolve every model to a local folder (hub ids downloaded at a pinned revision),
record resolved commits and weight digests. Local folders are referenced, not copied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task

from merging.io.artifacts import ArtifactWriter
from merging.io.fetch import fetch_folder, weights_digest
from merging.version import VERSION
from tasks.caching import run_logger
from tasks.params import PipelineParams, parse_params

FETCH_FIELDS = ("name", "source", "revision", "format", "gguf_file")


def fetch_params(params: PipelineParams) -> list[dict]:
    """The model fields fetch reads (coefficients and task labels are read downstream)."""
    refs = (params.models.base, *params.models.inputs)
    return [{k: getattr(ref, k) for k in FETCH_FIELDS} for ref in refs]


def _portable(folder: Path) -> str:
    """A folder inside the working directory is recorded relative to it (clones, DVC temp
    workspaces); anything else absolutely."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder.resolve())


def fetch_key(params: PipelineParams) -> str | None:
    """A cheap key for the fetch result: the model refs plus (name, size, mtime) of every file
    of local folders. None when a hub source has no pinned revision (it may move)."""
    h = hashlib.sha256(json.dumps(fetch_params(params), sort_keys=True).encode())
    for ref in (params.models.base, *params.models.inputs):
        path = Path(ref.source).expanduser()
        if not path.exists():
            if ref.revision is None:
                return None
            continue
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                stat = file.stat()
                h.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def fetch_models(params: PipelineParams, out_dir: str | Path) -> Path:
    """Write the fetch artifact: ``models.json`` with folder, commit and digest per model."""
    out_dir = Path(out_dir)
    digest_cache = out_dir.parent / ".digests.json"
    entries = {}
    for ref in (params.models.base, *params.models.inputs):
        folder, commit = fetch_folder(ref.source, ref.revision)
        if ref.format == "gguf" or folder.suffix == ".gguf":
            from merging.io.gguf import import_gguf

            folder = import_gguf(folder, ref.gguf_file, out_dir.parent / "gguf" / ref.name)
        entries[ref.name] = {"source": ref.source, "revision": ref.revision, "commit": commit,
                             "folder": _portable(folder), "digest": weights_digest(folder, digest_cache)}
    manifest = {"stage": "fetch", "params": fetch_params(params), "versions": {"mergeflow": VERSION},
                "cache_key": fetch_key(params) or ""}
    writer = ArtifactWriter(out_dir, manifest)
    (writer.folder / "models.json").write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return writer.commit(extra_files=["models.json"])


def fetched_models(fetch_dir: str | Path) -> dict[str, dict]:
    """Model name -> {folder, digest, commit, ...}, from a fetch artifact."""
    return json.loads((Path(fetch_dir) / "models.json").read_text())


def fetched_folders(fetch_dir: str | Path) -> dict[str, str]:
    """Model name -> local folder, from a fetch artifact."""
    return {name: e["folder"] for name, e in fetched_models(fetch_dir).items()}


def _key(context, parameters) -> str | None:
    key = fetch_key(parse_params(parameters["params"]))
    return f"fetch-{key}" if key else None


@task(name="fetch", retries=2, retry_delay_seconds=5, cache_key_fn=_key, persist_result=True, result_serializer="json")
def fetch(params: dict, out_dir: str) -> str:
    """Prefect task: retried on network/I-O errors; cheap when nothing changed (digests cached)."""
    path = fetch_models(parse_params(params), out_dir)
    run_logger().info("fetched %d models into %s", len(fetched_folders(path)), path)
    return str(path)
