"""The header of a safetensors file, validated before any tensor is read.

Format: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the data area.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data area) plus an optional ``__metadata__`` string map. Checked here, with
a one-line error naming the file and tensor: the length fits the file and a 100 MB cap,
the JSON is an object, every dtype is known, every shape is a list of non-negative ints,
``end - begin`` equals the element count times the dtype's size, offsets lie inside the
data area and no two tensors overlap. (The same-size relabelling of a tensor's dtype passes
these checks; the plan refuses an input whose dtype kind differs from the base's.)

``read_tensor`` reads one tensor's bytes with positional reads (``os.preadv``) straight into a
buffer torch owns: nothing of the file stays mapped, so only the tensors in flight are resident
(a memory-mapped reader keeps every page it touched in the process's RSS until it closes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from merging.errors import CheckpointMismatchError

__all__ = ["read_header", "read_layout", "read_tensor", "TensorSlot", "DTYPES", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


TensorSlot = tuple[tuple[int, ...], torch.dtype, int, int]
"""(shape, dtype, begin, end): a tensor and its bytes' absolute offsets in the file."""


def read_header(path: Path, owner: str, shapes_only: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` of a safetensors file whose header is consistent.

    With ``shapes_only`` the data area may be missing or short (a header-only file, written to
    give a model's shapes without its weights): offsets are not checked against the file's
    size, everything else is.
    """
    return {name: (shape, dtype) for name, (shape, dtype, _, _) in read_layout(path, owner, shapes_only).items()}


def read_layout(path: Path, owner: str, shapes_only: bool = False) -> dict[str, TensorSlot]:
    """``{tensor name: (shape, dtype, begin, end)}`` of a safetensors file whose header is
    consistent (``read_header``'s checks), with absolute byte offsets for ``read_tensor``."""

    def bad(what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{owner}: {path.name} is not a valid safetensors file: {what}; "
                                       "re-download or re-save it")

    with open(path, "rb") as handle:
        size = path.stat().st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise bad(f"it is {size} bytes long, too short for a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"its header claims {length} bytes but the file has {size - 8} after the length field")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(f"its header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorSlot] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= (offsets[1] if shapes_only else data_size)):
            if data_size == 0 and isinstance(offsets, list) and all(type(o) is int and o >= 0 for o in offsets):
                raise bad("it holds tensor headers but no tensor data (a header-only file gives shapes only: enough "
                          "for the base of an out_format: peft merge of LoRA adapters that keeps their span, not here)")
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size}-byte data area")
        expected = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise bad(f"tensor {name!r} ({info['dtype']}, shape {shape}) needs {expected} bytes but its offsets "
                      f"span {offsets[1] - offsets[0]}")
        tensors[name] = (tuple(shape), dtype, 8 + length + offsets[0], 8 + length + offsets[1])
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return tensors


def read_tensor(fd: int, slot: TensorSlot, where: str) -> torch.Tensor:
    """The tensor at ``slot`` of the open file ``fd``, read with ``os.preadv`` into a fresh
    buffer (safe from several threads: the reads are positional). ``where`` names the file and
    tensor in the error raised when the file ends early (it was cut after its header was read)."""
    shape, dtype, begin, end = slot
    raw = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    done = 0
    while done < len(view):  # a read may return less than asked (2 GiB at most on Linux)
        count = os.preadv(fd, [view[done:]], begin + done)
        if count == 0:
            raise CheckpointMismatchError(f"{where}: the file ends at byte {begin + done}, inside the tensor's bytes "
                                          f"[{begin}, {end}); it was truncated while being read; re-download or re-save it")
        done += count
    return raw.view(dtype).reshape(shape)
