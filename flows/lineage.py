"""``mergeflow lineage PATH_OR_DIGEST``: where a merged model came from.

For a saved model (a ``save`` artifact: ``<artifacts>/store/save-<key>`` of a Prefect run or
``artifacts/save`` of ``dvc repro``), or the digest of one (a prefix of at least 8 hex digits), it
reports: the weights digest (``merging.digests.model_digest``), the params each stage read (from
the artifacts' manifests, followed upstream by their input digests), the digests of the inputs
as fetch resolved them, the code version (mergeflow's version; the git commit a Prefect run
recorded, else the checkout's now) and the scores every evaluation of that digest gave (the
eval cache). Everything is read from disk; nothing is recomputed, and a saved model is never
rewritten after evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from flows.merge_and_eval import RUNS_LOG, code_version, store_of
from merging.digests import model_digest
from merging.errors import ArtifactError, MergeConfigError
from merging.fetch import fetched_models
from merging.io.artifacts import MANIFEST, artifact_digest, read_manifest
from merging.pipeline import MODEL_DIGEST_FILE, STAGES
from merging.pipeline_params import PipelineParams

__all__ = ["lineage", "format_lineage", "DVC_ROOT"]

DVC_ROOT = "artifacts"  # the DVC stages' fixed folders (dvc.yaml: --artifacts artifacts)


def _roots(params: PipelineParams) -> list[Path]:
    return list(dict.fromkeys([Path(params.pipeline.artifacts), Path(DVC_ROOT)]))


def _saved_models(params: PipelineParams) -> list[Path]:
    """Every save artifact of the Prefect store and of the DVC folders."""
    found = []
    for root in _roots(params):
        found += sorted(p for p in (root / "store").glob("save-*") if (p / MANIFEST).is_file())
        found += [root / "save"] if (root / "save" / MANIFEST).is_file() else []
    return found


def _digest_of(folder: Path) -> str:
    stamp = folder / MODEL_DIGEST_FILE
    return stamp.read_text().strip() if stamp.is_file() else model_digest(folder)


def _find(target: str, params: PipelineParams) -> tuple[Path, str]:
    """(saved model folder, its digest) for a folder or a digest (prefix)."""
    path = Path(target).expanduser()
    if path.is_dir():
        digest = _digest_of(path)
        if (path / MANIFEST).is_file() and read_manifest(path).get("stage") == "save":
            return path, digest
        target = digest  # a copy of a saved model (or another folder): look its digest up
    if len(target) < 8 or any(c not in "0123456789abcdef" for c in target.lower()):
        raise MergeConfigError(f"lineage {target!r}: not a model folder nor a digest (at least 8 hex digits)")
    matches = {p: d for p in _saved_models(params) if (d := _digest_of(p)).startswith(target.lower())}
    if not matches:
        roots = ", ".join(str(r) for r in _roots(params))
        raise ArtifactError(f"lineage {target}: no saved model with this digest under {roots} (removed by mergeflow gc, "
                            "or made with other params: pass --params)")
    if len(set(matches.values())) > 1:
        raise MergeConfigError(f"lineage {target}: digest prefix matches {len(set(matches.values()))} models; give more digits")
    folder = next(iter(matches))
    return folder, matches[folder]


def _upstream(folder: Path) -> dict[str, Path]:
    """stage -> artifact folder for ``folder`` and every artifact it was made from, found among its
    siblings by the input digests its manifest records."""
    chain = {read_manifest(folder)["stage"]: folder}
    todo = [folder]
    while todo:
        manifest = read_manifest(todo.pop())
        for stage, digest in manifest.get("inputs", {}).items():
            if stage in chain:
                continue
            for candidate in sorted(folder.parent.iterdir()):
                if candidate.name == stage or candidate.name.startswith(f"{stage}-"):
                    try:
                        if artifact_digest(candidate) == digest:
                            chain[stage] = candidate
                            todo.append(candidate)
                            break
                    except (ArtifactError, KeyError):
                        continue
    return chain


def _run_of(folder: Path, params: PipelineParams) -> dict[str, Any] | None:
    """The last recorded run that saved ``folder`` (Prefect runs only)."""
    log = store_of(params) / RUNS_LOG
    if not log.is_file():
        return None
    target = folder.resolve()
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    return next((r for r in reversed(runs) if Path(r["artifacts"].get("save", "")).resolve() == target), None)


def _scores(digest: str, params: PipelineParams) -> list[dict[str, Any]]:
    """Every cached evaluation of this model digest: its settings and scores."""
    found = []
    for root in _roots(params):
        for path in sorted((root / "store" / "eval-cache").glob("*.json")):
            result = json.loads(path.read_text())
            if result.get("digest") == digest:
                settings = {k: v for k, v in result["settings"].items() if v not in (None, {}, False) and k != "include_digest"}
                found.append({"scores": result["scores"], "settings": settings, "cached_in": str(path)})
    return found


def _own(read: Any, stage: str) -> Any:
    """What a stage's manifest says it read, without the stage's own name around it (a merge stage
    records ``{stage: params}``; a fused one, every stage of its chain)."""
    return read[stage] if isinstance(read, dict) and list(read) == [stage] else read


def lineage(target: str, params: PipelineParams) -> dict[str, Any]:
    """The lineage of a saved model (see the module docstring) as a plain dict."""
    folder, digest = _find(target, params)
    found = _upstream(folder)
    chain = {s.name: found[s.name] for s in STAGES if s.name in found}  # in table order
    run = _run_of(folder, params)
    manifests = {stage: read_manifest(path) for stage, path in chain.items()}
    code = run["code"] if run and run.get("code") else {
        **{k: v for k, v in code_version().items() if k != "fingerprint"},
        "mergeflow": manifests["save"].get("versions", {}).get("mergeflow"), "recorded": False}
    out: dict[str, Any] = {
        "model": str(folder), "digest": digest, "route": "prefect" if folder.parent.name == "store" else "dvc",
        "method": next((m["method"] for m in manifests.values() if m.get("method")), None),
        "params": {stage: _own(manifests[stage].get("params"), stage) for stage in chain},
        "inputs": ({name: {k: m.get(k) for k in ("source", "revision", "commit", "digest")}
                    for name, m in fetched_models(chain["fetch"]).items()} if "fetch" in chain else {}),
        "code": code, "scores": _scores(digest, params), "artifacts": {stage: str(path) for stage, path in chain.items()},
    }
    if run is not None:
        out["run"] = {"series": run.get("series"), "flow_run": run.get("flow_run"), "time": run.get("time"),
                      "params": run["params"]}
    return out


def format_lineage(info: dict[str, Any]) -> str:
    """The lineage as readable YAML, the model's identity first."""
    order = ("model", "digest", "route", "method", "code", "inputs", "params", "scores", "run", "artifacts")
    return yaml.safe_dump({k: info[k] for k in order if k in info}, sort_keys=False, width=120)
