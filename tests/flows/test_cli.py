"""`mergeflow merge` end to end, and bad inputs: each gives a clear one-line error, exit code 2,
and no output folder (nor a temporary one) at the target."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _ties(base, *models) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models]}


def _assert_clean_failure(result, target: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output
    for needle in needles:
        assert needle in message, (needle, message)
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


def test_merge_command_writes_a_loadable_model(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]))
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = runner.invoke(app, ["merge", "--config-path", str(cfg), "--out", str(tmp_path / "out"), "--overwrite", "-q"])
    assert again.exit_code == 0, again.output


def test_missing_model_folder(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tmp_path / "nope"))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "nope", "does not exist")


def test_bin_only_checkpoint_refused(tiny_models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], pickled))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "pickle", "allow_pickle")


def test_mismatched_shapes(tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["ft_a"], odd)
    state = load_file(odd / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, odd / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], odd))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, key, "(33, 16)", "(32, 16)")


def test_missing_tensor(tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["ft_a"], odd)
    state = load_file(odd / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, odd / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], odd))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "model.norm.weight", "lacks")


def test_unknown_method_lists_known_ones(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"]) | {"merge_method": "tiez"}
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "tiez", "'ties'", "task_arithmetic")


def test_parameter_out_of_range_names_model_and_key(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"])
    config["models"][0]["parameters"]["density"] = 1.5
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "models[0]", "density", "1.5")


def test_unknown_parameter_lists_valid_ones(tiny_models, tmp_path):
    config = _ties(tiny_models["base"], tiny_models["ft_a"]) | {"parameters": {"densty": 0.3}}
    cfg = _write(tmp_path / "c.yml", config)
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "densty", "density", "lambda")


def test_empty_model_list(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "ties", "base_model": str(tiny_models["base"]), "models": []})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "empty")


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: ties\nmodels: [\n  - oops: {\n")
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "malformed YAML")


def test_target_exists_is_refused_and_kept(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (target / "keep.txt").read_text() == "mine"


def test_nan_in_a_delta_names_model_and_tensor(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    state = load_file(bad / "model.safetensors")
    key = "model.layers.1.self_attn.v_proj.weight"
    state[key][0, 0] = math.nan
    save_file(state, bad / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_b"], bad))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, str(bad), key, "NaN")


def test_inf_in_a_delta(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["ft_a"], bad)
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"][1] = math.inf
    save_file(state, bad / "model.safetensors")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], bad))
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "model.norm.weight", "Inf")


def test_unwritable_target(tiny_models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]))
    target = blocker / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    assert result.exit_code == 2 and "cannot write" in result.output
    assert blocker.read_text() == "not a folder"


def test_missing_base_model_for_a_method_that_needs_one(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "ties", "models": [{"model": str(tiny_models["ft_a"])}]})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "needs base_model")


def test_lora_adapter_for_another_base(tiny_models, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    wider = LlamaForCausalLM(tiny_llama_config(hidden=32))  # another base: hidden 32, not 16
    lora = peft.get_peft_model(wider, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tmp_path / "adapter"))
    target = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q"])
    _assert_clean_failure(result, target, "q_proj")


def test_slices_config_is_refused(tiny_models, tmp_path):
    cfg = _write(tmp_path / "c.yml", {"merge_method": "passthrough", "slices": [{"sources": []}]})
    target = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q"]), target, "slices")


@pytest.mark.parametrize(
    ("extra_args", "config_extra", "needle"),
    [
        (["--device", "gpu"], {}, "device"),
        (["--shard-size", "lots"], {}, "shard_size"),
        ([], {"shard_size": "lots"}, "shard_size"),
        ([], {"parameters": {"lambda": [{"filter": "mlp"}]}}, "no 'value'"),
    ],
)
def test_bad_options_give_one_line_errors(tiny_models, tmp_path, extra_args, config_extra, needle):
    cfg = _write(tmp_path / "c.yml", _ties(tiny_models["base"], tiny_models["ft_a"]) | config_extra)
    target = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(cfg), str(target), "-q", *extra_args])
    _assert_clean_failure(result, target, needle)
    assert "Traceback" not in result.output


# mergekit-yaml's flags (issue 12 part 4)


def _task_arithmetic(tiny_models, tmp_path) -> Path:
    return _write(tmp_path / "ta.yml", {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]),
                                        "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 0.5}}]})


def _mergekit_flags() -> list[tuple[str, str | None]]:
    """Every flag of mergekit 0.1.5's mergekit-yaml, read from its click command, with a value
    where the flag takes one."""
    click = pytest.importorskip("click")
    run_yaml = pytest.importorskip("mergekit.scripts.run_yaml")
    values = {"--device": "cpu", "--lora-merge-dtype": "bfloat16", "--out-shard-size": "5B"}
    flags = []
    for param in run_yaml.main.params:
        if not isinstance(param, click.Option):
            continue
        takes_value = not (param.is_flag or param.count)
        for name in (*param.opts, *param.secondary_opts):
            value = values.get(param.opts[0], "1" if param.type is click.INT else "some-folder") if takes_value else None
            flags.append((name, value))
    assert len(flags) > 30 and ("--no-copy-tokenizer", None) in flags and ("-j", "1") in flags
    return flags


def test_every_mergekit_flag_is_accepted_or_refused_in_one_line(tiny_models, tmp_path):
    """Each flag either merges (exit 0) or gives a one-line error that names it (exit 2) and
    leaves nothing at the target; click's 'No such option' never appears."""
    cfg = _task_arithmetic(tiny_models, tmp_path)
    outcomes = {}
    for index, (flag, value) in enumerate(_mergekit_flags()):
        target = tmp_path / f"out{index}"
        result = runner.invoke(app, ["merge", str(cfg), str(target), "-q", flag, *([value] if value is not None else [])])
        assert "No such option" not in result.output, flag
        if result.exit_code == 0:
            assert (target / "model.safetensors").is_file(), flag
            outcomes[flag] = "accepted"
        else:
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flag, result.output)
            assert not target.exists(), flag
            outcomes[flag] = lines[0]
    refused = {flag for flag, outcome in outcomes.items() if outcome != "accepted"}
    assert refused - {"--cuda", "--gpu-rich"} == {"--unsafe-truncate-embeddings", "--multi-gpu", "--async-write",
                                                  "--no-safe-serialization", "--transformers-cache", "--lora-merge-dtype"}
    assert "--cuda" in outcomes["--gpu-rich"] and "HF_HUB_CACHE" in outcomes["--transformers-cache"]


