"""Artifact tensors: an all-zero tensor (bit for bit +0) is recorded by shape and dtype only and
read back as zeros; -0.0 and anything else round-trip through the shards; partial artifacts
joined by an index keep their zeros; a recipe artifact refuses to be read as tensors."""

from __future__ import annotations

import pytest
import torch

from merging.errors import ArtifactError
from merging.io.artifacts import ArtifactReader, ArtifactWriter, artifact_digest, read_manifest


def _write(folder, groups, key="k"):
    writer = ArtifactWriter(folder, {"stage": "s", "cache_key": key})
    for name, factors in groups.items():
        writer.add_group(name, factors)
    return writer.commit()


def test_all_zero_tensors_take_no_bytes_and_read_back_exactly(tmp_path):
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    negative_zero = torch.full((4,), -0.0)
    groups = {"a": {"deltas": torch.zeros(3, 1000, 100), "basis": values},
              "b": {"deltas": torch.zeros(5, dtype=torch.bfloat16)},
              "c": {"deltas": negative_zero}}
    folder = _write(tmp_path / "art", groups)
    manifest = read_manifest(folder)
    assert manifest["zeros"] == {"a": {"deltas": [[3, 1000, 100], "float32"]}, "b": {"deltas": [[5], "bfloat16"]}}
    assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) < 100_000  # the 1.2 MB of zeros are not stored
    reader = ArtifactReader(folder)
    for name, factors in groups.items():
        got = reader.read_group(name)
        assert sorted(got) == sorted(factors)
        for factor, tensor in factors.items():
            assert got[factor].dtype == tensor.dtype and got[factor].shape == tensor.shape
            assert torch.equal(got[factor].view(torch.uint8) if tensor.dtype != torch.bfloat16 else got[factor].view(torch.int16),
                               tensor.view(torch.uint8) if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16))
    assert torch.signbit(reader.read_group("c")["deltas"]).all()  # -0.0 kept, not turned into a recorded zero
    with pytest.raises(ArtifactError, match="no tensor group 'd'"):
        reader.read_group("d")


def test_zeros_change_the_output_digest(tmp_path):
    one = artifact_digest(_write(tmp_path / "one", {"a": {"x": torch.zeros(2, 2)}}))
    two = artifact_digest(_write(tmp_path / "two", {"a": {"x": torch.zeros(2, 3)}}))
    three = artifact_digest(_write(tmp_path / "three", {"a": {"x": torch.zeros(2, 2)}}))
    assert one != two and one == three


def test_partial_artifacts_keep_their_zeros(tmp_path):
    _write(tmp_path / "p0", {"a": {"x": torch.zeros(2)}}, key="p0")
    _write(tmp_path / "p1", {"b": {"x": torch.ones(2)}}, key="p1")
    index = ArtifactWriter(tmp_path / "index", {"stage": "s", "cache_key": "i"}).commit(extra={"parts": ["../p0", "../p1"]})
    reader = ArtifactReader(index)
    assert torch.equal(reader.read_group("a")["x"], torch.zeros(2)) and torch.equal(reader.read_group("b")["x"], torch.ones(2))


def test_a_recipe_is_not_read_as_tensors(tmp_path):
    folder = ArtifactWriter(tmp_path / "r", {"stage": "deltas", "cache_key": "r"}).commit(extra={"recipe": True})
    assert artifact_digest(folder) == "r"
    with pytest.raises(ArtifactError, match="recipe of stage 'deltas'"):
        ArtifactReader(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_mostly_zero_tensor_is_stored_as_mask_and_values_bit_for_bit(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(300, 400, generator=g).to(dtype)
    sparse[torch.rand(300, 400, generator=g) < 0.7] = 0
    sparse[0, :5] = torch.tensor([-0.0, float("nan"), float("inf"), -1e-30, 0.0]).to(dtype)
    dense = torch.randn(300, 400, generator=g).to(dtype)
    folder = _write(tmp_path / "art", {"g": {"selected": sparse, "dense": dense}})
    manifest = read_manifest(folder)
    assert manifest["sparse"] == {"g": {"selected": [[300, 400], str(dtype).removeprefix("torch.")]}}
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert stored < dense.numel() * dense.element_size() * 1.75  # stored plainly: 2x (and a padded header)
    got = ArtifactReader(folder).read_group("g")
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for name, tensor in {"selected": sparse, "dense": dense}.items():
        assert got[name].dtype == dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name].view(bits), tensor.view(bits)), name  # -0.0, NaN and inf included
