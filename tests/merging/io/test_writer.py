"""Atomic output folders and files (the shard writers: test_shards.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.errors import OutputExistsError
from merging.io.writer import atomic_output_dir, parse_size

REPO = Path(__file__).resolve().parents[3]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("100M") == 10**8
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_failure_leaves_no_trace_and_keeps_existing_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputExistsError):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_concurrent_artifact_writers_never_corrupt_the_target(tmp_path):
    """Two writers of the same content-addressed artifact: both commit, the target is whole."""
    from merging.io.artifacts import ArtifactReader, ArtifactWriter

    target = tmp_path / "sparsify-abc"
    one = ArtifactWriter(target, {"stage": "s", "cache_key": "abc"})
    two = ArtifactWriter(target, {"stage": "s", "cache_key": "abc"})
    for writer in (one, two):
        writer.add_group("w", {"x": torch.arange(6.0)})
    one.commit()
    two.commit()
    reader = ArtifactReader(target)
    assert torch.equal(reader.read_group("w")["x"], torch.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == ["sparsify-abc"]


@pytest.mark.parametrize("syscall", [True, False], ids=["renameat2", "lock-file"])
def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, syscall):
    from merging.io import writer

    if not syscall:
        monkeypatch.setattr(writer, "_RENAMEAT2", None)
    elif writer._RENAMEAT2 is None:
        pytest.skip("no renameat2 on this platform")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("new")
    dst.mkdir()  # an existing, even empty, folder is never replaced (plain rename(2) would)
    with pytest.raises(FileExistsError):
        writer.rename_noreplace(src, dst)
    assert (src / "a").read_text() == "new" and list(dst.iterdir()) == []
    dst.rmdir()
    dst.symlink_to(tmp_path / "missing")  # nor is a dangling symlink
    with pytest.raises(FileExistsError):
        writer.rename_noreplace(src, dst)
    dst.unlink()
    writer.rename_noreplace(src, dst)
    assert (dst / "a").read_text() == "new" and not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no lock file left


def test_lock_file_of_a_dead_writer_is_taken_over(tmp_path, monkeypatch):
    from merging.io import writer

    monkeypatch.setattr(writer, "_RENAMEAT2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dead = 2**22 + 12345  # above the kernel's pid_max: no process has it
    (tmp_path / ".dst.lock").write_text(str(dead))
    writer.rename_noreplace(src, dst)
    assert dst.is_dir() and not (tmp_path / ".dst.lock").exists()
    (tmp_path / "src2").mkdir()
    (tmp_path / ".dst2.lock").write_text(str(os.getpid()))  # a live holder: refused, not waited on
    with pytest.raises(FileExistsError, match="being written by process"):
        writer.rename_noreplace(tmp_path / "src2", tmp_path / "dst2")


def test_commit_race_has_exactly_one_winner(tmp_path):
    """Two complete folders committed to one target without overwrite: one lands, the other
    gets OutputExistsError, and the target is the winner's, whole."""
    from merging.io.writer import commit_dir

    target = tmp_path / "out"
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "who").write_text(folder.name)
    commit_dir(first, target, overwrite=False)
    with pytest.raises(OutputExistsError, match="already exists"):
        commit_dir(second, target, overwrite=False)
    assert (target / "who").read_text() == "a" and (second / "who").read_text() == "b"


def test_four_concurrent_merges_to_one_out(tiny_models, tmp_path):
    """Four ``mergeflow merge`` processes race for one OUT without --overwrite: exactly one
    exits 0, the others exit 2 saying it exists, and the target is one complete merge."""
    import yaml

    from merging.digests import model_digest

    config = {"merge_method": "ties", "base_model": str(tiny_models["base"]), "parameters": {"density": 0.5},
              "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 1.0}} for n in ("ft_a", "ft_b", "ft_c")]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out" / "merged"
    command = [sys.executable, "-m", "flows.cli", "merge", str(path), str(out), "-q"]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2, 2], results
    assert all("already exists" in err for code, err in results if code == 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    subprocess.run([*command[:-2], str(tmp_path / "alone"), "-q"], cwd=REPO, check=True)
    assert model_digest(out) == model_digest(tmp_path / "alone")
