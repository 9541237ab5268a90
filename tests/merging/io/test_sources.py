"""Model references: one rule for local paths vs Hugging Face ids; hub ids downloaded at a
pinned revision with the commit recorded; offline failures that say how to get the model."""

from __future__ import annotations

import pytest

from merging.errors import CheckpointNotFoundError
from merging.io.sources import resolve_source


def test_local_folder_is_referenced(tiny_models):
    folder, commit = resolve_source(str(tiny_models["base"]))
    assert folder == tiny_models["base"] and commit is None


def _fake_hub(monkeypatch, tmp_path):
    calls = {}
    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls, snapshot


def test_hub_id_uses_snapshot_download_with_the_pinned_revision(monkeypatch, tmp_path):
    calls, snapshot = _fake_hub(monkeypatch, tmp_path)
    folder, commit = resolve_source("org/model", "v1.0")
    assert calls["repo_id"] == "org/model" and calls["revision"] == "v1.0"
    assert "*.safetensors" in calls["allow_patterns"] and not any(p.endswith(".bin") for p in calls["allow_patterns"])
    assert folder == snapshot and commit == "0123abcd"
    resolve_source("org/model@v2")
    assert calls["revision"] == "v2"


def test_missing_path_under_an_existing_folder_is_local_never_a_hub_id(monkeypatch, tmp_path):
    calls, _ = _fake_hub(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="its first folder exists"):
        resolve_source("models/ft_zzz")
    with pytest.raises(CheckpointNotFoundError, match="starts with"):
        resolve_source("./no/such/folder")
    assert calls == {}


def test_offline_missing_model_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE.*huggingface-cli download org/absent --revision abc"):
        resolve_source("org/absent", "abc")
