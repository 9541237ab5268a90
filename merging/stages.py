"""The merge split into pipeline stages over the artifact store.

``deltas`` (theta_t - theta_0 per tensor group) -> ``decompose`` -> ``sparsify`` -> ``combine``
(merged delta, times lambda) -> ``save`` (base + merged delta as a Hugging Face folder).
Each function reads its input artifacts, runs the method's stage per tensor group, and
writes one artifact atomically with its manifest. Stages a method does not have are
``passthrough`` manifests that point at their input (no data copied). ``fused_combine``
streams deltas -> decompose -> sparsify -> combine in memory per group, for models too
large to keep intermediates, and gives bit-identical output.

The cache key of a stage is the sha256 of: its name, the parameters it reads, the output
digests of its input artifacts and the library version. Prefect tasks and DVC stages use
the same artifacts, so both routes skip the same work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from merging.api import run_stages
from merging.config import MergeConfig
from merging.io.artifacts import ArtifactReader, ArtifactWriter, read_manifest
from merging.io.model_card import write_support_files
from merging.io.writer import ShardedWriter, atomic_output_dir, parse_size
from merging.merge import _DTYPES, MergeInputs, _deltas, _stats_for, _tokenizer_folder, resolve_device
from merging.rng import generator_for
from merging.spec import TensorGroup
from merging.thresholds import global_thresholds
from merging.version import VERSION

__all__ = [
    "STAGES", "stage_params", "stage_key", "write_deltas", "write_decompose", "write_sparsify",
    "write_combine", "write_fused_combine", "write_model", "artifact_is_current", "key_for", "input_digests",
    "partition_groups", "write_index", "part_key",
]

log = logging.getLogger(__name__)

STAGES = ("deltas", "decompose", "sparsify", "combine", "save")
Progress = Callable[[int, int, str], None] | None


_METHOD_STAGES = ("decompose", "sparsify", "combine")


def stage_params(config: MergeConfig, stage: str) -> dict[str, Any]:
    """The part of ``config`` that ``stage`` reads (what its cache key and manifest record).

    A method stage records the parameters of its own stage and of the method stages before
    it: a parameter placed at its earliest reader (e.g. Circuit-Merge's temperature, read by
    sparsify and combine) must still invalidate the later readers even when the earlier
    stage's output happens not to change.
    """
    from merging.registry import get_method

    spec = get_method(config.merge_method)
    if stage == "deltas":
        return {"include": list(config.include), "exclude": list(config.exclude), "ignore": list(config.ignore),
                "compute_dtype": config.compute_dtype, "dtype": config.dtype}
    if stage == "save":
        return {"out_dtype": config.out_dtype or config.dtype, "tokenizer_source": config.tokenizer_source,
                "shard_size": str(config.shard_size)}
    upto = set(_METHOD_STAGES[: _METHOD_STAGES.index(stage) + 1])
    picked: dict[str, Any] = {"method": spec.name}
    picked["parameters"] = {k: v for k, v in sorted(config.parameters.items()) if spec.stage_of(k) in upto}
    picked["models"] = [{k: v for k, v in sorted(m.parameters.items()) if spec.stage_of(k) in upto} for m in config.models]
    if spec.random and stage != "decompose":
        picked["seed"] = config.seed
    return picked


def stage_key(stage: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """sha256 of (stage, params it reads, input output-digests, library version)."""
    payload = json.dumps({"stage": stage, "params": params, "inputs": inputs, "version": VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _fused_params(config: MergeConfig) -> dict[str, Any]:
    return {s: stage_params(config, s) for s in ("deltas", "decompose", "sparsify", "combine")}


def key_for(stage: str, config: MergeConfig, dirs: dict[str, str | Path | None], fused: bool = False) -> str:
    """The cache key the artifact of ``stage`` gets from these input artifact folders."""
    params = _fused_params(config) if fused else stage_params(config, stage)
    return stage_key("fused-combine" if fused else stage, params, input_digests(dirs))


def input_digests(dirs: dict[str, str | Path | None]) -> dict[str, str]:
    return {name: _digest(d) if d else "" for name, d in sorted(dirs.items())}


def _manifest(stage: str, config: MergeConfig, dirs: dict[str, str | Path | None], fused: bool = False,
              groups: list[str] | None = None) -> dict[str, Any]:
    params = _fused_params(config) if fused else stage_params(config, stage)
    inputs = input_digests(dirs)
    key = stage_key("fused-combine" if fused else stage, params, inputs)
    if groups is not None:
        key = part_key(key, groups)
    return {
        "stage": stage, "method": config.merge_method, "params": params, "inputs": inputs, "fused": fused,
        "cache_key": key, "versions": _versions(), **({"partition": len(groups)} if groups is not None else {}),
    }


def part_key(stage_key_value: str, groups: list[str]) -> str:
    """The cache key of one partition of a stage."""
    return hashlib.sha256((stage_key_value + "\x00" + "\x00".join(groups)).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import safetensors

    return {"mergeflow": VERSION, "torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__}


def artifact_is_current(folder: str | Path, key: str) -> bool:
    """Whether ``folder`` holds a complete artifact made with cache key ``key``."""
    try:
        return read_manifest(folder).get("cache_key") == key
    except Exception:
        return False


def _digest(folder: str | Path) -> str:
    """The content identity of an artifact (what downstream cache keys depend on)."""
    manifest = read_manifest(folder)
    if manifest.get("passthrough"):
        return manifest["cache_key"]
    if manifest.get("parts"):
        return manifest["parts_digest"]
    return manifest["output_digest"]


def _relative(target: str | Path, artifact: Path) -> str:
    """``target`` relative to ``artifact``'s folder, so a moved or cloned store still reads."""
    return os.path.relpath(Path(target).resolve(), Path(artifact).resolve())


