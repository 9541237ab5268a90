"""The pipeline, declared once: the stage table and the one runner that executes any entry.

    fetch -> deltas -> decompose -> sparsify -> combine -> save -> evaluate -> report

Each ``Stage`` names its input artifacts, the ``params.yaml`` keys it reads (what DVC lists),
whether it can be split into tensor-group partitions, and the function it runs: per tensor
group for the merge stages (``merging.stages``), per artifact for fetch, evaluate and report
(named by import path, so this library never imports lm-eval or plotting code). Everything
else is derived from this table: the Prefect task and flow, the DVC entry point
(``python -m flows.stage NAME``), ``dvc.yaml`` (``mergeflow dvc-yaml``), the fused mode and
``mergeflow merge``. Adding a stage is one entry here plus one function.

The runner owns the context, the loop over tensor groups, the writer, the manifest and the
key. A stage's key is the sha256 of its name, the params it reads, the digests of its input
artifacts and the fingerprint of the code it runs (``merging.fingerprint``), so a code change
can never serve a stale artifact. A ``recipe`` stage (``deltas``) stores a manifest only: the
stages that read it compute its groups in memory, from its own inputs, as the fused mode
does. With ``pipeline.materialize: false`` the ``fusable`` stages
write only a marker and the next stage runs them in memory per group (the fused mode);
``merge_checkpoints`` runs every merge stage that way, writing straight to its output.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merging import stages
from merging.config import MergeConfig
from merging.context import DTYPES, MergeContext, reproducible_threads
from merging.digests import content_key, model_digest
from merging.errors import ArtifactError, MergeConfigError
from merging.fetch import fetched_folders, local_state, model_sources
from merging.fingerprint import closure_files, fingerprint
from merging.io.adapter_writer import MergedAdapter
from merging.io.artifacts import (
    ArtifactReader,
    ArtifactWriter,
    artifact_digest,
    is_current,
    linked_data_folder,
    read_manifest,
    relative_link,
    write_manifest,
)
from merging.io.disk_space import check_free_space
from merging.io.shard_layout import plan_shards
from merging.io.shards import PlannedShardWriter
from merging.io.sources import AdapterSource
from merging.io.stats import STATS_FILE, collected_stats
from merging.io.writer import atomic_output_dir, parse_size, refuse_overlap
from merging.pipeline_params import PipelineParams, merge_config, named_stats
from merging.plan import TensorEntry
from merging.registry import get_method
from merging.spec import MethodSpec, _identity_sparsify
from merging.workers import group_workers, merge_groups

__all__ = ["Stage", "STAGES", "MERGE_STAGES", "get_stage", "stage_key", "stage_inputs", "stages_through", "run_stage",
           "merge_checkpoints", "RECIPE_STATS_PARAMS", "recipe_statistics",
           "partition_groups", "write_index", "stage_code_files", "pipeline_fingerprint", "fused_chain", "Progress", "MODEL_DIGEST_FILE"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None] | None
GroupFn = Callable[[MergeContext, TensorEntry, dict[str, stages.Tensors]], stages.Tensors]
MODEL_DIGEST_FILE = "model.digest"  # the saved model's identity alone, what DVC's evaluate depends on
_MERGE_CONTEXT = "fetch"  # every merge stage reads the fetched folders (base, inputs)
_MERGE_STATS = "collect_stats"  # and the inputs' statistics (empty unless the method reads them)
_LIBS = ("torch", "safetensors")
# what statistics collected through the partially merged model (RegMean++) depend on beyond the
# models and their data: the merge itself, so they are cached per recipe, not per model
RECIPE_STATS_PARAMS = ("merge.combine",)


def recipe_statistics(spec: MethodSpec) -> bool:
    """Whether the method's per-model statistics depend on the whole recipe (RegMean++)."""
    return spec.model_stats is not None and not spec.model_stats.per_model


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: stage, task and DVC stage name; artifacts live in ``<store>/<name>-<key>``.
        inputs: the stages whose artifacts it reads (merge stages also read ``fetch``).
        params: the ``params.yaml`` keys it reads (DVC reruns it when they change).
        method_params: more keys it reads for method ``spec`` (``collect_stats``: the recipe's,
            for statistics collected through the partially merged model).
        group: the per-tensor-group function of a merge stage.
        artifact: ``"module:function"`` of a whole-artifact stage, called as
            ``function(params, inputs, folder, store, code=fingerprint) -> file names`` writing
            into ``folder`` (``code``: the fingerprint of the stage's code, for caches of its own).
        partitioned: may be split over tensor-group partitions mapped over workers.
        fusable: with ``pipeline.materialize: false`` it runs in memory inside the next stage.
        covers_ignored: runs for tensors the plan keeps at the base value (``save``).
        recipe: its artifact is a manifest only (no tensors): every stage that reads it computes
            its groups in memory from the artifact's own inputs (``deltas``: input minus base,
            cheaper to recompute than to store and read back).
        passthrough: the method has no such stage: its artifact is its first input's.
        method_code: the method functions the stage runs (their modules join its fingerprint).
        first_pass: a whole-model pass before the loop, given ``read(stage, entry)``: what an
            input stage produced for a group (read from its artifact or computed in memory).
        versions: libraries whose versions join the fingerprint.
        reads_files: files or folders outside the store it may read, from the params (DVC deps:
            the local ones).
        outside_state: a cheap stand-in for the state of those files that joins the key (None:
            unknown, so the stage always runs).
        identity_file: the file in its folder that holds its output's identity alone; readers
            depend on it rather than the folder (a re-sharded model is the same model).
        output_bytes: about the bytes a merge stage stores for the given groups (checked
            against free disk before it writes; ``save`` uses its exact shard layout).
        metrics / plots: files in its folder that are DVC metrics / plots (with their options).
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    method_params: Callable[[MethodSpec], tuple[str, ...]] | None = None
    group: GroupFn | None = None
    artifact: str | None = None
    partitioned: bool = False
    fusable: bool = False
    covers_ignored: bool = False
    recipe: bool = False
    passthrough: Callable[[MethodSpec], bool] | None = None
    method_code: Callable[[MethodSpec], tuple] | None = None
    first_pass: Callable[[MergeContext, Callable[[str, TensorEntry], stages.Tensors]], None] | None = None
    versions: tuple[str, ...] = _LIBS
    reads_files: Callable[[PipelineParams], list[str]] | None = None
    outside_state: Callable[[PipelineParams], Any] | None = None
    identity_file: str | None = None
    output_bytes: Callable[[MergeContext, list[TensorEntry]], int] | None = None
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, dict], ...] = ()

    @property
    def is_merge(self) -> bool:
        return self.group is not None

    def artifact_function(self) -> Callable[..., list[str]]:
        module, _, function = self.artifact.partition(":")
        return getattr(importlib.import_module(module), function)

    def params_for(self, method: str) -> tuple[str, ...]:
        """The ``params.yaml`` keys the stage reads when the merge method is ``method``."""
        return self.params + (self.method_params(get_method(method)) if self.method_params else ())

    def code_modules(self, spec: MethodSpec | None) -> tuple[str, ...]:
        """Modules whose code the stage runs for method ``spec`` (None: any method)."""
        if not self.is_merge:
            return (self.artifact.partition(":")[0],)
        own = ("merging.pipeline", self.group.__module__)
        if self.method_code is None:
            return own
        return (*own, "merging.registry") if spec is None else (*own, *(f.__module__ for f in self.method_code(spec) if f))


