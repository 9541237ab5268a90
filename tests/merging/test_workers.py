"""Tensor groups merged on several threads: the same bytes as one after the other (saved models,
stage artifacts and their manifests, random masks included), commits in plan order where the
sink needs it, never two large groups at once, and errors reported as the sequential run would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from merging import pipeline
from merging.pipeline_params import merge_config, parse_params
from merging.plan import TensorEntry
from merging.workers import merge_groups
from tests.pipeline_helpers import DEMO_EVALS
from tests.robustness_helpers import save_model_family

# random masks (DARE, DELLA), the selection-bound TIES (per-model densities), SVDs (TSV-M)
METHODS = {
    "ties": {"sparsify": {"density": {"a": 0.3, "b": 0.5, "c": 0.7}}, "combine": {"lambda": 0.9}},
    "dare_ties": {"sparsify": {"density": 0.5}},
    "della": {"sparsify": {"density": 0.6, "epsilon": 0.1}},
    "tsv_m": {},  # SVDs: MKL's thread count is per thread, so workers must set it too
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return save_model_family(tmp_path_factory.mktemp("family"), layers=2, hidden=64, vocab=1024)


def _params(family: dict[str, Path], method: str, artifacts: Path, shard_size: str = "2GB"):
    return parse_params({
        "models": {"base": {"name": "base", "source": str(family["base"])},
                   "inputs": [{"name": n, "source": str(family[f"ft_{i}"])} for i, n in enumerate("abc", start=1)]},
        "merge": {"method": method, "seed": 11, **METHODS[method]},
        "pipeline": {"device": "cpu", "compute_dtype": "float32", "artifacts": str(artifacts), "shard_size": shard_size},
        "eval": {"tasks": ["demo_arith"], "include_path": str(DEMO_EVALS)},
    })


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _workers(monkeypatch, count: int) -> None:
    monkeypatch.setattr(pipeline, "group_workers", lambda device: count)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_saved_model_is_byte_identical_with_one_and_two_workers(family, tmp_path, monkeypatch, method):
    outputs = {}
    for count, shard_size in ((1, "2GB"), (2, "2GB"), (2, "60KB"), (1, "60KB")):
        _workers(monkeypatch, count)
        out = tmp_path / f"w{count}-{shard_size}"
        pipeline.merge_checkpoints(merge_config(_params(family, method, tmp_path / "art", shard_size)), out)
        outputs[count, shard_size] = _files(out)
    assert outputs[1, "2GB"] == outputs[2, "2GB"]
    assert outputs[1, "60KB"] == outputs[2, "60KB"] and len(outputs[2, "60KB"]) > len(outputs[2, "2GB"])


@pytest.mark.parametrize("method", ["dare_ties"])
def test_stage_artifacts_and_manifests_are_byte_identical(family, tmp_path, monkeypatch, method):
    stores = {}
    for count in (1, 2):
        _workers(monkeypatch, count)
        root = tmp_path / f"w{count}"
        params = _params(family, method, root)
        for name in pipeline.stages_through("save"):
            stage = pipeline.get_stage(name)
            pipeline.run_stage(name, params, {n: root / n for n in pipeline.stage_inputs(stage)}, root / name, root / "store")
        stores[count] = {name: _files(root / name) for name in pipeline.stages_through("save") if name != "fetch"}
    assert stores[1].keys() == stores[2].keys()
    for name in stores[1]:
        assert stores[1][name] == stores[2][name], name


def _entries(sizes: list[int]) -> list[TensorEntry]:
    return [TensorEntry(name=f"t{i}", shape=(size,), dtype=torch.float32, kind="other", layer_t=0.0) for i, size in enumerate(sizes)]


def _record(entries: list[TensorEntry], delays: dict[str, float], workers: int, any_order: bool):
    """Run ``merge_groups`` with merges that sleep; returns (commit order, max concurrent, large pairs seen)."""
    lock, running, seen = threading.Lock(), set(), {"max": 0, "large_pairs": 0}
    committed = []

    def merge(entry: TensorEntry) -> str:
        with lock:
            running.add(entry.name)
            seen["max"] = max(seen["max"], len(running))
            seen["large_pairs"] += sum(1 for n in running if n in delays) >= 2
        time.sleep(delays.get(entry.name, 0.01))
        with lock:
            running.discard(entry.name)
        assert threading.current_thread() is not threading.main_thread()
        return entry.name.upper()

    def commit(entry: TensorEntry, result: str) -> None:
        assert threading.current_thread() is threading.main_thread() and result == entry.name.upper()
        committed.append(entry.name)

    merge_groups(entries, merge, commit, workers, any_order)
    return committed, seen


def test_ordered_sinks_get_groups_in_plan_order():
    entries = _entries([10] * 8)
    committed, seen = _record(entries, {"t0": 0.2}, workers=2, any_order=False)  # t0 slowest, yet first
    assert committed == [e.name for e in entries] and seen["max"] == 2


def test_any_order_sinks_are_not_held_up_and_large_groups_never_overlap():
    entries = _entries([1000, 1000, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10])  # two "vocabulary" groups first
    committed, seen = _record(entries, {"t0": 0.15, "t1": 0.15}, workers=2, any_order=True)
    assert sorted(committed) == sorted(e.name for e in entries) and seen["max"] == 2
    assert seen["large_pairs"] == 0
    assert committed.index("t2") < committed.index("t0")  # small groups ran beside the first large one


def test_the_earliest_failing_group_is_reported_and_nothing_after_it_is_committed():
    entries = _entries([10] * 6)
    committed = []

    def merge(entry: TensorEntry) -> str:
        if entry.name in ("t2", "t3"):
            time.sleep(0.05 if entry.name == "t2" else 0.0)  # t3 fails first in time, t2 first in plan order
            raise ValueError(entry.name)
        return entry.name

    with pytest.raises(ValueError, match="t2"):
        merge_groups(entries, merge, lambda e, r: committed.append(e.name), 2, any_order=False)
    assert committed == ["t0", "t1"]
