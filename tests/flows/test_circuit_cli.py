"""The Circuit-Merge seed's command line and YAML run as documented; outputs load with
transformers and keep the base dtype."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_seed_command_line(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    def args(out):
        return ["circuit-merge", str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"]), str(out),
                "--temperature", "0.3", "--base_droprate", "0.5", "--meaningful_change_threshold", "1e-6", "--seed", "7", "-q"]

    out = tmp_path / "merged"
    result = runner.invoke(app, args(out))
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    again = tmp_path / "again"
    assert runner.invoke(app, args(again)).exit_code == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_seed_yaml_with_string_threshold_and_skip_rescaling(tiny_models, tmp_path):
    config = tmp_path / "circuit.yml"
    config.write_text(
        f"base_model: {tiny_models['base']}\n"
        f"variant_models:\n  - model: {tiny_models['ft_a']}\n  - model: {tiny_models['ft_b']}\n  - model: {tiny_models['ft_c']}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "parameters:\n  temperature: 0.5\n  base_droprate: 0.4\n  meaningful_change_threshold: 1e-6\n  seed: 3\n  skip_rescaling: true\n"
    )
    result = runner.invoke(app, ["circuit-merge", "--config", str(config), "-q"])
    assert result.exit_code == 0, result.output
    merged, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny_models["base"] / "model.safetensors")
    assert merged.keys() == base.keys() and all(merged[k].dtype == base[k].dtype for k in base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)


def test_single_variant_is_refused_with_a_clear_message(tiny_models, tmp_path):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["circuit-merge", str(tiny_models["base"]), str(tiny_models["ft_a"]), str(out), "-q"])
    assert result.exit_code == 2 and "single_model_drop" in result.output
    assert not out.exists()
