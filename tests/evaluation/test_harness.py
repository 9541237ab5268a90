"""lm-eval on a full model folder and on a PEFT adapter (through peft on its base); results
cached by weights digest."""

from __future__ import annotations

import json

import torch

from evaluation.harness import evaluate_folder, primary_scores
from tests.pipeline_helpers import DEMO_EVALS


def test_adapter_and_full_model_evaluate_and_cache(tiny_models, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    settings = {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS), "limit": 2, "batch_size": 2, "device": "cpu"}
    store = tmp_path / "store"
    adapter_result = evaluate_folder(settings, str(tmp_path / "adapter"), "digest-adapter", str(store), str(tiny_models["base"]))
    full_result = evaluate_folder(settings, str(tiny_models["ft_a"]), "digest-full", str(store), str(tiny_models["base"]))
    for path in (adapter_result, full_result):
        result = json.loads(open(path).read())
        assert set(result["scores"]) == {"demo_arith"} and 0.0 <= result["scores"]["demo_arith"] <= 1.0
    assert evaluate_folder(settings, "/nonexistent", "digest-full", str(store)) == full_result  # cached by digest


def test_primary_scores_prefers_accuracy():
    results = {"results": {"t1": {"acc,none": 0.5, "acc_norm,none": 0.6}, "t2": {"exact_match,none": 0.25},
                           "t3": {"alias": "t3", "word_perplexity,none": 12.0, "word_perplexity_stderr,none": 1.0}}}
    assert primary_scores(results) == {"t1": 0.5, "t2": 0.25, "t3": 12.0}


def test_cached_scores_are_keyed_on_the_task_files(tmp_path):
    from evaluation.harness import result_path

    include = tmp_path / "evals"
    (include / "t").mkdir(parents=True)
    (include / "t.yaml").write_text("task: t\n")
    (include / "t" / "test.jsonl").write_text('{"answer": 0}\n')
    settings = {"tasks": ["t"], "include_path": str(include), "limit": None, "batch_size": 8, "device": "cpu"}
    first = result_path(settings, "digest", str(tmp_path / "store"))
    assert result_path(settings, "digest", str(tmp_path / "store")) == first
    (include / "__pycache__").mkdir()
    (include / "__pycache__" / "loader.pyc").write_bytes(b"\0")  # bytecode lm-eval leaves behind: ignored
    assert result_path(settings, "digest", str(tmp_path / "store")) == first
    (include / "t" / "test.jsonl").write_text('{"answer": 1}\n')  # same task name, other data (another zoo seed)
    assert result_path(settings, "digest", str(tmp_path / "store")) != first


def test_eval_settings_reach_lm_eval_and_key_the_cache(tiny_models, tmp_path):
    """num_fewshot, dtype and model_args are what lm-eval ran with, and each is part of the
    cache key (a cached score of other settings is never reused)."""
    from evaluation.harness import result_path

    settings = {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS), "limit": 2, "batch_size": 2, "device": "cpu",
                "dtype": "float32", "num_fewshot": 2, "apply_chat_template": False, "model_args": {"max_length": 48}}
    store = tmp_path / "store"
    path = evaluate_folder(settings, str(tiny_models["ft_a"]), "digest-a", str(store), str(tiny_models["base"]))
    result = json.loads(path.read_text())
    assert result["n_shot"] == {"demo_arith": 2}
    assert result["config"]["model_args"] == {"pretrained": str(tiny_models["ft_a"]), "tokenizer": str(tiny_models["base"]),
                                              "backend": "causal", "dtype": "float32", "max_length": 48}  # ft_a: no tokenizer
    assert result["settings"]["num_fewshot"] == 2 and result["settings"]["model_args"] == {"max_length": 48}
    keys = {result_path(settings | change, "digest-a", str(store)) for change in
            ({}, {"num_fewshot": 0}, {"dtype": "auto"}, {"model_args": {}}, {"apply_chat_template": True}, {"batch_size": "auto"})}
    assert len(keys) == 6


