"""Config parsing, fuzzed (issue 15): any input gives a valid config or a typed error.

"Typed error" means a ``MergeflowError`` (what the command line turns into one line and exit
code 2); any other exception (TypeError, RecursionError, a yaml or pydantic error, ...) fails.
A config that parses must also resolve, without any model, into the parameters every tensor
of a Llama-shaped plan is merged with (registry lookup, model count, global/per-model split,
gradients and filters, regexes, shard size), all of them finite, and its recipe (the
``mergeflow_config.yml`` written beside a merged model) must parse back to the same recipe.

Inputs: raw Python objects built by hypothesis (nested dicts, lists and scalars over the
config's own vocabulary), valid mergekit / DRM / Circuit-Merge configs and ``params.yaml``
files with a few mutations each (wrong types, NaN/inf, huge numbers, unknown keys, odd
strings), and arbitrary bytes, YAML-ish fragments and byte-mutated valid YAML in a file.
Examples are derandomized, so every run checks the same inputs.
"""

from __future__ import annotations

import copy
import datetime
import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from merging.api import check_model_count
from merging.config import MAX_YAML_NODES, MergeConfig, load_merge_config, parse_merge_config, parse_yaml, read_yaml
from merging.context import resolve_device
from merging.errors import MergeConfigError, MergeflowError
from merging.io.writer import parse_size
from merging.pipeline_params import PipelineParams, merge_config, parse_params
from merging.plan import build_plan
from merging.registry import METHODS, get_method
from merging.resolve import build_params, field_names, split_global_parameters
from tests.pipeline_helpers import DEMO_EVALS

FUZZ = settings(derandomize=True, max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# a Llama-shaped plan without a model: (name, shape, dtype); two numbered layers
TENSORS = (
    ("model.embed_tokens.weight", (64, 16), torch.float32),
    ("model.layers.0.self_attn.q_proj.weight", (16, 16), torch.float32),
    ("model.layers.0.mlp.down_proj.weight", (16, 32), torch.float32),
    ("model.layers.1.mlp.gate_proj.weight", (32, 16), torch.float32),
    ("model.layers.1.input_layernorm.weight", (16,), torch.float32),
    ("model.norm.weight", (16,), torch.float32),
    ("lm_head.weight", (64, 16), torch.float32),
    ("model.rotary_emb.inv_freq", (8,), torch.int64),
)

PARAM_KEYS = sorted({k for spec in METHODS.values() for k in field_names(spec.params) | field_names(spec.model_params)})
CONFIG_KEYS = [
    "merge_method", "base_model", "models", "model", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
    "source", "seed", "device", "compute_dtype", "include", "exclude", "ignore", "shard_size", "allow_pickle",
    "allow_nonfinite", "stats", "out", "slices", "modules", "chat_template", "merging_config", "save_path",
    "variant_models", "output_dir", "linear_parameter_regex_pattern", "linear_parameter_ignore_regex_pattern",
    "ignore_module_regex_pattern", "filter", "value",
]
PARAMS_KEYS = [
    "models", "base", "inputs", "name", "source", "revision", "coefficient", "task", "format", "gguf_file", "merge",
    "method", "seed", "decompose", "sparsify", "combine", "plan", "include", "exclude", "ignore", "pipeline", "device",
    "compute_dtype", "out_dtype", "materialize", "task_runner", "max_workers", "partitions", "artifacts", "shard_size",
    "eval", "tasks", "validation_tasks", "include_path", "limit", "batch_size", "evaluate_inputs", "schedule", "cron",
    "timezone", "zoo", "out", "steps", "full_finetune", "lr",
]
WEIRD = [
    math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**400,
    "", " ", "\x00", "\n", "nan", ".nan", "inf", "-inf", "1e400", "0x10", "~", "null", "yes", "../../etc/passwd",
    "/dev/null", "/dev/zero", "a" * 300, "\u202e\u0301", "\U0001f600", "ties", "drm", "linear", "slerp", "circuit_merge",
    "dynamic_ties", "union", "base", "cpu", "cuda", "auto", "float16", "int8", "5GB", "0GB", "-1GB", "1e999GB",
    "infGB", "nanGB", "1.5KiB", "(", "[a-", "*", ".*", "(a+)+$", True, False, None, [], {}, b"\xff\xfe",
    datetime.date(2020, 1, 1), datetime.datetime(2020, 1, 1, 12, 0),
]
METHOD_NAMES = sorted(METHODS)

scalars = st.one_of(
    st.sampled_from(WEIRD), st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(), st.floats(min_value=-2.0, max_value=2.0), st.text(max_size=12), st.sampled_from(METHOD_NAMES),
    st.binary(max_size=6),
)
keys = st.one_of(st.sampled_from(CONFIG_KEYS + PARAM_KEYS + PARAMS_KEYS), st.text(max_size=8), st.integers(-2, 2),
                 st.none(), st.booleans(), st.floats(allow_nan=True))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                      max_leaves=25)


