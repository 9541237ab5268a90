"""``params.yaml``, validated: the single source of truth of the pipeline (its stages read
the sections named in ``merging.pipeline.STAGES``).

Sections (``PipelineParams`` mirrors them; the defaults live here and in the method
params models, nowhere else):

* ``models``: ``base`` and ``inputs``, each with ``name``, ``source`` (local folder, PEFT
  adapter folder, or Hugging Face id), ``revision`` (pinned for hub sources),
  ``coefficient`` (the method's per-model weight) and optionally ``task`` (the eval task
  the model specializes in, for normalized accuracy);
* ``merge``: ``method``, ``seed`` and one section per stage that reads method
  parameters: ``decompose``, ``sparsify``, ``combine``. Each key must sit in the section
  of the stage that reads it, so that DVC reruns exactly that stage and those after it;
  a per-model parameter may be a scalar or a mapping ``{model name: value}``;
* ``plan``: ``include`` / ``exclude`` / ``ignore`` regexes, and mergekit's ``slices`` (sources
  name models of ``models``);
* ``tokenizer``: the output vocabulary (``source: base | union | <model name>``, ``tokens``,
  ``pad_to_multiple_of``, ``chat_template``), as mergekit's tokenizer section;
* ``pipeline``: device, compute/output dtype, ``materialize``, task runner, artifact store;
* ``eval``: lm-eval tasks (local include path or lm-eval's own), limit, batch size, device,
  dtype, few-shot, chat template, extra model arguments, the regression tolerance;
* ``retry``: retries and timeouts where failures can be transient (fetch, evaluate, the flow run);
* ``schedule``: the nightly deployment's cron and timezone;
* ``zoo``: how the demo zoo is built (base and output folders, seed, task count, steps).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merging.config import DEFAULT_EXCLUDE, MergeConfig, parse_merge_config, read_yaml
from merging.errors import MergeConfigError
from merging.registry import get_method
from merging.resolve import field_names

__all__ = ["PipelineParams", "ModelRef", "ZooSection", "EvalSection", "RetrySection", "Retry", "load_params", "apply_overrides", "require_evaluation", "merge_config", "named_stats",
           "REPLACE"]

_STRICT = ConfigDict(frozen=True, extra="forbid")


class ModelRef(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    revision: str | None = None
    coefficient: float = 1.0
    task: str | None = None
    format: Literal["auto", "gguf"] = "auto"
    gguf_file: str | None = None
    data: str | None = Field(None, description="The model's own task data (training prompts: .txt, one a line, or .jsonl "
                                               "with text/question/prompt): the collect_stats stage runs it through the "
                                               "model for RegMean's Grams and Fisher (never validation or test data).")


class ModelsSection(BaseModel):
    model_config = _STRICT

    base: ModelRef
    inputs: tuple[ModelRef, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsSection:
        names = [self.base.name, *(m.name for m in self.inputs)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return self


class MergeSection(BaseModel):
    model_config = _STRICT

    method: str = "drm"
    seed: int = 0
    decompose: dict[str, Any] = Field(default_factory=dict)
    sparsify: dict[str, Any] = Field(default_factory=dict)
    combine: dict[str, Any] = Field(default_factory=dict)


class PlanSection(BaseModel):
    model_config = _STRICT

    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    ignore: tuple[str, ...] = ()
    slices: tuple[dict[str, Any], ...] | None = Field(
        None, description="mergekit's layer slices, each {sources: [{model: <model name>, layer_range: [a, b], "
                          "parameters}], parameters}; model names are those of 'models'.")


class TokenizerSection(BaseModel):
    """The output vocabulary (mergekit's tokenizer section); model names are those of 'models'."""

    model_config = _STRICT

    source: str | None = Field(None, description="base (default), union, or a model name.")
    tokens: dict[str, Any] = Field(default_factory=dict, description="Per-token overrides, as mergekit's tokenizer.tokens.")
    pad_to_multiple_of: int | None = Field(None, ge=1)
    chat_template: str | None = Field(None, description="auto, a named template or an inline Jinja template.")


class PipelineSection(BaseModel):
    model_config = _STRICT

    device: Literal["cpu", "cuda", "auto"] = "auto"
    compute_dtype: Literal["float32", "float64"] = "float32"
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    materialize: bool = Field(True, description="Write deltas/decompose/sparsify artifacts; false streams them in memory (fused).")
    task_runner: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = Field(
        None, description="task_runner: dask: the scheduler of an existing dask.distributed cluster (tcp://host:8786); "
                          "its workers must see the artifact store and the models at the same paths (a shared file "
                          "system). Default: a local cluster of max_workers processes.")
    partitions: int = Field(1, ge=1, description="Split decompose/sparsify/combine into this many tensor-group partitions, mapped over the task runner.")
    artifacts: str = "artifacts"
    shard_size: str = "2GB"
    out_format: Literal["hf", "peft"] = copy.copy(MergeConfig.model_fields["out_format"])  # the save stage's output
    adapter_rank: int | None = copy.copy(MergeConfig.model_fields["adapter_rank"])
    keep_runs: int = Field(5, ge=0, description="mergeflow gc keeps what the last N recorded runs of each series used (and what the current params use).")


# model_args keys mergeflow sets itself (per model, or from another eval key), and credentials,
# which come from the environment (HF_TOKEN) and never from a file in the repository
_RESERVED_MODEL_ARGS = {"pretrained": "set per evaluated model", "peft": "set per evaluated adapter",
                        "dtype": "use eval.dtype", "device": "use eval.device", "batch_size": "use eval.batch_size",
                        "token": "gated models read HF_TOKEN from the environment",
                        "use_auth_token": "gated models read HF_TOKEN from the environment"}


class EvalSection(BaseModel):
    model_config = _STRICT

    tasks: tuple[str, ...] = Field((), description="lm-eval task names (include_path's or lm-eval's own; offline, their datasets must be in the local cache); empty only for params that merge without evaluating (see require_evaluation).")
    validation_tasks: tuple[str, ...] = Field((), description="Same tasks on validation data, aligned with 'tasks'; sweeps select on them.")
    include_path: str | None = None
    limit: int | None = Field(None, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(8, description="Requests per forward pass; auto: the largest that fits.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ...; default: pipeline.device.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights dtype while evaluating; auto: the model's own (config.json).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; default: each task's own.")
    apply_chat_template: bool | str = Field(False, description="Format prompts with the tokenizer's chat template (true) or the named one.")
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict, description="More arguments of lm-eval's hf model (max_length, attn_implementation, trust_remote_code, ...).")
    evaluate_inputs: bool = True
    regression_tolerance: float = Field(0.02, ge=0, description="A drop of the merged model's score on any task by more than this, from the previous run of the same series, fails the run.")
    bootstrap_resamples: int = Field(2000, ge=0, description="Paired bootstrap resamples of the test items behind each interval of the report and the leaderboard (merging/bootstrap.py); 0: no intervals.")
    bootstrap_level: float = Field(0.95, gt=0, lt=1, description="Coverage of the bootstrap intervals.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap's item draws.")

    @model_validator(mode="after")
    def _aligned(self) -> EvalSection:
        if any(not name.strip() for name in (*self.tasks, *self.validation_tasks)):
            raise ValueError("eval.tasks and eval.validation_tasks must not hold empty task names")
        if self.validation_tasks and len(self.validation_tasks) != len(self.tasks):
            raise ValueError("eval.validation_tasks must list one validation task per entry of eval.tasks, in the same order")
        reserved = sorted(set(self.model_args) & set(_RESERVED_MODEL_ARGS))
        if reserved:
            raise ValueError("; ".join(f"eval.model_args.{k}: not allowed ({_RESERVED_MODEL_ARGS[k]})" for k in reserved))
        return self


class Retry(BaseModel):
    """How an orchestrator retries one step whose failures can be transient."""

    model_config = _STRICT

    retries: int = Field(0, ge=0, description="Attempts after the first (a MergeflowError, e.g. a config problem, is never retried).")
    delay_seconds: float = Field(10, ge=0, description="Wait before each retry.")
    timeout_seconds: float | None = Field(None, gt=0, description="Fail an attempt that runs longer (null: no limit).")


class FetchRetry(Retry):
    retries: int = Field(2, ge=0, description="Attempts after the first (downloads from the hub).")


class EvaluateRetry(Retry):
    retries: int = Field(1, ge=0, description="Attempts after the first (lm-eval runs: GPUs, dataset downloads).")


class RetrySection(BaseModel):
    """Retries and timeouts where failures can be transient: fetching models, evaluating them, and
    the whole flow run (Prefect). The compute stages are deterministic and never retried."""

    model_config = _STRICT

    fetch: FetchRetry = FetchRetry()
    evaluate: EvaluateRetry = EvaluateRetry()
    flow: Retry = Retry()


class ZooSection(BaseModel):
    """The demo zoo (``mergeflow zoo build --params params.yaml``, the ``zoo`` DVC stage)."""

    model_config = _STRICT

    base: str = Field("./demo/base", description="Hugging Face folder of the base (mergeflow zoo base DIR).")
    out: str = Field("./demo/zoo", description="Where the specialists, zoo.json and the lm-eval tasks (OUT/evals) go.")
    seed: int = 0
    tasks: int = Field(4, ge=1, description="The first K zoo tasks.")
    steps: int = Field(120, ge=1, description="Optimizer steps per specialist (batch 16).")
    full_finetune: bool = Field(False, description="Full fine-tunes instead of LoRA adapters.")
    lr: float | None = Field(None, gt=0, description="Learning rate; default 3e-4 for LoRA, 3e-5 for full fine-tunes.")

    def checked_update(self, changes: dict[str, Any]) -> ZooSection:
        """This section with ``changes`` (command-line flags) applied and validated."""
        try:
            return self.model_validate(self.model_dump() | changes)
        except ValidationError as err:
            problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in err.errors())
            raise MergeConfigError(f"zoo settings: {problems}") from None


