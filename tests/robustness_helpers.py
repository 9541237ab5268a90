"""Builders shared by the robustness tests of issue 15 (determinism, SIGKILL): a family of
Llama-shaped checkpoints with a configurable size, larger than the session's ``tiny_models``
where a test needs tensors past torch's intra-op parallel grain (32768 elements) or a merge
that lasts long enough to be killed while it writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import save_tokenizer, tiny_llama_config


def save_model_family(root: Path, *, layers: int = 2, hidden: int = 16, vocab: int = 64, finetunes: int = 3,
                      scale: float = 0.02) -> dict[str, Path]:
    """``base`` (random Llama with a tokenizer) and ``ft_1`` .. ``ft_N``: the base plus a seeded
    Gaussian perturbation of every tensor (written with safetensors, so building stays fast)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = root / "base"
    LlamaForCausalLM(tiny_llama_config(layers=layers, hidden=hidden, vocab=vocab)).save_pretrained(base)
    save_tokenizer(base)
    state = load_file(base / "model.safetensors")
    family = {"base": base}
    for index in range(1, finetunes + 1):
        folder = root / f"ft_{index}"
        folder.mkdir()
        shutil.copy(base / "config.json", folder / "config.json")
        generator = torch.Generator().manual_seed(index)
        tuned = {name: (t + scale * torch.randn(t.shape, generator=generator)).contiguous() for name, t in state.items()}
        save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
        family[f"ft_{index}"] = folder
    return family