# --- valid configs ------------------------------------------------------------------------------

def _bounded(info) -> st.SearchStrategy | None:
    """Valid values of one params field, from its annotation and ge/gt/le/lt bounds."""
    annotation = info.annotation
    if annotation is bool:
        return st.booleans()
    if get_origin(annotation) is Literal:
        return st.sampled_from(get_args(annotation))
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in info.metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    low = bounds.get("Ge", bounds.get("Gt"))
    high = bounds.get("Le", bounds.get("Lt"))
    if annotation is int or annotation == (int | None):
        low = 0 if low is None else low
        return st.integers(low, low + 3)
    if annotation is float:
        return st.floats(min_value=-3.0 if low is None else low, max_value=3.0 if high is None else high,
                         exclude_min="Gt" in bounds, exclude_max="Lt" in bounds, allow_nan=False)
    return None


@st.composite
def _setting(draw, info, method: str, name: str):
    """A valid value, a gradient over the layers, or a filter list (mergekit's three forms)."""
    if method.startswith("della") and name in ("density", "epsilon"):  # density ± epsilon inside (0, 1)
        value = st.floats(0.3, 0.7) if name == "density" else st.floats(0.0, 0.25)
    else:
        value = _bounded(info)
    form = draw(st.sampled_from(["scalar", "scalar", "gradient", "filter"]))
    if form == "gradient" and info.annotation is float:
        return draw(st.lists(value, min_size=2, max_size=4))
    if form == "filter":
        return [{"filter": draw(st.sampled_from(["mlp", "self_attn", "layers.1", "*"])), "value": draw(value)},
                {"value": draw(value)}]
    return draw(value)


@st.composite
def _method_parameters(draw, method: str, model_names: list[str]) -> tuple[dict, list[dict]]:
    """(global parameters, per-model parameters): valid settings of the method's fields."""
    spec = get_method(method)
    shared: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in model_names]
    for model, fields in ((False, spec.params.model_fields), (True, spec.model_params.model_fields)):
        for name, info in fields.items():
            key = info.alias or name
            if _bounded(info) is None or not draw(st.booleans()):
                continue
            if model and draw(st.booleans()):
                for entry in per_model:
                    if draw(st.booleans()):
                        entry[key] = draw(_setting(info, method, key))
            else:
                shared[key] = draw(_setting(info, method, key))
    return shared, per_model


