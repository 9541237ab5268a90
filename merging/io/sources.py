"""Model references -> local folders -> sources of per-tensor deltas.

A reference is a local folder (full model or PEFT LoRA adapter), a local ``.gguf`` file
(converted to a folder once), a Hugging Face id with an optional ``@revision`` (downloaded
with ``huggingface_hub.snapshot_download``, safetensors and JSON/tokenizer files only), or
mergekit's ``model+adapter`` form. A source yields the dense delta of one tensor against the
base, one tensor at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from merging.errors import CheckpointNotFoundError, MergeConfigError
from merging.io.adapter import LoraAdapter
from merging.io.checkpoint import CheckpointReader

__all__ = ["ModelSource", "FullModelSource", "AdapterSource", "resolve_folder", "resolve_source", "is_local_ref", "open_source", "is_adapter_folder"]

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_local_ref(ref: str) -> bool:
    """The one rule: a reference is a local path if it exists, starts with ``.``, ``/`` or
    ``~``, or its first path component is an existing folder; otherwise a hub id."""
    first = Path(ref).parts[0] if ref else ""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or bool(first and Path(first).is_dir())


def resolve_source(ref: str, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, resolved hub commit or None) for a model reference.

    One rule: ``ref`` is local if it exists, starts with ``.``, ``/`` or ``~``, or its first
    path component is an existing folder; otherwise it is a Hugging Face id ``owner/name``
    (optionally ``@revision``), downloaded with ``snapshot_download`` at ``revision``.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path, None
    if is_local_ref(ref):
        why = "it starts with ./, / or ~" if ref.startswith((".", "/", "~")) else "its first folder exists"
        raise CheckpointNotFoundError(f"model {ref!r}: local folder {path} does not exist (read as a local path "
                                      f"because {why})")
    repo_id, _, pinned = ref.partition("@")
    revision = revision or pinned or None
    first = Path(ref).parts[0] if Path(ref).parts else ref
    rule = (f"read as a Hugging Face id because no local path {ref!r} exists, it does not start with ./, / or ~, "
            f"and its first folder {first!r} does not exist here; write ./{ref} for a local folder")
    if repo_id.count("/") != 1:
        raise CheckpointNotFoundError(f"model {ref!r}: {path} does not exist, and it is not a Hugging Face id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # huggingface_hub raises many types (offline, 404, auth): all mean "cannot fetch"
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = ("HF_HUB_OFFLINE is set: unset it to download, or download the model elsewhere "
                f"(huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "") + ") "
                "and give its local folder") if offline else "check the id, the revision and your network or token"
        raise CheckpointNotFoundError(f"model {ref!r} ({rule}) could not be fetched from the "
                                      f"Hugging Face Hub at {revision or 'main'} ({type(err).__name__}); {hint}") from None
    return folder, folder.name


def resolve_folder(ref: str) -> Path:
    """The local folder of a model reference (see ``resolve_source``); a ``.gguf`` file is
    converted once into the GGUF cache (``merging.io.gguf.converted_gguf``)."""
    path = resolve_source(ref)[0]
    if path.is_file() and path.suffix == ".gguf":
        from merging.io.gguf import converted_gguf  # needs transformers: imported only for GGUF files

        return converted_gguf(path)
    return path


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

    def delta(self, key: str, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The delta of tensor ``key``; into ``out`` (shaped like ``base``) when given: the same
        values, converted in place of a temporary copy."""
        tensor = self.reader.get(key)
        if self.read_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.read_dtype)
        if out is not None:
            return out.copy_(tensor).sub_(base)
        return tensor.to(device=base.device, dtype=base.dtype) - base


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter densified on the fly: delta = s * B A (zero where untouched)."""

    name: str
    adapter: LoraAdapter

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError("adapters are checked with check_against, not by shapes")

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        d = self.adapter.delta(key, base)
        return None if d is None else d.to(device=base.device, dtype=base.dtype)

    def factors(self, key: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The LoRA factors of ``key`` (see ``LoraAdapter.factors``)."""
        return self.adapter.factors(key, dtype)


def open_source(ref: str, base_folder: Path, base_shapes: dict[str, tuple[int, ...]], allow_pickle: bool = False,
                read_dtype: torch.dtype | None = None) -> ModelSource:
    """Open a model reference as a delta source (an adapter is checked against the base's
    tensors here; a full model's tensors are checked by the caller's plan)."""
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
        adapter = LoraAdapter(folder, name=adapter_ref or ref)
        adapter.check_against(base_shapes)
        return AdapterSource(name=adapter_ref or ref, adapter=adapter)
    reader = CheckpointReader(folder, name=ref, allow_pickle=allow_pickle)
    return FullModelSource(name=ref, reader=reader, read_dtype=read_dtype)
