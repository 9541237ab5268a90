"""Training and scoring a zoo specialist.

``train_specialist`` fine-tunes the base on a task's training rows, the prompt masked out of
the loss: a PEFT LoRA adapter (r=8, alpha 16, no dropout, on q/k/v/o and gate/up/down; lr
3e-4) or, with ``full_finetune``, the whole model (lr 3e-5). Batch 16, AdamW without weight
decay, a linear warmup over 10 steps; batches are drawn from a ``torch.Generator`` seeded
with ``seed``, and ``torch.manual_seed(seed)`` fixes the LoRA initialisation.

``score`` is lm-eval's ``acc`` for multiple choice: ``argmax_choice sum log p(" " + choice |
question)``, with the context/continuation split of lm-eval's HF backend (``encode_pair``).
Both compute the LM head only at the positions that are scored or trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BATCH_SIZE", "FULL_LR", "LORA_ALPHA", "LORA_LR", "LORA_RANK", "LORA_TARGETS", "WARMUP_STEPS",
           "encode_pair", "score", "train_specialist"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 8, 16
BATCH_SIZE = 16
LORA_LR, FULL_LR = 3e-4, 3e-5
WARMUP_STEPS = 10


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-eval's HF backend does: trailing
    spaces move to the continuation, which is the tail of the whole string's encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _pad(seqs: list[list[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def _head_logits(model, ids, mask, positions):
    """Logits at ``positions`` (a boolean (B, T) mask) only: the LM head over a 49k vocabulary
    at every position would be a quarter of the compute. ``model`` may be a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    return inner.get_output_embeddings()(hidden[positions])  # (N, V)


def score(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> float:
    """Accuracy of ``argmax_choice sum log p(" " + choice | question)``, lm-eval's ``acc``."""
    import torch

    requests = []  # (row index, choice index, context ids, continuation ids)
    for i, row in enumerate(rows):
        for j, choice in enumerate(row["choices"]):
            requests.append((i, j, *encode_pair(tokenizer, row["question"], " " + choice)))
    requests.sort(key=lambda r: len(r[2]) + len(r[3]))  # similar lengths together: less padding
    loglik = torch.full((len(rows), max(len(r["choices"]) for r in rows)), -math.inf, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            seqs = [(c + t)[:-1] for _, _, c, t in batch]
            # the logits at position p predict token p + 1: the continuation's are at len(c) - 1 ...
            positions = _pad([[len(c) - 1 <= p < len(c) + len(t) - 1 for p in range(len(c) + len(t) - 1)]
                              for _, _, c, t in batch], False)
            logits = _head_logits(model, _pad(seqs, 0), _pad([[1] * len(s) for s in seqs], 0), positions)
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            targets = torch.tensor([token for _, _, _, t in batch for token in t])
            picked = logprobs[torch.arange(len(targets)), targets]
            offset = 0
            for i, j, _, t in batch:
                loglik[i, j] = picked[offset:offset + len(t)].sum()
                offset += len(t)
    predicted = loglik.argmax(dim=1)
    return float(sum(int(p) == r["answer"] for p, r in zip(predicted.tolist(), rows)) / len(rows))


def _examples(tokenizer, rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) for the correct answer; the prompt's labels are -100."""
    out = []
    for row in rows:
        context, target = encode_pair(tokenizer, row["question"], " " + row["choices"][row["answer"]])
        out.append((context + target, [-100] * len(context) + target))
    return out


def train_specialist(base: Path, rows: Sequence[dict], *, steps: int, seed: int, lr: float, full_finetune: bool):
    """Fine-tune a specialist on the training rows: a PEFT LoRA model, or the full model.

    Returns:
        ``(model, tokenizer, final loss)``; the model is in eval mode and not saved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if not full_finetune:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = _examples(tokenizer, rows)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:BATCH_SIZE]], order[BATCH_SIZE:]
        ids = _pad([b[0] for b in batch], pad)
        targets = _pad([b[1][1:] + [-100] for b in batch], -100)  # (B, T): the token each position predicts
        mask = _pad([[1] * len(b[0]) for b in batch], 0)
        logits = _head_logits(model, ids, mask, targets != -100)
        loss = torch.nn.functional.cross_entropy(logits, targets[targets != -100])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, tokenizer, float(loss.detach())