def _passthrough(out: Path, manifest: dict[str, Any], source: str | Path) -> Path:
    writer = ArtifactWriter(out, {**manifest, "passthrough": _relative(source, out)})
    return writer.commit()


def _groups(inputs: MergeInputs, subset: list[str] | None = None):
    entries = [e for e in inputs.plan if e.kind != "ignore"]
    if subset is None:
        return entries
    wanted = set(subset)
    return [e for e in entries if e.name in wanted]


def partition_groups(config: MergeConfig, parts: int) -> list[list[str]]:
    """Split the merged tensor groups into ``parts`` contiguous partitions of similar size
    (bytes), for stages mapped over workers; ``write_index`` joins their artifacts."""
    inputs = MergeInputs(config)
    entries = _groups(inputs)
    sizes = [max(1, _numel(e.shape)) for e in entries]
    target = sum(sizes) / max(parts, 1)
    out: list[list[str]] = [[]]
    filled = 0.0
    for entry, size in zip(entries, sizes):
        if out[-1] and filled + size > target * len(out) and len(out) < parts:
            out.append([])
        out[-1].append(entry.name)
        filled += size
    return [p for p in out if p]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_index(stage: str, config: MergeConfig, dirs: dict[str, str | Path | None], parts: list[str | Path], out: str | Path) -> Path:
    """The artifact of a stage mapped over partitions: a manifest listing the partial
    artifacts (no data copied); readers see the union of their groups."""
    manifest = _manifest(stage, config, dirs)
    digests = hashlib.sha256("".join(_digest(p) for p in parts).encode()).hexdigest()
    relative = [_relative(p, Path(out)) for p in parts]
    writer = ArtifactWriter(Path(out), {**manifest, "parts": relative, "parts_digest": digests})
    return writer.commit()


def _group(inputs: MergeInputs, entry, base: torch.Tensor, deltas: torch.Tensor, thresholds, trim_kinds) -> TensorGroup:
    _, model_params = inputs.params_for(entry)
    return TensorGroup(
        name=entry.name, base=base, deltas=deltas, model_params=model_params, kind=entry.kind,
        has_base=inputs.has_base, trim_thresholds=thresholds if entry.kind in trim_kinds else None,
        stats=_stats_for(inputs.stats, entry.name),
    )