class StatsSection(BaseModel):
    """How the collect_stats stage records each input's statistics on its own data (RegMean's
    input Grams, Fisher's diagonal; ``evaluation.stats.collect_stats``), for methods that read them."""

    model_config = _STRICT

    max_samples: int = Field(256, ge=1, description="Samples of each model's data.")
    max_length: int = Field(256, ge=1, description="Tokens per sample.")
    batch_size: int = Field(8, ge=1, description="Samples per forward (Fisher: one per backward).")
    seed: int = Field(0, description="Seed of Fisher's sampled labels.")


class ScheduleSection(BaseModel):
    model_config = _STRICT

    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class PipelineParams(BaseModel):
    model_config = _STRICT

    models: ModelsSection
    merge: MergeSection = MergeSection()
    plan: PlanSection = PlanSection()
    tokenizer: TokenizerSection = TokenizerSection()
    pipeline: PipelineSection = PipelineSection()
    eval: EvalSection = EvalSection()
    retry: RetrySection = RetrySection()
    stats: StatsSection = StatsSection()
    schedule: ScheduleSection = ScheduleSection()
    zoo: ZooSection = ZooSection()

    @model_validator(mode="after")
    def _keys_in_their_stage(self) -> PipelineParams:
        spec = get_method(self.merge.method)
        valid = field_names(spec.params) | field_names(spec.model_params)
        problems = []
        for stage in ("decompose", "sparsify", "combine"):
            for key in getattr(self.merge, stage):
                if key not in valid:
                    problems.append(f"merge.{stage}.{key}: not a parameter of {spec.name!r} (valid: {', '.join(sorted(valid))})")
                elif spec.stage_of(key) != stage:
                    problems.append(f"merge.{stage}.{key}: read by the {spec.stage_of(key)!r} stage; move it to merge.{spec.stage_of(key)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


REPLACE = "!"  # an override key ending in "!" replaces its value instead of merging into it


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineParams:
    """Read and validate ``params.yaml`` with ``overrides`` merged in (``apply_overrides``)."""
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        return parse_params(raw, str(path))  # refused there, naming the file
    return parse_params(apply_overrides(raw, overrides or {}), str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (params as loaded YAML) with ``overrides`` merged in; neither is modified.

    Keys are dotted params.yaml paths (``"eval.limit"``, as ``dvc exp run -S``) or nested
    mappings (``{"eval": {"limit": 10}}``), applied in order. A mapping merges into the
    mapping already there, key by key and recursively, so an override never drops the
    section's other keys; anything else (a scalar, a list, null) replaces. A key ending in
    ``!``, at any depth (``"merge.sparsify!"`` or ``{"merge": {"sparsify!": {...}}}``),
    replaces its value whole: that is how a sweep point sets its method's sections without
    inheriting params.yaml's keys of another method.

    Raises:
        MergeConfigError: ``overrides`` is not a mapping, or a key is not a dotted name.
    """
    if not isinstance(overrides, dict):
        raise MergeConfigError(f"overrides: expected a mapping of dotted params.yaml keys to values, got {type(overrides).__name__}")
    merged = raw
    for key, value in overrides.items():
        parts = key.split(".") if isinstance(key, str) else [""]
        if not all(parts):
            raise MergeConfigError(f"override {key!r}: not a dotted params.yaml key (e.g. eval.limit or merge.combine.lambda)")
        for part in reversed(parts):
            value = {part: value}
        merged = _merged(merged, value)
    return merged


def _merged(old: Any, new: Any) -> Any:
    """``new`` merged into ``old`` (see ``apply_overrides``), as a new value."""
    if not isinstance(new, dict):
        return copy.deepcopy(new)
    base = old if isinstance(old, dict) else {}
    out = dict(base)
    for key, value in new.items():
        if isinstance(key, str) and key.endswith(REPLACE):
            out[key[: -len(REPLACE)]] = _merged(None, value)
        else:
            out[key] = _merged(base.get(key), value)
    return out


def require_evaluation(params: PipelineParams, source: str = "params") -> PipelineParams:
    """``params`` if a run that evaluates can use them (``MergeConfigError`` otherwise).

    The rule: the merge-and-eval flow and what is built on it (sweeps, the leaderboard, the
    deployments, DVC's evaluate stage) need at least one task in ``eval.tasks``; they call
    this once the params are loaded, before any stage runs. ``PipelineParams`` itself accepts
    an empty list, because params that only merge are legitimate: the merge stages run
    alone, ``mergeflow gc``, ``mergeflow zoo build`` and ``mergeflow dvc-yaml`` read the same
    file and evaluate nothing.
    """
    if not params.eval.tasks:
        raise MergeConfigError(f"{source}: eval.tasks is empty, so this run would have nothing to evaluate; "
                               "list lm-eval task names in eval.tasks (an override such as {'eval': {'limit': 10}} "
                               "merges into the section and keeps its tasks)")
    return params


def parse_params(raw: Any, source: str = "params") -> PipelineParams:
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {_message(e)}" for e in err.errors())
        raise MergeConfigError(f"{source}: invalid params: {problems}") from None


def _message(error: dict[str, Any]) -> str:
    """pydantic's message, with the valid keys where a key is unknown."""
    if error["type"] != "extra_forbidden":
        return error["msg"]
    model: Any = PipelineParams
    for part in error["loc"][:-1]:
        if isinstance(part, str):  # list positions (models.inputs.0) keep the element's model
            annotation = model.model_fields[part].annotation
            model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if model is None:
                return error["msg"]
    return f"unknown key (valid: {', '.join(model.model_fields)})"


def named_stats(params: PipelineParams) -> dict[str, str]:
    """Input name -> the statistics file the merge sections name for it (``stats``: one file for
    every input, or one per input)."""
    names = [ref.name for ref in params.models.inputs]
    found: dict[str, str] = {}
    for section in (params.merge.decompose, params.merge.sparsify, params.merge.combine):
        value = section.get("stats")
        if isinstance(value, str):
            found |= dict.fromkeys(names, value)
        elif isinstance(value, dict):
            found |= {name: path for name, path in value.items() if name in names and isinstance(path, str)}
    return found


def merge_config(params: PipelineParams, folders: dict[str, str] | None = None,
                 stats: dict[str, str] | None = None) -> MergeConfig:
    """The library's merge config for these params; ``folders`` maps model names to the
    local folders ``fetch`` resolved (default: the sources as given), ``stats`` model names to
    the statistics files collect_stats wrote (a model's own ``stats`` in the merge sections wins)."""
    folders = folders or {}
    spec = get_method(params.merge.method)
    model_keys = field_names(spec.model_params)
    weight_key = "coefficient" if "coefficient" in model_keys else "weight" if "weight" in model_keys else None
    shared: dict[str, Any] = {}
    per_model: dict[str, dict[str, Any]] = {m.name: {} for m in params.models.inputs}
    for stage in ("decompose", "sparsify", "combine"):
        for key, value in getattr(params.merge, stage).items():
            if key in model_keys and isinstance(value, dict):
                unknown = set(value) - set(per_model)
                if unknown:
                    raise MergeConfigError(f"merge.{stage}.{key}: unknown model name(s) {sorted(unknown)}")
                for name, v in value.items():
                    per_model[name][key] = v
            else:
                shared[key] = value
    models = []
    for m in params.models.inputs:
        entry = dict(per_model[m.name])
        if weight_key is not None:
            entry.setdefault(weight_key, m.coefficient)
        elif m.coefficient != 1.0:
            raise MergeConfigError(f"models.inputs[{m.name}].coefficient: method {spec.name!r} has no per-model weight")
        if stats and m.name in stats and "stats" in model_keys:
            entry.setdefault("stats", stats[m.name])
        models.append({"model": folders.get(m.name, m.source), "parameters": entry})
    raw = {
        "merge_method": spec.name,
        "base_model": folders.get(params.models.base.name, params.models.base.source),
        "models": models,
        "parameters": shared,
        "seed": params.merge.seed,
        "device": params.pipeline.device,
        "compute_dtype": params.pipeline.compute_dtype,
        "out_dtype": params.pipeline.out_dtype,
        "include": list(params.plan.include),
        "exclude": list(params.plan.exclude),
        "ignore": list(params.plan.ignore),
        "shard_size": params.pipeline.shard_size,
        "out_format": params.pipeline.out_format,
        "adapter_rank": params.pipeline.adapter_rank,
        "base_is_reference": True,
    }
    folder_of = {m.name: folders.get(m.name, m.source) for m in (params.models.base, *params.models.inputs)}
    if params.plan.slices is not None:
        raw.pop("models")
        raw["slices"] = [_named_slice(s, folder_of) for s in params.plan.slices]
    section = params.tokenizer
    if section.source is not None or section.tokens or section.pad_to_multiple_of is not None:
        raw["tokenizer"] = {**({"source": folder_of.get(section.source, section.source)} if section.source else {}),
                            "tokens": {t: _named_token(o, folder_of) for t, o in section.tokens.items()},
                            **({"pad_to_multiple_of": section.pad_to_multiple_of} if section.pad_to_multiple_of else {})}
    if section.chat_template is not None:
        raw["chat_template"] = section.chat_template
    return parse_merge_config(raw, "params.yaml")


def _named(value: Any, folder_of: dict[str, str], key: str) -> Any:
    """A model name of params.yaml -> its folder (``MergeConfigError`` for an unknown name)."""
    if not isinstance(value, str) or value not in folder_of:
        raise MergeConfigError(f"{key}: {value!r} is not a model name of 'models' (known: {', '.join(folder_of)})")
    return folder_of[value]


def _named_slice(piece: dict[str, Any], folder_of: dict[str, str]) -> dict[str, Any]:
    out = dict(piece)
    if not isinstance(out.get("sources"), list):
        raise MergeConfigError("plan.slices: each slice needs a 'sources' list")
    out["sources"] = [{**s, "model": _named(s.get("model"), folder_of, "plan.slices[].sources[].model")}
                      if isinstance(s, dict) else s for s in out["sources"]]
    if "base_model" in out:
        out["base_model"] = _named(out["base_model"], folder_of, "plan.slices[].base_model")
    return out


def _named_token(override: Any, folder_of: dict[str, str]) -> Any:
    """A token override whose ``source`` names a model (``{kind: model_token, model: NAME}``)."""
    if isinstance(override, dict) and isinstance(override.get("source"), dict) and "model" in override["source"]:
        source = {**override["source"], "model": _named(override["source"]["model"], folder_of, "tokenizer.tokens[].source.model")}
        return {**override, "source": source}
    return override
