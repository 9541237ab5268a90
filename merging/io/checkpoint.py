"""Lazy readers of Hugging Face model folders (safetensors only, one tensor at a time).

A folder holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Tensors are read with ``safe_open`` (memory-mapped) on demand, never the whole model.
Pickle checkpoints (``pytorch_model.bin``) are refused unless the user opts in with
``allow_pickle``, and then loaded with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from merging.errors import CheckpointNotFoundError, MergeConfigError, UnsafeCheckpointError

__all__ = ["CheckpointReader"]

log = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointReader:
    """Tensor names, shapes and dtypes of a model folder, and lazy reads of its tensors.

    Args:
        path: a Hugging Face model folder.
        name: how the model is named in messages (defaults to the path).
        allow_pickle: allow ``pytorch_model.bin`` checkpoints (weights only, no code).
    """

    def __init__(self, path: str | Path, name: str | None = None, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.is_dir():
            raise CheckpointNotFoundError(
                f"model {self.name!r}: folder {self.path} does not exist (give a local model folder, "
                "or a Hugging Face id fetched with network access)"
            )
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        index = self.path / SAFETENSORS_INDEX
        single = self.path / SAFETENSORS_SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise MergeConfigError(f"model {self.name!r}: {index} is not a valid safetensors index ({err})") from None
            for tensor, file in weight_map.items():
                shard = self.path / file
                if not shard.is_file():
                    raise CheckpointNotFoundError(f"model {self.name!r}: shard {file} listed in {index.name} is missing")
                self._files[tensor] = shard
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                for tensor in handle.keys():
                    self._files[tensor] = single
        else:
            others = sorted(p.name for p in self.path.glob("*.safetensors"))
            if others:
                for file in others:
                    with safe_open(self.path / file, framework="pt") as handle:
                        for tensor in handle.keys():
                            self._files[tensor] = self.path / file
            elif any((self.path / n).is_file() for n in PICKLE_NAMES):
                if not allow_pickle:
                    raise UnsafeCheckpointError(
                        f"model {self.name!r}: {self.path} holds only a pickle checkpoint (pytorch_model.bin), which "
                        "can run arbitrary code when loaded. Convert it to safetensors (e.g. load it once in a "
                        "trusted environment and save_pretrained(..., safe_serialization=True)), or set "
                        "allow_pickle: true (weights-only load) if you trust the file"
                    )
                self._load_pickle()
            else:
                raise CheckpointNotFoundError(
                    f"model {self.name!r}: no model.safetensors, model.safetensors.index.json or *.safetensors in {self.path}"
                )
        self._read_metadata()

    def _load_pickle(self) -> None:
        files = [self.path / "pytorch_model.bin"]
        index = self.path / "pytorch_model.bin.index.json"
        if index.is_file():
            files = sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
        self._pickled = {}
        for file in files:
            self._pickled.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))

    def _read_metadata(self) -> None:
        if self._pickled is not None:
            self._meta = {k: (tuple(v.shape), v.dtype) for k, v in self._pickled.items()}
            return
        by_file: dict[Path, list[str]] = {}
        for tensor, file in self._files.items():
            by_file.setdefault(file, []).append(tensor)
        for file, tensors in by_file.items():
            handle = self._handle(file)
            for tensor in tensors:
                sl = handle.get_slice(tensor)
                self._meta[tensor] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._meta.items()}

    def file_of(self, key: str) -> str:
        """The shard file a tensor lives in (used to read tensors in file order)."""
        return self._files[key].name if self._files else "pytorch_model.bin"

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU)."""
        if key not in self._meta:
            raise KeyError(key)
        if self._pickled is not None:
            return self._pickled[key]
        return self._handle(self._files[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()
        self._pickled = None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