@st.composite
def valid_configs(draw, method: str | None = None) -> dict:
    """A valid config in the mergekit, DRM seed or Circuit-Merge format (of ``method``, or any)."""
    layouts = {"drm": ["mergekit", "drm"], "circuit_merge": ["mergekit", "circuit"]}.get(method, ["mergekit"])
    layout = draw(st.sampled_from(layouts if method else ["mergekit"] * 6 + ["drm", "circuit"]))
    method = method or {"drm": "drm", "circuit": "circuit_merge"}.get(layout) or draw(st.sampled_from(METHOD_NAMES))
    spec = get_method(method)
    count = draw(st.integers(spec.min_models, spec.max_models or spec.min_models + 2))
    names = [f"models/ft_{i}" for i in range(count)]
    shared, per_model = draw(_method_parameters(method, names))
    regexes = st.lists(st.sampled_from([r".*", r".*mlp.*", r"model\.layers\.1\..*", r".*(embed_tokens|lm_head).*"]), max_size=2)
    extra = draw(st.fixed_dictionaries({}, optional={
        "seed": st.integers(0, 2**32), "device": st.sampled_from(["cpu", "auto"]), "out_dtype": st.sampled_from(["float32", "bfloat16"]),
        "shard_size": st.sampled_from(["5GB", "100MB", 4096, "2KiB"]), "allow_pickle": st.booleans(),
        "tokenizer_source": st.just("base"),
    }))
    if layout == "drm":
        merging = {**shared, **draw(st.fixed_dictionaries({}, optional={
            "linear_parameter_regex_pattern": regexes, "linear_parameter_ignore_regex_pattern": regexes,
            "ignore_module_regex_pattern": regexes, "dtype": st.sampled_from(["float32", "float64"])}))}
        return {"models": [{"model": n, "parameters": p} for n, p in zip(names, per_model)], "base_model": "models/base",
                "save_path": "out/merged", "merging_config": merging, **extra}
    if layout == "circuit":
        return {"base_model": "models/base", "variant_models": [{"model": n} for n in names], "output_dir": "out/merged",
                "parameters": {**shared, **({"seed": extra.pop("seed")} if "seed" in extra else {})}, **extra}
    models = [{"model": n, "parameters": p} if p or draw(st.booleans()) else n for n, p in zip(names, per_model)]
    config = {"merge_method": method, "base_model": "models/base", "models": models, **extra,
              **draw(st.fixed_dictionaries({}, optional={"include": regexes, "exclude": regexes, "ignore": regexes,
                                                         "compute_dtype": st.sampled_from(["float32", "float64"])}))}
    if shared or draw(st.booleans()):
        config["parameters"] = shared
    return config


@st.composite
def valid_params(draw, method: str | None = None) -> dict:
    """A valid ``params.yaml`` mapping: method parameters in the sections of their stages."""
    method = method or draw(st.sampled_from(METHOD_NAMES))
    spec = get_method(method)
    count = draw(st.integers(spec.min_models, spec.max_models or spec.min_models + 2))
    names = [f"m{i}" for i in range(count)]
    shared, per_model = draw(_method_parameters(method, names))
    sections: dict[str, dict] = {"decompose": {}, "sparsify": {}, "combine": {}}
    for key, value in shared.items():
        sections[spec.stage_of(key)][key] = value
    for name, entry in zip(names, per_model):
        for key, value in entry.items():
            sections[spec.stage_of(key)].setdefault(key, {})
            if isinstance(sections[spec.stage_of(key)][key], dict):
                sections[spec.stage_of(key)][key][name] = value
    return {
        "models": {"base": {"name": "base", "source": "models/base"},
                   "inputs": [{"name": n, "source": f"models/{n}", "task": "demo_arith"} for n in names]},
        "merge": {"method": method, "seed": draw(st.integers(0, 99)), **sections},
        "plan": {"include": [".*"], "ignore": []},
        "pipeline": {"device": "cpu", "artifacts": "artifacts", "shard_size": draw(st.sampled_from(["2GB", "8KB"]))},
        "eval": {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS), "limit": 3},
    }


# --- mutations ----------------------------------------------------------------------------------

