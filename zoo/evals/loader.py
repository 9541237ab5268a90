"""Dataset loader for mergeflow's lm-eval tasks: reads JSONL files that sit beside this
file, so the task YAMLs work from any working directory (lm-eval resolves relative
``data_files`` against the CWD). Each YAML passes ``dataset_kwargs: {data: <folder>}``."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data: str, **_: object) -> datasets.DatasetDict:
    """``<data>/<split>.jsonl`` for every split present (validation, test, train)."""
    folder = (HERE / data).resolve()
    splits = {}
    for split in ("train", "validation", "test"):
        path = folder / f"{split}.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            splits[split] = datasets.Dataset.from_list(rows)
    if not splits:
        raise FileNotFoundError(f"no train/validation/test .jsonl files in {folder}")
    return datasets.DatasetDict(splits)