STAGES: tuple[Stage, ...] = (
    Stage("fetch", (), ("models",), artifact="merging.fetch:fetch_models", versions=(),
          reads_files=model_sources, outside_state=local_state),
    Stage("collect_stats", ("fetch",), ("models", "stats", "merge.method", "pipeline.device"),
          method_params=lambda spec: RECIPE_STATS_PARAMS if recipe_statistics(spec) else (),
          artifact="evaluation.pipeline_stats:collect_pipeline_stats", versions=("torch", "transformers"),
          reads_files=lambda params: [m.data for m in params.models.inputs if m.data],
          outside_state=lambda params: _files_state([m.data for m in params.models.inputs if m.data]),
          identity_file=STATS_FILE),
    Stage("deltas", (), ("merge.method", "plan", "tokenizer", "pipeline.compute_dtype", "pipeline.materialize",
                         "pipeline.out_format"),
          group=stages.compute_deltas, fusable=True, recipe=True, output_bytes=stages.deltas_bytes,
          reads_files=lambda params: stats_files(params)),
    Stage("decompose", ("deltas",), ("merge.method", "merge.decompose", "pipeline.materialize"),
          group=stages.decompose, partitioned=True, fusable=True, output_bytes=stages.deltas_bytes,
          passthrough=lambda spec: not spec.has_decompose, method_code=lambda spec: (spec.decompose,)),
    Stage("sparsify", ("decompose", "deltas"),
          ("merge.method", "merge.seed", "merge.decompose", "merge.sparsify", "pipeline.materialize"),
          group=stages.sparsify, partitioned=True, fusable=True, first_pass=stages.trim_thresholds,
          output_bytes=stages.deltas_bytes,
          passthrough=lambda spec: spec.sparsify is _identity_sparsify,
          method_code=lambda spec: (spec.sparsify, spec.global_trim)),
    Stage("combine", ("sparsify", "deltas"),
          ("models", "merge.method", "merge.seed", "merge.decompose", "merge.sparsify", "merge.combine",
           "pipeline.materialize"),
          group=stages.combine, partitioned=True, method_code=lambda spec: (spec.combine,),
          output_bytes=stages.merged_delta_bytes),
    Stage("save", ("combine",), ("pipeline.out_dtype", "pipeline.shard_size", "pipeline.out_format", "pipeline.adapter_rank"),
          group=stages.save, covers_ignored=True,
          identity_file=MODEL_DIGEST_FILE),
    Stage("evaluate", ("save", "fetch"), ("eval", "pipeline.device"), artifact="evaluation.harness:evaluate_models",
          versions=("lm_eval", "transformers", "torch"),
          reads_files=lambda params: [params.eval.include_path] if params.eval.include_path else []),
    Stage("report", ("evaluate",), ("models", "merge.method", "eval"), artifact="evaluation.report:write_report",
          versions=(), metrics=("metrics.json",),
          plots=(("plots/scores.csv", {"x": "task", "y": "accuracy", "template": "bar_horizontal"}), ("plots/scores.png", {}))),
)
_BY_NAME = {s.name: s for s in STAGES}
MERGE_STAGES = tuple(s for s in STAGES if s.is_merge)