def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw, valid: st.SearchStrategy, vocabulary: list[str]) -> Any:
    """A valid mapping with one to three edits: a value replaced (by a weird scalar or any
    value), a key removed, an unknown key added, a value wrapped in a list."""
    raw = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(raw)))
        if not path:
            raw = draw(values) if draw(st.integers(0, 9)) == 0 else raw
            continue
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        leaf = path[-1]
        edit = draw(st.sampled_from(["weird", "weird", "value", "delete", "unknown", "wrap"]))
        if edit == "weird":
            parent[leaf] = draw(st.sampled_from(WEIRD))
        elif edit == "value":
            parent[leaf] = draw(values)
        elif edit == "delete":
            del parent[leaf]
        elif edit == "unknown" and isinstance(parent, dict):
            parent[draw(st.sampled_from(vocabulary) | st.text(max_size=6))] = draw(scalars)
        else:
            parent[leaf] = [parent[leaf]]
    return raw


# --- the property ---------------------------------------------------------------------------------

def _valid_or_typed(call, *args) -> Any:
    """``call(*args)``, or None when it raised a ``MergeflowError`` with a message; any other
    exception propagates and fails the test."""
    try:
        return call(*args)
    except MergeflowError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return None


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def _resolve(config: MergeConfig) -> None:
    """What ``MergeContext`` checks before any tensor is merged, without opening a model:
    method, device, model count, parameters of every tensor of the plan (all finite)."""
    spec = get_method(config.merge_method)
    resolve_device(config.device)
    entries = [m for m in config.models if not (spec.needs_base and m.model == config.base_model)]
    check_model_count(spec, len(entries))
    shared, defaults = split_global_parameters(spec, config.parameters)
    plan = build_plan(TENSORS, config.include, config.exclude, config.ignore, num_layers=2)
    for entry in plan:
        if entry.kind == "ignore":
            continue
        params, per_model = build_params(spec, shared, defaults, [m.parameters for m in entries],
                                         [m.model for m in entries], entry.name, entry.layer_t)
        resolved = [params.model_dump(), *(p.model_dump() for p in per_model)]
        assert all(math.isfinite(x) for x in _numbers(resolved)), f"{entry.name}: non-finite parameter accepted: {resolved}"
    assert parse_size(config.shard_size) > 0


def _check_config(raw: Any) -> MergeConfig | None:
    """The property for one raw mapping; returns the config when it is valid and resolves."""
    config = _valid_or_typed(parse_merge_config, raw)
    if config is None:
        return None
    assert isinstance(config, MergeConfig)
    return _check_parsed(config)


def _check_parsed(config: MergeConfig) -> MergeConfig | None:
    try:
        _resolve(config)
    except MergeflowError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return None
    recipe = config.to_yaml()  # the model card's recipe, written after the merge: it must not fail
    again = parse_merge_config(parse_yaml(recipe), "recipe")
    assert again.to_yaml() == recipe
    return config


def _check_params(raw: Any) -> PipelineParams | None:
    params = _valid_or_typed(parse_params, raw)
    if params is None:
        return None
    assert isinstance(params, PipelineParams)
    config = _valid_or_typed(merge_config, params)
    if config is None or _check_parsed(config) is None:
        return None
    return params


# --- tests ------------------------------------------------------------------------------------------

