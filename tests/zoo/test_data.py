"""The zoo's task rows and lm-eval include folder: deterministic, held-out words, test splits of
at least MIN_TEST_ITEMS items, the train and validation files byte-identical to the zoo's before
it became its own package (and before its test split grew)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from merging.errors import MergeConfigError
from zoo.content import ANTONYMS, CATEGORIES, HELD_OUT_ANTONYMS, HELD_OUT_CATEGORIES, number_words, plural
from zoo.data import (
    LOADER,
    MAX_VALIDATION_ITEMS,
    MIN_TEST_ITEMS,
    SPLITS,
    TASKS,
    YAML_HEADER,
    make_rows,
    select_tasks,
    write_evals,
)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_rows_are_deterministic_and_well_formed(task):
    rows = make_rows(task, seed=0)
    assert rows == make_rows(task, seed=0)
    assert rows != make_rows(task, seed=1)
    for split in SPLITS:
        assert rows[split], split
        for row in rows[split]:
            choices = row["choices"]
            assert len(choices) == 4 and len(set(choices)) == 4, row
            assert 0 <= row["answer"] < 4
            assert row["question"] == task.prompt.format(x=row["word"])
    assert 40 <= len(rows["validation"]) <= MAX_VALIDATION_ITEMS


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_every_test_split_has_at_least_min_test_items_each_asked_once(seed):
    sizes = {}
    for task in TASKS:
        test = make_rows(task, seed)["test"]
        sizes[task.name] = len(test)
        questions = [r["question"] for r in test]
        assert len(set(questions)) == len(questions), task.name  # no item asked twice
    assert MIN_TEST_ITEMS == 200 and min(sizes.values()) >= MIN_TEST_ITEMS, sizes
    # the sizes do not depend on the seed except antonym's (a validation pair left unasked)
    assert sizes["category"] == 48 + sum(len(w.split()) for w in HELD_OUT_CATEGORIES.values()) == 225
    assert sizes["plural"] == 268 and sizes["successor"] == 199 + (200 - 60) == 339
    assert 2 * (31 + len(HELD_OUT_ANTONYMS)) == 260 <= sizes["antonym"] <= 264


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_validation_and_test_words_are_never_trained_on(task):
    rows = make_rows(task, seed=3)
    seen = {r["word"] for r in rows["train"]} | {r["choices"][r["answer"]] for r in rows["train"]}
    held_out = {split: {r["word"] for r in rows[split]} for split in ("validation", "test")}
    assert not held_out["validation"] & seen and not held_out["test"] & seen
    assert not held_out["validation"] & held_out["test"]
    # the held-out pools go to test only, for every seed
    pool = {w for unit in task.held_out for w in ((unit,) if isinstance(unit, str) else unit[:1] if task.name == "category"
                                                  else unit)}
    assert pool <= held_out["test"] and not pool & (seen | held_out["validation"])
    if task.name in ("antonym", "plural"):  # the answers are content words too
        for split in ("validation", "test"):
            answers = {r["choices"][r["answer"]].lower() for r in rows[split]}
            assert not answers & {w.lower() for w in seen}, split
    # distractors come from the same split: no training word leaks into an evaluation item
    train_words = {r["word"] for r in rows["train"]}
    for split in ("validation", "test"):
        assert not {c.lower() for r in rows[split] for c in r["choices"]} & train_words - set(CATEGORIES)


def test_answers_follow_each_task_rule():
    rows = {t.name: make_rows(t, 0)["test"] for t in TASKS}
    pairs = {a: b for a, b in ANTONYMS + HELD_OUT_ANTONYMS} | {b: a for a, b in ANTONYMS + HELD_OUT_ANTONYMS}
    groups = {w: g for pool in (CATEGORIES, HELD_OUT_CATEGORIES) for g, words in pool.items() for w in words.split()}
    numbers = {number_words(n): n for n in range(1000)}
    assert all(r["choices"][r["answer"]] == pairs[r["word"]] for r in rows["antonym"])
    assert all(r["choices"][r["answer"]] == groups[r["word"]] for r in rows["category"])
    assert all(r["choices"][r["answer"]] == plural(r["word"]) for r in rows["plural"])
    assert all(r["choices"][r["answer"]] == str(numbers[r["word"]] + 1) for r in rows["successor"])
    for name in ("antonym", "category", "plural"):  # the distractor the base falls for: the input itself
        assert all(r["word"] in r["choices"] for r in rows[name]), name


def test_select_tasks_range():
    assert [t.name for t in select_tasks(4)] == [t.name for t in TASKS[:4]]
    with pytest.raises(MergeConfigError, match="--tasks 0: the zoo has"):
        select_tasks(0)
    with pytest.raises(MergeConfigError, match=f"pick 1 to {len(TASKS)}"):
        select_tasks(len(TASKS) + 1)


def test_write_evals_is_a_self_contained_include_folder_without_stale_tasks(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "zoo_gone.yaml").write_text(YAML_HEADER + "\ntask: zoo_gone\n")
    (evals / "zoo_mine.yaml").write_text("task: zoo_mine\n")  # not generated: kept
    (evals / "gone").mkdir(parents=True)
    (evals / "gone" / "test.jsonl").write_text("{}\n")
    (evals / "notes").mkdir()
    (evals / "notes" / "README.md").write_text("mine\n")  # not generated: kept
    rows = write_evals(TASKS[:2], 0, evals)
    first = TASKS[0].name
    for split in SPLITS:
        lines = (evals / first / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows[first][split]
    assert (evals / "loader.py").read_bytes() == LOADER.read_bytes()
    text = (evals / f"zoo_{first}_val.yaml").read_text()
    assert f"task: zoo_{first}_val\n" in text and f"data: {first}\n" in text and "test_split: validation" in text
    assert "custom_dataset: !function loader.load_jsonl" in text
    assert "test_split: test" in (evals / f"zoo_{first}.yaml").read_text()
    assert not (evals / "zoo_gone.yaml").exists() and (evals / "zoo_mine.yaml").exists()
    assert not (evals / "gone").exists() and (evals / "notes" / "README.md").exists()


def _folder_sha256(folder: Path, skip: str) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != skip:
            h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.mark.parametrize(("seed", "digest"), [
    (0, "c89c2c7435cdc3d7b7f58f4706d915008f661f440887a07047884f2c8d5c08dc"),
    (1, "4036e4f19e28d5120236ac7adf4018a806d161db9c0f638108fdb0aa0bba89b9"),
])
def test_train_and_validation_files_are_byte_identical_to_the_zoo_before_its_test_split_grew(tmp_path, seed, digest):
    """Every file of the four tasks' include folder but ``test.jsonl`` (train and validation
    rows, YAMLs, loader) as written before the held-out pools were added, which is as
    ``flows/zoo.py`` wrote them before the zoo became its own package: specialists train on the
    same rows and their validation scores stay valid."""
    write_evals(TASKS, seed, tmp_path / "evals")
    assert _folder_sha256(tmp_path / "evals", skip="test.jsonl") == digest
