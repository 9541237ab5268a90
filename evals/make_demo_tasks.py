"""Writes the two small demo tasks (4-way multiple choice, scored by log-likelihood):
``demo_arith`` (sums of small numbers) and ``demo_antonym``. Deterministic; the JSONL
files are committed, this script documents how they were made."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANTONYMS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"), ("old", "new"),
            ("open", "closed"), ("full", "empty"), ("early", "late"), ("high", "low"), ("hard", "soft"), ("wet", "dry")]


def arith(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    answer = a + b
    wrong = rng.sample([n for n in range(2, 19) if n != answer], 3)
    choices = [str(answer)] + [str(w) for w in wrong]
    rng.shuffle(choices)
    return {"question": f"{a} plus {b} is", "choices": choices, "answer": choices.index(str(answer))}


def antonym(rng: random.Random) -> dict:
    word, opposite = rng.choice(ANTONYMS)
    wrong = rng.sample([w for pair in ANTONYMS for w in pair if w not in (word, opposite)], 3)
    choices = [opposite] + wrong
    rng.shuffle(choices)
    return {"question": f"The opposite of {word} is", "choices": choices, "answer": choices.index(opposite)}


def main() -> None:
    for name, make in (("arith", arith), ("antonym", antonym)):
        rng = random.Random(name)
        for split in ("validation", "test"):
            rows = [make(rng) for _ in range(24)]
            path = HERE / "demo" / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
