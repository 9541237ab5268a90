"""Building the zoo: its lm-eval tasks, one specialist per task fine-tuned from the base, and
``zoo.json`` with every specialist scored on every task's validation split.

Deterministic from the seed: the rows come from ``(seed, task)``, each specialist trains
with ``task_seed(seed, task)`` under torch's deterministic algorithms. A specialist is keyed
by the base weights, its training rows and the hyperparameters; one whose key matches
``zoo.json`` is not retrained, and an unchanged rebuild only rewrites the tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from merging.digests import content_key, model_digest
from merging.errors import CheckpointNotFoundError, MergeConfigError
from merging.io.writer import atomic_output_dir, atomic_write_text
from zoo.data import ZooTask, select_tasks, write_evals
from zoo.train import (
    BATCH_SIZE,
    FULL_LR,
    LORA_ALPHA,
    LORA_LR,
    LORA_RANK,
    LORA_TARGETS,
    WARMUP_STEPS,
    score,
    train_specialist,
)

__all__ = ["build", "task_seed"]

log = logging.getLogger(__name__)


def task_seed(seed: int, name: str) -> int:
    """The training seed of one specialist: from (seed, task name), not the task's position."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def build(base: Path, out: Path, evals_dir: Path | None = None, *, tasks: int, steps: int, seed: int,
          full_finetune: bool = False, lr: float | None = None) -> dict:
    """Write the zoo's eval tasks, fine-tune one specialist per task and score them all.

    A specialist whose key (base weights, training rows, hyperparameters) matches the one
    recorded in ``out/zoo.json`` is not retrained; when nothing changed, nothing is rescored.

    Args:
        base: the base model's Hugging Face folder.
        out: where the specialists (``out/<task>/``) and ``zoo.json`` go.
        evals_dir: the lm-eval include folder for the tasks (default ``out/evals``).
        tasks: build the first ``tasks`` zoo tasks.
        steps: optimizer steps per specialist.
        seed: the zoo's seed (rows and training).
        full_finetune: save full models instead of LoRA adapters.
        lr: learning rate (default 3e-4 for LoRA, 3e-5 for full fine-tunes).

    Returns:
        The ``zoo.json`` summary (also written to ``out/zoo.json``).

    Raises:
        CheckpointNotFoundError: ``base`` is not a Hugging Face model folder.
        MergeConfigError: ``steps`` below 1 or ``tasks`` outside 1..4.
    """
    base, out = Path(base), Path(out)
    evals_dir = Path(evals_dir) if evals_dir is not None else out / "evals"
    if not (base / "config.json").is_file():
        raise CheckpointNotFoundError(f"--base {base} is not a Hugging Face model folder (no config.json); "
                                      "make it with: mergeflow zoo base DIR")
    if steps < 1:
        raise MergeConfigError(f"--steps {steps}: must be at least 1")
    chosen = select_tasks(tasks)
    lr = lr if lr is not None else (FULL_LR if full_finetune else LORA_LR)
    rows = write_evals(chosen, seed, evals_dir)
    config = {"tasks": [t.name for t in chosen], "steps": steps, "seed": seed, "full_finetune": full_finetune, "lr": lr,
              "batch_size": BATCH_SIZE, "warmup_steps": WARMUP_STEPS, "lora": None if full_finetune else
              {"r": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": list(LORA_TARGETS)},
              "base_digest": model_digest(base), "data_digest": content_key(rows)}
    keys = {t.name: content_key({k: v for k, v in config.items() if k not in ("tasks", "data_digest")}
                            | {"task": t.name, "train": rows[t.name]["train"]}) for t in chosen}
    summary_path = out / "zoo.json"
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if previous.get("config") == config and all((out / t).is_dir() for t in keys):
        log.info("zoo in %s is up to date", out)
        return previous
    done = {name: previous["specialists"][name] for name, key in keys.items()
            if (out / name).is_dir() and previous.get("specialists", {}).get(name, {}).get("key") == key}
    start = time.perf_counter()
    with _deterministic():
        base_acc, cross, specialists = _train_and_score(base, out, chosen, rows, keys, done, steps=steps, seed=seed,
                                                        lr=lr, full_finetune=full_finetune)
    summary = {
        "config": config,
        "base": str(base), "evals": str(evals_dir),
        "rows": {t: {s: len(r) for s, r in rs.items()} for t, rs in rows.items()},
        "accuracy": {t.name: {"base": base_acc[t.name], "specialist": cross[t.name][t.name]} for t in chosen},
        "cross_validation_accuracy": cross,
        "specialists": specialists,
        "total_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the body; the previous setting is restored after."""
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _load_specialist(base: Path, folder: Path, full_finetune: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if full_finetune:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)


def _train_and_score(base: Path, out: Path, chosen: Sequence[ZooTask], rows: dict, keys: dict[str, str],
                     done: dict[str, dict], *, steps: int, seed: int, lr: float, full_finetune: bool
                     ) -> tuple[dict, dict, dict]:
    """Train and save each specialist not in ``done``; returns the base's validation accuracy
    per task, every specialist's validation accuracy on every task, and per-specialist records
    (key, timings)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_acc = {t.name: score(base_model, tokenizer, rows[t.name]["validation"]) for t in chosen}
    del base_model
    log.info("base validation accuracy: %s", {k: round(v, 3) for k, v in base_acc.items()})
    out.mkdir(parents=True, exist_ok=True)
    cross: dict[str, dict[str, float]] = {}
    specialists: dict[str, dict] = {}
    for task in chosen:
        t0 = time.perf_counter()
        if task.name in done:
            model = _load_specialist(base, out / task.name, full_finetune)
            record = done[task.name]
            log.info("%s: specialist unchanged, not retrained", task.name)
        else:
            model, _, loss = train_specialist(base, rows[task.name]["train"], steps=steps,
                                              seed=task_seed(seed, task.name), lr=lr, full_finetune=full_finetune)
            train_s = time.perf_counter() - t0
            with atomic_output_dir(out / task.name, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                if full_finetune:
                    tokenizer.save_pretrained(tmp)
            record = {"key": keys[task.name], "train_s": round(train_s, 1), "s_per_step": round(train_s / steps, 2),
                      "final_loss": round(loss, 4)}
        t1 = time.perf_counter()
        cross[task.name] = {t.name: score(model, tokenizer, rows[t.name]["validation"]) for t in chosen}
        specialists[task.name] = record | {"eval_s": round(time.perf_counter() - t1, 1)}
        log.info("%s: own validation accuracy %.3f (base %.3f)", task.name, cross[task.name][task.name],
                 base_acc[task.name])
        del model
    return base_acc, cross, specialists
