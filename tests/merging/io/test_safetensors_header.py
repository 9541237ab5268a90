"""The safetensors header validator against files written by the safetensors library and
hand-built headers (numbers worked out by hand: F32 is 4 bytes an element)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from merging.errors import CheckpointMismatchError
from merging.io.safetensors_header import read_header


def _file(path, header: dict, data_size: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)
    return path


def test_reads_what_the_library_writes(tmp_path):
    tensors = {"a": torch.zeros(3, 4), "b": torch.zeros(0, 5, dtype=torch.bfloat16), "c": torch.zeros(2, dtype=torch.int64),
               "d": torch.zeros(7, dtype=torch.bool)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "m.safetensors", "m")
    assert header == {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def test_a_valid_hand_built_header(tmp_path):
    # a: F32 [2, 3] = 24 bytes at [0, 24); b: F16 [4] = 8 bytes at [24, 32); empty tensor at the end
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [32, 32]}}
    assert read_header(_file(tmp_path / "x", header, 32), "m") == {
        "a": ((2, 3), torch.float32), "b": ((4,), torch.float16), "e": ((0,), torch.float32)}


@pytest.mark.parametrize("entry, data_size, message", [
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, 24, "needs 24 bytes but its offsets span 20"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}, 24, "outside the 24-byte data area"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}, 24, "outside"),
    ({"dtype": "F33", "shape": [2, 3], "data_offsets": [0, 24]}, 24, "unknown dtype"),
    ({"dtype": "F32", "shape": [2.0, 3], "data_offsets": [0, 24]}, 24, "invalid shape"),
    ({"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]}, 24, "invalid shape"),
    ({"dtype": "F32", "shape": [2, 3]}, 24, "exactly dtype, shape and data_offsets"),
    ("F32", 24, "exactly dtype"),
])
def test_inconsistent_entries(tmp_path, entry, data_size, message):
    with pytest.raises(CheckpointMismatchError, match=message):
        read_header(_file(tmp_path / "x", {"t": entry}, data_size), "model 'm'")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    with pytest.raises(CheckpointMismatchError, match="'a' and 'b' overlap"):
        read_header(_file(tmp_path / "x", header, 16), "m")


def test_length_field_and_json(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointMismatchError, match="header claims 4611686018427387904 bytes"):
        read_header(path, "m")
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointMismatchError, match="not a JSON object"):
        read_header(path, "m")
    path.write_bytes(b"\x01")
    with pytest.raises(CheckpointMismatchError, match="too short"):
        read_header(path, "m")
    path.write_bytes(struct.pack("<Q", 4) + b"{\"a\"")
    with pytest.raises(CheckpointMismatchError, match="not valid JSON"):
        read_header(path, "m")
