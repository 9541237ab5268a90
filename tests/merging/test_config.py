"""Config loading: mergekit, DRM seed and Circuit-Merge YAMLs map onto one validated model."""

import pytest
import yaml
from pydantic import ValidationError

from merging.config import DEFAULT_EXCLUDE, load_merge_config, parse_merge_config
from merging.errors import MergeConfigError

DRM_SEED_YAML = """
models:
  - model: allenai/Llama-3.1-Tulu-3-8B-SFT
    parameters:
      coefficient: 1.0
  - model: allenai/Llama-3.1-Tulu-3-8B-DPO
    parameters:
      coefficient: 0.5
base_model: meta-llama/Llama-3.1-8B
save_path: ./merged_model
merging_config:
  singular_matrices_drop_rate: 0.8
  direction: vertical
  linear_parameter_regex_pattern:
    - .*weight.*
  linear_parameter_ignore_regex_pattern:
    - .*embed_tokens.*
    - .*lm_head.*
  ignore_module_regex_pattern: []
  enable_disjoint_mean: true
  enable_sign_resolution: true
  non_linear_module_entries_drop_rate: 0.0
  dtype: float32
"""

CIRCUIT_YAML = """
base_model: ./base
variant_models:
  - model: ./v1
  - model: ./v2
output_dir: ./merged
parameters:
  temperature: 0.3
  base_droprate: 0.5
  meaningful_change_threshold: 1e-6
  seed: 42
"""


def test_drm_seed_yaml_maps_every_key():
    config = parse_merge_config(yaml.safe_load(DRM_SEED_YAML))
    assert config.merge_method == "drm"
    assert config.out == "./merged_model"
    assert config.base_model == "meta-llama/Llama-3.1-8B"
    assert [m.parameters for m in config.models] == [{"coefficient": 1.0}, {"coefficient": 0.5}]
    assert config.include == (".*weight.*",)
    assert config.exclude == (".*embed_tokens.*", ".*lm_head.*")
    assert config.ignore == ()
    assert config.parameters == {
        "singular_matrices_drop_rate": 0.8, "direction": "vertical", "enable_disjoint_mean": True,
        "enable_sign_resolution": True, "non_linear_module_entries_drop_rate": 0.0, "svd_dtype": "float32",
    }


def test_circuit_yaml_maps_keys_and_seed():
    config = parse_merge_config(yaml.safe_load(CIRCUIT_YAML))
    assert config.merge_method == "circuit_merge"
    assert config.out == "./merged" and config.seed == 42
    assert [m.model for m in config.models] == ["./v1", "./v2"]
    assert config.parameters["meaningful_change_threshold"] == "1e-6"  # PyYAML: a string; the method coerces it


def test_mergekit_yaml_defaults():
    config = parse_merge_config({"merge_method": "ties", "base_model": "b", "models": ["x", {"model": "y"}],
                                 "tokenizer": {"source": "base"}, "dtype": "bfloat16"})
    assert [m.model for m in config.models] == ["x", "y"]
    assert config.tokenizer_source == "base" and config.dtype == "bfloat16"
    assert config.exclude == DEFAULT_EXCLUDE and config.seed == 0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"merge_method": "ties", "models": []}, "empty"),
        ({"merge_method": "ties", "models": ["a"], "colour": 1}, "colour"),
        ({"merge_method": "ties", "models": ["a"], "modules": {"text": {}}}, "'modules'"),
        ({"merge_method": "ties", "models": ["a"], "dtype": "float8"}, "dtype"),
        ([1, 2], "mapping"),
        ({"base_model": "b", "variant_models": [{"model": "v"}], "parameters": {"merge_method": "dynamic_ties"}}, "dynamic_ties"),
    ],
)
def test_bad_configs(raw, needle):
    with pytest.raises(MergeConfigError, match=needle):
        parse_merge_config(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MergeConfigError, match="does not exist"):
        load_merge_config(tmp_path / "none.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [1,\n")
    with pytest.raises(MergeConfigError, match="malformed YAML"):
        load_merge_config(bad)


def test_config_is_frozen():
    config = parse_merge_config({"merge_method": "ties", "models": ["a"]})
    with pytest.raises(ValidationError):
        config.seed = 3


def test_yaml_limits_allow_ordinary_anchors_and_refuse_bombs():
    from merging.config import MAX_YAML_NODES, parse_yaml

    ordinary = "defaults: &d {weight: 1.0, density: 0.5}\nmodels:\n  - {model: a, parameters: *d}\n  - {model: b, parameters: *d}\n"
    assert parse_yaml(ordinary)["models"][1]["parameters"] == {"weight": 1.0, "density": 0.5}
    # 10 aliases of a 1,000-item list: 10,000 items once expanded -> just over the limit
    items = ", ".join(["1"] * 1000)
    bomb = f"a: &a [{items}]\nb: [" + ", ".join(["*a"] * 10) + "]\n"
    with pytest.raises(MergeConfigError, match=f"more than {MAX_YAML_NODES} nodes"):
        parse_yaml(bomb)
    with pytest.raises(MergeConfigError, match="recursive"):
        parse_yaml("a: &a [1, *a]\n")