def get_stage(name: str) -> Stage:
    if name not in _BY_NAME:
        raise MergeConfigError(f"unknown stage {name!r}; stages: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def stages_through(name: str) -> list[str]:
    """The stages a run of ``name`` needs, itself included, in table order (its inputs, the merge
    context of merge stages, transitively): what to run, in order, to produce its artifact."""
    needed, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(stage_inputs(get_stage(current)))
    return [s.name for s in STAGES if s.name in needed]


def fused_chain(stage: Stage) -> list[Stage]:
    """The fusable stages ``stage`` reads (transitively) plus itself, in table order."""
    members = {stage.name}
    todo = list(stage.inputs)
    while todo:
        name = todo.pop()
        if name not in members and get_stage(name).fusable:
            members.add(name)
            todo.extend(get_stage(name).inputs)
    return [s for s in STAGES if s.name in members]


# --- keys and manifests -----------------------------------------------------------------------

_METHOD_STAGES = ("decompose", "sparsify", "combine")


def merge_stage_params(config: MergeConfig, stage: str) -> dict[str, Any]:
    """The part of ``config`` that merge stage ``stage`` reads (its key and manifest record it).

    A method stage records the parameters of its own stage and of the method stages before
    it: a parameter placed at its earliest reader (e.g. Circuit-Merge's temperature, read by
    sparsify and combine) must still invalidate the later readers even when the earlier
    stage's output happens not to change.
    """
    spec = get_method(config.merge_method)
    if stage == "deltas":
        # an adapter output changes the plan (untouched tensors) and what deltas keep (factors only)
        return {"include": list(config.include), "exclude": list(config.exclude), "ignore": list(config.ignore),
                "compute_dtype": config.compute_dtype, "dtype": config.dtype, "out_format": config.out_format}
    if stage == "save":
        return {"out_dtype": config.out_dtype or config.dtype, "tokenizer_source": config.tokenizer_source,
                "shard_size": str(config.shard_size), "out_format": config.out_format,
                "adapter_rank": config.adapter_rank}
    upto = set(_METHOD_STAGES[: _METHOD_STAGES.index(stage) + 1])
    picked: dict[str, Any] = {"method": spec.name}
    picked["parameters"] = {k: v for k, v in sorted(config.parameters.items()) if spec.stage_of(k) in upto}
    picked["models"] = [{k: v for k, v in sorted(m.parameters.items()) if spec.stage_of(k) in upto} for m in config.models]
    if spec.random and stage != "decompose":
        picked["seed"] = config.seed
    return picked


def _select(params: PipelineParams, keys: tuple[str, ...]) -> dict[str, Any]:
    dumped = params.model_dump(mode="json")
    picked = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return picked


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name.replace("_", "-")).split("+")[0]
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _code(chain: list[Stage], spec: MethodSpec | None) -> str:
    roots = sorted({m for s in chain for m in s.code_modules(spec)})
    return fingerprint(roots, _versions(tuple(sorted({v for s in chain for v in s.versions}))))


