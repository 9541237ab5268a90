"""Parameter settings as mergekit accepts them: scalars, gradients, filters, global defaults."""

import pytest

from merging.errors import MergeConfigError
from merging.registry import get_method
from merging.resolve import build_params, resolve_setting, split_global_parameters


def test_gradient_interpolates_piecewise_linearly():
    assert resolve_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert resolve_setting([0.2, 0.8], "x", 0.0) == 0.2 and resolve_setting([0.2, 0.8], "x", 1.0) == 0.8


def test_filters_first_match_wins_with_fallback():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert resolve_setting(setting, "model.layers.3.self_attn.q_proj.weight") == 0.1
    assert resolve_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.5
    assert resolve_setting(setting, "model.norm.weight") == 0.5


def test_global_parameters_split_into_shared_and_model_defaults():
    spec = get_method("ties")
    shared, defaults = split_global_parameters(spec, {"density": 0.4, "lambda": 2.0, "normalize": False})
    assert shared == {"lambda": 2.0, "normalize": False} and defaults == {"density": 0.4}
    params, models = build_params(spec, shared, defaults, [{}, {"density": 0.9}], ["a", "b"])
    assert params.lambda_ == 2.0 and [m.density for m in models] == [0.4, 0.9]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(MergeConfigError, match="Valid: .*density.*lambda"):
        split_global_parameters(get_method("ties"), {"dens": 1})
    with pytest.raises(MergeConfigError, match="model 'b'.*models\\[1\\]"):
        build_params(get_method("ties"), {}, {}, [{}, {"gamma": 0.1}], ["a", "b"])


def test_out_of_range_names_the_path():
    with pytest.raises(MergeConfigError, match=r"models\[0\] \(a\)\.parameters\.density"):
        build_params(get_method("ties"), {}, {}, [{"density": 0.0}], ["a"])
