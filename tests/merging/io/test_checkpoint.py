"""The checkpoint reader's positional reads against the safetensors library's own reader, and
what they leave resident (nothing of the file stays mapped)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.errors import ArtifactError, CheckpointMismatchError
from merging.io.artifacts import ArtifactReader, ArtifactWriter
from merging.io.checkpoint import CheckpointReader

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
           torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(_DTYPES):
        values = torch.randn(5, 3 + i, generator=g, dtype=torch.float64) * 50
        if not dtype.is_floating_point:
            values = values.abs() if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else values
            values = values.to(torch.int64) % 2 if dtype == torch.bool else values.to(torch.int64)
        tensors[f"t{i}.{str(dtype).removeprefix('torch.')}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    tensors["wide"] = torch.randn(2, 3, 4, generator=g)
    return tensors


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    raw = lambda t: bytes(t.reshape(-1).view(torch.uint8).numpy())  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


def test_reads_exactly_what_safe_open_reads_for_every_dtype(tmp_path):
    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():
            expected = handle.get_tensor(name)
            got = reader.get(name)
            assert _same(got, expected), name
    reader.get("wide").add_(1)  # a buffer of its own: the next read is unchanged
    assert _same(reader.get("wide"), tensors["wide"])


def test_sharded_folder_reads_each_tensor_from_its_shard(tmp_path):
    tensors = {f"layer{i}.weight": torch.randn(64, 32, dtype=torch.bfloat16) for i in range(4)}
    save_file({k: tensors[k] for k in list(tensors)[:2]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in list(tensors)[2:]}, str(tmp_path / "b.safetensors"))
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert _same(reader.get(name), tensor)


def test_a_file_cut_after_its_header_was_read_is_one_clear_error(tmp_path):
    save_file({"a": torch.randn(256), "b": torch.randn(256)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    os.truncate(tmp_path / "model.safetensors", os.path.getsize(tmp_path / "model.safetensors") - 100)
    last = max(reader.keys(), key=lambda k: reader._slots[k][3])
    with pytest.raises(CheckpointMismatchError, match=f"tensor '{last}'.*truncated while being read"):
        reader.get(last)


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_reading_every_tensor_leaves_nothing_of_the_file_resident(tmp_path):
    """Compared, not timed: a memory-mapped reader keeps every page it read in RssFile until it
    closes (here the whole 48 MB file); positional reads keep none of it."""
    save_file({f"t{i}": torch.randn(1024, 1024) for i in range(12)}, str(tmp_path / "model.safetensors"))
    size_kb = os.path.getsize(tmp_path / "model.safetensors") // 1024
    reader = CheckpointReader(tmp_path)
    gc.collect()
    before = _rss_file_kb()
    for name in reader.keys():
        reader.get(name).sum()
    grown = _rss_file_kb() - before
    assert grown < size_kb / 8, (grown, size_kb)


def test_artifact_reader_returns_what_was_written(tmp_path):
    groups = {"g1": {"deltas": torch.randn(3, 8, 4, dtype=torch.float64), "a": torch.randn(2, 2)},
              "g0": {"deltas": torch.randn(2, 5).to(torch.bfloat16)}}
    writer = ArtifactWriter(tmp_path / "art", {"cache_key": "k"})
    for name, factors in groups.items():
        writer.add_group(name, factors)
    writer.commit()
    reader = ArtifactReader(tmp_path / "art")
    for name, factors in groups.items():
        got = reader.read_group(name)
        assert list(got) == sorted(factors)  # factors by name, as safe_open listed them
        assert all(_same(got[k], v) for k, v in factors.items())
    with pytest.raises(ArtifactError, match="no tensor group 'g9'"):
        reader.read_group("g9")
    reader.close()