@dataclass(frozen=True)
class _Plan:
    """What one run of a stage reads: the derived key and the manifest fields."""

    chain: list[Stage]
    config: MergeConfig | None
    inputs: dict[str, Path]
    digests: dict[str, str]
    read: dict[str, Any]
    code: str
    key: str


def stage_inputs(stage: Stage, fused: bool = False) -> list[str]:
    """The artifacts a run of ``stage`` reads (in fused mode: those of its whole chain)."""
    chain = fused_chain(stage) if fused else [stage]
    external = {n for s in chain for n in s.inputs} - {s.name for s in chain}
    if stage.is_merge:
        external |= {_MERGE_CONTEXT, _MERGE_STATS}
    return sorted(external)


def _plan(stage: Stage, params: PipelineParams, inputs: dict[str, Path], fused: bool, groups: list[str] | None) -> _Plan:
    chain = fused_chain(stage) if fused else [stage]
    external = set(stage_inputs(stage, fused))
    missing = sorted(external - set(inputs))
    if missing:
        raise ArtifactError(f"stage {stage.name!r} needs the artifact(s) {missing}")
    used = {n: Path(inputs[n]) for n in sorted(external)}
    config = None
    if stage.is_merge:
        collected = collected_stats(used[_MERGE_STATS])
        config = merge_config(params, fetched_folders(used[_MERGE_CONTEXT]), collected)
        read = {s.name: merge_stage_params(config, s.name) for s in chain}
        spec = get_method(config.merge_method)
        if collected and recipe_statistics(spec):
            _check_recipe_statistics(used[_MERGE_STATS], params)
    else:
        read = _select(params, stage.params_for(params.merge.method))
        spec = None
    code = _code(chain, spec)
    digests = {n: artifact_digest(p) for n, p in used.items()}
    payload = {"stage": stage.name, "fused": fused, "params": read, "code": code, "inputs": digests, "groups": groups}
    if config is not None:  # statistics files are named by path in the params: their state joins the key
        payload["stats_files"] = _stats_state(config)
    if stage.outside_state is not None:
        payload["outside"] = stage.outside_state(params)
        if payload["outside"] is None:  # unknown (an unpinned hub source may move): never reuse
            payload["unknown"] = time.time_ns()
    return _Plan(chain, config, used, digests, read, code, content_key(payload))


