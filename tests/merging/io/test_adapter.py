"""PEFT LoRA adapters: dense deltas equal peft's own merge_and_unload(), and bad folders are refused.

Adapters are made with peft 0.21 on tiny random models built locally (float64, so the
comparison is tight), their factors filled with random values, saved with save_pretrained
and read back with ``LoraAdapter`` (spec ``../shared/specs/circuit-della-peft.md`` §3).
"""

import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key

from merging.errors import AdapterError, CheckpointNotFoundError, UnsafeCheckpointError
from merging.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, pattern_key
from tests.conftest import tiny_llama_config

F64 = torch.float64


def _llama(hidden=16, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden=hidden)).to(F64)


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(F64)


def _make_adapter(model, config: LoraConfig, folder, perturb=lambda name: "lora_" in name):
    """Wrap ``model`` with peft, randomise the trainable tensors, save; return (base, merged) state dicts."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if perturb(name):
                param.copy_(0.1 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    peft_model.save_pretrained(folder)
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, merged


def _check_roundtrip(folder, base, merged, touched):
    adapter = LoraAdapter(folder)
    adapter.check_against({k: tuple(v.shape) for k, v in base.items()})
    for key, weight in base.items():
        delta = adapter.delta(key, weight)
        if key in touched:
            assert delta is not None and delta.dtype == F64
            assert torch.allclose(weight + delta, merged[key], rtol=0, atol=1e-12), key
        else:
            assert delta is None, key
            assert torch.equal(weight, merged[key]), key
    return adapter


def _keys(layers, *names):
    return {f"model.layers.{i}.{n}.weight" for i in layers for n in names}


def test_plain_lora_matches_merge_and_unload(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base, merged = _make_adapter(_llama(), cfg, tmp_path)
    adapter = _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.q_proj", "self_attn.v_proj"))
    assert adapter.base_model_name_or_path is None or isinstance(adapter.base_model_name_or_path, str)


def test_float32_delta_matches_within_float32_precision(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=16, target_modules=["o_proj"])
    base, merged = _make_adapter(LlamaForCausalLM(tiny_llama_config()), cfg, tmp_path)
    adapter = LoraAdapter(tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    delta = adapter.delta(key, base[key])
    assert delta.dtype == torch.float32
    assert torch.allclose(base[key] + delta, merged[key], rtol=0, atol=1e-6)


def test_rslora_scaling(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"])
    base, merged = _make_adapter(_llama(), cfg, tmp_path)
    _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.k_proj", "mlp.down_proj"))


def test_rank_and_alpha_patterns(tmp_path):
    cfg = LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 3, r"layers\.1\.self_attn\.(q|v)_proj": 6, "v_proj": 5},
        alpha_pattern={"q_proj": 7},
    )
    base, merged = _make_adapter(_llama(), cfg, tmp_path)
    _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.q_proj", "self_attn.v_proj"))


@pytest.mark.parametrize(
    "module",
    ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.10.self_attn.q_proj",
     "model.layers.0.self_attn.k_proj", "model.xq_proj", "q_proj"],
)
def test_pattern_key_follows_peft(module):
    keys = ["layers.0.self_attn.q_proj", r"layers\.1\.self_attn\.(q|v)_proj", "v_proj", "q_proj", "layers.1.*"]
    expected = get_pattern_key(keys, module)
    assert pattern_key(keys, module) == (expected if expected in keys else None)


def test_fan_in_fan_out_gpt2_conv1d_and_trained_biases(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    base, merged = _make_adapter(_gpt2(), cfg, tmp_path, perturb=lambda n: "lora_" in n or n.endswith(".bias"))
    biases = {k for k in base if k.endswith(".bias") and not k.endswith(".attn.bias")}
    touched = {f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)} | biases
    _check_roundtrip(tmp_path, base, merged, touched)


def test_modules_to_save_lm_head(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    base, merged = _make_adapter(_llama(), cfg, tmp_path, perturb=lambda n: "lora_" in n or "modules_to_save" in n)
    assert not torch.equal(base["lm_head.weight"], merged["lm_head.weight"])
    _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.q_proj") | {"lm_head.weight"})


def test_embedding_lora(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    base, merged = _make_adapter(_llama(), cfg, tmp_path)
    _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.q_proj") | {"model.embed_tokens.weight"})


def test_older_modules_to_save_key_spelling(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base, merged = _make_adapter(_llama(), cfg, tmp_path, perturb=lambda n: "lora_" in n or "modules_to_save" in n)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = tensors.pop("base_model.model.lm_head.weight")
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    _check_roundtrip(tmp_path, base, merged, _keys((0, 1), "self_attn.q_proj") | {"lm_head.weight"})


@pytest.fixture
def plain_adapter(tmp_path):
    folder = tmp_path / "adapter"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _make_adapter(_llama(), cfg, folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))


def test_adapter_for_another_base_names_module_and_shapes(plain_adapter):
    other = {k: tuple(v.shape) for k, v in _llama(hidden=32).state_dict().items()}
    with pytest.raises(AdapterError) as err:
        LoraAdapter(plain_adapter).check_against(other)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "another base" in message
    assert "(16, 16) vs base (32, 32)" in message
    gpt2 = {k: tuple(v.shape) for k, v in _gpt2().state_dict().items()}
    with pytest.raises(AdapterError, match=re.escape("base has no tensor 'model.layers.1.self_attn.v_proj.weight'")):
        LoraAdapter(plain_adapter).check_against(gpt2)


def test_delta_refuses_a_base_tensor_of_another_shape(plain_adapter):
    with pytest.raises(AdapterError, match=re.escape("adapter shape (16, 16) vs base (32, 32)")):
        LoraAdapter(plain_adapter).delta("model.layers.0.self_attn.q_proj.weight", torch.zeros(32, 32))


def test_dora_is_refused(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    _make_adapter(_llama(), cfg, tmp_path)
    with pytest.raises(AdapterError, match="DoRA"):
        LoraAdapter(tmp_path)
    _edit_config(tmp_path, use_dora=False)  # the weights still carry lora_magnitude_vector
    with pytest.raises(AdapterError, match="lora_magnitude_vector.*DoRA"):
        LoraAdapter(tmp_path)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 8}, "do not have rank 8"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"rank_pattern": {"q_proj": 2}}, "module 'model.layers.0.self_attn.q_proj'.*rank 2"),
    ],
)
def test_unsupported_or_inconsistent_configs(plain_adapter, changes, needle):
    _edit_config(plain_adapter, **changes)
    with pytest.raises(AdapterError, match=needle):
        LoraAdapter(plain_adapter)


def test_missing_weights_file(plain_adapter):
    (plain_adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"no {ADAPTER_WEIGHTS}"):
        LoraAdapter(plain_adapter)


def test_pickle_only_adapter_is_never_loaded(plain_adapter):
    (plain_adapter / ADAPTER_WEIGHTS).unlink()
    (plain_adapter / "adapter_model.bin").write_bytes(b"not a pickle, and never opened")
    with pytest.raises(UnsafeCheckpointError, match="adapter_model.bin") as err:
        LoraAdapter(plain_adapter)
    assert "safe_serialization=True" in str(err.value)


def test_malformed_and_missing_config(plain_adapter, tmp_path):
    (plain_adapter / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(AdapterError, match=f"{ADAPTER_CONFIG} is not valid JSON"):
        LoraAdapter(plain_adapter)
    (plain_adapter / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=f"no {ADAPTER_CONFIG}"):
        LoraAdapter(plain_adapter, name="my-adapter")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        LoraAdapter(tmp_path / "nowhere")


def test_corrupt_weights_file(plain_adapter):
    (plain_adapter / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="cannot be read"):
        LoraAdapter(plain_adapter)
