"""The generic stage task's cache policy: a record is valid only while its artifact is."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tasks.stage import StoreCachePolicy


def _artifact(folder, key):
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text("x")
    (folder / "manifest.json").write_text(json.dumps({"cache_key": key, "files": ["data.txt"]}))


def test_record_is_dropped_when_its_artifact_is_not_current(tmp_path):
    policy = StoreCachePolicy(key_storage=tmp_path / "records")
    (tmp_path / "records").mkdir()
    inputs = {"stage": "combine", "key": "k1", "out_dir": str(tmp_path / "store" / "combine-k1")}
    key = policy.compute_key(SimpleNamespace(), inputs, {})
    record = tmp_path / "records" / key
    record.write_text("{}")
    _artifact(tmp_path / "store" / "combine-k1", "k1")
    assert policy.compute_key(SimpleNamespace(), inputs, {}) == key and record.is_file()  # current: kept
    (tmp_path / "store" / "combine-k1" / "data.txt").unlink()  # incomplete artifact
    assert policy.compute_key(SimpleNamespace(), inputs, {}) == key and not record.exists()
    other = {**inputs, "out_dir": str(tmp_path / "elsewhere")}
    assert policy.compute_key(SimpleNamespace(), other, {}) != key  # keyed on the folder too