@FUZZ
@given(values)
@example({"merge_method": "ties", "models": ["a"], "parameters": {"lambda": math.nan}})
@example({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": math.inf}}]})
@example({"merge_method": "ties", "base_model": "b", "models": ["a"], "shard_size": "inf"})
@example({"merge_method": "ties", "base_model": "b", "models": ["a"], "include": ["("]})
@example({"models": [{"model": "a", "parameters": {"coefficient": math.nan}}], "base_model": "b", "merging_config": {}})
def test_any_object_gives_a_config_or_a_typed_error(raw):
    _check_config(raw)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generated_valid_configs_are_valid(method):
    """The generator the mutations start from makes only valid, resolvable configs (so a
    mutated config that parses is a real finding, not a broken generator)."""
    layouts = set()

    @settings(FUZZ, max_examples=15)
    @given(valid_configs(method))
    def check(raw):
        config = parse_merge_config(raw)
        _resolve(config)
        assert config.merge_method == method
        layouts.add("drm" if "merging_config" in raw else "circuit" if "variant_models" in raw else "mergekit")

    check()
    assert layouts == {"mergekit", *({"drm": {"drm"}, "circuit_merge": {"circuit"}}.get(method, set()))}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generated_valid_params_are_valid(method):
    @settings(FUZZ, max_examples=10)
    @given(valid_params(method))
    def check(raw):
        config = merge_config(parse_params(raw))
        _resolve(config)
        assert config.merge_method == method

    check()


def test_mutated_configs_give_a_config_or_a_typed_error():
    outcomes = {"valid": 0, "typed error": 0}

    @FUZZ
    @given(mutated(valid_configs(), CONFIG_KEYS + PARAM_KEYS))
    @example({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "a", "parameters": {"density": [{"filter": "nowhere", "value": b"\xff"}, {"value": 0.5}]}}]})
    @example({"merge_method": "task_arithmetic", "base_model": "b", "models": ["a"],
              "parameters": {"lambda": [1.0, math.inf]}})
    @example({"merge_method": "slerp", "base_model": "b", "models": ["a"], "parameters": {"t": [{"filter": "mlp", "value": math.nan}]}})
    def check(raw):
        outcomes["valid" if _check_config(raw) is not None else "typed error"] += 1

    check()
    assert outcomes["valid"] > 10 and outcomes["typed error"] > 10, outcomes  # both sides of the property exercised


@FUZZ
@given(values)
@example({"models": {"base": {"name": "b", "source": "b"}, "inputs": [{"name": "a", "source": "a", "coefficient": math.nan}]}})
@example({"models": {"base": {"name": "b", "source": "b"}, "inputs": [{"name": "a", "source": "a"}]},
          "merge": {"method": "ties", "combine": {"lambda": -math.inf}}})
def test_any_object_gives_params_or_a_typed_error(raw):
    _check_params(raw)


def test_mutated_params_give_params_or_a_typed_error():
    outcomes = {"valid": 0, "typed error": 0}

    @FUZZ
    @given(mutated(valid_params(), PARAMS_KEYS + PARAM_KEYS))
    def check(raw):
        outcomes["valid" if _check_params(raw) is not None else "typed error"] += 1

    check()
    assert outcomes["valid"] > 10 and outcomes["typed error"] > 10, outcomes


# --- files --------------------------------------------------------------------------------------

FRAGMENTS = [
    "merge_method: ties\n", "base_model: b\n", "models:\n", "  - model: a\n", "    parameters: {density: 0.5}\n",
    "parameters:\n", "  lambda: ", "&a ", "*a", "&b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n", "<<: *a\n", "[", "]",
    "{", "}", ": ", "- ", ", ", "!!binary /w==", "!!python/object/apply:os.system ['true']", "!!float", "!!set",
    ".nan", ".inf", "-.inf", "1e309", "0x1F", "0o17", "~", "null", "'", '"', "\t", "\n", "  ", "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n", "---\n", "...\n", "? ", "|\n", ">-\n", "\ufeff", "\x00", "\x85", "\u2028", "#",
    "merging_config: {dtype: float32}\n", "variant_models: [a]\n", "output_dir: o\n", "seed: 99999999999999999999\n",
]


@st.composite
def yaml_bytes(draw) -> bytes:
    """Bytes a config file may hold: random, YAML fragments, or valid YAML with byte edits."""
    kind = draw(st.sampled_from(["binary", "fragments", "fragments", "edited"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "fragments":
        parts = draw(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=30))
        return "".join(parts).encode("utf-8", "surrogatepass")
    data = bytearray(yaml.safe_dump(draw(valid_configs()), sort_keys=False).encode())
    for _ in range(draw(st.integers(0, 3))):  # none: the valid file itself
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=3) | st.sampled_from([f.encode() for f in FRAGMENTS]))
        if edit == "insert":
            data[at:at] = chunk
        elif edit == "delete":
            del data[at:at + len(chunk)]
        else:
            data[at:at + len(chunk)] = chunk
    return bytes(data)


