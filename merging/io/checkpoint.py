"""Lazy readers of Hugging Face model folders (safetensors only, one tensor at a time).

A folder holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Tensors are read on demand, never the whole model, each with positional reads into a buffer
torch owns (``safetensors_header.read_tensor``): no page of the file stays mapped, so the
process holds only the tensors in flight, and several threads may read at once.
Pickle checkpoints (``pytorch_model.bin``) are refused unless the user opts in with
``allow_pickle``, and then loaded with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from merging.errors import CheckpointMismatchError, CheckpointNotFoundError, UnsafeCheckpointError
from merging.io.files import model_file, read_json_object
from merging.io.safetensors_header import TensorSlot, read_layout, read_tensor

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
        shapes_only: also accept safetensors files that hold only their header (no tensor data):
            their tensors have names, shapes and dtypes, and reading one is an error. For a base
            whose weights a merge never reads (an ``out_format: peft`` merge of LoRA adapters).
    """

    def __init__(self, path: str | Path, name: str | None = None, allow_pickle: bool = False,
                 shapes_only: bool = False) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        self.shapes_only = shapes_only
        self._headers_only: set[Path] = set()  # files without their data area (shapes_only)
        if not self.path.is_dir():
            raise CheckpointNotFoundError(
                f"model {self.name!r}: folder {self.path} does not exist (give a local model folder, "
                "or a Hugging Face id fetched with network access)"
            )
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._fds: dict[Path, int] = {}  # open weight files (read with os.preadv)
        self._fds_lock = threading.Lock()
        self._slots: dict[str, TensorSlot] = {}  # tensor name -> (shape, dtype, begin, end) in its file
        self._pickled: dict[str, torch.Tensor] | None = None
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._aliases: dict[str, str] = {}  # a name this checkpoint lacks -> the tied copy it reads instead
        index = self.path / SAFETENSORS_INDEX
        single = self.path / SAFETENSORS_SINGLE
        if os.path.lexists(index):
            self._read_index(model_file(self.path, SAFETENSORS_INDEX, self._owner))
        elif os.path.lexists(single):
            self._add_file(SAFETENSORS_SINGLE)
        else:
            others = sorted(p.name for p in self.path.glob("*.safetensors"))
            if others:
                for file in others:
                    self._add_file(file)
            elif any(os.path.lexists(self.path / n) for n in PICKLE_NAMES):
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

    @property
    def _owner(self) -> str:
        return f"model {self.name!r}"

    def _add_file(self, name: str, wanted: list[str] | None = None) -> None:
        """Validate one safetensors file's header and record its tensors (``wanted``: the
        tensors an index assigns to it, each of which must be there)."""
        path = model_file(self.path, name, self._owner)
        try:
            header = read_layout(path, self._owner)
        except CheckpointMismatchError:
            if not self.shapes_only:
                raise
            header = read_layout(path, self._owner, shapes_only=True)
            self._headers_only.add(path)
        for tensor in sorted(header) if wanted is None else wanted:
            if tensor not in header:
                raise CheckpointMismatchError(f"{self._owner}: {SAFETENSORS_INDEX} puts tensor {tensor!r} in {name}, "
                                              "which does not contain it; the index and the shards do not belong together")
            self._files[tensor] = path
            self._slots[tensor] = header[tensor]
            self._meta[tensor] = header[tensor][:2]

    def _read_index(self, index: Path) -> None:
        data = read_json_object(index, self._owner)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointMismatchError(f"{self._owner}: {index} must have a 'weight_map' object mapping tensor names "
                                          f"to shard file names, got {type(weight_map).__name__}")
        by_file: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            by_file.setdefault(file, []).append(tensor)
        for file, tensors in by_file.items():
            self._add_file(file, tensors)

    def _load_pickle(self) -> None:
        files = [self.path / "pytorch_model.bin"]
        index = self.path / "pytorch_model.bin.index.json"
        if os.path.lexists(index):
            weight_map = read_json_object(model_file(self.path, index.name, self._owner), self._owner).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointMismatchError(f"{self._owner}: {index} has no 'weight_map' object")
            files = [self.path / f for f in sorted(set(weight_map.values()))]
        self._pickled = {}
        for file in files:
            path = model_file(self.path, str(file.relative_to(self.path)), self._owner)
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # UnpicklingError (a forbidden global), RuntimeError (not a zip/pickle), EOFError
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UnsafeCheckpointError(
                    f"{self._owner}: {path.name} cannot be loaded as plain weights ({type(err).__name__}: "
                    f"{reason[:200]}); nothing in it was executed. Convert it to safetensors in a trusted environment"
                ) from None
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise UnsafeCheckpointError(f"{self._owner}: {path.name} is not a state dict of tensors")
            self._pickled.update(loaded)
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in self._pickled.items()}

    def _fd(self, file: Path) -> int:
        with self._fds_lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._fds[file]

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

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v[1] for k, v in self._meta.items()}

    def files(self) -> list[Path]:
        """The weight files the tensors are read from, sorted by name."""
        return sorted(set(self._files.values()), key=lambda p: p.name)

    def file_of(self, key: str) -> str:
        """The shard file a tensor lives in (used to read tensors in file order)."""
        key = self._aliases.get(key, key)
        return self._files[key].name if self._files else "pytorch_model.bin"

    def alias(self, missing: str, present: str) -> None:
        """Serve tensor ``missing`` (absent here) as the tied copy ``present`` (a checkpoint saved
        with one copy of a parameter another saved several times)."""
        self._meta[missing] = self._meta[present]
        self._aliases[missing] = self._aliases.get(present, present)

    def hide(self, key: str) -> None:
        """Leave out tensor ``key`` (a redundant tied copy the base does not store)."""
        del self._meta[key]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU)."""
        if key not in self._meta:
            raise KeyError(key)
        key = self._aliases.get(key, key)
        if self._pickled is not None:
            return self._pickled[key]
        if self._files[key] in self._headers_only:
            raise CheckpointMismatchError(
                f"{self._owner}: {self._files[key].name} holds tensor headers only (no data), and this merge reads "
                f"tensor {key!r}; a header-only base serves only out_format: peft merges of LoRA adapters (without "
                "modules_to_save) by a method that keeps their span; give the full base")
        file = self._files[key]
        return read_tensor(self._fd(file), self._slots[key], f"{self._owner}, tensor {key!r} in {file.name}")

    def close(self) -> None:
        with self._fds_lock:
            while self._fds:
                os.close(self._fds.popitem()[1])
        self._pickled = None

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        while fds:
            os.close(fds.popitem()[1])

