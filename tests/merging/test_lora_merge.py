"""LoRA adapters as merge inputs: densified on the fly, they merge exactly like the full
models peft's merge_and_unload makes of them (also with mergekit's `base+adapter` form)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config


def _adapter(base_dir, out_dir, seed, targets, rank=4, rslora=False):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_rslora=rslora))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(out_dir)
    merged = lora.merge_and_unload()
    full = out_dir.parent / f"{out_dir.name}-full"
    merged.save_pretrained(full)
    return out_dir, full


def test_adapters_merge_like_their_merged_full_models(tiny_models, tmp_path):
    base = tiny_models["base"]
    a, a_full = _adapter(base, tmp_path / "a", 1, ["q_proj", "v_proj"])
    b, b_full = _adapter(base, tmp_path / "b", 2, ["q_proj", "up_proj", "down_proj"], rank=2, rslora=True)
    for method, params in (("ties", {"density": 0.5}), ("drm", {"singular_matrices_drop_rate": 0.5}), ("task_arithmetic", {})):
        def run(x, y, name, method=method, params=params):
            config = parse_merge_config({"merge_method": method, "base_model": str(base),
                                         "models": [{"model": str(x)}, {"model": str(y)}], "parameters": params})
            return load_file(merge_checkpoints(config, tmp_path / name) / "model.safetensors")

        from_adapters = run(a, b, f"{method}-adapters")
        from_full = run(a_full, b_full, f"{method}-full")
        assert from_adapters.keys() == from_full.keys()
        for key in from_full:
            assert torch.allclose(from_adapters[key], from_full[key], atol=2e-6), (method, key)
    mergekit_form = parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(base),
                                        "models": [{"model": f"{base}+{a}"}, {"model": f"{base}+{b}"}]})
    plus = load_file(merge_checkpoints(mergekit_form, tmp_path / "plus") / "model.safetensors")
    assert all(torch.equal(plus[k], from_adapters[k]) for k in plus)
