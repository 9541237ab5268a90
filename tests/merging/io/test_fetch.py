"""Fetching: local folders referenced, hub ids downloaded at a pinned revision with the
commit recorded, offline failures that say how to get the model, cached digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.errors import CheckpointNotFoundError
from merging.io import fetch as fetch_module
from merging.io.fetch import fetch_folder, weights_digest


def test_local_folder_is_referenced(tiny_models):
    folder, commit = fetch_folder(str(tiny_models["base"]))
    assert folder == tiny_models["base"].resolve() and commit is None


def test_hub_id_uses_snapshot_download_with_the_pinned_revision(monkeypatch, tmp_path):
    calls = {}
    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder, commit = fetch_folder("org/model", "v1.0")
    assert calls["repo_id"] == "org/model" and calls["revision"] == "v1.0"
    assert "*.safetensors" in calls["allow_patterns"] and not any(p.endswith(".bin") for p in calls["allow_patterns"])
    assert folder == snapshot and commit == "0123abcd"


def test_offline_missing_model_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE.*huggingface-cli download org/absent --revision abc"):
        fetch_folder("org/absent", "abc")


def test_missing_local_path():
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        fetch_folder("./no/such/folder")


def test_digest_is_cached_by_stat(tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "digests.json"
    first = weights_digest(tiny_models["ft_a"], cache)
    hashed: list[Path] = []
    original = fetch_module.file_digest
    monkeypatch.setattr(fetch_module, "file_digest", lambda p: hashed.append(p) or original(p))
    assert weights_digest(tiny_models["ft_a"], cache) == first and hashed == []
    assert weights_digest(tiny_models["ft_b"], cache) != first
