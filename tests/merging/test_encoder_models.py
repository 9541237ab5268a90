"""Encoder-only (BERT) and encoder-decoder (T5) checkpoints: the tensor plan (two layer stacks,
cross-attention, relative attention bias, shared and tied embeddings), every registered method,
and the LoRA path (task arithmetic of peft adapters equals the dense sum; a merged adapter loads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config
from merging.config import DEFAULT_EXCLUDE
from merging.io.stats import write_stats
from merging.plan import build_plan, find_tied
from merging.registry import get_method
from tests.merging.test_determinism import SETTINGS

KINDS = ("t5", "t5_v1_1", "bert")


def _build(kind: str):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=32, max_position_embeddings=32))
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=63, eos_token_id=62,
                      feed_forward_proj="gated-gelu" if kind == "t5_v1_1" else "relu")
    config.tie_word_embeddings = kind == "t5"  # v1.1: an untied LM head, and shared/encoder/decoder embeddings all saved
    return _retie(T5ForConditionalGeneration(config))


def _retie(model):
    """T5 v1.1 checkpoints store the one shared embedding three times (shared, encoder and
    decoder embed_tokens), equal; an untied tiny model built here would not keep them equal."""
    if hasattr(model, "shared") and not model.config.tie_word_embeddings:
        with torch.no_grad():
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def _load(kind: str, folder: Path):
    from transformers import BertForMaskedLM, T5ForConditionalGeneration

    return (BertForMaskedLM if kind == "bert" else T5ForConditionalGeneration).from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for kind in KINDS:
        model = _build(kind)
        family = {"base": root / kind / "base"}
        model.save_pretrained(family["base"])
        for i, name in enumerate("abc", start=1):
            tuned = _load(kind, family["base"])
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in tuned.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
            _retie(tuned)
            family[name] = root / kind / name
            tuned.save_pretrained(family[name])
        out[kind] = family
    return out


def _plan(folder: Path):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        items = [(k, tuple(f.get_slice(k).get_shape()), torch.float32) for k in f.keys()]
    return {e.name: e for e in build_plan(items, [r".*"], DEFAULT_EXCLUDE, [], num_layers=2)}


def test_t5_plan_two_stacks_cross_attention_and_relative_bias(families):
    plan = _plan(families["t5_v1_1"]["base"])
    # encoder (2 blocks) and decoder (3 blocks) are stacks of their own: t runs 0..1 in each
    assert plan["encoder.block.1.layer.0.SelfAttention.q.weight"].layer_t == 1.0
    assert plan["decoder.block.1.layer.0.SelfAttention.q.weight"].layer_t == 0.5
    assert plan["decoder.block.2.layer.1.EncDecAttention.k.weight"].layer_t == 1.0
    assert plan["decoder.block.0.layer.1.EncDecAttention.o.weight"].kind == "matrix"  # cross-attention
    assert plan["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].kind == "other"  # a table
    assert {plan[n].kind for n in ("shared.weight", "encoder.embed_tokens.weight", "lm_head.weight")} == {"other"}


def test_a_single_stack_is_still_checked_against_the_config():
    from merging.errors import CheckpointMismatchError

    items = [(f"model.layers.{i}.w", (2, 2), torch.float32) for i in range(3)]
    with pytest.raises(CheckpointMismatchError, match="layer 2 but the base's config.json says the model has 2"):
        build_plan(items, [r".*"], DEFAULT_EXCLUDE, [], num_layers=2)


def test_tied_copies_are_found_and_untied_heads_are_not(families):
    base = load_file(families["t5_v1_1"]["base"] / "model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    tied = find_tied(shapes, lambda a, b: torch.equal(base[a], base[b]))
    # the three copies of the shared embedding form one group (named after its first name in the file); the LM head,
    # of the same shape but its own values, is not in it
    assert set(tied) | set(tied.values()) == {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert len(set(tied.values())) == 1 and len(tied) == 2


def _stats(family: dict[str, Path], kind: str, names: list[str]) -> dict[str, str]:
    base = load_file(family["base"] / "model.safetensors")
    files = {}
    for index, name in enumerate(names, start=1):
        g = torch.Generator().manual_seed(index)
        if kind == "gram":
            xs = {k: torch.randn(4 * t.shape[1], t.shape[1], generator=g) for k, t in base.items()
                  if t.dim() == 2 and not any(w in k for w in ("embed", "shared", "lm_head", "relative_attention"))}
            tensors = {k: x.T @ x / x.shape[0] for k, x in xs.items()}
        else:  # one statistic per parameter: the tied copies of the shared embedding get the same
            tensors = {k: torch.rand(t.shape, generator=g) ** 4 for k, t in base.items()}
            tensors |= {k: tensors["shared.weight"].clone() for k in tensors if k.endswith("embed_tokens.weight")}
        path = family["base"].parent / "stats" / f"{kind}_{name}.safetensors"
        if not path.exists():
            write_stats(path, tensors, kind, tokens={k: 64 for k in tensors})
        files[name] = str(path)
    return files


def _config(family: dict[str, Path], method: str) -> dict:
    count, settings = SETTINGS[method]
    names = list("abc"[:count])
    models = []
    for name in names:
        per_model = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                per_model[key] = value[name] if name in value else None
            elif isinstance(value, str) and value.startswith("@"):
                per_model[key] = _stats(family, value[1:], names)[name]
        models.append({"model": str(family[name]), "parameters": {k: v for k, v in per_model.items() if v is not None}})
    shared = {k: v for k, v in settings.items() if not isinstance(v, dict) and not (isinstance(v, str) and v.startswith("@"))}
    base = {} if get_method(method).base == "input" else {"base_model": str(family["base"])}
    return {"merge_method": method, **base, "models": models, "parameters": shared, "device": "cpu", "seed": 3}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(set(SETTINGS) - {"regmean_plusplus"}))
def test_every_method_merges_the_model_and_it_runs(families, kind, method, tmp_path):
    family = families[kind]
    raw = _config(family, method)
    out = merge_checkpoints(parse_merge_config(raw), tmp_path / "out")
    reference = raw.get("base_model") or raw["models"][0]["model"]  # the output has the reference's tensor names
    merged, base = load_file(out / "model.safetensors"), load_file(Path(reference) / "model.safetensors")
    assert merged.keys() == base.keys() and all(torch.isfinite(t).all() for t in merged.values())
    if "encoder.embed_tokens.weight" in merged:  # copies of the tied embeddings stay equal, random methods included
        assert torch.equal(merged["shared.weight"], merged["encoder.embed_tokens.weight"])
        assert torch.equal(merged["shared.weight"], merged["decoder.embed_tokens.weight"])
    model = _load(kind, out)
    ids = torch.tensor([[5, 6, 7, 62]])
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits if kind != "bert" else model(input_ids=ids).logits
    assert logits.shape[-1] == 64 and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_task_arithmetic_is_the_weighted_sum_on_every_tensor(families, kind, tmp_path):
    family = families[kind]
    raw = {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "parameters": {"lambda": 0.7},
           "models": [{"model": str(family[n]), "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", 0.5))],
           "dtype": "float32", "compute_dtype": "float64"}
    merged = load_file(merge_checkpoints(parse_merge_config(raw), tmp_path / "out") / "model.safetensors")
    base, a, b = (load_file(family[n] / "model.safetensors") for n in ("base", "a", "b"))
    assert "encoder.embed_tokens.weight" not in a or kind != "t5_v1_1"  # the fine-tunes store the shared embedding once
    for name, value in base.items():
        a_t, b_t = (m.get(name, m.get("shared.weight")).double() for m in (a, b))  # (read from the tied copy)
        expected = value.double() + 0.7 * ((a_t - value.double()) + 0.5 * (b_t - value.double()))
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind, targets", [("t5_v1_1", ["q", "v", "wo"]), ("bert", ["query", "value", "dense"])])
def test_lora_adapters_merge_to_the_dense_sum_and_out_as_an_adapter(families, kind, targets, tmp_path):
    import peft

    family = families[kind]
    adapters = []
    for i, rank in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(_load(kind, family["base"]),
                                    peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp_path / f"lora{i}")
        adapters.append(model)
    raw = {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "device": "cpu",
           "models": [{"model": str(tmp_path / f"lora{i}")} for i in range(2)]}
    merged = load_file(merge_checkpoints(parse_merge_config(raw), tmp_path / "dense") / "model.safetensors")
    expected = {}
    for model in adapters:
        for name, tensor in model.merge_and_unload().state_dict().items():
            expected.setdefault(name, []).append(tensor)
    base = load_file(family["base"] / "model.safetensors")
    touched = 0
    for name, value in base.items():
        want = value + sum(e - value for e in expected[name])
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)
        touched += not torch.equal(want, value)
    assert touched >= 3 * 2  # cross-attention (T5) / every layer's targets really moved

    adapter = merge_checkpoints(parse_merge_config({**raw, "out_format": "peft"}), tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(_load(kind, family["base"]), adapter).merge_and_unload().state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=1e-5, msg=name)


def test_a_model_storing_more_tied_copies_than_the_base_merges(families, tmp_path):
    # the base is a fine-tune saved with the shared embedding once; the input stores it three times
    family = families["t5_v1_1"]
    raw = {"merge_method": "task_arithmetic", "base_model": str(family["a"]), "models": [{"model": str(family["base"])}],
           "device": "cpu"}
    merged = load_file(merge_checkpoints(parse_merge_config(raw), tmp_path / "out") / "model.safetensors")
    a, other = load_file(family["a"] / "model.safetensors"), load_file(family["base"] / "model.safetensors")
    assert merged.keys() == a.keys() and "encoder.embed_tokens.weight" not in merged
    torch.testing.assert_close(merged["shared.weight"], other["shared.weight"], rtol=0, atol=1e-6)


def test_a_copy_that_differs_is_not_taken_for_a_tied_one(families, tmp_path):
    from merging.errors import CheckpointMismatchError

    family = families["t5_v1_1"]
    tensors = load_file(family["base"] / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors["encoder.embed_tokens.weight"] + 1.0  # not a copy any more
    odd = tmp_path / "odd"
    odd.mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    (odd / "config.json").write_text((family["base"] / "config.json").read_text())
    raw = {"merge_method": "task_arithmetic", "base_model": str(family["a"]), "models": [{"model": str(odd)}]}
    with pytest.raises(CheckpointMismatchError, match="encoder.embed_tokens.weight' that the base lacks"):
        merge_checkpoints(parse_merge_config(raw), tmp_path / "out")


def test_per_stack_gradients_and_tied_copies_match_mergekit(families, tmp_path):
    # mergekit 0.1.5 plans T5 (v1.1, gated) as an encoder and a decoder module, a gradient per module
    pytest.importorskip("mergekit")
    from tests.merging.test_mergekit_parity import assert_same_as_mergekit

    family = families["t5_v1_1"]
    assert_same_as_mergekit({"merge_method": "slerp", "base_model": str(family["a"]),
                             "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
                             "parameters": {"t": [{"filter": "SelfAttention", "value": [0, 0.3, 1]}, {"value": [1, 0.2]}]}},
                            tmp_path)