class _Context:
    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.inputs = MergeInputs(config)
        self.spec = self.inputs.spec
        self.device = resolve_device(config.device)
        self.dtype = _DTYPES[config.compute_dtype]

    def base(self, name: str) -> torch.Tensor:
        raw = self.inputs.base.get(name)
        if self.config.dtype:
            raw = raw.to(_DTYPES[self.config.dtype])
        return raw.to(device=self.device, dtype=self.dtype)


def _each(entries, progress: Progress) -> Iterable:
    for done, entry in enumerate(entries, start=1):
        yield entry
        if progress is not None:
            progress(done, len(entries), entry.name)


def write_deltas(config: MergeConfig, out: str | Path, fetch_dir: str | Path | None = None, progress: Progress = None) -> Path:
    """Materialize the task deltas of every merged tensor group."""
    ctx = _Context(config)
    writer = ArtifactWriter(Path(out), _manifest("deltas", config, {"fetch": fetch_dir}), parse_size(config.shard_size))
    try:
        for entry in _each(_groups(ctx.inputs), progress):
            writer.add_group(entry.name, {"deltas": _deltas(ctx.inputs, entry, ctx.base(entry.name))})
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_decompose(config: MergeConfig, deltas_dir: str | Path, out: str | Path, progress: Progress = None,
                    groups: list[str] | None = None) -> Path:
    """Run the method's decomposition per group (passthrough if it has none); ``groups``
    restricts it to one partition (see ``partition_groups`` and ``write_index``)."""
    ctx = _Context(config)
    manifest = _manifest("decompose", config, {"deltas": deltas_dir}, groups=groups)
    if not ctx.spec.has_decompose:
        return _passthrough(Path(out), manifest, deltas_dir)
    deltas = ArtifactReader(deltas_dir)
    writer = ArtifactWriter(Path(out), manifest, parse_size(config.shard_size))
    try:
        for entry in _each(_groups(ctx.inputs, groups), progress):
            group = _group(ctx.inputs, entry, ctx.base(entry.name), deltas.read_group(entry.name)["deltas"].to(ctx.device), None, ())
            params, _ = ctx.inputs.params_for(entry)
            writer.add_group(entry.name, ctx.spec.decompose(group, params))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _thresholds(ctx: _Context, delta_source: Callable[[Any], torch.Tensor]):
    """Whole-model per-model thresholds of a declared global trim (streamed first pass)."""
    groups = _groups(ctx.inputs)
    if not groups:
        return None, frozenset()
    params, model_params = ctx.inputs.params_for(groups[0])
    return global_thresholds(ctx.spec, params, model_params, groups, delta_source, ctx.dtype, ctx.device)


