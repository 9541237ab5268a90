"""Built-in demo models: a small Llama-shaped base with its own byte-level BPE tokenizer and
three fine-tune-like variants (base + shared and task-specific low-rank perturbations).
Deterministic. ``python -m flows.demo_models OUT_DIR`` (a DVC stage)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TASKS = ("math", "code", "chat")


def _tokenizer(folder: Path) -> int:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    evals = Path(__file__).resolve().parents[1] / "evals" / "demo"
    texts = [p.read_text() for p in sorted(evals.rglob("*.jsonl"))] or ["hello world"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _low_rank(shape: torch.Size, g: torch.Generator, rank: int = 4, scale: float = 0.004) -> torch.Tensor:
    if len(shape) == 1:
        return torch.randn(shape, generator=g) * scale
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) * (scale / rank**0.5)


def build(out: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {"base": out / "base", **{t: out / t for t in TASKS}}
    paths["base"].mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(paths["base"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    base = LlamaForCausalLM(config)
    base.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    shared = {n: _low_rank(p.shape, g) for n, p in base.named_parameters()}
    for task in TASKS:
        model = LlamaForCausalLM.from_pretrained(paths["base"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.5 * shared[name] + _low_rank(p.shape, g))
        model.save_pretrained(paths[task])
        for f in paths["base"].glob("tokenizer*"):
            (paths[task] / f.name).write_bytes(f.read_bytes())
    return paths


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/models"))
