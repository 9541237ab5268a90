"""Model references -> local folders -> sources of per-tensor deltas.

A reference is a local folder (full model or PEFT LoRA adapter), a Hugging Face id with an
optional ``@revision`` (downloaded with ``huggingface_hub.snapshot_download``, safetensors
and JSON/tokenizer files only), or mergekit's ``model+adapter`` form. A source yields the
dense delta of one tensor against the base, one tensor at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from merging.errors import CheckpointNotFoundError
from merging.io.checkpoint import CheckpointReader

__all__ = ["ModelSource", "FullModelSource", "AdapterSource", "resolve_folder", "open_source", "is_adapter_folder"]

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def resolve_folder(ref: str) -> Path:
    """A local folder for ``ref``: the path itself, or a hub snapshot (pinned ``@revision``)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    looks_local = ref.startswith((".", "/", "~")) or os.sep + os.sep in ref or ref.count("/") != 1
    if looks_local:
        raise CheckpointNotFoundError(f"model {ref!r}: folder {path} does not exist")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # huggingface_hub raises many types (offline, 404, auth)
        raise CheckpointNotFoundError(
            f"model {ref!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Download it first (huggingface-cli download {repo_id}) "
            "and give its local path, or run with network access (HF_HUB_OFFLINE unset)"
        ) from None


class ModelSource(Protocol):
    name: str

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class FullModelSource:
    """A full fine-tune: delta = theta_t - theta_0."""

    name: str
    reader: CheckpointReader
    read_dtype: torch.dtype | None = None  # mergekit's ``dtype``: inputs are cast to it first

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.reader.shapes()

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        tensor = self.reader.get(key)
        if self.read_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.read_dtype)
        return tensor.to(device=base.device, dtype=base.dtype) - base


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter densified on the fly: delta = s * B A (zero where untouched)."""

    name: str
    adapter: object  # merging.io.adapter.LoraAdapter

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError("adapters are checked with check_against, not by shapes")

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        d = self.adapter.delta(key, base)
        return None if d is None else d.to(device=base.device, dtype=base.dtype)


def open_source(ref: str, base_folder: Path, base_shapes: dict[str, tuple[int, ...]], allow_pickle: bool = False,
                read_dtype: torch.dtype | None = None) -> ModelSource:
    """Open a model reference as a delta source, checked against the base's tensors."""
    from merging.errors import MergeConfigError
    from merging.plan import check_same_tensors

    adapter_ref = None
    if "+" in ref and not Path(ref).exists():
        ref, adapter_ref = ref.split("+", 1)
        if resolve_folder(ref).resolve() != base_folder.resolve():
            raise MergeConfigError(
                f"model {ref}+{adapter_ref}: an adapter on a model other than base_model is not supported; "
                "merge the adapter into that model first, or list the adapter on its own"
            )
    folder = resolve_folder(adapter_ref or ref)
    if is_adapter_folder(folder):
        from merging.io.adapter import LoraAdapter

        adapter = LoraAdapter(folder, name=adapter_ref or ref)
        adapter.check_against(base_shapes)
        return AdapterSource(name=adapter_ref or ref, adapter=adapter)
    reader = CheckpointReader(folder, name=ref, allow_pickle=allow_pickle)
    check_same_tensors(base_shapes, reader.shapes(), ref)
    return FullModelSource(name=ref, reader=reader, read_dtype=read_dtype)