def write_sparsify(config: MergeConfig, decompose_dir: str | Path, deltas_dir: str | Path, out: str | Path,
                   progress: Progress = None, groups: list[str] | None = None) -> Path:
    """Run the method's sparsification (trim / drop / prune + sign election) per group."""
    from merging.spec import _identity_sparsify

    ctx = _Context(config)
    manifest = _manifest("sparsify", config, {"decompose": decompose_dir, "deltas": deltas_dir}, groups=groups)
    if ctx.spec.sparsify is _identity_sparsify:
        return _passthrough(Path(out), manifest, decompose_dir)
    deltas = ArtifactReader(deltas_dir)
    factors_in = ArtifactReader(decompose_dir)
    thresholds, kinds = _thresholds(ctx, lambda e: deltas.read_group(e.name)["deltas"])
    writer = ArtifactWriter(Path(out), manifest, parse_size(config.shard_size))
    try:
        for entry in _each(_groups(ctx.inputs, groups), progress):
            group = _group(ctx.inputs, entry, ctx.base(entry.name), deltas.read_group(entry.name)["deltas"].to(ctx.device), thresholds, kinds)
            params, _ = ctx.inputs.params_for(entry)
            factors = {k: v.to(ctx.device) for k, v in factors_in.read_group(entry.name).items()}
            writer.add_group(entry.name, ctx.spec.sparsify(group, factors, params, generator_for(config.seed, entry.name)))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_combine(config: MergeConfig, sparsify_dir: str | Path, deltas_dir: str | Path, out: str | Path,
                  progress: Progress = None, groups: list[str] | None = None) -> Path:
    """Combine the factors of each group into its merged delta (times lambda)."""
    ctx = _Context(config)
    manifest = _manifest("combine", config, {"sparsify": sparsify_dir, "deltas": deltas_dir}, groups=groups)
    deltas = ArtifactReader(deltas_dir)
    factors_in = ArtifactReader(sparsify_dir)
    writer = ArtifactWriter(Path(out), manifest, parse_size(config.shard_size))
    try:
        for entry in _each(_groups(ctx.inputs, groups), progress):
            group = _group(ctx.inputs, entry, ctx.base(entry.name), deltas.read_group(entry.name)["deltas"].to(ctx.device), None, ())
            params, _ = ctx.inputs.params_for(entry)
            factors = {k: v.to(ctx.device) for k, v in factors_in.read_group(entry.name).items()}
            merged = ctx.spec.combine(group, factors, params)
            writer.add_group(entry.name, {"merged_delta": merged * params.lambda_ if params.lambda_ != 1 else merged})
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_fused_combine(config: MergeConfig, out: str | Path, fetch_dir: str | Path | None = None, progress: Progress = None) -> Path:
    """deltas -> decompose -> sparsify -> combine in memory per group; same output as the
    materialized stages, without writing the intermediates."""
    ctx = _Context(config)
    manifest = _manifest("combine", config, {"fetch": fetch_dir}, fused=True)
    thresholds, kinds = _thresholds(ctx, lambda e: _deltas(ctx.inputs, e, ctx.base(e.name)))
    writer = ArtifactWriter(Path(out), manifest, parse_size(config.shard_size))
    try:
        for entry in _each(_groups(ctx.inputs), progress):
            base = ctx.base(entry.name)
            group = _group(ctx.inputs, entry, base, _deltas(ctx.inputs, entry, base), thresholds, kinds)
            params, _ = ctx.inputs.params_for(entry)
            writer.add_group(entry.name, {"merged_delta": run_stages(ctx.spec, group, params, config.seed)})
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_model(config: MergeConfig, combine_dir: str | Path, out: str | Path, progress: Progress = None,
                overwrite: bool = True) -> Path:
    """base + merged delta, cast once to the output dtype, as a Hugging Face folder."""
    ctx = _Context(config)
    combined = ArtifactReader(combine_dir)
    manifest = _manifest("save", config, {"combine": combine_dir})
    out_dtype_name = config.out_dtype or config.dtype
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, parse_size(config.shard_size))
        entries = sorted(ctx.inputs.plan, key=lambda e: ctx.inputs.base.file_of(e.name))
        for entry in _each(entries, progress):
            raw = ctx.inputs.base.get(entry.name)
            out_dtype = _DTYPES[out_dtype_name] if out_dtype_name and raw.is_floating_point() else raw.dtype
            if entry.kind == "ignore":
                writer.add(entry.name, raw.to(out_dtype))
                continue
            merged = ctx.base(entry.name) + combined.read_group(entry.name)["merged_delta"].to(ctx.device)
            writer.add(entry.name, merged.to(out_dtype))
        files = writer.finalize()
        write_support_files(base_folder=ctx.inputs.base_folder, tokenizer_folder=_tokenizer_folder(config, ctx.inputs), out=tmp,
                            config=config, out_dtype=out_dtype_name, spec=ctx.spec, model_names=ctx.inputs.model_names)
        from merging.io.artifacts import folder_digest

        manifest["files"] = sorted(files)
        manifest["output_digest"] = folder_digest(tmp, files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
