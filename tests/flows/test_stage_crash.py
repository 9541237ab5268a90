"""A save killed midway (SIGKILL: no cleanup code runs) leaves no partial model at the target
(and an earlier complete model untouched); the rerun completes with the same output digest."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from merging import pipeline
from merging.io.artifacts import read_manifest
from tests.pipeline_helpers import write_params

KILL_AFTER_TENSORS = textwrap.dedent(
    """
    import os, signal, sys
    from merging.io import shards
    from flows.stage import run_named_stage

    original, count = shards.PlannedShardWriter.add_group, [0]
    def add_group(self, tensors):
        original(self, tensors)                # written at its offset, on disk ...
        count[0] += 1
        if count[0] == 7:
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
    shards.PlannedShardWriter.add_group = add_group
    run_named_stage("save", sys.argv[1], sys.argv[2])
    """
)


def _stages(params, root, names):
    for name in names:
        subprocess.run([sys.executable, "-m", "flows.stage", name, "--params", str(params), "--artifacts", str(root)],
                       check=True, capture_output=True)


def test_killed_save_leaves_nothing_partial_and_rerun_matches(tiny_models, tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    root = tmp_path / "art"
    _stages(params, root, pipeline.stages_through("combine"))

    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_TENSORS, str(params), str(root)], capture_output=True)
    assert killed.returncode == -9
    assert not (root / "save").exists()
    assert list(root.glob(".save.tmp-*"))  # the killed writer's temporary folder, never at the target

    _stages(params, root, ["save"])
    digest = read_manifest(root / "save")["output_digest"]
    assert not list(root.glob(".save.tmp-*"))  # stale temporaries of dead writers are cleaned up

    # a rerun with another shard size rewrites the folder: killed midway, the complete model stays
    resharded = tmp_path / "resharded.yaml"
    resharded.write_text(params.read_text().replace("shard_size: 2GB", "shard_size: 8KB"))
    killed_again = subprocess.run([sys.executable, "-c", KILL_AFTER_TENSORS, str(resharded), str(root)], capture_output=True)
    assert killed_again.returncode == -9
    assert read_manifest(root / "save")["output_digest"] == digest and (root / "save" / "model.safetensors").is_file()

    reference = tmp_path / "reference"
    _stages(params, reference, pipeline.stages_through("save"))
    assert read_manifest(reference / "save")["output_digest"] == digest
