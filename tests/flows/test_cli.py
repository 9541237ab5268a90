"""`mergeflow merge` end to end, and bad inputs: each gives a clear one-line error, exit code 2,
and no output folder (nor a temporary one) at the target."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _ties(base, *models) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models]}


def _assert_clean_failure(result, target: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output
    for needle in needles:
        assert needle in message, (needle, message)
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


def test_merge_command_writes_a_loadable_model(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]))
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = runner.invoke(app, ["merge", "--config-path", str(cfg), "--out", str(tmp_path / "out"), "--overwrite", "-q"])
    assert again.exit_code == 0, again.output


def test_missing_model_folder(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tmp_path / "nope"))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "nope", "does not exist")


def test_bin_only_checkpoint_refused(tiny_models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], pickled))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "pickle", "allow_pickle")


def test_mismatched_shapes(tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["ft_a"], odd)
    state = load_file(odd / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, odd / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], odd))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, key, "(33, 16)", "(32, 16)")


def test_missing_tensor(tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["ft_a"], odd)
    state = load_file(odd / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, odd / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], odd))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "model.norm.weight", "lacks")


def test_unknown_method_lists_known_ones(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"]) | {"merge_method": "tiez"}
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "tiez", "'ties'", "task_arithmetic")


def test_parameter_out_of_range_names_model_and_key(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"])
    config["models"][0]["parameters"]["density"] = 1.5
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "models[0]", "density", "1.5")


def test_unknown_parameter_lists_valid_ones(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"]) | {"parameters": {"densty": 0.3}}
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "densty", "density", "lambda")


def test_empty_model_list(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "ties", "base_model": str(tiny_models["base"]), "models": []})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "empty")


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: ties\nmodels: [\n  - oops: {\n")
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "malformed YAML")


def test_target_exists_is_refused_and_kept(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (target / "keep.txt").read_text() == "mine"


def test_nan_in_a_delta_names_model_and_tensor(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    state = load_file(bad / "model.safetensors")
    key = "model.layers.1.self_attn.v_proj.weight"
    state[key][0, 0] = math.nan
    save_file(state, bad / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_b"], bad))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, str(bad), key, "NaN")


def test_inf_in_a_delta(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"][1] = math.inf
    save_file(state, bad / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], bad))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "model.norm.weight", "Inf")


def test_unwritable_target(tiny_models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]))
    target = blocker / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    assert result.exit_code == 2 and "cannot write" in result.output
    assert blocker.read_text() == "not a folder"


def test_missing_base_model_for_a_method_that_needs_one(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "ties", "models": [{"model": str(tiny_models["ft_a"])}]})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "needs base_model")


def test_lora_adapter_for_another_base(tiny_models, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    wider = LlamaForCausalLM(tiny_llama_config(hidden=32))  # another base: hidden 32, not 16
    lora = peft.get_peft_model(wider, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tmp_path / "adapter"))
    target = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    _assert_clean_failure(result, target, "q_proj")


def test_slices_config_is_refused(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "passthrough", "slices": [{"sources": []}]})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "slices")


@pytest.mark.parametrize(
    ("extra_args", "config_extra", "needle"),
    [
        (["--device", "gpu"], {}, "device"),
        (["--shard-size", "lots"], {}, "shard_size"),
        ([], {"shard_size": "lots"}, "shard_size"),
        ([], {"parameters": {"lambda": [{"filter": "mlp"}]}}, "no 'value'"),
    ],
)
def test_bad_options_give_one_line_errors(tiny_models, tmp_path, extra_args, config_extra, needle):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]) | config_extra)
    target = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q", *extra_args])
    _assert_clean_failure(result, target, needle)
    assert "Traceback" not in result.output
