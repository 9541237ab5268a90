"""Safetensors shard writers that keep no tensor in memory once it is written.

* ``PlannedShardWriter`` (saved models): every shard file is created with its header when the
  writer is made (``merging.io.shard_layout`` computes them from the plan), and each tensor's
  bytes go to their offset (``os.pwrite``) as soon as they arrive, in any order. ``finalize``
  checks that every planned tensor was written exactly once with its planned shape and dtype
  (``OutputLayoutError`` otherwise) and writes the index when there are several shards.
* ``StreamingShardWriter`` (pipeline artifacts, whose factor shapes are known only when a group
  is done): each group's bytes go to the current shard right away, after room kept at the front
  for the header, which is written when the shard is full (padded with spaces to the room kept,
  as the format allows). Files therefore depend on the order groups arrive in: one stage run
  adds them in plan order.

Either way memory is bounded by the tensor groups in flight, not by the shard size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from merging.errors import OutputLayoutError
from merging.io.shard_layout import ShardLayout, dtype_name, encode_header, entry_json, header_text, shard_names
from merging.io.writer import INDEX

__all__ = ["PlannedShardWriter", "StreamingShardWriter", "write_tensor_bytes", "HEADER_ROOM"]

HEADER_ROOM = 64 * 1024
"""Bytes kept for a streamed shard's header (about 500 tensor entries; a first group that
needs more gets more)."""


def write_tensor_bytes(fd: int, tensor: torch.Tensor, offset: int) -> int:
    """Write ``tensor``'s bytes (C order, little-endian) at ``offset`` of ``fd``; returns the
    count. ``os.pwrite`` may write less than asked (2 GiB at most on Linux): loop."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy())
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)
    return written


def _write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class PlannedShardWriter:
    """Writes the tensors of ``layout`` into ``folder`` (headers first, data at its offsets)."""

    def __init__(self, folder: Path, layout: ShardLayout) -> None:
        self.folder = Path(folder)
        self.layout = layout
        self._shard_of = {name: shard for shard in layout.shards for name in shard.slots}
        self._left = {shard.file: len(shard.slots) for shard in layout.shards}
        self._fds: dict[str, int] = {}
        self._written: set[str] = set()
        for shard in layout.shards:
            fd = os.open(self.folder / shard.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.pwrite(fd, shard.header, 0)
                os.ftruncate(fd, shard.size)
            finally:
                os.close(fd)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor at its offset."""
        planned = self.layout.tensors.get(name)
        if planned is None:
            raise OutputLayoutError(f"tensor {name!r} is not in the output plan; nothing was written")
        if name in self._written:
            raise OutputLayoutError(f"tensor {name!r} was written twice; nothing was written")
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise OutputLayoutError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, but the plan says "
                                    f"{planned.shape} {planned.dtype}; nothing was written")
        shard = self._shard_of[name]
        if shard.file not in self._fds:
            self._fds[shard.file] = os.open(self.folder / shard.file, os.O_WRONLY)
        write_tensor_bytes(self._fds[shard.file], tensor, shard.slots[name][0])
        self._written.add(name)
        self._left[shard.file] -= 1
        if self._left[shard.file] == 0:
            os.close(self._fds.pop(shard.file))

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.write(name, tensor)

    def finalize(self) -> dict[str, str]:
        """Check that every planned tensor was written, write the index (several shards);
        returns the weight map, tensor name -> file name."""
        self.close()
        missing = [name for name in self.layout.tensors if name not in self._written]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise OutputLayoutError(f"{len(missing)} planned tensor(s) were never written ({shown}); nothing was written")
        weight_map = self.layout.weight_map()
        if len(self.layout.shards) > 1:
            _write_index(self.folder, weight_map, self.layout.tensor_bytes)
        return weight_map

    def close(self) -> None:
        """Close the files still open (also on errors)."""
        while self._fds:
            os.close(self._fds.popitem()[1])


class StreamingShardWriter:
    """Writes tensor groups into shards of at most ``max_shard_bytes`` of data as they arrive
    (a group larger than that gets a shard of its own; a group's tensors share a shard)."""

    def __init__(self, folder: Path, max_shard_bytes: int, header_room: int = HEADER_ROOM) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.header_room = header_room
        self.total_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._fd: int | None = None
        self._room = 0  # header bytes kept in the open shard
        self._entries: list[str] = []
        self._header_bytes = len(header_text([]))
        self._data_bytes = 0

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors that must share a shard (a tensor group's factors) now."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        entries, offset = [], self._data_bytes
        for name, tensor in tensors.items():
            end = offset + tensor.numel() * tensor.element_size()
            entries.append(entry_json(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, end))
            offset = end
        growth = sum(len(e.encode()) + 1 for e in entries)
        if self._fd is not None and self._entries and (self._data_bytes + size > self.max_shard_bytes or self._header_bytes + growth > self._room):
            self._seal()
        if self._fd is None:
            self._open(growth)
            return self.add_group(tensors)  # offsets restart in the new shard
        for tensor in tensors.values():
            self._data_bytes += write_tensor_bytes(self._fd, tensor, 8 + self._room + self._data_bytes)
        self._entries += entries
        self._header_bytes += growth
        self._shards[-1][1].extend(tensors)
        self.total_bytes += size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_group({name: tensor})

    def _open(self, growth: int) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.safetensors.partial"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        needed = self._header_bytes + growth + 64  # data offsets of a fresh shard are no longer than these
        self._room = max(self.header_room, needed + (-needed) % 8)
        self._entries, self._header_bytes, self._data_bytes = [], len(header_text([])), 0
        self._shards.append((path, []))

    def _seal(self) -> None:
        os.pwrite(self._fd, encode_header(self._entries, reserve=self._room), 0)
        os.close(self._fd)
        self._fd = None

    def finalize(self) -> dict[str, str]:
        """Seal the last shard, name the shards, write the index (when there are several);
        returns the weight map, tensor name -> file name."""
        if self._fd is None and not self._shards:
            self._open(0)
        if self._fd is not None:
            self._seal()
        weight_map: dict[str, str] = {}
        for (path, names), file in zip(self._shards, shard_names(len(self._shards))):
            path.rename(self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        if len(self._shards) > 1:
            _write_index(self.folder, weight_map, self.total_bytes)
        return weight_map

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
