"""The zoo's task rows and lm-eval include folder: deterministic, held-out words, the files
byte-identical to the zoo's before it became its own package."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from merging.errors import MergeConfigError
from zoo.content import ANTONYMS, CATEGORIES, number_words, plural
from zoo.data import LOADER, MAX_EVAL_ITEMS, SPLITS, TASKS, YAML_HEADER, make_rows, select_tasks, write_evals


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
    assert 40 <= len(rows["validation"]) <= MAX_EVAL_ITEMS and 40 <= len(rows["test"]) <= MAX_EVAL_ITEMS


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_validation_and_test_words_are_never_trained_on(task):
    rows = make_rows(task, seed=3)
    seen = {r["word"] for r in rows["train"]} | {r["choices"][r["answer"]] for r in rows["train"]}
    held_out = {split: {r["word"] for r in rows[split]} for split in ("validation", "test")}
    assert not held_out["validation"] & seen and not held_out["test"] & seen
    assert not held_out["validation"] & held_out["test"]
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
    pairs = dict(ANTONYMS) | {b: a for a, b in ANTONYMS}
    groups = {w: g for g, words in CATEGORIES.items() for w in words.split()}
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


def _folder_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.mark.parametrize(("seed", "digest"), [
    (0, "16f2ec17c4eb100ca632c0ba6ffd6ad97c39daf65ed2f976d61466e0ffed7b0d"),
    (1, "431c01ad54cafffb43ee1ee9b270a6af05df954e9e54c519a9a27cc416634179"),
])
def test_eval_folder_is_byte_identical_to_the_pre_package_zoo(tmp_path, seed, digest):
    """Every file of the four tasks' include folder (JSONL rows, YAMLs, loader), as written by
    ``flows/zoo.py`` before the zoo became its own package: cached lm-eval scores stay valid."""
    write_evals(TASKS, seed, tmp_path / "evals")
    assert _folder_sha256(tmp_path / "evals") == digest
