"""The zoo's word pools and word rules."""

from __future__ import annotations

from zoo.content import ANTONYMS, CATEGORIES, PLURAL_NOUNS, number_words, plural


def test_content_pools_have_no_duplicates_or_overlaps():
    antonym_words = [w for pair in ANTONYMS for w in pair]
    category_words = [w for words in CATEGORIES.values() for w in words.split()]
    assert len(antonym_words) == len(set(antonym_words))
    assert len(category_words) == len(set(category_words))
    assert not set(antonym_words) & set(category_words)
    assert not set(PLURAL_NOUNS) & (set(antonym_words) | set(category_words))
    assert len(PLURAL_NOUNS) == len(set(PLURAL_NOUNS)) >= 250


def test_plural():
    assert [plural(w) for w in ("box", "city", "key", "table", "church", "glass", "brush")] == [
        "boxes", "cities", "keys", "tables", "churches", "glasses", "brushes"]


def test_number_words():
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 100, 342, 910)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "one hundred", "three hundred forty-two", "nine hundred ten"]
