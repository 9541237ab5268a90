"""GGUF import: a llama.cpp ``.gguf`` file (quantized or not) becomes a plain Hugging Face
safetensors folder, so every later stage sees an ordinary model.

transformers reads the file (``from_pretrained(folder, gguf_file=name)``), dequantizes every
tensor to float32 and undoes llama.cpp's q/k row permutation; the tokenizer is rebuilt from
the same file's ``tokenizer.ggml.*`` metadata. The GGUF quantizer and ``quantization_config``
are dropped before ``save_pretrained`` (the weights are dense by then, and a quantized model
refuses to save). The folder is written atomically and carries ``gguf_source.json`` with the
GGUF's sha256: a second import of the same file is a no-op.

A ``.gguf`` file given as a model reference (``mergeflow merge``) is converted once into
``<cache>/<sha256 prefix>`` (``converted_gguf``): the folder is named by the file's content, so
the same bytes anywhere share one conversion and a changed file gets a new one.

This is the one module of ``merging`` that imports transformers (inside ``import_gguf``, so
importing the module stays light): reading GGUF is transformers' job.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

from merging.digests import file_digest
from merging.errors import CheckpointNotFoundError, MergeConfigError, OutputExistsError
from merging.io.artifacts import acquire_lock, release_lock
from merging.io.writer import atomic_output_dir

__all__ = ["import_gguf", "find_gguf", "is_converted", "converted_gguf", "gguf_cache_dir", "MARKER", "CACHE_ENV"]

MARKER = "gguf_source.json"
CACHE_ENV = "MERGEFLOW_GGUF_CACHE"
log = logging.getLogger(__name__)


def find_gguf(source: Path, gguf_file: str | None = None) -> Path:
    """The ``.gguf`` file that ``source`` (a file, or a folder holding one) names.

    Raises:
        CheckpointNotFoundError: ``source`` or the named file does not exist, or the folder has no ``.gguf``.
        MergeConfigError: several candidates and no ``gguf_file``, or ``gguf_file`` contradicts ``source``.
    """
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix != ".gguf":
            raise MergeConfigError(f"{source} is not a .gguf file; point 'source' at a .gguf file or a folder holding one")
        if gguf_file is not None and Path(gguf_file).name != source.name:
            raise MergeConfigError(f"gguf_file {gguf_file!r} does not match source file {source.name!r}; drop gguf_file or fix it")
        return source
    if not source.is_dir():
        raise CheckpointNotFoundError(f"GGUF source {source} does not exist")
    candidates = sorted(str(p.relative_to(source)) for p in source.rglob("*.gguf") if p.is_file())
    if gguf_file is not None:
        path = source / gguf_file
        if not path.is_file():
            raise CheckpointNotFoundError(f"gguf_file {gguf_file!r} not found in {source}; candidates: {candidates or 'none'}")
        return path
    if not candidates:
        raise CheckpointNotFoundError(f"no .gguf file in {source}; point 'source' at a GGUF file or a folder holding one")
    if len(candidates) > 1:
        raise MergeConfigError(f"{source} holds {len(candidates)} .gguf files ({', '.join(candidates)}); "
                               "name the one to use with 'gguf_file'")
    return source / candidates[0]


def is_converted(out_dir: Path, digest: str) -> bool:
    """Whether ``out_dir`` holds the conversion of the GGUF file with sha256 ``digest``."""
    marker = out_dir / MARKER
    if not (marker.is_file() and (out_dir / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == digest
    except json.JSONDecodeError:
        return False


def gguf_cache_dir() -> Path:
    """Where ``.gguf`` model references are converted: ``$MERGEFLOW_GGUF_CACHE``, else
    ``$XDG_CACHE_HOME/mergeflow/gguf`` (``~/.cache/mergeflow/gguf``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mergeflow" / "gguf"


def converted_gguf(path: Path, cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder of the GGUF file ``path``: ``<cache_dir>/<sha256[:24]>``
    (``gguf_cache_dir()`` by default), converted on first use, atomically."""
    path = find_gguf(Path(path))
    digest = file_digest(path)
    return _convert(path, digest, Path(cache_dir or gguf_cache_dir()) / digest[:24])


def import_gguf(source: Path, gguf_file: str | None, out_dir: Path, *, overwrite: bool = True) -> Path:
    """Dequantize a GGUF model into a Hugging Face safetensors folder at ``out_dir``.

    Args:
        source: a ``.gguf`` file, or a folder holding one (``gguf_file`` picks among several).
        gguf_file: the file's name inside ``source`` (relative path), or None.
        out_dir: the folder to write; left as is when it already holds this GGUF's conversion.
        overwrite: replace an ``out_dir`` holding anything else (else ``OutputExistsError``).

    Returns:
        ``out_dir``: config, float32 safetensors weights, tokenizer and ``gguf_source.json``.

    Raises:
        CheckpointNotFoundError: no such file or folder.
        OutputExistsError: ``out_dir`` holds something else and ``overwrite`` is False.
        MergeConfigError: ambiguous or unreadable file, or an architecture transformers cannot load.
    """
    path = find_gguf(Path(source), gguf_file)
    return _convert(path, file_digest(path), Path(out_dir), overwrite)


def _convert(path: Path, digest: str, out_dir: Path, overwrite: bool = True) -> Path:
    """Convert under a lock beside ``out_dir``: a second process converting the same file waits
    for the first and reuses its folder instead of converting again."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    lock = acquire_lock(lock_path)
    try:
        return _convert_locked(path, digest, out_dir, overwrite)
    finally:
        release_lock(lock, lock_path)


def _convert_locked(path: Path, digest: str, out_dir: Path, overwrite: bool) -> Path:
    if is_converted(out_dir, digest):
        log.info("GGUF %s already converted in %s", path.name, out_dir)
        return out_dir
    if not overwrite and os.path.lexists(out_dir):
        raise OutputExistsError(f"{out_dir} exists and is not a conversion of {path.name}; pass --overwrite to replace it")
    start = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, IndexError, OSError, ImportError, struct.error) as err:  # unreadable or unsupported file
        raise MergeConfigError(f"cannot convert GGUF {path}: {type(err).__name__}: {err}. Check that the file is complete "
                               f"(sha256 {digest[:12]}...) and its architecture is one transformers "
                               f"{transformers.__version__} reads from GGUF (llama, mistral, qwen2, gemma, ...)") from None
    # The weights are dense float32 now; the quantizer only stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_file": path.name, "gguf_sha256": digest, "transformers": transformers.__version__}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    log.info("converted GGUF %s to %s in %.1f s", path.name, out_dir, time.perf_counter() - start)
    return out_dir
