"""SIGKILL at random points (issue 15): no cleanup code runs, yet no partial output is ever
seen at a target, nothing left behind breaks a rerun, and the rerun's output is the clean
run's, digest for digest.

Three kinds of process are killed, each at times drawn by a seeded ``random.Random``
between 0 and its measured clean duration (stratified, so the kills cover import, planning,
merging, writing and committing): ``mergeflow merge`` (15 kills, alternately onto a fresh
target and with ``--overwrite`` onto the complete model of the previous rerun), the DVC
entry point ``python -m flows.stage NAME`` of three stages (deltas, sparsify, save), and a
Prefect run ``mergeflow run`` (2 kills, against the session's Prefect test server and result
storage, so that the in-process rerun sees what the killed run left): 20 kills in all.
Reruns run in the test's process (the same command functions), to stay within time.

The merges run on a 24-layer model family (hidden size 128) written in 64 KB shards, so that the merge itself
(not only Python's start-up) is a large share of a run and several kills land mid-write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.stage import run_named_stage
from merging import pipeline
from merging.digests import model_digest
from merging.io.artifacts import MANIFEST, is_current, read_manifest
from merging.pipeline_params import load_params
from tests.pipeline_helpers import write_params
from tests.robustness_helpers import save_model_family

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MERGE_KILLS = 15
STAGE_KILLS = ("deltas", "sparsify", "save")
PREFECT_KILLS = 2
MERGEFLOW = [sys.executable, "-m", "flows.cli"]  # the ``mergeflow`` console script's entry point


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def _clean_run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` to completion; its duration in seconds."""
    started = time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
    assert code == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def _killed_run(cmd: list[str], env: dict[str, str], delay: float, log: Path) -> bool:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; False when it finished first."""
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
            return True
    assert code == 0, log.read_text()[-3000:]
    return False


def _kill_times(seed: int, duration: float, count: int) -> list[float]:
    """``count`` random times in [0, duration), one in each of ``count`` equal strata, shuffled."""
    rng = random.Random(seed)
    times = [duration * (i + rng.random()) / count for i in range(count)]
    rng.shuffle(times)
    return times


def _leftovers(parent: Path, name: str) -> list[str]:
    """What writers of ``parent/name`` leave beside it: ``.NAME.tmp-*`` (a folder being
    written), ``.NAME.old-*`` (a replaced target being removed), lock files."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")) if parent.is_dir() else []


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return save_model_family(tmp_path_factory.mktemp("family"), layers=24, hidden=128, vocab=1024)


# --- mergeflow merge ------------------------------------------------------------------------------

def test_killed_merges_leave_no_partial_model_and_reruns_match_the_clean_digest(family, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(family["base"]), "device": "cpu", "shard_size": "64KB",
        "parameters": {"density": 0.5, "lambda": 0.9},
        "models": [str(family[name]) for name in ("ft_1", "ft_2", "ft_3")],
    }))
    command = MERGEFLOW
    clean = tmp_path / "clean" / "model"
    duration = _clean_run([*command, "merge", str(config), str(clean), "-q"], _env(), tmp_path / "clean.log")
    clean_digest = model_digest(clean)
    assert len(list(clean.glob("model-*-of-*.safetensors"))) > 10  # many shards: many writes to interrupt

    parent = tmp_path / "runs"
    parent.mkdir()
    target = parent / "model"
    outcomes = {"finished": 0, "mid-write": 0, "before or after writing": 0}
    for index, delay in enumerate(_kill_times(15, duration, MERGE_KILLS)):
        overwrite = index % 2 == 1  # onto the complete model of the previous rerun; else onto a fresh target
        if not overwrite:
            shutil.rmtree(target, ignore_errors=True)
        cmd = [*command, "merge", str(config), str(target), "-q", *(["--overwrite"] if overwrite else [])]
        killed = _killed_run(cmd, _env(), delay, tmp_path / f"kill-{index}.log")
        left = _leftovers(parent, "model")
        outcomes["finished" if not killed else "mid-write" if left else "before or after writing"] += 1
        # never a partial model at the target: absent, or complete with the clean digest
        if target.exists():
            assert model_digest(target) == clean_digest, f"kill {index} at {delay:.2f}s left a different model"
        assert set(os.listdir(parent)) <= {"model", *left}
        assert all(name.startswith((".model.tmp-", ".model.old-")) for name in left), left  # temporaries only

        rerun = CliRunner().invoke(app, ["merge", str(config), str(target), "-q", *(["--overwrite"] if target.exists() else [])])
        assert rerun.exit_code == 0, f"rerun after kill {index} at {delay:.2f}s: {rerun.output}"
        assert model_digest(target) == clean_digest
        assert os.listdir(parent) == ["model"], f"left behind after the rerun: {os.listdir(parent)}"
    assert outcomes["mid-write"] >= 1, f"no kill landed while the model was being written: {outcomes}"


# --- the DVC stage entry point --------------------------------------------------------------------

def _stage_cmd(name: str, params: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "flows.stage", name, "--params", str(params), "--artifacts", str(root)]


