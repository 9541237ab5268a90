"""Which input files may be read: regular files inside the model folder, or links into the
Hugging Face hub cache or a DVC cache (how hub snapshots and ``dvc checkout`` lay models out)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from merging.errors import CheckpointMismatchError
from merging.io.checkpoint import CheckpointReader
from merging.io.files import model_file, read_json_object


def _blob(path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 2), value)}, str(path), metadata={"format": "pt"})


def test_hub_snapshot_links_into_blobs_are_followed(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--org--name"
    _blob(repo / "blobs" / "abc123", 1.5)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc123")
    reader = CheckpointReader(snapshot)
    assert torch.equal(reader.get("w"), torch.full((2, 2), 1.5))


def test_dvc_symlink_checkout_is_followed(tmp_path):
    project = tmp_path / "project"
    blob = project / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    _blob(blob, 2.0)
    model = project / "models" / "base"
    model.mkdir(parents=True)
    (model / "model.safetensors").symlink_to(blob)
    assert torch.equal(CheckpointReader(model).get("w"), torch.full((2, 2), 2.0))


def test_links_elsewhere_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    _blob(tmp_path / "elsewhere" / "w.safetensors", 3.0)
    (model / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "w.safetensors")
    with pytest.raises(CheckpointMismatchError, match="outside the model folder"):
        CheckpointReader(model)
    # a DVC cache of another project (not an ancestor of the model folder) is not trusted either
    other = tmp_path / "other" / ".dvc" / "cache" / "x"
    _blob(other, 4.0)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(other)
    with pytest.raises(CheckpointMismatchError, match="outside the model folder"):
        CheckpointReader(model)


@pytest.mark.parametrize("name", ["../x.json", "/etc/passwd", "", "a/../../x"])
def test_names_that_escape_are_refused_before_any_lookup(tmp_path, name):
    with pytest.raises(CheckpointMismatchError, match="relative path inside"):
        model_file(tmp_path, name, "model 'm'")


def test_special_files_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(CheckpointMismatchError, match="FIFO"):
        model_file(tmp_path, "fifo.json", "model 'm'")
    (tmp_path / "sub.json").mkdir()
    with pytest.raises(CheckpointMismatchError, match="folder"):
        model_file(tmp_path, "sub.json", "model 'm'")
    assert model_file(tmp_path, "absent.json", "model 'm'", required=False) is None


def test_json_objects_are_size_capped_and_typed(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": 1}')
    assert read_json_object(path, "m") == {"a": 1}
    with pytest.raises(CheckpointMismatchError, match="limit"):
        read_json_object(path, "m", max_bytes=4)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointMismatchError, match="nested too deeply|JSON object"):
        read_json_object(path, "m")