def _expanded_size(value: Any, limit: int) -> int:
    """Nodes of a loaded document with shared (aliased) parts counted every time they appear."""
    count, stack = 0, [value]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)
    return count


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


def test_config_files_of_any_bytes_give_a_config_or_a_typed_error(config_file):
    outcomes = {"valid": 0, "typed error": 0}

    @FUZZ
    @given(yaml_bytes())
    @example(b"\xff\xfe\x00m\x00e")  # UTF-16 with a BOM
    @example(b"merge_method: ties\nmodels: [\xe9]\n")  # Latin-1
    @example(b"[" * 100_000)
    @example(b"a: " + b"{a: " * 5000 + b"1" + b"}" * 5000)
    @example(LAUGHS.encode())
    @example(("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters:\n  lambda:\n    - {filter: zzz, value: "
              + "[" * 3 + "]" * 3 + "}\n    - {value: 1.0}\n").encode())
    @example(b"merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {lambda: .nan}\n")
    @example(b"merge_method: ties\nbase_model: b\nmodels: [a]\nshard_size: .inf\n")
    @example(b"#" * (2**20 + 1))
    def check(data):
        config_file.write_bytes(data)
        loaded = _valid_or_typed(read_yaml, config_file)
        if loaded is not None:
            assert _expanded_size(loaded, MAX_YAML_NODES) <= MAX_YAML_NODES
        config = _valid_or_typed(load_merge_config, config_file)
        if config is not None and _check_config(loaded) is not None:
            outcomes["valid"] += 1
        else:
            outcomes["typed error"] += 1

    check()
    assert outcomes["valid"] > 10 and outcomes["typed error"] > 50, outcomes


def test_a_billion_laughs_inside_a_valid_config_is_refused(config_file):
    """Nested aliases expanding past the node limit are refused while loading, even where the
    config would otherwise be valid (a parameter filter list is kept as it is)."""
    config_file.write_text(LAUGHS + "merge_method: ties\nbase_model: b\nmodels: [m]\n"
                           "parameters: {lambda: [{filter: zzz, value: *i}, {value: 1.0}]}\n")
    with pytest.raises(MergeConfigError, match="expands to more than"):
        load_merge_config(config_file)


# inputs the fuzzing above found, kept as plain cases so that each reads on its own
FOUND = {
    "NUL character": "merge_method: ties\x00\n",
    "!!float without a value": "merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {lambda: !!float }\n",
    "!!int 0x": "merge_method: ties\nbase_model: b\nmodels: [a]\nseed: !!int 0x\n",
    "!!bool empty": "merge_method: ties\nbase_model: b\nmodels: [a]\nallow_pickle: !!bool ''\n",
    "!!timestamp out of range": "merge_method: ties\nbase_model: b\nmodels: [a]\nout: !!timestamp 2020-13-45\n",
    "DRM merging_config not a mapping": "models: [a]\nbase_model: b\nsave_path: o\nmerging_config: 0.5\n",
    "DRM merging_config a string": "models: [a]\nbase_model: b\nsave_path: o\nmerging_config: ' '\n",
    "Circuit-Merge parameters a list": "variant_models: [a]\nbase_model: b\noutput_dir: o\nparameters: [1]\n",
    "bytes in an unused filter branch": "merge_method: ties\nbase_model: b\nmodels: [a]\n"
                                        "parameters: {lambda: [{filter: nowhere, value: !!binary /w==}, {value: 1.0}]}\n",
}


@pytest.mark.parametrize("text", FOUND.values(), ids=FOUND.keys())
def test_inputs_found_by_fuzzing_give_a_config_or_a_typed_error(config_file, text):
    config_file.write_text(text)
    config = _valid_or_typed(load_merge_config, config_file)
    if config is not None:
        _check_parsed(config)
