"""The DRM seed's example config runs unchanged (models swapped for local ones) through
`mergeflow merge CONFIG` and `--config-path CONFIG`, writes to its save_path, loads with
transformers, and every tensor equals the per-tensor DRM of its plan kind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from merging.api import merge_tensors

SEED = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "000_1a261822ca866dc1.txt"
SEED_CONFIG = """
# A list of models to be merged.
models:
  - model: allenai/Llama-3.1-Tulu-3-8B  # HuggingFace Hub ID or local path
    parameters:
      coefficient: 1.0
  - model: allenai/Llama-3.1-Tulu-3.1-8B
    parameters:
      coefficient: 1.0
base_model: allenai/Llama-3.1-Tulu-3-8B-DPO
merging_config:
  singular_matrices_drop_rate: 0.8
  direction: vertical
  linear_parameter_regex_pattern:
    - ".*weight.*"
  linear_parameter_ignore_regex_pattern:
    - ".*embed_tokens.*"
    - ".*lm_head.*"
  ignore_module_regex_pattern: []
  enable_disjoint_mean: true
  enable_sign_resolution: true
  non_linear_module_entries_drop_rate: 0.0
  dtype: float32
save_path: ./tulu-drm-v
"""


def _seed_yaml() -> str:
    if SEED.is_file():  # the example config exactly as the seed README prints it
        match = re.search(r"```yaml\n(.*?)```", SEED.read_text(), re.S)
        if match and "merging_config" in match.group(1):
            return match.group(1)
    return SEED_CONFIG


def test_seed_config_runs_unchanged(tiny_models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    text = _seed_yaml()
    text = text.replace("allenai/Llama-3.1-Tulu-3-8B-DPO", str(tiny_models["base"]))
    text = text.replace("allenai/Llama-3.1-Tulu-3.1-8B", str(tiny_models["ft_b"]))
    text = text.replace("allenai/Llama-3.1-Tulu-3-8B", str(tiny_models["ft_a"]))
    (tmp_path / "config.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["merge", "config.yaml", "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "tulu-drm-v"
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    again = CliRunner().invoke(app, ["merge", "--config-path", "config.yaml", "--overwrite", "-q"])
    assert again.exit_code == 0, again.output

    merged, base = load_file(out / "model.safetensors"), load_file(tiny_models["base"] / "model.safetensors")
    a, b = load_file(tiny_models["ft_a"] / "model.safetensors"), load_file(tiny_models["ft_b"] / "model.safetensors")
    params = {"direction": "vertical", "singular_matrices_drop_rate": 0.8}
    for key in base:
        kind = "matrix" if base[key].dim() == 2 and "embed_tokens" not in key and "lm_head" not in key else "other"
        expected = merge_tensors("drm", base[key], [a[key], b[key]], params=params, kind=kind, name=key)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    assert os.path.isfile(out / "config.json")
