"""Atomic output folders and byte-bounded shards."""

import json

import pytest
import torch
from safetensors.torch import load_file

from merging.errors import OutputExistsError
from merging.io.writer import ShardedWriter, atomic_output_dir, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("100M") == 10**8
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_shards_respect_byte_limit(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=100)
    for i in range(5):
        writer.add(f"t{i}", torch.zeros(10))  # 40 bytes each: 2 per shard
    writer.add("big", torch.zeros(50))  # 200 bytes: a shard of its own
    weight_map = writer.finalize()
    names = sorted(set(weight_map.values()))
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 40 + 200
    assert index["weight_map"] == weight_map and weight_map["big"] == "model-00004-of-00004.safetensors"
    assert set(load_file(tmp_path / names[0])) == {"t0", "t1"}


def test_failure_leaves_no_trace_and_keeps_existing_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputExistsError):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_concurrent_artifact_writers_never_corrupt_the_target(tmp_path):
    """Two writers of the same content-addressed artifact: both commit, the target is whole."""
    from merging.io.artifacts import ArtifactReader, ArtifactWriter

    target = tmp_path / "sparsify-abc"
    one = ArtifactWriter(target, {"stage": "s", "cache_key": "abc"})
    two = ArtifactWriter(target, {"stage": "s", "cache_key": "abc"})
    for writer in (one, two):
        writer.add_group("w", {"x": torch.arange(6.0)})
    one.commit()
    two.commit()
    reader = ArtifactReader(target)
    assert torch.equal(reader.read_group("w")["x"], torch.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == ["sparsify-abc"]
