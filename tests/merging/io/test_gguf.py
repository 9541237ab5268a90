"""GGUF import on small GGUF files written here with the ``gguf`` package: a tiny Llama with
F32 tensors (q/k rows permuted the way llama.cpp's converter writes them) and a byte-level
BPE tokenizer in ``tokenizer.ggml.*`` metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merging.errors import CheckpointNotFoundError, MergeConfigError
from merging.io.gguf import MARKER, converted_gguf, find_gguf, import_gguf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 4, 2, 32
HEAD_DIM = HIDDEN // HEADS


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return sorted(set(bytes_to_unicode().values()))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` LlamaModel.permute (HF rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny llama GGUF; returns the Hugging Face state dict it must load as."""
    import gguf

    tokens = ["<|endoftext|>", "<pad>", *_byte_alphabet(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    expected: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, HIDDEN),
                                       "model.norm.weight": 1 + rand(HIDDEN), "lm_head.weight": rand(vocab, HIDDEN)}
    files = {"token_embd.weight": expected["model.embed_tokens.weight"], "output_norm.weight": expected["model.norm.weight"],
             "output.weight": expected["lm_head.weight"]}
    for i in range(LAYERS):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        layer = {"self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
                 "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                 "mlp.gate_proj.weight": rand(FFN, HIDDEN), "mlp.up_proj.weight": rand(FFN, HIDDEN),
                 "mlp.down_proj.weight": rand(HIDDEN, FFN), "input_layernorm.weight": 1 + rand(HIDDEN),
                 "post_attention_layernorm.weight": 1 + rand(HIDDEN)}
        expected |= {hf + k: v for k, v in layer.items()}
        files |= {gg + "attn_q.weight": _llama_cpp_permute(layer["self_attn.q_proj.weight"], HEADS),
                  gg + "attn_k.weight": _llama_cpp_permute(layer["self_attn.k_proj.weight"], KV_HEADS),
                  gg + "attn_v.weight": layer["self_attn.v_proj.weight"], gg + "attn_output.weight": layer["self_attn.o_proj.weight"],
                  gg + "ffn_gate.weight": layer["mlp.gate_proj.weight"], gg + "ffn_up.weight": layer["mlp.up_proj.weight"],
                  gg + "ffn_down.weight": layer["mlp.down_proj.weight"], gg + "attn_norm.weight": layer["input_layernorm.weight"],
                  gg + "ffn_norm.weight": layer["post_attention_layernorm.weight"]}

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (vocab - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    for name, array in files.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: torch.from_numpy(v) for k, v in expected.items()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.F32.gguf"
    return path, write_tiny_gguf(path)


def test_import_loads_with_transformers_and_weights_match(tiny_gguf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, expected = tiny_gguf
    out = import_gguf(path, None, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert json.loads((out / MARKER).read_text())["gguf_file"] == path.name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (HEADS, KV_HEADS, LAYERS)

    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(expected)
    for name, tensor in expected.items():  # includes the q/k rows llama.cpp permuted
        assert saved[name].dtype == torch.float32
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not getattr(model, "is_quantized", False)
    torch.testing.assert_close(model.model.layers[1].self_attn.k_proj.weight, expected["model.layers.1.self_attn.k_proj.weight"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(" the tea").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "Ġthe"
    assert tokenizer.decode(ids) == " the tea"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_second_import_is_skipped_and_changed_file_reconverted(tmp_path, monkeypatch):
    import transformers

    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, seed=1)
    out = import_gguf(path.parent, None, tmp_path / "hf")
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("reconverted an unchanged GGUF")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    assert import_gguf(path, "model.gguf", out) == out
    assert weights.stat().st_mtime_ns == before
    monkeypatch.undo()

    expected = write_tiny_gguf(path, seed=2)
    import_gguf(path, None, out)
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(weights)["lm_head.weight"], expected["lm_head.weight"])
    assert not list(tmp_path.glob(".hf.*")), "temporary folders left behind"


def test_folder_with_several_files_needs_gguf_file(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(path.read_bytes())
    with pytest.raises(MergeConfigError, match=r"a\.gguf, b\.gguf.*gguf_file"):
        find_gguf(tmp_path)
    assert find_gguf(tmp_path, "b.gguf") == tmp_path / "b.gguf"
    with pytest.raises(CheckpointNotFoundError, match=r"'c\.gguf' not found.*a\.gguf"):
        find_gguf(tmp_path, "c.gguf")


def test_missing_and_wrong_sources(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", None, tmp_path / "out")
    with pytest.raises(CheckpointNotFoundError, match=r"no \.gguf file in"):
        import_gguf(tmp_path, None, tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MergeConfigError, match="not a .gguf file"):
        import_gguf(tmp_path / "weights.bin", None, tmp_path / "out")
    with pytest.raises(MergeConfigError, match="does not match source file"):
        import_gguf(path, "other.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_a_config_error(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MergeConfigError, match=r"cannot convert GGUF .*broken\.gguf"):
        import_gguf(broken, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fetch_converts_gguf_sources(tiny_gguf, tmp_path):
    from merging.fetch import fetch_models, fetched_models
    from merging.pipeline_params import parse_params

    path, _ = tiny_gguf
    other = tmp_path / "other"
    other.mkdir()
    write_tiny_gguf(other / "ft.gguf", seed=3)
    params = parse_params({"models": {"base": {"name": "base", "source": str(path)},
                                      "inputs": [{"name": "ft", "source": str(other), "format": "gguf"}]},
                           "merge": {"method": "task_arithmetic"}})
    (tmp_path / "fetch").mkdir()
    assert fetch_models(params, {}, tmp_path / "fetch", tmp_path / "store") == ["models.json"]
    models = fetched_models(tmp_path / "fetch")
    for name in ("base", "ft"):
        folder = Path(models[name]["folder"])
        assert folder == tmp_path / "store" / "gguf" / name
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_gguf_files_merge_as_models_converted_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    import transformers
    from safetensors.torch import load_file

    from merging import merge_checkpoints, parse_merge_config

    path, base = tiny_gguf
    tuned = write_tiny_gguf(tmp_path / "ft.gguf", seed=3)
    monkeypatch.setenv("MERGEFLOW_GGUF_CACHE", str(tmp_path / "cache"))
    raw = {"merge_method": "task_arithmetic", "base_model": str(path),
           "models": [{"model": str(tmp_path / "ft.gguf"), "parameters": {"weight": 0.5}}], "device": "cpu"}
    merged = load_file(merge_checkpoints(parse_merge_config(raw), tmp_path / "out") / "model.safetensors")
    for name, tensor in base.items():
        torch.testing.assert_close(merged[name], tensor + 0.5 * (tuned[name] - tensor), msg=name)
    folders = sorted((tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all(len(f.name) == 24 and (f / MARKER).is_file() for f in folders)

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    merge_checkpoints(parse_merge_config(raw), tmp_path / "again")  # the cached conversions are reused
    assert sorted((tmp_path / "cache").iterdir()) == folders


def test_import_gguf_command(tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    path, _ = tiny_gguf
    runner = CliRunner()
    result = runner.invoke(app, ["import-gguf", str(path), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / MARKER).is_file()
    assert runner.invoke(app, ["import-gguf", str(path), str(tmp_path / "hf")]).exit_code == 0  # already converted
    (tmp_path / "other").mkdir()
    result = runner.invoke(app, ["import-gguf", str(path), str(tmp_path / "other")])
    assert result.exit_code == 2 and "--overwrite" in result.output and len(result.output.strip().splitlines()) == 1
    assert runner.invoke(app, ["import-gguf", str(path), str(tmp_path / "other"), "--overwrite"]).exit_code == 0


def test_concurrent_conversions_of_one_file_convert_it_once(tiny_gguf, tmp_path, monkeypatch):
    import threading
    import time

    import transformers

    path, _ = tiny_gguf
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    calls = []

    def slow(cls, *args, **kwargs):  # holds the conversion long enough for the other thread to arrive
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(slow))
    results, errors = [], []

    def convert():
        try:
            results.append(converted_gguf(path, tmp_path / "cache"))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1, "the second conversion should have waited for the first and reused it"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [results[0].name]  # no lock or temp left
