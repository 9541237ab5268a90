"""The planned shard layout and the two shard writers: bytes, offsets, loadability, errors."""

from __future__ import annotations

import gc
import json
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging.errors import OutputLayoutError
from merging.io.shard_layout import PlannedTensor, plan_shards
from merging.io.shards import PlannedShardWriter, StreamingShardWriter


def _tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes and odd sizes, in 'output order' (not the library's order)."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.layers.0.norm.weight": torch.randn(5, generator=g),
        "model.layers.0.mask": torch.rand(3, generator=g) > 0.5,
        "model.layers.0.q.weight": torch.randn(5, 5, generator=g).to(torch.float16),
        "model.layers.0.count": torch.tensor([3, 1, 2], dtype=torch.int64),
        "model.scalar": torch.tensor(2.5, dtype=torch.float64),
        "model.empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
    }


def _planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _write(folder, tensors, max_shard_bytes, order=None):
    writer = PlannedShardWriter(folder, plan_shards(_planned(tensors), max_shard_bytes))
    for name in order or tensors:
        writer.write(name, tensors[name])
    return writer.finalize()


def test_one_shard_is_byte_for_byte_what_safetensors_writes(tmp_path):
    tensors = _tensors()
    weight_map = _write(tmp_path, tensors, 10**9, order=list(reversed(tensors)))  # any arrival order
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert set(weight_map.values()) == {"model.safetensors"} and not (tmp_path / "model.safetensors.index.json").exists()
    header_length = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]
    assert header_length % 8 == 0
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def test_shards_follow_the_plan_order_and_size_alone(tmp_path):
    """Greedy in output order: a tensor that would overflow a non-empty shard starts the next;
    each shard equals safetensors' own file of its tensors; the index is Hugging Face's."""
    tensors = _tensors()
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}  # 70, 20, 3, 50, 24, 8, 0, 70
    (tmp_path / "a").mkdir()
    weight_map = _write(tmp_path / "a", tensors, 100)
    expected = [["model.embed_tokens.weight", "model.layers.0.norm.weight", "model.layers.0.mask"],
                ["model.layers.0.q.weight", "model.layers.0.count", "model.scalar", "model.empty"], ["lm_head.weight"]]
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert weight_map == {name: files[i] for i, names in enumerate(expected) for name in names}
    assert list(weight_map) == list(tensors)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    for file, names in zip(files, expected):
        save_file({n: tensors[n] for n in names}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b", tensors, 100, order=sorted(tensors))  # another arrival order: the same files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_offsets_come_from_the_plan_before_any_tensor(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.full((2, 2), 2.0, dtype=torch.float64)}
    layout = plan_shards(_planned(tensors), 10**6)
    (shard,) = layout.shards
    header = len(shard.header)
    assert shard.slots == {"b": (header, header + 32), "a": (header + 32, header + 44)}  # F64 before F32
    assert layout.file_bytes == header + 44 and layout.tensor_bytes == 44
    writer = PlannedShardWriter(tmp_path, layout)
    data = (tmp_path / "model.safetensors").read_bytes()
    assert data[:header] == shard.header and len(data) == header + 44  # the header is there first
    writer.write("a", tensors["a"])
    data = (tmp_path / "model.safetensors").read_bytes()
    assert data[header + 32:] == tensors["a"].numpy().tobytes() and data[header:header + 32] == bytes(32)
    writer.write("b", tensors["b"])
    writer.finalize()
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert torch.equal(handle.get_tensor("b"), tensors["b"]) and handle.metadata() == {"format": "pt"}


def test_planned_writer_keeps_no_tensor(tmp_path):
    """A written tensor is on disk and no longer referenced by the writer (memory is bounded
    by the groups in flight, not by the shard size)."""
    tensors = {"a": torch.arange(4.0), "b": torch.arange(3.0)}
    writer = PlannedShardWriter(tmp_path, plan_shards(_planned(tensors), 10**9))
    value = torch.arange(4.0)
    ref = weakref.ref(value)
    writer.write("a", value)
    del value
    gc.collect()
    assert ref() is None
    writer.write("b", tensors["b"])
    writer.finalize()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], tensors["a"])


