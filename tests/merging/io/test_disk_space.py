"""Free disk checked before writing: a typed error in human units, nothing left at the target."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from merging.errors import InsufficientDiskSpaceError, OutputWriteError
from merging.io.disk_space import check_free_space, human_bytes

Usage = namedtuple("Usage", "total used free")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**9, 3 * 10**15)] == \
        ["0 B", "999 B", "1.00 KB", "1.23 MB", "5.00 GB", "3.00 PB"]


def test_short_disk_names_path_needed_available_and_missing(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or Usage(10**12, 10**12 - 2 * 10**9, 2 * 10**9))
    target = tmp_path / "not" / "yet" / "there"
    check_free_space(target, 2 * 10**9, "the merged model")  # exactly enough is enough
    with pytest.raises(InsufficientDiskSpaceError) as err:
        check_free_space(target, 3_500_000_000, "the merged model")
    assert isinstance(err.value, OutputWriteError)
    assert str(err.value) == (f"not enough free disk to write the merged model at {target}: it needs 3.50 GB, the file "
                              "system has 2.00 GB free (1.50 GB missing); free some space or choose another path")
    assert seen[-1] == tmp_path  # the nearest folder that exists: the file system the target will be on


def test_merge_command_refuses_before_writing(tiny_models, tmp_path, monkeypatch):
    """``mergeflow merge`` with too little disk: exit code 2, the message, nothing at the target."""
    config = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
              "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("ft_a", "ft_b")]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 999, 999))
    target = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "c.yml"), str(target), "-q"])
    assert result.exit_code == 2, result.output
    assert "not enough free disk to write the merged model" in result.output and "999 B free" in result.output
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_stage_refuses_before_writing_its_artifact(tiny_models, tmp_path, monkeypatch):
    """A materialized stage checks the bytes it will store (sparsify: T x numel x 4) first."""
    from merging.pipeline import get_stage, run_stage, stage_inputs, stages_through
    from merging.pipeline_params import load_params
    from tests.pipeline_helpers import write_params

    params = load_params(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    store = tmp_path / "art" / "store"
    done = {}
    for name in stages_through("sparsify")[:-1]:  # what sparsify reads (fetch, deltas, ...), written with the disk as it is
        done[name] = run_stage(name, params, {n: done[n] for n in stage_inputs(get_stage(name))}, store / name, store)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 999, 999))
    with pytest.raises(InsufficientDiskSpaceError, match="the sparsify artifact at .*sparsify.*999 B free"):
        run_stage("sparsify", params, {n: done[n] for n in stage_inputs(get_stage("sparsify"))}, store / "sparsify", store)
    assert not (store / "sparsify").exists() and not list(store.glob(".sparsify*"))
