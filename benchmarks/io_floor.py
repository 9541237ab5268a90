"""The I/O floor of a merge: read every input tensor once and write a model-sized output, nothing else.

    python benchmarks/io_floor.py OUT_DIR INPUT_DIR [INPUT_DIR ...]

Imports only torch and safetensors. The output has the first input's tensors (names, shapes,
dtypes) in one safetensors file whose header is written first; each output tensor is written
as soon as every input's tensor of that name has been read: copied out of the file, as a merge
must (``get_tensor`` alone maps the file without reading it), so memory stays at one tensor per
input. A merge cannot be faster than this on the same
machine; ``bench_merge.py`` runs it in its own process beside the merges.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def _files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    return dict.fromkeys(_keys(folder / "model.safetensors"), folder / "model.safetensors")


def _keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as handle:
        return list(handle.keys())


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def main(out: Path, inputs: list[Path]) -> None:
    where = [_files(folder) for folder in inputs]
    infos = {}
    for path in sorted(set(where[0].values())):
        infos.update({k: v for k, v in _header(path).items() if k != "__metadata__"})
    header, offset = {}, 0
    for name in where[0]:
        begin, end = infos[name]["data_offsets"]
        header[name] = {"dtype": infos[name]["dtype"], "shape": infos[name]["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handles: dict[Path, object] = {}
    out.mkdir(parents=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in header:
            tensors = []
            for files in where:
                path = files[name]
                if path not in handles:
                    handles[path] = safe_open(path, "pt")
                tensors.append(handles[path].get_tensor(name).clone())  # the read itself
            f.write(tensors[0].contiguous().reshape(-1).view(torch.uint8).numpy())


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