def test_merge_help_groups_the_mergekit_flags(tiny_models):
    result = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0 and "mergekit compatibility" in result.output
    assert "--out-shard-size" in result.output and "per-tensor generators" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_device_error(tiny_models, tmp_path):
    target = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(_task_arithmetic(tiny_models, tmp_path)), str(target), "-q", "--cuda"])
    _assert_clean_failure(result, target, "cuda", "no CUDA device")


def test_random_seed_sets_the_seed_of_random_methods(tiny_models, tmp_path):
    cfg = _write(tmp_path / "dare.yml", {"merge_method": "dare_ties", "base_model": str(tiny_models["base"]),
                                         "models": [{"model": str(tiny_models[n]), "parameters": {"density": 0.5}} for n in ("ft_a", "ft_b")]})

    def merged(*args: str) -> dict[str, torch.Tensor]:
        target = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = runner.invoke(app, ["merge", str(cfg), str(target), "-q", *args])
        assert result.exit_code == 0, result.output
        return load_file(target / "model.safetensors")

    one, two, seed_one = merged("--random-seed", "1"), merged("--random-seed", "2"), merged("--seed", "1")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(one[key], two[key])
    assert all(torch.equal(one[k], seed_one[k]) for k in one)
    target = tmp_path / "disagree"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q", "--seed", "1", "--random-seed", "2"]),
                          target, "--seed", "--random-seed", "disagree")


def test_out_shard_size_reads_mergekit_sizes(tiny_models, tmp_path):
    """mergekit's suffixes are decimal counts (parse_kmb): 5B is 5e9 bytes (not 5 bytes), 100M 1e8."""
    from flows.cli import _mergekit_size

    assert (_mergekit_size("5B"), _mergekit_size("100M"), _mergekit_size("20k"), _mergekit_size("1234")) == (
        5 * 10**9, 10**8, 20_000, 1234)
    cfg = _task_arithmetic(tiny_models, tmp_path)
    for size, shards in (("5B", 1), ("100M", 1), ("10k", 3)):
        target = tmp_path / f"out-{size}"
        result = runner.invoke(app, ["merge", str(cfg), str(target), "-q", "--out-shard-size", size])
        assert result.exit_code == 0, result.output
        assert len(list(target.glob("*.safetensors"))) >= shards, size
        if shards == 1:
            assert [p.name for p in target.glob("*.safetensors")] == ["model.safetensors"]
    recorded = yaml.safe_load((tmp_path / "out-5B" / "mergeflow_config.yml").read_text())
    assert recorded["shard_size"] == 5 * 10**9
    for bad in ("5GB", "1.5B", "-3"):
        target = tmp_path / "bad"
        _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q", "--out-shard-size", bad]),
                              target, "--out-shard-size", "--shard-size")


def test_no_copy_tokenizer_and_no_write_model_card(tiny_models, tmp_path):
    from merging.digests import TOKENIZER_FILES

    cfg = _task_arithmetic(tiny_models, tmp_path)
    default, bare = tmp_path / "default", tmp_path / "bare"
    assert runner.invoke(app, ["merge", str(cfg), str(default), "-q"]).exit_code == 0
    result = runner.invoke(app, ["merge", str(cfg), str(bare), "-q", "--no-copy-tokenizer", "--no-write-model-card"])
    assert result.exit_code == 0, result.output
    assert (default / "README.md").is_file() and any((default / name).is_file() for name in TOKENIZER_FILES)
    assert not (bare / "README.md").exists()
    assert not [name for name in TOKENIZER_FILES if (bare / name).exists()]
    assert (bare / "config.json").is_file() and (bare / "model.safetensors").is_file()
    assert load_file(bare / "model.safetensors").keys() == load_file(default / "model.safetensors").keys()


def test_num_threads_is_restored_and_checked(tiny_models, tmp_path):
    cfg = _task_arithmetic(tiny_models, tmp_path)
    before = torch.get_num_threads()
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q", "-j", "2", "-vv"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == before
    target = tmp_path / "zero"
    _assert_clean_failure(runner.invoke(app, ["merge", str(cfg), str(target), "-q", "-j", "0"]), target, "--num-threads")
