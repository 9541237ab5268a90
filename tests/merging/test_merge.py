"""Whole-checkpoint merges: transformers round trip, logits by hand, shards, tied weights,
dtypes, determinism across shard sizes, bounded memory."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import merge_checkpoints, parse_merge_config
from merging import pipeline as pipeline_module
from merging.io import checkpoint as checkpoint_module
from merging.io import shards as shards_module
from tests.conftest import save_tiny_model


def _state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    return load_file(folder / "model.safetensors")


def _config(method, base, models, **extra):
    return parse_merge_config({"merge_method": method, "base_model": str(base) if base else None,
                               "models": [{"model": str(m), "parameters": p} for m, p in models], **extra})


def test_task_arithmetic_output_loads_and_logits_match_by_hand(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    base, a, b = tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]
    config = _config("task_arithmetic", base, [(a, {"weight": 0.6}), (b, {"weight": 0.3})], parameters={"lambda": 0.9}, device="cpu")
    out = merge_checkpoints(config, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()

    sb, sa, sbb = _state(base), _state(a), _state(b)
    by_hand = {k: sb[k] + 0.9 * (0.6 * (sa[k] - sb[k]) + 0.3 * (sbb[k] - sb[k])) for k in sb}
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    reference.load_state_dict(by_hand, strict=False)
    tokens = torch.tensor([[1, 5, 9, 2, 33]])
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, reference(tokens).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert "task_arithmetic" in (out / "README.md").read_text()


def test_sharded_output_has_index_and_same_tensors(tiny_models, tmp_path):
    base, a, b = tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]
    models = [(a, {"density": 0.5}), (b, {"density": 0.5})]
    one = merge_checkpoints(_config("ties", base, models), tmp_path / "one")
    many = merge_checkpoints(_config("ties", base, models, shard_size=3000), tmp_path / "many")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _state(one).values())
    x, y = _state(one), _state(many)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_planned_shards_are_bit_identical_reruns_and_load(tiny_models, tmp_path):
    """The shards are laid out from the plan before merging: a rerun writes the same bytes in
    every file, each shard is what safetensors itself writes for its tensors, and transformers
    loads the sharded folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base, a, b = tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]
    models = [(a, {"density": 0.5}), (b, {"density": 0.5})]
    first = merge_checkpoints(_config("ties", base, models, shard_size=5000), tmp_path / "first")
    second = merge_checkpoints(_config("ties", base, models, shard_size=5000), tmp_path / "second")
    weights = sorted(p.name for p in first.iterdir() if p.name.startswith("model"))
    assert len(weights) > 4 and weights == sorted(p.name for p in second.iterdir() if p.name.startswith("model"))
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in weights)
    for name in weights[:-1]:  # the shards (the index sorts last)
        save_file(load_file(first / name), str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
        assert (first / name).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(first)
    state = merged.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _state(first).items())


