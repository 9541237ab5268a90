"""params.yaml validation: stage sections, per-model mappings, coefficients."""

import pytest

from merging.errors import MergeConfigError
from merging.pipeline_params import load_params, merge_config, parse_params


def _raw(**merge):
    return {"models": {"base": {"name": "base", "source": "b"},
                       "inputs": [{"name": "x", "source": "x", "coefficient": 0.7}, {"name": "y", "source": "y"}]},
            "merge": {"method": "ties", **merge}}


def test_key_in_the_wrong_stage_names_the_right_one():
    with pytest.raises(MergeConfigError, match=r"merge\.combine\.density: read by the 'sparsify' stage"):
        parse_params(_raw(combine={"density": 0.3}))


def test_unknown_key_lists_valid_ones():
    with pytest.raises(MergeConfigError, match="not a parameter of 'ties'"):
        parse_params(_raw(sparsify={"densty": 0.3}))


def test_merge_config_maps_coefficients_and_per_model_values():
    params = parse_params(_raw(sparsify={"density": {"x": 0.3, "y": 0.6}}, combine={"lambda": 0.5}))
    config = merge_config(params, {"base": "/b", "x": "/x"})
    assert config.base_model == "/b" and [m.model for m in config.models] == ["/x", "y"]
    assert [m.parameters for m in config.models] == [{"density": 0.3, "weight": 0.7}, {"density": 0.6, "weight": 1.0}]
    assert config.parameters == {"lambda": 0.5}


def test_unknown_model_name_in_a_mapping():
    with pytest.raises(MergeConfigError, match="unknown model name"):
        merge_config(parse_params(_raw(sparsify={"density": {"z": 0.3}})))


def test_duplicate_names_and_overrides(tmp_path):
    raw = _raw()
    raw["models"]["inputs"][1]["name"] = "x"
    with pytest.raises(MergeConfigError, match="unique"):
        parse_params(raw)
    path = tmp_path / "params.yaml"
    path.write_text("models:\n  base: {name: b, source: b}\n  inputs: [{name: x, source: x}]\nmerge: {method: ties}\n")
    params = load_params(path, {"merge.sparsify.density": 0.25, "merge.seed": 4})
    assert params.merge.sparsify == {"density": 0.25} and params.merge.seed == 4


def test_validation_tasks_must_align():
    raw = _raw()
    raw["eval"] = {"tasks": ["a", "b"], "validation_tasks": ["a_val"]}
    with pytest.raises(MergeConfigError, match="validation_tasks"):
        parse_params(raw)
