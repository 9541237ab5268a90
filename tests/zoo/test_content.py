"""The zoo's word pools and word rules."""

from __future__ import annotations

from zoo.content import (
    ANTONYMS,
    CATEGORIES,
    HELD_OUT_ANTONYMS,
    HELD_OUT_CATEGORIES,
    HELD_OUT_PLURAL_NOUNS,
    PLURAL_NOUNS,
    number_words,
    plural,
)


def test_content_pools_have_no_duplicates_or_overlaps():
    antonym_words = [w for pair in ANTONYMS for w in pair]
    category_words = [w for words in CATEGORIES.values() for w in words.split()]
    assert len(antonym_words) == len(set(antonym_words))
    assert len(category_words) == len(set(category_words))
    assert not set(antonym_words) & set(category_words)
    assert not set(PLURAL_NOUNS) & (set(antonym_words) | set(category_words))
    assert len(PLURAL_NOUNS) == len(set(PLURAL_NOUNS)) >= 250


def test_held_out_pools_are_disjoint_from_every_pool_and_each_other():
    pools = {"antonym": [w for pair in ANTONYMS for w in pair], "category": [w for ws in CATEGORIES.values() for w in ws.split()],
             "plural": list(PLURAL_NOUNS), "group names": list(CATEGORIES)}
    held = {"antonym": [w for pair in HELD_OUT_ANTONYMS for w in pair],
            "category": [w for ws in HELD_OUT_CATEGORIES.values() for w in ws.split()], "plural": list(HELD_OUT_PLURAL_NOUNS)}
    every = [w for words in (*pools.values(), *held.values()) for w in words]
    assert len(every) == len(set(every))  # no word twice anywhere: held-out words are new to every split
    assert set(HELD_OUT_CATEGORIES) == set(CATEGORIES)
    assert all(len(pair) == 2 for pair in HELD_OUT_ANTONYMS)
    assert not [n for n in HELD_OUT_PLURAL_NOUNS if n.endswith(("f", "fe", "o"))]  # regular plurals only
    assert (len(HELD_OUT_ANTONYMS), len(held["category"]), len(HELD_OUT_PLURAL_NOUNS)) == (99, 177, 214)


def test_plural():
    assert [plural(w) for w in ("box", "city", "key", "table", "church", "glass", "brush")] == [
        "boxes", "cities", "keys", "tables", "churches", "glasses", "brushes"]


def test_number_words():
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 100, 342, 910)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "one hundred", "three hundred forty-two", "nine hundred ten"]
