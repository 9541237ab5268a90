"""Shared builders: tiny Llama-shaped checkpoints made on the fly, and the Prefect harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def tiny_llama_config(layers: int = 2, tie: bool = False, vocab: int = 64, hidden: int = 16):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )


def perturbed(model_class, base: Path, seed: int, delta_scale: float):
    """``base`` loaded as ``model_class`` plus a seeded Gaussian perturbation of every parameter."""
    model = model_class.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * delta_scale)
    return model


def save_tiny_model(path: Path, *, seed: int = 0, layers: int = 2, tie: bool = False, dtype=torch.float32,
                    base: Path | None = None, delta_scale: float = 0.02, shard: str | None = None) -> Path:
    """Save a tiny LlamaForCausalLM; with ``base``, the base plus a seeded perturbation."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = perturbed(LlamaForCausalLM, base, seed, delta_scale)
    else:
        model = LlamaForCausalLM(tiny_llama_config(layers=layers, tie=tie))
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def save_tiny_multimodal(path: Path, *, seed: int = 0, base: Path | None = None, delta_scale: float = 0.02) -> Path:
    """Save a tiny Mistral3ForConditionalGeneration (a 3-layer text decoder, a 2-layer Pixtral
    vision tower, a projector); with ``base``, the base plus a seeded perturbation."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    if base is not None:
        model = perturbed(Mistral3ForConditionalGeneration, base, seed, delta_scale)
    else:
        model = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config={"model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
            vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "head_dim": 8}))
    model.save_pretrained(path)
    return path


def save_tokenizer(path: Path) -> None:
    """A small word-level tokenizer, so tokenizer copying is exercised."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"<unk>": 60, "<s>": 61, "</s>": 62, "<pad>": 63}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tune-like variants of a 2-layer tiny Llama (float32)."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_model(root / "base", seed=0)
    save_tokenizer(base)
    models = {"base": base}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        models[name] = save_tiny_model(root / name, seed=i, base=base)
    return models


@pytest.fixture(scope="session")
def multimodal(tmp_path_factory) -> dict[str, str]:
    """A tiny multi-modal base and two fine-tunes of it (``save_tiny_multimodal``)."""
    root = tmp_path_factory.mktemp("mm")
    base = save_tiny_multimodal(root / "base")
    return {"base": str(base), **{n: str(save_tiny_multimodal(root / n, seed=i, base=base)) for i, n in enumerate("ab", 1)}}


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A Prefect test harness (temporary SQLite server) shared by the flow tests of a session.
    Also isolates persisted task results: cached results of an earlier session would point at
    that session's deleted temporary folders."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path_factory.mktemp("prefect-results"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