@pytest.mark.parametrize("mistake", ["unplanned", "twice", "shape", "dtype", "missing"])
def test_writes_that_break_the_plan_are_refused(tmp_path, mistake):
    tensors = {"a": torch.ones(3), "b": torch.ones(2)}
    writer = PlannedShardWriter(tmp_path, plan_shards(_planned(tensors), 10**6))
    writer.write("a", tensors["a"])
    act = {"unplanned": lambda: writer.write("c", torch.ones(1)), "twice": lambda: writer.write("a", tensors["a"]),
           "shape": lambda: writer.write("b", torch.ones(3)), "dtype": lambda: writer.write("b", torch.ones(2).double()),
           "missing": writer.finalize}[mistake]
    needle = {"unplanned": "'c' is not in the output plan", "twice": "'a' was written twice", "shape": "(3,)",
              "dtype": "torch.float64", "missing": "1 planned tensor(s) were never written ('b')"}[mistake]
    with pytest.raises(OutputLayoutError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        act()
    writer.close()


def test_a_plan_naming_a_tensor_twice_is_refused():
    with pytest.raises(OutputLayoutError, match="'a' twice"):
        plan_shards([PlannedTensor("a", (1,), torch.float32)] * 2, 100)


def test_streamed_shards_load_and_hold_nothing(tmp_path):
    """Artifacts: each group goes to disk when added (the writer keeps no reference to it); a
    group that would overflow a shard starts the next; the files load with safe_open."""
    writer = StreamingShardWriter(tmp_path, max_shard_bytes=100)
    expected, refs = {}, []
    for i in range(5):  # 23 bytes per group: 4 per shard
        group = {f"g{i}::x": torch.full((5,), float(i)), f"g{i}::mask": torch.arange(3) > i}
        expected.update({name: t.clone() for name, t in group.items()})
        refs += [weakref.ref(t) for t in group.values()]
        writer.add_group(group)
    del group
    gc.collect()
    assert all(r() is None for r in refs)
    weight_map = writer.finalize()
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [k for k, v in weight_map.items() if v.startswith("model-00002")] == ["g4::x", "g4::mask"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 23
    for name, file in weight_map.items():
        with safe_open(tmp_path / file, "pt") as handle:
            assert torch.equal(handle.get_tensor(name), expected[name])
    first = (tmp_path / "model-00001-of-00002.safetensors").read_bytes()
    length = struct.unpack("<Q", first[:8])[0]
    assert length == 64 * 1024 and len(first) == 8 + length + 4 * 23  # the header room, then the data


def test_streamed_header_room_starts_a_new_shard_or_grows(tmp_path):
    """Entries that would overflow the header room start a new shard; a first group that needs
    more room than the default gets it."""
    (tmp_path / "a").mkdir()
    writer = StreamingShardWriter(tmp_path / "a", max_shard_bytes=10**6, header_room=256)
    for i in range(4):
        writer.add(f"tensor-{i}", torch.ones(2))
    big = {f"many-{i}": torch.full((1,), float(i)) for i in range(20)}
    writer.add_group(big)
    weight_map = writer.finalize()
    assert len(set(weight_map.values())) >= 3 and len({weight_map[n] for n in big}) == 1
    for name, file in weight_map.items():
        with safe_open(tmp_path / "a" / file, "pt") as handle:
            assert handle.get_tensor(name).shape in (torch.Size([2]), torch.Size([1]))
    assert torch.equal(load_file(tmp_path / "a" / weight_map["many-7"])["many-7"], torch.tensor([7.0]))


def test_streamed_group_larger_than_a_shard_gets_its_own(tmp_path):
    writer = StreamingShardWriter(tmp_path, max_shard_bytes=16)
    writer.add("small", torch.ones(2))
    writer.add("big", torch.ones(100))
    writer.add("after", torch.ones(1))
    assert writer.finalize() == {"small": "model-00001-of-00003.safetensors", "big": "model-00002-of-00003.safetensors",
                                 "after": "model-00003-of-00003.safetensors"}
    assert torch.equal(load_file(tmp_path / "model-00002-of-00003.safetensors")["big"], torch.ones(100))
