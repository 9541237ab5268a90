"""The merge config: mergekit's YAML schema, extended; DRM and Circuit-Merge YAMLs mapped on.

mergekit keys: ``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``,
``parameters``, ``dtype`` (inputs are read in it), ``out_dtype``, ``tokenizer_source`` (or
``tokenizer: {source: ...}``). mergeflow's own keys: ``seed``, ``device``,
``compute_dtype``, ``include`` / ``exclude`` / ``ignore`` (regexes, ``re.match`` on tensor
names: which 2-D tensors merge as matrices, which take the "other" path, which keep the
base value), ``shard_size``, ``allow_pickle``, ``allow_nonfinite`` (write merged tensors
holding NaN/Inf instead of refusing), ``copy_tokenizer`` and ``write_model_card`` (mergekit's
output options: tokenizer files and the README.md card), ``stats`` (activation statistics file) and
``out`` (output folder; the CLI's ``--out`` or positional argument wins), ``out_format`` (``hf``, or
``peft``: the merge of LoRA adapters written as a PEFT adapter, ``merging.io.adapter_writer``) and
``adapter_rank`` (its per-module rank cap).

The models of a merge are given in one of three ways (mergekit's): ``models`` (whole models),
``slices`` (layer ranges, ``merging.slices``) or ``modules`` (per module of a multi-modal model,
each with its own ``models`` or ``slices`` and ``parameters``; ``merging.modules``).

The DRM seed YAML (``merging_config``, ``save_path``) and the Circuit-Merge YAML
(``variant_models``, ``output_dir``) are recognised by their keys and mapped onto the
same model.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.errors import MergeConfigError

__all__ = ["ModelEntry", "SliceSource", "OutputSlice", "OutputModule", "ModelToken", "ZeroToken", "TokenOverride", "MergeConfig", "load_merge_config", "parse_merge_config", "read_yaml", "parse_yaml", "check_plain", "DEFAULT_EXCLUDE"]

# 2-D tensors that are not merged as matrices by default (embeddings and LM heads).
DEFAULT_EXCLUDE = (
    r".*(embed_tokens|lm_head|wte|wpe|shared|embed_positions|word_embeddings|position_embeddings"
    r"|token_type_embeddings|embed_out|output_layer|relative_attention_bias)\b.*",
)


class ModelEntry(BaseModel):
    """One input model: a local folder, a PEFT adapter folder, ``hub/id@revision``, or
    ``base+adapter`` (mergekit's LoRA syntax)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One input of an output slice: layers ``[layer_range[0], layer_range[1])`` of ``model``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSlice(BaseModel):
    """A run of output layers: the merge of its sources' layers (mergekit's output slice)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _same_length(cls, sources: tuple[SliceSource, ...]) -> tuple[SliceSource, ...]:
        if not sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice must cover the same number of layers, got {sorted(lengths)}")
        return sources


class OutputModule(BaseModel):
    """One module of a multi-modal model (mergekit's ``modules.<name>``): its own ``models`` or
    ``slices``, and parameters between the slices' and the global ones in precedence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[OutputSlice, ...] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> OutputModule:
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module needs either a non-empty 'models' or a non-empty 'slices' list, not both")
        return self

    def model_refs(self) -> list[str]:
        """Every model the module reads, in order of first mention."""
        refs = [m.model for m in self.models] if self.models else [s.model for sl in self.slices for s in sl.sources]
        return list(dict.fromkeys(refs))


CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
"""The named chat templates (mergekit 0.1.5's; their text is ``merging.tokenizer_merge.CHAT_TEMPLATES``)."""


def check_chat_template(value: str) -> str:
    """``auto``, a named template or inline Jinja; anything else is a ``MergeConfigError``."""
    if value == "auto" or value in CHAT_TEMPLATE_NAMES or ("{" in value and len(value) >= 20):
        return value
    raise MergeConfigError(f"chat_template: {value!r} is neither auto, a named template "
                           f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a Jinja template")


class ModelToken(BaseModel):
    """A token's row taken from a model's own token (by id or by text)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["zero"]


class TokenOverride(BaseModel):
    """Where one output token's embedding rows come from (``tokens:``); ``force`` uses it
    even for models that have the token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class MergeConfig(BaseModel):
    """A validated merge recipe (frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: tuple[ModelEntry, ...]
    slices: tuple[OutputSlice, ...] | None = Field(
        None, description="mergekit's layer slices: the output's layers are the slices' layers in order; 'models' "
                          "is then derived (every model a slice reads).")
    modules: dict[str, OutputModule] | None = Field(
        None, description="mergekit's per-module configs of multi-modal models (text_decoder, vision_tower, "
                          "multi_modal_projector, ...): each module its own models or slices; 'models' is then derived.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str | None = None
    tokens: dict[str, TokenOverride] = Field(
        default_factory=dict, description="Per-token embedding sources (mergekit's tokenizer.tokens); tokens not in "
                                          "the vocabulary are added.")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Pad the vocabulary rows to a multiple of this.")
    chat_template: str | None = Field(None, description="auto, a named template (alpaca, chatml, exaone, llama3, "
                                                        "mistral) or an inline Jinja template.")
    seed: int = Field(0, description="Seed of the per-tensor generators of random methods.")
    device: Literal["cpu", "cuda", "auto"] = "auto"
    compute_dtype: Literal["float32", "float64"] = "float32"
    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    ignore: tuple[str, ...] = ()
    shard_size: int | str = "5GB"
    allow_pickle: bool = False
    base_is_reference: bool = Field(False, description="The base is only the reference the deltas are taken against "
                                    "(params.yaml); in a mergekit config, methods that take no base (linear, karcher, "
                                    "passthrough) merge an unlisted base_model as one more input, as mergekit does.")
    allow_nonfinite: bool = Field(False, description="Write merged tensors that hold NaN or Inf instead of refusing.")
    copy_tokenizer: bool = Field(True, description="Copy the tokenizer files of tokenizer_source into the output.")
    write_model_card: bool = Field(True, description="Write a README.md model card into the output.")
    stats: str | None = None
    out: str | None = None
    out_format: Literal["hf", "peft"] = Field(
        "hf", description="hf: a Hugging Face model folder. peft: a PEFT LoRA adapter folder (every input a LoRA "
                          "adapter; exact for methods that keep the adapters' span, else give adapter_rank).")
    adapter_rank: int | None = Field(
        None, ge=1, description="out_format: peft: truncate every LoRA module to at most this rank (a truncated SVD; "
                                "the energy dropped is reported).")

    @model_validator(mode="before")
    @classmethod
    def _models_of_slices(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("modules") is not None:
            if data.get("models") or data.get("slices"):
                raise ValueError("give one of 'models', 'slices' or 'modules'")
            modules = data["modules"]
            if not isinstance(modules, dict) or not modules:
                raise ValueError("'modules' must be a non-empty mapping of module name to its models or slices")
            refs = []
            for module in modules.values():
                if isinstance(module, OutputModule):
                    refs += module.model_refs()
                elif isinstance(module, dict):
                    refs += [m.get("model") if isinstance(m, dict) else m for m in module.get("models") or []]
                    refs += [s.get("model") for sl in module.get("slices") or [] if isinstance(sl, dict)
                             for s in sl.get("sources") or [] if isinstance(s, dict)]
            data = {**data, "models": [{"model": r} for r in dict.fromkeys(refs) if isinstance(r, str)]}
        elif isinstance(data, dict) and data.get("slices") is not None:
            if data.get("models"):
                raise ValueError("give either 'models' or 'slices', not both")
            refs = [s.model if isinstance(s, SliceSource) else s.get("model") if isinstance(s, dict) else None
                    for sl in data["slices"] for s in (sl.sources if isinstance(sl, OutputSlice)
                                                       else sl.get("sources") or [] if isinstance(sl, dict) else [])]
            data = {**data, "models": [{"model": r} for r in dict.fromkeys(refs) if isinstance(r, str)]}
        return data

    @field_validator("models")
    @classmethod
    def _not_empty(cls, models: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
        if not models:
            raise ValueError("the model list is empty; list at least one model under 'models'")
        return models

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_chat_template(value)
        except MergeConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("shard_size")
    @classmethod
    def _readable_size(cls, value: int | str) -> int | str:
        from merging.io.writer import parse_size

        if parse_size(value) <= 0:
            raise ValueError("shard_size must be positive")
        return value

    @field_validator("include", "exclude", "ignore", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["merge_method"] = self.merge_method
        if self.slices is not None or self.modules is not None:
            data.pop("models", None)
        return yaml.safe_dump(data, sort_keys=False)


# top-level keys of a DRM / Circuit-Merge YAML that are ours too, copied as they are
_SHARED_KEYS = ("device", "out_dtype", "shard_size", "allow_pickle", "allow_nonfinite", "tokenizer_source", "out_format",
                "adapter_rank")
_DRM_KEYS = ("seed", *_SHARED_KEYS)
_DRM_RENAMES = {"linear_parameter_regex_pattern": "include", "linear_parameter_ignore_regex_pattern": "exclude",
                "ignore_module_regex_pattern": "ignore"}


def _moved(source: dict, renames: dict[str, str]) -> dict[str, Any]:
    """Pop the keys of ``renames`` present in ``source``: ``{new name: value}``."""
    return {new: source.pop(old) for old, new in renames.items() if old in source}


def _copied(raw: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: raw[key] for key in keys if key in raw}


def _mapping(raw: dict, key: str, kind: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"'{key}' of a {kind} config must be a mapping, got {type(value).__name__}")
    return dict(value)


def _from_drm(raw: dict) -> dict:
    unknown = set(raw) - {"models", "base_model", "save_path", "merging_config", *_DRM_KEYS}
    if unknown:
        raise MergeConfigError(f"unknown top-level key(s) {sorted(unknown)} in a DRM config")
    cfg = _mapping(raw, "merging_config", "DRM")
    mapped = {"merge_method": "drm", "base_model": raw.get("base_model"), "models": raw.get("models"),
              "out": raw.get("save_path"), **_moved(cfg, _DRM_RENAMES), **_copied(raw, _DRM_KEYS)}
    cfg.update(_moved(cfg, {"dtype": "svd_dtype"}))
    return {**mapped, "parameters": cfg}


def _from_circuit(raw: dict) -> dict:
    params = _mapping(raw, "parameters", "Circuit-Merge")
    method = params.pop("merge_method", "circuit_merge")
    if method != "circuit_merge":
        raise MergeConfigError(
            f"Circuit-Merge method {method!r} is not supported (its 'dynamic_ties' is experimental and "
            "numerically wrong upstream); use merge_method: circuit_merge"
        )
    mapped = {"merge_method": "circuit_merge", "base_model": raw.get("base_model"), "models": raw.get("variant_models"),
              "out": raw.get("output_dir"), **_moved(params, {"seed": "seed"}), **_copied(raw, (*_SHARED_KEYS, "dtype"))}
    return {**mapped, "parameters": params}


def _from_mergekit(raw: dict) -> dict:
    given = [k for k in ("models", "slices", "modules") if k in raw]
    if len(given) > 1:
        raise MergeConfigError(f"give one of 'models', 'slices' or 'modules', not {' and '.join(given)}")
    mapped = dict(raw)
    if isinstance(mapped.get("slices"), list):  # YAML's empty 'parameters:' is null
        mapped["slices"] = [_without_null_parameters(s) for s in mapped["slices"]]
    if isinstance(mapped.get("modules"), dict):
        mapped["modules"] = {name: _module_without_nulls(module) for name, module in mapped["modules"].items()}
    tokenizer = mapped.pop("tokenizer", None)
    if tokenizer is not None:
        if "tokenizer_source" in mapped:
            raise MergeConfigError("give either 'tokenizer_source' or a 'tokenizer:' section, not both")
        unknown = set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"} if isinstance(tokenizer, dict) else None
        if unknown is None or unknown:
            raise MergeConfigError("'tokenizer' must be a mapping of source, tokens and pad_to_multiple_of"
                                   + (f"; unknown key(s) {sorted(unknown)}" if unknown else ""))
        mapped["tokenizer_source"] = tokenizer.get("source") or "union"  # mergekit's default
        mapped.update({k: tokenizer[k] for k in ("tokens", "pad_to_multiple_of") if tokenizer.get(k) is not None})
    source = mapped.get("tokenizer_source")
    if isinstance(source, str) and source.startswith("model:"):  # older mergekit's 'model:<path>'
        mapped["tokenizer_source"] = source.removeprefix("model:")
    return mapped


def _module_without_nulls(module: Any) -> Any:
    if not isinstance(module, dict):
        return module
    module = _without_null_parameters(module)
    if isinstance(module.get("slices"), list):
        module["slices"] = [_without_null_parameters(s) for s in module["slices"]]
    if isinstance(module.get("models"), list):
        module["models"] = [{"model": m} if isinstance(m, str) else _without_null_parameters(m) for m in module["models"]]
    return module


def _without_null_parameters(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    item = {k: v for k, v in item.items() if not (k == "parameters" and v is None)}
    if isinstance(item.get("sources"), list):
        item["sources"] = [_without_null_parameters(s) for s in item["sources"]]
    return item


def check_plain(value: Any, where: str) -> None:
    """Configs hold strings, numbers, booleans, null, lists and string-keyed mappings only
    (YAML's ``!!binary``, timestamps, sets and non-string keys are refused by key path)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise MergeConfigError(f"{path}: key {key!r} must be a string")
                stack.append((child, f"{path}.{key}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise MergeConfigError(f"{path}: a {type(item).__name__} value is not allowed here; use a string or a number")


def parse_merge_config(raw: Any, source: str = "<config>") -> MergeConfig:
    """Validate a parsed YAML mapping in any of the three formats."""
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    check_plain(raw, source)
    if "merging_config" in raw or "save_path" in raw:
        mapped = _from_drm(raw)
    elif "variant_models" in raw or "output_dir" in raw:
        mapped = _from_circuit(raw)
    else:
        mapped = _from_mergekit(raw)
    if isinstance(mapped.get("models"), list):
        mapped["models"] = [{"model": m} if isinstance(m, str) else m for m in mapped["models"]]
        mapped["models"] = [{**m, "parameters": m.get("parameters") or {}} if isinstance(m, dict) else m
                            for m in mapped["models"]]
    if mapped.get("parameters") is None:
        mapped["parameters"] = {}
    mapped = {k: v for k, v in mapped.items() if v is not None or k in ("base_model",)}
    try:
        return MergeConfig.model_validate(mapped)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise MergeConfigError(f"{source}: invalid merge config: {problems}") from None


MAX_CONFIG_BYTES = 2**20
"""A config or params file larger than this is refused before it is parsed."""
MAX_YAML_NODES = 10_000
"""Nodes a YAML document may have once its aliases are expanded (a "billion laughs" file of
1 KB expands to billions)."""


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content, or a ``MergeConfigError`` naming the file: it must be a regular
    file of at most ``MAX_CONFIG_BYTES``, UTF-8, and at most ``MAX_YAML_NODES`` nodes once
    aliases are expanded."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise MergeConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise MergeConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MergeConfigError(f"config file {path} is not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise MergeConfigError(f"config file {path} is {info.st_size} bytes; a config may have at most {MAX_CONFIG_BYTES}")
    try:
        return parse_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise MergeConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except MergeConfigError as err:
        raise MergeConfigError(f"{path}: {err}") from None


def parse_yaml(text: str) -> Any:
    """Safe-load one YAML document with the alias-expansion and nesting limits."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise MergeConfigError(f"malformed YAML: {' '.join(str(err).split())}") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:  # PyYAML on some malformed escapes, tags, numbers
        raise MergeConfigError(f"malformed YAML ({type(err).__name__}: {err})") from None
    except RecursionError:
        raise MergeConfigError("YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes of the document as if every alias were copied out, without copying."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise MergeConfigError("a YAML alias refers to a node that contains it (a recursive document)")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise MergeConfigError(f"the YAML document expands to more than {MAX_YAML_NODES} nodes "
                                       "(aliases nested in aliases); write the values out")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config file."""
    return parse_merge_config(read_yaml(path), str(path))