def test_a_task_whose_dataset_cannot_be_loaded_is_named(tiny_models, tmp_path):
    """Offline (HF_DATASETS_OFFLINE, set for the tests), a task over a hub dataset that is not in the
    local cache fails before any model is loaded, naming the task and the dataset."""
    import pytest

    from evaluation.harness import run_lm_eval
    from merging.errors import MergeConfigError

    include = tmp_path / "evals"
    include.mkdir()
    (include / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: mergeflow-tests/never-downloaded\ndataset_name: main\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    settings = {"tasks": ["hub_task"], "include_path": str(include), "limit": 1, "batch_size": 1, "device": "cpu"}
    with pytest.raises(MergeConfigError, match=r"eval task 'hub_task': dataset mergeflow-tests/never-downloaded \(config main\) could not be loaded.*offline"):
        run_lm_eval(str(tiny_models["base"]), settings)


def test_an_encoder_decoder_model_is_scored_on_the_seq2seq_backend(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from evaluation.harness import lm_backend
    from tests.conftest import save_tokenizer

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                        decoder_start_token_id=63, pad_token_id=63, eos_token_id=62)).save_pretrained(tmp_path / "t5")
    save_tokenizer(tmp_path / "t5")
    assert lm_backend(tmp_path / "t5") == "seq2seq"
    settings = {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS), "limit": 2, "batch_size": 2, "device": "cpu"}
    result = json.loads(open(evaluate_folder(settings, str(tmp_path / "t5"), "digest-t5", str(tmp_path / "store"))).read())
    assert set(result["scores"]) == {"demo_arith"} and 0.0 <= result["scores"]["demo_arith"] <= 1.0


def test_an_encoder_only_model_is_refused_by_name(tmp_path):
    import pytest
    from transformers import BertConfig, BertForMaskedLM

    from evaluation.harness import lm_backend
    from merging.errors import MergeConfigError

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(MergeConfigError, match=r"'.*bert' is an encoder-only model \(BertForMaskedLM\)"):
        lm_backend(tmp_path / "bert")


def test_each_items_score_is_recorded_in_doc_order(tiny_models, tmp_path):
    """Per-item acc as a 0/1 string, item by item what zoo.train.score (lm-eval's acc,
    computed independently) gives each row alone; their mean is the task's score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoo.train import score

    settings = {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS), "limit": 8, "batch_size": 4, "device": "cpu",
                "dtype": "float32"}
    path = evaluate_folder(settings, str(tiny_models["ft_a"]), "digest-a", str(tmp_path / "store"), str(tiny_models["base"]))
    result = json.loads(path.read_text())
    entry = result["items"]["demo_arith"]
    assert entry["metric"] == "acc,none" and len(entry["values"]) == 8 and set(entry["values"]) <= {"0", "1"}
    assert entry["values"].count("1") / 8 == result["scores"]["demo_arith"]
    rows = [json.loads(line) for line in (DEMO_EVALS / "demo" / "arith" / "test.jsonl").read_text().splitlines()[:8]]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["ft_a"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["base"])
    assert entry["values"] == "".join(str(int(score(model, tokenizer, [row]))) for row in rows)


def test_item_scores_keep_only_mean_aggregated_numbers():
    from evaluation.harness import item_scores

    results = {"t": {"acc,none": 0.5, "acc_norm,none": 1.0}, "bleu": {"bleu,none": 12.0}, "odd": {"acc,none": 0.9}}
    samples = {"t": [{"doc_id": 1, "filter": "none", "acc": 0.0, "acc_norm": 1.0},
                     {"doc_id": 0, "filter": "none", "acc": 1.0, "acc_norm": 1.0}],
               "bleu": [{"doc_id": 0, "filter": "none", "bleu": ("ref", "hyp")}],
               "odd": [{"doc_id": 0, "filter": "none", "acc": 1.0}]}  # the mean is not the score: not kept
    assert item_scores(results, samples) == {"t": {"metric": "acc,none", "values": "10"}}
