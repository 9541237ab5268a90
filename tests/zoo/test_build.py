"""A reduced zoo build on a tiny Llama: adapters, zoo.json, no retraining when nothing changed,
task YAMLs that run under lm-eval from another working directory, the scorer equal to
lm-eval's accuracy, full fine-tunes, and the zoo as the pipeline's input (all slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo.build import build
from zoo.data import TASKS, make_rows
from zoo.train import FULL_LR, score


def _tiny_base(folder: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["question"] + " " + " ".join(r["choices"]) for t in TASKS for rs in make_rows(t, 0).values() for r in rs]
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
    summary = build(base, out, tasks=1, steps=3, seed=0)
    evals = out / "evals"  # the default: the zoo carries its own lm-eval tasks
    name = TASKS[0].name
    assert (out / name / "adapter_config.json").is_file() and (out / name / "adapter_model.safetensors").is_file()
    written = json.loads((out / "zoo.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["config"]["tasks"] == [name] and written["config"]["steps"] == 3
    assert set(written["accuracy"][name]) == {"base", "specialist"}
    assert written["specialists"][name]["train_s"] > 0 and written["rows"][name]["validation"] > 0

    # the same build again: nothing retrained or rescored; one more task: only its specialist is trained
    adapter = out / name / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    assert build(base, out, tasks=1, steps=3, seed=0) == written
    second = build(base, out, tasks=2, steps=3, seed=0)
    assert adapter.stat().st_mtime_ns == mtime
    assert second["specialists"][name]["key"] == written["specialists"][name]["key"]
    assert (out / TASKS[1].name / "adapter_model.safetensors").is_file()
    assert set(second["cross_validation_accuracy"][name]) == {name, TASKS[1].name}

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
    assert res["results"][f"zoo_{name}_val"]["acc,none"] == pytest.approx(score(model, tokenizer, rows), abs=1e-9)


@pytest.mark.slow
def test_full_finetune_saves_a_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "zoo"
    build(base, out, tmp_path / "evals", tasks=1, steps=2, seed=0, full_finetune=True)
    folder = out / TASKS[0].name
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
    assert json.loads((out / "zoo.json").read_text())["config"]["lr"] == FULL_LR


@pytest.mark.slow
def test_reduced_zoo_runs_through_the_pipeline_to_evaluate(prefect_harness, tmp_path):
    """The zoo's adapters and lm-eval tasks as the pipeline's inputs: fetch -> ... -> evaluate
    -> report, with the specialists scored through peft and the metrics filled in."""
    import yaml

    from flows.merge_and_eval import merge_and_eval

    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "zoo"
    build(base, out, tasks=2, steps=3, seed=0)
    names = [t.name for t in TASKS[:2]]
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