def test_random_method_is_bit_identical_across_shard_sizes_and_runs(tiny_models, tmp_path):
    base, a, b = tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]
    models = [(a, {"density": 0.4}), (b, {"density": 0.6})]
    first = _state(merge_checkpoints(_config("dare_ties", base, models, seed=11), tmp_path / "r1"))
    second = _state(merge_checkpoints(_config("dare_ties", base, models, seed=11, shard_size=2000), tmp_path / "r2"))
    other = _state(merge_checkpoints(_config("dare_ties", base, models, seed=12), tmp_path / "r3"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    again = merge_checkpoints(_config("dare_ties", base, models, seed=11), tmp_path / "r4")
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "r1" / "model.safetensors").read_bytes()


def test_sharded_input_is_read(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0, shard="20KB")
    a = save_tiny_model(tmp_path / "a", seed=1, base=base, shard="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    out = merge_checkpoints(_config("task_arithmetic", base, [(a, {})]), tmp_path / "out")
    sa, so = _state(a), _state(out)
    assert all(torch.allclose(sa[k], so[k]) for k in sa)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base", seed=0, tie=True)
    a = save_tiny_model(tmp_path / "a", seed=1, base=base)
    out = merge_checkpoints(_config("task_arithmetic", base, [(a, {})]), tmp_path / "out")
    assert set(_state(out)) == set(_state(base))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_output_dtype_follows_base_or_config(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0, dtype=torch.bfloat16)
    a = save_tiny_model(tmp_path / "a", seed=1, base=base, dtype=torch.bfloat16)
    out = merge_checkpoints(_config("task_arithmetic", base, [(a, {})]), tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in _state(out).values())
    out32 = merge_checkpoints(_config("task_arithmetic", base, [(a, {})], out_dtype="float32"), tmp_path / "f32")
    assert all(t.dtype == torch.float32 for t in _state(out32).values())
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"


def test_ignore_regex_keeps_base_and_exclude_routes_to_other(tiny_models, tmp_path):
    base, a = tiny_models["base"], tiny_models["ft_a"]
    config = _config("task_arithmetic", base, [(a, {})], ignore=[r".*layers\.1\..*"])
    out = _state(merge_checkpoints(config, tmp_path / "ign"))
    sb, sa = _state(base), _state(a)
    for key in sb:
        expected = sb[key] if ".layers.1." in key else sa[key]
        assert torch.allclose(out[key], expected), key


def test_whole_model_ties_trim_matches_single_flat_tensor(tiny_models, tmp_path):
    """trim_scope: model computed by the streamed two-pass threshold equals TIES on one flat vector."""
    from merging.api import merge_tensors

    base, a, b = tiny_models["base"], tiny_models["ft_a"], tiny_models["ft_b"]
    params = {"trim_scope": "model", "weight_before_election": False, "sign_tie_rule": "majority"}
    out = _state(merge_checkpoints(_config("ties", base, [(a, {"density": 0.2}), (b, {"density": 0.2})], parameters=params), tmp_path / "m"))
    sb, sa, sbb = _state(base), _state(a), _state(b)
    keys = list(sb)
    flat = lambda s: torch.cat([s[k].reshape(-1) for k in keys])  # noqa: E731
    merged_flat = merge_tensors("ties", flat(sb), [flat(sa), flat(sbb)], params=params,
                                model_params=[{"density": 0.2}] * 2, name="all", kind="other")
    # zero-mass positions (filled by a tensor-wide majority) only occur where every trimmed
    # entry is zero with continuous data, so per-tensor and flat election agree exactly
    got = flat(out)
    assert torch.allclose(got, merged_flat, atol=1e-6)
    assert 0.15 < float((got != flat(sb)).float().mean()) < 0.45  # about 20 % per model survives


class _LiveBytes:
    """Bytes of tensors read from checkpoints or pending in the writer that are still alive."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, size)
        return tensor

    def _release(self, size: int) -> None:
        self.live -= size


def _peak_live_bytes(tmp_path: Path, layers: int, monkeypatch, workers: int = 1) -> tuple[int, int]:
    monkeypatch.setattr(pipeline_module, "group_workers", lambda device: workers)
    base, models = tmp_path / f"base{layers}", [tmp_path / f"m{layers}_{i}" for i in (1, 2, 3)]
    if not base.exists():  # built once per depth
        save_tiny_model(base, seed=0, layers=layers)
        for i, model in enumerate(models, start=1):
            save_tiny_model(model, seed=i, base=base)
    tracker = _LiveBytes()
    original_get = checkpoint_module.CheckpointReader.get
    monkeypatch.setattr(checkpoint_module.CheckpointReader, "get", lambda self, key: tracker.track(original_get(self, key)))
    original_write = shards_module.PlannedShardWriter.write
    monkeypatch.setattr(shards_module.PlannedShardWriter, "write", lambda self, n, t: original_write(self, n, tracker.track(t.clone())))
    config = _config("ties", base, [(m, {"density": 0.3}) for m in models], shard_size=4096)
    merge_checkpoints(config, tmp_path / f"out{layers}-{workers}")
    largest = max(t.numel() * t.element_size() for t in _state(base).values())
    return tracker.peak, largest


def test_peak_memory_does_not_grow_with_layers(tmp_path, monkeypatch):
    small, largest = _peak_live_bytes(tmp_path, 2, monkeypatch)
    big, _ = _peak_live_bytes(tmp_path, 24, monkeypatch)
    model_bytes = sum(t.numel() * t.element_size() for t in _state(tmp_path / "base24").values())
    assert big <= small * 1.1, (small, big)
    assert big < 8 * largest + 4096 + largest
    assert big < model_bytes / 4  # far below one model, let alone four
    # two workers: at most two groups in flight (which two depends on timing), still flat in depth
    two, _ = _peak_live_bytes(tmp_path, 24, monkeypatch, workers=2)
    assert two <= 2 * small, (small, two)


def test_no_base_linear_uses_first_model_as_reference(tiny_models, tmp_path):
    a, b = tiny_models["ft_a"], tiny_models["ft_b"]
    out = _state(merge_checkpoints(_config("linear", None, [(a, {"weight": 1.0}), (b, {"weight": 1.0})]), tmp_path / "lin"))
    sa, sb = _state(a), _state(b)
    assert all(torch.allclose(out[k], (sa[k] + sb[k]) / 2, atol=1e-7) for k in sa)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della", "model_stock", "task_arithmetic", "drm",
                                    "tsv_m", "iso_c", "iso_cts", "consensus", "tall_masks", "scale_svd", "circuit_merge"])
def test_every_registered_elementwise_method_runs_end_to_end(tiny_models, tmp_path, method):
    from transformers import AutoModelForCausalLM

    base = tiny_models["base"]
    models = [(tiny_models[n], {}) for n in ("ft_a", "ft_b", "ft_c")]
    out = merge_checkpoints(_config(method, base, models), tmp_path / method)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tokenizer_source_and_input_dtype(tiny_models, tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"marker": "other tokenizer"}')
    base, a = tiny_models["base"], tiny_models["ft_a"]
    out = merge_checkpoints(_config("task_arithmetic", base, [(a, {})], tokenizer_source=str(other)), tmp_path / "t")
    assert (out / "tokenizer.json").read_text() == '{"marker": "other tokenizer"}'
    bf = _state(merge_checkpoints(_config("task_arithmetic", base, [(a, {})], dtype="bfloat16"), tmp_path / "bf"))
    sb, sa = _state(base), _state(a)
    key = "model.layers.0.mlp.up_proj.weight"
    expected = sb[key].bfloat16().float() + (sa[key].bfloat16().float() - sb[key].bfloat16().float())
    assert bf[key].dtype == torch.bfloat16 and torch.equal(bf[key], expected.bfloat16())