def _artifact_state(folder: Path) -> str | None:
    """None when absent; the output digest of a complete artifact (manifest and all its files)."""
    if not folder.exists():
        return None
    manifest = read_manifest(folder)
    assert is_current(folder, manifest["cache_key"]), f"{folder} is incomplete: {sorted(os.listdir(folder))}"
    return manifest.get("output_digest") or manifest["cache_key"]


def test_killed_dvc_stages_leave_no_partial_artifact_and_reruns_match(family, tmp_path):
    models = {"base": family["base"], "ft_a": family["ft_1"], "ft_b": family["ft_2"], "ft_c": family["ft_3"]}
    params_file = write_params(tmp_path / "params.yaml", models, tmp_path / "unused")
    params = load_params(params_file)
    clean, root = tmp_path / "clean", tmp_path / "killed"
    order = pipeline.stages_through("save")

    def run_in_process(name: str, folder: Path) -> None:
        stage = pipeline.get_stage(name)
        pipeline.run_stage(name, params, {n: folder / n for n in pipeline.stage_inputs(stage)}, folder / name, folder / "store")

    durations, expected = {}, {}
    for name in order:
        if name in STAGE_KILLS:
            durations[name] = _clean_run(_stage_cmd(name, params_file, clean), _env(), tmp_path / f"clean-{name}.log")
        else:
            run_in_process(name, clean)
        expected[name] = _artifact_state(clean / name)

    rng_times = _kill_times(16, 1.0, len(STAGE_KILLS))
    for name in order:
        if name not in STAGE_KILLS:
            run_in_process(name, root)
            continue
        delay = durations[name] * rng_times[STAGE_KILLS.index(name)]
        _killed_run(_stage_cmd(name, params_file, root), _env(), delay, tmp_path / f"kill-{name}.log")
        assert _artifact_state(root / name) in (None, expected[name]), f"{name} killed at {delay:.2f}s"
        left = _leftovers(root, name)
        assert all(n.startswith((f".{name}.tmp-", f".{name}.old-")) for n in left), left

        run_named_stage(name, str(params_file), str(root))  # what the rerun's process runs
        assert _artifact_state(root / name) == expected[name]
        assert not _leftovers(root, name), f"{name}: left behind after the rerun"
    assert model_digest(root / "save") == model_digest(clean / "save")


# --- a Prefect run -------------------------------------------------------------------------------

def _store_is_clean(artifacts: Path) -> list[str]:
    """Every artifact folder in the store is complete; returns the temporaries (``.NAME.tmp-*``,
    ``.NAME.old-*``) beside them. Other dot files are the store's own (cache records, leases)."""
    store = artifacts / "store"
    temporaries = []
    for folder in sorted(store.iterdir()) if store.is_dir() else []:
        if folder.name.startswith("."):
            if ".tmp-" in folder.name or ".old-" in folder.name:
                temporaries.append(folder.name)
            continue
        if folder.is_dir() and folder.name != "eval-cache":
            manifest = read_manifest(folder)
            assert is_current(folder, manifest["cache_key"]), f"{folder.name} is incomplete"
    report = artifacts / "report"
    assert not report.exists() or (report / "metrics.json").is_file()
    return temporaries + _leftovers(artifacts, "report")


def _saved_digest(artifacts: Path) -> str:
    (saved,) = (artifacts / "store").glob("save-*")
    assert (saved / MANIFEST).is_file()
    return (saved / pipeline.MODEL_DIGEST_FILE).read_text().strip()


def test_killed_prefect_runs_leave_a_consistent_store_and_reruns_match(prefect_harness, tiny_models, tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    from flows.merge_and_eval import merge_and_eval

    env = _env(PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_LOCAL_STORAGE_PATH=str(PREFECT_LOCAL_STORAGE_PATH.value()))
    overrides = ["--set", "eval.evaluate_inputs=false", "--set", "eval.limit=1", "--set", "eval.tasks=[demo_arith]"]

    def params(artifacts: Path) -> Path:
        return write_params(tmp_path / f"{artifacts.name}.yaml", tiny_models, artifacts)

    clean = tmp_path / "clean"
    duration = _clean_run([*MERGEFLOW, "run", "--params", str(params(clean)), *overrides], env,
                          tmp_path / "clean.log")
    clean_digest = _saved_digest(clean)
    assert json.loads((clean / "report" / "metrics.json").read_text())["method"] == "ties"

    for index, delay in enumerate(_kill_times(17, duration, PREFECT_KILLS)):
        artifacts = tmp_path / f"run-{index}"
        params_file = params(artifacts)
        _killed_run([*MERGEFLOW, "run", "--params", str(params_file), *overrides], env, delay,
                    tmp_path / f"kill-{index}.log")
        _store_is_clean(artifacts)

        merge_and_eval(str(params_file), {"eval.evaluate_inputs": False, "eval.limit": 1, "eval.tasks": ["demo_arith"]})
        assert not _store_is_clean(artifacts), f"run {index} killed at {delay:.2f}s: temporaries left after the rerun"
        assert _saved_digest(artifacts) == clean_digest
