"""RegMean of LoRA adapters (``../shared/specs/data-aware.md`` §2): merged in factored form, the
same model as RegMean of the full models peft's merge_and_unload makes of them; and written as a
PEFT adapter (``out_format: peft``), exactly, since the result stays in the adapters' span."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config
from merging.io.adapter import LoraAdapter
from merging.io.stats import write_stats
from tests.merging.test_lora_merge import _adapter


def _grams(base_dir, path, seed):
    """Seeded random Grams of every Linear of the tiny model (what collect-stats --kind gram writes)."""
    g = torch.Generator().manual_seed(seed)
    base = load_file(base_dir / "model.safetensors")
    xs = {k: torch.randn(3 * t.shape[1], t.shape[1], generator=g) for k, t in base.items()
          if t.dim() == 2 and "embed" not in k and "lm_head" not in k}
    return write_stats(path, {k: x.T @ x / len(x) for k, x in xs.items()}, "gram", tokens={k: len(x) for k, x in xs.items()})


def test_regmean_of_adapters_equals_regmean_of_their_full_models(tiny_models, tmp_path):
    base = tiny_models["base"]
    a, a_full = _adapter(base, tmp_path / "a", 1, ["q_proj", "v_proj", "down_proj"])
    b, b_full = _adapter(base, tmp_path / "b", 2, ["q_proj", "up_proj"], rank=2)
    stats = [_grams(base, tmp_path / "ga.safetensors", 1), _grams(base, tmp_path / "gb.safetensors", 2)]

    def run(x, y, name, **extra):
        config = parse_merge_config({"merge_method": "regmean", "base_model": str(base), "parameters": {"alpha": 0.6},
                                     "models": [{"model": str(x), "parameters": {"stats": str(stats[0])}},
                                                {"model": str(y), "parameters": {"stats": str(stats[1]), "weight": 2.0}}],
                                     **extra})
        return merge_checkpoints(config, tmp_path / name)

    from_adapters = load_file(run(a, b, "adapters") / "model.safetensors")
    from_full = load_file(run(a_full, b_full, "full") / "model.safetensors")
    for key in from_full:
        assert torch.allclose(from_adapters[key], from_full[key], atol=2e-6), key
    adapter = LoraAdapter(run(a, b, "peft", out_format="peft"))
    merged_base = load_file(base / "model.safetensors")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        delta = adapter.delta(key, merged_base[key])
        assert torch.allclose(merged_base[key] + delta, from_full[key], atol=2e-6), key
