"""The zoo's content units: word pairs, grouped words, regular nouns (the pools are data, in
``words.json``) and number words.

The pools are disjoint (a word belongs to one task only), so a specialist trained on one
task never sees another task's words as answers. ``words.json``'s ``held_out`` section holds
more of each pool (``HELD_OUT_*``) that only ever go to a task's test split; they are disjoint
from every pool, so adding them changed no training or validation row.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ANTONYMS", "CATEGORIES", "HELD_OUT_ANTONYMS", "HELD_OUT_CATEGORIES", "HELD_OUT_PLURAL_NOUNS",
           "PLURAL_NOUNS", "number_words", "plural"]

_WORDS = json.loads((Path(__file__).parent / "words.json").read_text())
ANTONYMS = tuple(tuple(pair) for pair in _WORDS["antonyms"])
CATEGORIES = _WORDS["categories"]  # group name -> its words, space-separated
_TAKEN = {w for pair in ANTONYMS for w in pair} | {w for words in CATEGORIES.values() for w in words.split()}
PLURAL_NOUNS = tuple(dict.fromkeys(w for w in _WORDS["plural_nouns"] if w not in _TAKEN))
_HELD_OUT = _WORDS["held_out"]
HELD_OUT_ANTONYMS = tuple(tuple(pair) for pair in _HELD_OUT["antonyms"])
HELD_OUT_CATEGORIES = _HELD_OUT["categories"]  # group name (one of CATEGORIES) -> its held-out words
HELD_OUT_PLURAL_NOUNS = tuple(_HELD_OUT["plural_nouns"])


def plural(noun: str) -> str:
    """The regular English plural: box -> boxes, city -> cities, key -> keys, table -> tables."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``342`` -> ``"three hundred forty-two"`` (0 <= n < 1000)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    return f"{_ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")