def _check_recipe_statistics(folder: Path, params: PipelineParams) -> None:
    """Statistics of the whole recipe (RegMean++) must come from this recipe: a collect_stats
    artifact made for other merge settings (a dvc.yaml generated for another method does not
    rerun collect_stats when they change) is refused, never merged with."""
    made_for = read_manifest(folder).get("params", {})
    wanted = _select(params, RECIPE_STATS_PARAMS)
    stale = [key for key, value in wanted.items() if made_for.get(key) != value]
    if stale:
        raise ArtifactError(
            f"the collect_stats artifact {folder} holds {params.merge.method} statistics collected for other "
            f"{', '.join(stale)} ({made_for.get(stale[0])!r}, params say {wanted[stale[0]]!r}); they depend on the whole "
            "recipe, so collect_stats must rerun: regenerate dvc.yaml with 'mergeflow dvc-yaml' (it then lists those keys "
            "for collect_stats) and rerun")


def stats_files(params: PipelineParams) -> list[str]:
    """The statistics files the merge sections name (``stats``: one file, or one per model)."""
    return sorted(set(named_stats(params).values()))


def _stats_state(config: MergeConfig) -> list[Any]:
    """(path, size, mtime) of every statistics file the merge reads (the global ``stats`` and each
    model's ``stats``): a cheap stand-in for their content, as fetch's key has for local models,
    so a file rewritten in place reruns the stages that read it."""
    return _files_state([config.stats, *(m.parameters.get("stats") for m in config.models)])


