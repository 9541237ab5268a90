"""Tokenizer merges: output vocabularies, row alignment with mergekit's defaults, the
tokenizer section, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import merge_checkpoints, parse_merge_config
from merging.config import TokenOverride, ZeroToken
from merging.errors import MergeConfigError
from merging.tokenizer_merge import CHAT_TEMPLATES, Vocabulary, align_rows


def add_tokens(model: Path, tokens: list[str], seed: int) -> Path:
    """Give ``model`` (a tiny Llama folder) the base tokenizer plus ``tokens`` and as many new
    embedding and LM-head rows."""
    from tokenizers import AddedToken, Tokenizer

    from tests.conftest import save_tokenizer

    save_tokenizer(model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    tok.save(str(model / "tokenizer.json"))
    tensors = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.randn(len(tokens), tensors[key].shape[1], generator=g)])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] += len(tokens)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    from tests.conftest import save_tiny_model, save_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    base = save_tiny_model(root / "base", seed=0)
    save_tokenizer(base)
    b = add_tokens(save_tiny_model(root / "b", seed=1, base=base), ["<tool>", "<think>"], 1)
    c = add_tokens(save_tiny_model(root / "c", seed=2, base=base), ["<think>", "<x>"], 2)
    return {"base": base, "b": b, "c": c}


def _vocab(tokens: list[str], perms: dict[str, list[int]], rows: int | None = None) -> Vocabulary:
    return Vocabulary("", {t: i for i, t in enumerate(tokens)}, rows or len(tokens), {m: tuple(p) for m, p in perms.items()},
                      {}, Path("."))


def test_missing_rows_follow_mergekit_defaults():
    # tokens: shared, only-in-A, in base and B, in A and B (not base), in none
    vocab = _vocab(["s", "a", "bb", "ab", "none"], {"base": [0, -1, 1, -1, -1], "A": [0, 1, -1, 2, -1],
                                                      "B": [0, -1, 1, 2, -1]}, rows=8)
    tensors = {"A": torch.tensor([[1.0], [2.0], [3.0]]), "B": torch.tensor([[10.0], [20.0], [30.0]]),
               "base": torch.tensor([[100.0], [200.0]])}
    out = align_rows(tensors, vocab, {}, "base")
    assert out["base"][:5, 0].tolist() == [100.0, 2.0, 200.0, 16.5, 0.0]  # single owner, own, mean of A and B, zero
    assert out["A"][:5, 0].tolist() == [1.0, 2.0, 200.0, 3.0, 0.0]  # the base's row where the base has it
    assert out["B"][:5, 0].tolist() == [10.0, 2.0, 20.0, 30.0, 0.0]
    assert torch.allclose(out["A"][5:], out["A"][:5].mean(dim=0).expand(3, 1))  # padding rows: the mean
    forced = align_rows(tensors, vocab, {"s": TokenOverride(source="B", force=True),
                                         "ab": TokenOverride(source=ZeroToken(kind="zero"))}, "base")
    assert [forced[m][0, 0].item() for m in "AB"] == [10.0, 10.0] and forced["base"][3, 0].item() == 0.0
    with pytest.raises(MergeConfigError, match="tokens.s.source: model 'C' is not one of"):
        align_rows(tensors, vocab, {"s": TokenOverride(source="C", force=True)}, "base")


def test_union_merge_aligns_rows_and_writes_tokenizer_and_template(vocab_models, tmp_path):
    from transformers import AutoTokenizer

    m = vocab_models
    # base_is_reference: the base only gives the vocabulary's reference, not a third linear input
    raw = {"merge_method": "linear", "base_model": str(m["base"]), "base_is_reference": True,
           "models": [{"model": str(m[n]), "parameters": {"weight": 0.5}} for n in "bc"],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {"<new>": {"source": {"kind": "zero"}}}},
           "chat_template": "chatml"}
    out = merge_checkpoints(parse_merge_config(raw), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert {"<tool>", "<think>", "<x>", "<new>"} <= set(vocab) and len(vocab) == 68
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    b, c = (load_file(m[n] / "model.safetensors")["model.embed_tokens.weight"] for n in "bc")
    assert embed.shape == (72, 16)
    assert torch.allclose(embed[vocab["<tool>"]], b[64])  # one owner: its row in both inputs
    assert torch.allclose(embed[vocab["<think>"]], (b[65] + c[64]) / 2)
    assert torch.equal(embed[vocab["<new>"]], torch.zeros(16))
    assert torch.allclose(embed[5], (b[5] + c[5]) / 2)
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]


def test_model_source_keeps_that_models_vocabulary(vocab_models, tmp_path):
    m = vocab_models
    raw = {"merge_method": "task_arithmetic", "base_model": str(m["base"]), "models": [str(m["b"]), str(m["c"])],
           "tokenizer_source": f"model:{m['c']}"}
    out = merge_checkpoints(parse_merge_config(raw), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    assert "<x>" in json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] or \
        any(t["content"] == "<x>" for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"])


def test_differing_vocabularies_without_a_tokenizer_merge_are_refused(vocab_models, tmp_path):
    from merging.errors import CheckpointMismatchError

    m = vocab_models
    raw = {"merge_method": "linear", "models": [str(m["base"]), str(m["b"])]}
    with pytest.raises(CheckpointMismatchError, match=r"shape \(66, 16\) does not match the base.s \(64, 16\)"):
        merge_checkpoints(parse_merge_config(raw), tmp_path / "out")


@pytest.mark.parametrize(("raw", "match"), [
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "either 'tokenizer_source' or"),
    ({"tokenizer": {"source": "union", "pad": 8}}, r"unknown key\(s\) \['pad'\]"),
    ({"chat_template": "nonesuch"}, "neither auto, a named template"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a"}}}}}, "token_id or token"),
])
def test_tokenizer_config_errors_name_the_key(raw, match):
    with pytest.raises(MergeConfigError, match=match):
        parse_merge_config({"merge_method": "linear", "models": ["a"], **raw})


def test_named_templates_are_mergekits():
    from merging.config import CHAT_TEMPLATE_NAMES

    assert set(CHAT_TEMPLATES) == set(CHAT_TEMPLATE_NAMES)
    assert all("{%" in text for text in CHAT_TEMPLATES.values())
