"""Model digests: over tensors by name and content (not the shard layout) plus config and
tokenizer files; cached by file stat."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file

from merging import digests
from merging.digests import model_digest


def _reshard(src, dst):
    """The same tensors in two shards, in another order, plus an index."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors, reverse=True)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, dst / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, dst / "model-00002-of-00002.safetensors")


def test_digest_ignores_sharding_but_not_tokenizer_or_values(tiny_models, tmp_path):
    base = tiny_models["base"]
    first = model_digest(base)
    _reshard(base, tmp_path / "resharded")
    assert model_digest(tmp_path / "resharded") == first
    (tmp_path / "resharded" / "README.md").write_text("a card does not change the model\n")
    assert model_digest(tmp_path / "resharded") == first
    tokenizer = tmp_path / "resharded" / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text().replace("<pad>", "<PAD>"))
    assert model_digest(tmp_path / "resharded") != first
    assert model_digest(tiny_models["ft_a"]) != first


def test_digest_is_cached_by_stat(tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "digests.json"
    first = model_digest(tiny_models["ft_a"], cache)
    hashed = []
    original = digests._tensor_digests
    monkeypatch.setattr(digests, "_tensor_digests", lambda p: hashed.append(p) or original(p))
    assert model_digest(tiny_models["ft_a"], cache) == first and hashed == []
    assert model_digest(tiny_models["ft_b"], cache) != first and len(hashed) == 1