def _files_state(paths: list[Any]) -> list[Any]:
    """(path, size, mtime) of each named file (None, None when absent), sorted by path."""
    state = []
    for path in sorted({str(p) for p in paths if isinstance(p, str) and p}):
        found = Path(path).expanduser()
        stat = found.stat() if found.is_file() else None
        state.append([path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return state


def pipeline_fingerprint() -> str:
    """The fingerprint of every stage's code, for any method (results cached above the stages)."""
    return _code(list(STAGES), None)


def stage_key(name: str, params: PipelineParams, inputs: dict[str, Path], fused: bool = False,
              groups: list[str] | None = None) -> str:
    """The cache key ``name`` gets from these input artifacts (see the module docstring)."""
    return _plan(get_stage(name), params, inputs, fused, groups).key


def _manifest(stage: Stage, plan: _Plan, fused: bool, groups: list[str] | None) -> dict[str, Any]:
    return {"stage": stage.name, "method": plan.config.merge_method if plan.config else None, "params": plan.read,
            "inputs": plan.digests, "fused": fused, "cache_key": plan.key,
            "versions": _versions(("mergeflow", *stage.versions)), **({"partition": len(groups)} if groups else {})}


# --- the runner -------------------------------------------------------------------------------

def run_stage(name: str, params: PipelineParams, inputs: dict[str, str | Path], out: str | Path, store: str | Path,
              *, fused: bool = False, groups: list[str] | None = None, progress: Progress = None,
              force: bool = False) -> Path:
    """Run stage ``name`` into the artifact folder ``out`` (nothing to do when ``out`` already
    holds the artifact of this key). ``fused`` runs its fusable inputs in memory; a fusable
    stage run with ``fused`` writes only a marker; ``groups`` restricts a partitioned stage
    to one partition."""
    stage, out = get_stage(name), Path(out)
    inputs = {k: Path(v) for k, v in inputs.items()}
    if fused and stage.fusable:
        return _marker(stage, out)
    plan = _plan(stage, params, inputs, fused, groups)
    if is_current(out, plan.key) and not force:
        return out
    manifest = _manifest(stage, plan, fused, groups)
    started = time.perf_counter()
    if not stage.is_merge:
        writer = ArtifactWriter(out, manifest)
        try:
            files = stage.artifact_function()(params, plan.inputs, writer.folder, Path(store), code=plan.code)
        except BaseException:
            writer.abort()
            raise
        result = writer.commit(extra_files=files)
    elif stage.recipe:
        result = ArtifactWriter(out, manifest).commit(extra={"recipe": True})
    elif stage.passthrough is not None and not fused and stage.passthrough(get_method(plan.config.merge_method)):
        link = relative_link(plan.inputs[stage.inputs[0]], out)
        result = ArtifactWriter(out, manifest).commit(extra={"passthrough": link})
    else:
        ctx = MergeContext(plan.config)
        in_memory = _computed_in_memory(plan)
        chain = [s for s in STAGES if s.name in in_memory] + plan.chain
        readers = {n: ArtifactReader(p) for n, p in plan.inputs.items() if n != _MERGE_CONTEXT and n not in in_memory}
        if stage.covers_ignored and ctx.config.out_format == "peft":
            with _adapter_sink(ctx, out, overwrite=True, manifest=manifest) as add:
                _merged_deltas(chain, ctx, readers, add, progress)
        else:
            with _sink(stage, ctx, out, manifest, overwrite=True, groups=groups) as add:
                _loop(chain, ctx, readers, add, groups, progress)
        result = out
    log.info("stage %s -> %s (%.1f s)", name, result, time.perf_counter() - started)
    return result


def _computed_in_memory(plan: _Plan) -> set[str]:
    """The input stages a run computes per group in memory instead of reading: recipes
    (``Stage.recipe``), passthroughs of recipes, and what those read that this run was not
    given (a passthrough's own input), transitively."""
    def in_memory(name: str) -> bool:
        if name not in plan.inputs:
            return True
        folder = Path(plan.inputs[name])
        return bool(read_manifest(linked_data_folder(folder)).get("recipe"))

    found: set[str] = set()
    todo = [n for n in plan.inputs if n not in (_MERGE_CONTEXT, _MERGE_STATS) and get_stage(n).is_merge]
    while todo:
        name = todo.pop()
        if name not in found and in_memory(name):
            found.add(name)
            todo.extend(get_stage(name).inputs)
    return found


def merge_checkpoints(config: MergeConfig, out: str | Path, *, overwrite: bool = False, progress: Progress = None) -> Path:
    """Merge the models of ``config`` into a Hugging Face folder at ``out``: every merge stage
    fused in memory, tensor group by tensor group, written atomically (``mergeflow merge``).
    With ``out_format: peft`` the merged deltas become a PEFT LoRA adapter instead (``_adapter_sink``)."""
    started = time.perf_counter()
    ctx = MergeContext(config)
    if config.out_format == "peft":
        with _adapter_sink(ctx, Path(out), overwrite) as add:
            _merged_deltas(list(MERGE_STAGES), ctx, {}, add, progress)
    else:
        with _sink(MERGE_STAGES[-1], ctx, Path(out), None, overwrite) as add:
            _loop(list(MERGE_STAGES), ctx, {}, add, None, progress)
    log.info("merged with %s into %s (%.1f s)", ctx.spec.name, out, time.perf_counter() - started)
    return Path(out)


def _loop(chain: list[Stage], ctx: MergeContext, readers: dict[str, ArtifactReader],
          add: Callable[[str, stages.Tensors], None], groups: list[str] | None, progress: Progress) -> None:
    """Run ``chain`` per tensor group: inputs come from ``readers`` or from the chain's earlier
    stages in memory; the last stage's output goes to ``add``."""
    by_name = {s.name: s for s in chain}
    read_by = {n: [s.name for s in chain if n in s.inputs] for s in chain for n in s.inputs}

    def produce(name: str, entry: TensorEntry, memo: dict[str, stages.Tensors]) -> stages.Tensors:
        if name not in memo:
            if name in by_name:
                stage = by_name[name]
                memo[name] = stage.group(ctx, entry, {n: produce(n, entry, memo) for n in stage.inputs})
                for n in stage.inputs:  # an input every stage reading it is done with is let go (memory)
                    if all(r in memo for r in read_by[n]):
                        memo[n] = {}  # (kept as a key: its readers' check above stays true)
            else:
                memo[name] = readers[name].read_group(entry.name)
        return memo[name]

    with reproducible_threads(ctx.device):
        _run_chain(chain, ctx, produce, add, groups, progress)


def _run_chain(chain: list[Stage], ctx: MergeContext, produce, add, groups: list[str] | None, progress: Progress) -> None:
    for stage in chain:
        if stage.first_pass is not None:
            stage.first_pass(ctx, lambda name, e: produce(name, e, {}))
            ctx.release_group()
    _run_groups(chain[-1], ctx, produce, add, groups, progress)


def _run_groups(last: Stage, ctx: MergeContext, produce, add, groups: list[str] | None, progress: Progress) -> None:
    """``last``'s output for every tensor group it covers (``produce(name, entry, memo)``), to ``add``."""
    entries = ctx.all_entries() if last.covers_ignored else ctx.merged_entries()
    if groups is not None:
        wanted = set(groups)
        entries = [e for e in entries if e.name in wanted]

    def merge(entry: TensorEntry) -> stages.Tensors:
        try:
            return last.group(ctx, entry, {}) if entry.kind == "ignore" else produce(last.name, entry, {})
        finally:
            ctx.release_group()

    done = 0

    def commit(entry: TensorEntry, tensors: stages.Tensors) -> None:
        nonlocal done
        add(entry.name, tensors)
        done += 1
        if progress is not None:
            progress(done, len(entries), entry.name)

    # groups are independent now: merged on the available cores, the output the same (merging.workers)
    merge_groups(entries, merge, commit, group_workers(ctx.device), any_order=isinstance(add, _AnyOrder))


class _AnyOrder:
    """A sink that takes tensor groups in any order (each tensor has its planned offset)."""

    def __init__(self, add: Callable[[str, stages.Tensors], None]) -> None:
        self.add = add

    def __call__(self, name: str, tensors: stages.Tensors) -> None:
        self.add(name, tensors)


@contextlib.contextmanager
def _sink(stage: Stage, ctx: MergeContext, out: Path, manifest: dict[str, Any] | None,
          overwrite: bool, groups: list[str] | None = None) -> Iterator[Callable[[str, stages.Tensors], None]]:
    """Where the last stage's groups go: an artifact, or (save) a Hugging Face model folder
    whose shard layout comes from the plan alone. Free disk is checked first."""
    if not stage.covers_ignored:  # intermediates: the store's own shard size, not the model's
        wanted = None if groups is None else set(groups)
        entries = [e for e in ctx.merged_entries() if wanted is None or e.name in wanted]
        check_free_space(out, stage.output_bytes(ctx, entries), f"the {stage.name} artifact")
        writer = ArtifactWriter(out, manifest)
        try:
            yield writer.add_group
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return
    refuse_overlap(out, ctx.input_folders())
    layout = plan_shards(stages.saved_tensors(ctx), parse_size(ctx.config.shard_size))
    check_free_space(out, layout.file_bytes, "the merged model")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shards = PlannedShardWriter(tmp, layout)
        try:
            yield _AnyOrder(lambda name, tensors: shards.add_group(tensors))
            shards.finalize()
        finally:
            shards.close()
        stages.write_model_files(ctx, tmp)
        if manifest is not None:
            digest = model_digest(tmp)
            (tmp / MODEL_DIGEST_FILE).write_text(digest + "\n")
            write_manifest(tmp, {**manifest, "files": sorted(p.name for p in tmp.iterdir()), "output_digest": digest})


def _merged_deltas(chain: list[Stage], ctx: MergeContext, readers: dict[str, ArtifactReader],
                   add: Callable[[str, stages.Tensors], None], progress: Progress) -> None:
    """An adapter output's groups: combine's merged delta (or factors) of every merged tensor,
    from the chain's merge stages in memory, or (a staged save) from combine's artifact."""
    merge_chain = [s for s in chain if not s.covers_ignored]
    if merge_chain:
        _loop(merge_chain, ctx, readers, add, None, progress)
        return
    combine = readers["combine"]
    with reproducible_threads(ctx.device):  # the adapter's QR/SVD balancing, as in a fused run
        _run_groups(get_stage("combine"), ctx, lambda name, entry, memo: combine.read_group(entry.name), add, None, progress)


@contextlib.contextmanager
def _adapter_sink(ctx: MergeContext, out: Path, overwrite: bool,
                  manifest: dict[str, Any] | None = None) -> Iterator[Callable[[str, stages.Tensors], None]]:
    """``out_format: peft``: combine's merged deltas written as a PEFT LoRA adapter folder
    (``merging.io.adapter_writer``), atomically; tensors whose delta is zero are left out. With
    ``manifest`` (the save stage) the folder is an artifact: its model digest and manifest beside."""
    full = [s.name for s in ctx.sources if not isinstance(s, AdapterSource)]
    if full:
        raise MergeConfigError(f"out_format: peft needs every input to be a LoRA adapter, but model {full[0]!r} is a "
                               "full model; use out_format: hf (then mergeflow extract-lora for an adapter)")
    output = MergedAdapter(
        [s.adapter for s in ctx.sources], rank=ctx.config.adapter_rank, method=ctx.spec.name,
        in_span=all(ctx.spec.keeps_lora_span(ctx.params_for(e)[0]) for e in ctx.merged_entries()),
        dtype=DTYPES[ctx.out_dtype_name] if ctx.out_dtype_name else torch.float32)
    entries = {e.name: e for e in ctx.plan}
    refuse_overlap(out, ctx.input_folders())
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        def add(name: str, tensors: stages.Tensors) -> None:
            if "merged_b" in tensors:  # the factor route end to end: never densified
                output.add_factored(name, tensors["merged_b"], tensors["merged_a"])
            else:
                output.add(name, tensors["merged_delta"], lambda: stages.save(ctx, entries[name], {"combine": tensors})[name])

        yield add
        output.write(tmp, ctx.config.base_model)
        (tmp / "mergeflow_config.yml").write_text(ctx.config.to_yaml())
        if manifest is not None:
            digest = model_digest(tmp)
            (tmp / MODEL_DIGEST_FILE).write_text(digest + "\n")
            write_manifest(tmp, {**manifest, "files": sorted(p.name for p in tmp.iterdir()), "output_digest": digest})


def _marker(stage: Stage, out: Path) -> Path:
    """A fusable stage in fused mode: a manifest saying its work happens downstream."""
    key = f"fused-{stage.name}"
    if is_current(out, key):
        return out
    return ArtifactWriter(out, {"stage": stage.name, "fused": True, "cache_key": key}).commit()


# --- partitions -------------------------------------------------------------------------------

def partition_groups(params: PipelineParams, fetch_dir: str | Path, parts: int,
                     stats_dir: str | Path | None = None) -> list[list[str]]:
    """Split the merged tensor groups into ``parts`` contiguous partitions of similar size,
    for stages mapped over workers; ``write_index`` joins their artifacts."""
    ctx = MergeContext(merge_config(params, fetched_folders(fetch_dir), collected_stats(stats_dir)))
    entries = ctx.merged_entries()
    sizes = [max(1, int(torch.Size(e.shape).numel())) for e in entries]
    target = sum(sizes) / max(parts, 1)
    out: list[list[str]] = [[]]
    filled = 0.0
    for entry, size in zip(entries, sizes):
        if out[-1] and filled + size > target * len(out) and len(out) < parts:
            out.append([])
        out[-1].append(entry.name)
        filled += size
    return [p for p in out if p]


def write_index(name: str, params: PipelineParams, inputs: dict[str, str | Path], parts: list[str | Path],
                out: str | Path, fused: bool = False) -> Path:
    """The artifact of a stage mapped over partitions: a manifest listing the partial
    artifacts (no data copied); readers see the union of their groups."""
    stage, out = get_stage(name), Path(out)
    plan = _plan(stage, params, {k: Path(v) for k, v in inputs.items()}, fused, None)
    if is_current(out, plan.key):
        return out
    digest = content_key([artifact_digest(p) for p in parts])
    return ArtifactWriter(out, _manifest(stage, plan, fused, None)).commit(
        extra={"parts": [relative_link(p, out) for p in parts], "output_digest": digest})


def stage_code_files(stage: Stage) -> list[str]:
    """The source files a stage may run, for any method (the deps ``dvc.yaml`` lists)."""
    return closure_files(stage.code_modules(None))
