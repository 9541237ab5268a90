"""Where every tensor of a saved model goes, computed from the plan before any tensor exists.

``plan_shards`` takes the output tensors (name, shape, dtype) in output order and a shard size
and returns the layout: which shard file holds each tensor, at which byte offset, and each
shard's complete safetensors header. It depends on nothing else (not on partitions, workers or
the order tensors are produced in), so a model's files are the same however it was merged.

Shards are filled greedily in output order: a tensor that would push a non-empty shard past
``max_shard_bytes`` starts the next one (a tensor larger than that gets a shard of its own).
Inside a shard, the tensors' bytes and header entries follow the safetensors library's own
order (dtype from the widest down, then name), the header is compact JSON with
``__metadata__: {"format": "pt"}`` first, padded with spaces to a multiple of 8 bytes, after
an 8-byte little-endian length: byte for byte what ``safetensors.torch.save_file`` writes for
the same tensors (tested), so a shard's data is aligned to its widest dtype.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from merging.errors import OutputLayoutError
from merging.io.safetensors_header import DTYPES

__all__ = ["PlannedTensor", "Shard", "ShardLayout", "plan_shards", "encode_header", "header_text", "entry_json", "dtype_name",
           "shard_names", "FORMAT_METADATA", "SINGLE_FILE"]

SINGLE_FILE = "model.safetensors"
# one metadata key only: the header must be the same bytes for the same tensors
FORMAT_METADATA = {"format": "pt"}

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# the safetensors library's dtype order (its Rust enum), written from the last one down
_LIBRARY_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                  "I64", "U64")
_RANK = {name: rank for rank, name in enumerate(_LIBRARY_ORDER)}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    if dtype not in _NAMES:
        raise OutputLayoutError(f"dtype {dtype} cannot be stored in safetensors; use one of {', '.join(_NAMES.values())}")
    return _NAMES[dtype]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor as the plan says it will be."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One shard file: its header bytes (data begins right after them) and where each tensor
    lies, as absolute (begin, end) byte offsets in the file."""

    file: str
    header: bytes
    slots: dict[str, tuple[int, int]]

    @property
    def size(self) -> int:
        return len(self.header) + sum(end - begin for begin, end in self.slots.values())


@dataclass(frozen=True)
class ShardLayout:
    """Every shard of a saved model and every planned tensor."""

    shards: tuple[Shard, ...]
    tensors: dict[str, PlannedTensor]

    @property
    def tensor_bytes(self) -> int:
        """The bytes of the tensors alone (the index's ``total_size``)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        """The bytes the shard files take, headers included."""
        return sum(s.size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, in output order."""
        where = {name: shard.file for shard in self.shards for name in shard.slots}
        return {name: where[name] for name in self.tensors}


def entry_json(name: str, dtype: str, shape: Sequence[int], begin: int, end: int) -> str:
    """One tensor's header entry, ``"name":{...}``, as the safetensors library writes it."""
    info = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(name, ensure_ascii=False) + ":" + json.dumps(info, separators=(",", ":"))


def header_text(entries: Iterable[str]) -> bytes:
    """The JSON header of ``entries`` (from ``entry_json``), unpadded: each entry adds its
    length plus one (its comma)."""
    metadata = json.dumps(FORMAT_METADATA, separators=(",", ":"))
    return ('{"__metadata__":' + metadata + "".join("," + e for e in entries) + "}").encode()


def encode_header(entries: Iterable[str], reserve: int | None = None) -> bytes:
    """The 8-byte length and the JSON header of ``entries`` (from ``entry_json``), padded with
    spaces to a multiple of 8 bytes, or to exactly ``reserve`` bytes when given (the format
    allows trailing spaces; a header written after its data needs the room kept for it)."""
    text = header_text(entries)
    length = len(text) + (-len(text)) % 8 if reserve is None else reserve
    if len(text) > length:
        raise OutputLayoutError(f"a shard header of {len(text)} bytes does not fit the {length} bytes kept for it")
    return struct.pack("<Q", length) + text + b" " * (length - len(text))


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as Hugging Face names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _library_order(tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    return sorted(tensors, key=lambda t: (-_RANK[dtype_name(t.dtype)], t.name.encode()))


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> ShardLayout:
    """The layout of ``tensors`` (output order) in shards of at most ``max_shard_bytes``."""
    if max_shard_bytes <= 0:
        raise OutputLayoutError(f"shard size must be positive, got {max_shard_bytes}")
    by_name: dict[str, PlannedTensor] = {}
    for tensor in tensors:
        if tensor.name in by_name:
            raise OutputLayoutError(f"the output plan lists tensor {tensor.name!r} twice")
        dtype_name(tensor.dtype)
        by_name[tensor.name] = tensor
    groups: list[list[PlannedTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if groups[-1] and filled + tensor.nbytes > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(tensor)
        filled += tensor.nbytes
    shards = []
    for file, members in zip(shard_names(len(groups)), groups):
        entries, relative, offset = [], {}, 0
        for tensor in _library_order(members):
            relative[tensor.name] = (offset, offset + tensor.nbytes)
            entries.append(entry_json(tensor.name, dtype_name(tensor.dtype), tensor.shape, offset, offset + tensor.nbytes))
            offset += tensor.nbytes
        header = encode_header(entries)
        slots = {name: (len(header) + begin, len(header) + end) for name, (begin, end) in relative.items()}
        shards.append(Shard(file, header, slots))
    return ShardLayout(tuple(shards), by_name)
