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


def _params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("models:\n  base: {name: b, source: b}\n  inputs: [{name: x, source: x}, {name: y, source: y}]\n"
                    "merge: {method: ties, sparsify: {density: 0.5}, combine: {lambda: 1.0}}\n"
                    "eval: {tasks: [t1, t2], limit: 3, batch_size: 4}\n")
    return path


def test_nested_and_dotted_overrides_merge_into_their_section(tmp_path):
    """Issue 15 item 9: {"eval": {"limit": 10}} used to replace the whole eval section (and
    drop its tasks); a mapping now merges key by key, at any depth, however it is spelled."""
    path = _params_file(tmp_path)
    nested = {"eval": {"limit": 10}, "merge": {"sparsify": {"density": {"x": 0.2}}}}
    for overrides in (nested, {"eval.limit": 10, "merge.sparsify.density": {"x": 0.2}}):
        params = load_params(path, overrides)
        assert params.eval.tasks == ("t1", "t2") and params.eval.limit == 10 and params.eval.batch_size == 4
        assert params.merge.sparsify == {"density": {"x": 0.2}} and params.merge.combine == {"lambda": 1.0}
    assert nested == {"eval": {"limit": 10}, "merge": {"sparsify": {"density": {"x": 0.2}}}}  # not modified
    # a list replaces (no element-wise merge), and later overrides merge into earlier ones
    params = load_params(path, {"eval.tasks": ["t3"], "merge.sparsify": {"density": {"x": 0.2}}, "merge.sparsify.density.y": 0.7})
    assert params.eval.tasks == ("t3",) and params.merge.sparsify == {"density": {"x": 0.2, "y": 0.7}}


def test_override_key_ending_in_bang_replaces_the_section(tmp_path):
    path = _params_file(tmp_path)
    params = load_params(path, {"merge.method": "task_arithmetic", "merge.sparsify!": {}, "merge": {"combine!": {"lambda": 0.3}}})
    assert params.merge.sparsify == {} and params.merge.combine == {"lambda": 0.3}
    with pytest.raises(MergeConfigError, match=r"merge\.sparsify\.density: not a parameter of 'task_arithmetic'"):
        load_params(path, {"merge.method": "task_arithmetic"})  # merged, params.yaml's TIES density stays


def test_unknown_override_keys_are_named_with_the_valid_ones(tmp_path):
    path = _params_file(tmp_path)
    with pytest.raises(MergeConfigError, match=r"eval\.limt: unknown key \(valid: tasks, validation_tasks, include_path, limit,"):
        load_params(path, {"eval": {"limt": 10}})
    with pytest.raises(MergeConfigError, match=r"evl: unknown key \(valid: models, merge, plan,"):
        load_params(path, {"evl.limit": 10})
    with pytest.raises(MergeConfigError, match=r"models\.inputs\.0\.colour: unknown key \(valid: name, source,"):
        load_params(path, {"models.inputs": [{"name": "x", "source": "x", "colour": 1}]})
    with pytest.raises(MergeConfigError, match=r"override 'eval\.\.limit': not a dotted params.yaml key"):
        load_params(path, {"eval..limit": 10})
    with pytest.raises(MergeConfigError, match="overrides: expected a mapping"):
        load_params(path, [("eval.limit", 10)])


def test_params_with_nothing_to_evaluate_are_refused_for_runs_that_evaluate(tmp_path):
    """Merge-only params (no eval.tasks) stay valid; a run that evaluates refuses them up front."""
    from merging.pipeline_params import require_evaluation

    path = _params_file(tmp_path)
    assert require_evaluation(load_params(path)).eval.tasks == ("t1", "t2")
    merge_only = load_params(path, {"eval!": {"limit": 10}})  # the old replacing behaviour, spelled out
    assert merge_only.eval.tasks == ()
    with pytest.raises(MergeConfigError, match=r"manual: eval\.tasks is empty"):
        require_evaluation(merge_only, "manual")
    with pytest.raises(MergeConfigError, match=r"eval: .*must not hold empty task names"):
        load_params(path, {"eval.tasks": ["t1", " "]})


def test_eval_and_retry_settings_and_their_defaults():
    from merging.pipeline_params import PipelineParams

    raw = _raw()
    raw["eval"] = {"tasks": ["arc_easy"], "batch_size": "auto", "num_fewshot": 5, "apply_chat_template": True,
                   "model_args": {"max_length": 4096, "attn_implementation": "sdpa"}}
    raw["retry"] = {"evaluate": {"timeout_seconds": 3600}}
    params = parse_params(raw)
    assert params.eval.batch_size == "auto" and params.eval.model_args["max_length"] == 4096
    assert params.eval.dtype == "auto" and params.eval.device is None  # the model's dtype, the pipeline's device
    # a section given in part keeps the defaults of its other keys, per step
    assert (params.retry.evaluate.retries, params.retry.evaluate.timeout_seconds) == (1, 3600)
    assert (params.retry.fetch.retries, params.retry.flow.retries) == (2, 0)
    zoo = PipelineParams.model_validate(_raw()).zoo
    assert (zoo.base, zoo.out) == ("./demo/base", "./demo/zoo")  # local defaults are written ./...


def test_tokens_and_per_model_keys_are_refused_in_model_args():
    raw = _raw()
    raw["eval"] = {"tasks": ["t"], "model_args": {"token": "hf_secret", "pretrained": "x"}}
    with pytest.raises(MergeConfigError, match=r"eval\.model_args\.pretrained: not allowed.*eval\.model_args\.token: not allowed \(gated models read HF_TOKEN from the environment\)"):
        parse_params(raw)
    raw["eval"] = {"tasks": ["t"], "batch_size": 0}
    with pytest.raises(MergeConfigError, match="eval.batch_size"):
        parse_params(raw)
    raw["eval"] = {"tasks": ["t"]}
    raw["retry"] = {"compute": {"retries": 3}}  # deterministic stages are never retried: no such key
    with pytest.raises(MergeConfigError, match=r"retry\.compute: unknown key \(valid: fetch, evaluate, flow\)"):
        parse_params(raw)
