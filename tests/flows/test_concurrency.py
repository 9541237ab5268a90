"""Several runs on one artifact store at once (issue 15): four ``mergeflow run`` processes with
different params all complete with correct models; the upstream artifacts they share are
computed once; nothing is left half-written; the store's locks let a run's artifacts alone
while it uses them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from merging.digests import model_digest
from merging.io.artifacts import ArtifactWriter, is_current, is_leased, lease, read_manifest, remove_unleased
from merging.pipeline import MODEL_DIGEST_FILE, merge_checkpoints
from merging.pipeline_params import load_params, merge_config
from tests.pipeline_helpers import REPO, write_params

LAMBDAS = (0.5, 0.7, 1.0, 1.3)
SHARED = ("fetch", "collect_stats", "deltas", "decompose", "sparsify")


def _prefect_env(tmp_path: Path) -> dict[str, str]:
    """The harness's API server and a private result folder, for subprocesses."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
            "PREFECT_LOGGING_LEVEL": "INFO"}


def _executed(logs: list[str]) -> list[str]:
    """The stages whose task body ran, in every log (a Cached task does not run its body)."""
    return [stage for log in logs for stage in re.findall(r"prefect\.task_runs: ([a-z_]+) -> ", log)]


@pytest.mark.slow
def test_four_concurrent_runs_share_the_store(prefect_harness, tiny_models, tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")  # TIES: density shared, lambda varies
    lean = ["--set", "eval.tasks=[demo_arith]", "--set", "eval.evaluate_inputs=false", "--set", "eval.limit=2"]
    runs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--params", str(params), *lean,
                              "--set", f"merge.combine.lambda={value}"],
                             cwd=REPO, env=_prefect_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for value in LAMBDAS]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, "\n\n".join(logs)

    store = tmp_path / "art" / "store"
    executed = _executed(logs)
    for stage in SHARED:  # computed by one run; the others waited for its lock and found its record (Cached)
        assert executed.count(stage) == 1 and len(list(store.glob(f"{stage}-*"))) == 1, (stage, executed)
    assert executed.count("save") == 4 and executed.count("report") == 4
    leftovers = [p for p in (tmp_path / "art").rglob(".*") if re.search(r"\.(tmp|old)-|\.writer$", p.name)]
    assert not leftovers  # no temporary or set-aside folder, no lock file

    records = [json.loads(line) for line in (store / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["merge"]["combine"]["lambda"] for r in records) == sorted(LAMBDAS)
    cache = store / "eval-cache"
    assert len(list(cache.glob("*.json"))) == 5  # the base once, and the four merged models
    latest = json.loads((tmp_path / "art" / "report" / "metrics.json").read_text())
    assert latest["method"] == "ties" and set(latest["accuracy"]) == {"merged", "base"}  # one run's whole report

    for record in records:  # each saved model is the model merged alone, in memory, by `mergeflow merge`
        value = record["params"]["merge"]["combine"]["lambda"]
        alone = merge_checkpoints(merge_config(load_params(params, {"merge.combine.lambda": value})), tmp_path / f"alone-{value}")
        saved = Path(record["artifacts"]["save"])
        assert (saved / MODEL_DIGEST_FILE).read_text().strip() == model_digest(alone), value
        assert is_current(saved, read_manifest(saved)["cache_key"])


def test_a_second_writer_of_an_artifact_keeps_the_first_ones_folder(tmp_path):
    """Keys are content addresses: the loser of a commit race discards its own folder and the
    winner's (which a reader may have open) stays; an incomplete folder is replaced."""
    target = tmp_path / "store" / "combine-0123"
    first, second = (ArtifactWriter(target, {"stage": "combine", "cache_key": "k"}) for _ in range(2))
    for writer, text in ((first, "first"), (second, "second")):
        (writer.folder / "data.txt").write_text(text)
    first.commit(extra_files=["data.txt"])
    reader = open(target / "data.txt")  # noqa: SIM115 (open across the second commit)
    inode = (target / "data.txt").stat().st_ino
    assert second.commit(extra_files=["data.txt"]) == target
    assert (target / "data.txt").stat().st_ino == inode and reader.read() == "first"
    reader.close()
    assert sorted(p.name for p in target.parent.iterdir()) == ["combine-0123"]  # the loser's temporary folder is gone

    (target / "data.txt").unlink()  # no longer current: the next writer replaces it
    third = ArtifactWriter(target, {"stage": "combine", "cache_key": "k"})
    (third.folder / "data.txt").write_text("third")
    third.commit(extra_files=["data.txt"])
    assert (target / "data.txt").read_text() == "third" and is_current(target, "k")


def test_leased_artifacts_are_not_removed(tmp_path):
    folder = tmp_path / "store" / "save-0123"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("x")
    with lease(folder):
        assert is_leased(folder)
        child = subprocess.run([sys.executable, "-c", "import sys; from merging.io.artifacts import remove_unleased; "
                                "sys.exit(0 if remove_unleased(sys.argv[1]) else 3)", str(folder)], cwd=REPO)
        assert child.returncode == 3 and (folder / "model.safetensors").is_file()  # another process may not
    assert not is_leased(folder)
    assert remove_unleased(folder) and not folder.exists()
    assert not list(folder.parent.iterdir())  # the lease file went with it


def test_gc_leaves_what_a_running_flow_leases(tiny_models, tmp_path):
    from flows.gc import collect_garbage

    params = load_params(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    orphan = tmp_path / "art" / "store" / "combine-0123"  # in no run's record, not what the params make
    orphan.mkdir(parents=True)
    with lease(orphan):
        assert collect_garbage(params, keep_runs=0, dry_run=True) == []
        assert collect_garbage(params, keep_runs=0) == [] and orphan.is_dir()
    assert collect_garbage(params, keep_runs=0) == [orphan] and not orphan.exists()
