"""DVC reruns exactly the stages downstream of a changed parameter (in a temporary git repo
holding a copy of this project)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _edit(path: Path, change) -> None:
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "project"
    for name in [*files, "params.yaml"]:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)

    # the project's pipeline (dvc.yaml generated from the stage table, as `mergeflow dvc-yaml`
    # does) on the tiny demo models instead of the zoo (minutes to build)
    from flows.dvc_yaml import render_dvc_yaml

    shutil.copy(REPO / "tests" / "flows" / "tiny_params.yaml", dest / "params.yaml")
    stages = yaml.safe_load(render_dvc_yaml(str(REPO / "tests" / "flows" / "tiny_params.yaml")).replace(
        str(REPO / "tests" / "flows" / "tiny_params.yaml"), "params.yaml"))
    assert not {"base_model", "zoo"} & set(stages["stages"])
    tiny = {"demo_models": {"cmd": "python -m tests.fixtures.demo_models demo/models",
                            "deps": ["tests/fixtures/demo_models.py", "tests/fixtures/evals/demo"], "outs": ["demo/models"]}}
    stages["stages"] = tiny | stages["stages"]
    stages["stages"]["fetch"]["deps"] = ["demo/models", *stages["stages"]["fetch"]["deps"]]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))

    def fast(params):
        params["eval"]["limit"] = 3
        params["pipeline"]["device"] = "cpu"

    _edit(dest / "params.yaml", fast)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _run(cmd, dest)
    return dest


def test_rerun_sets(project):
    first = _run(["dvc", "repro"], project)
    assert _ran(first) == {"demo_models", "fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save", "evaluate", "report"}
    assert (project / "artifacts" / "report" / "metrics.json").is_file() and (project / "dvc.lock").is_file()

    assert _ran(_run(["dvc", "repro"], project)) == set()

    def reshard(params):
        params["pipeline"]["shard_size"] = "8KB"

    _edit(project / "params.yaml", reshard)  # a new layout of the same model: its scores are reused
    assert _ran(_run(["dvc", "repro"], project)) == {"save"}
    assert len(list((project / "artifacts" / "save").glob("model-*-of-*.safetensors"))) > 1

    method = yaml.safe_load((project / "params.yaml").read_text())["merge"]["method"]
    drop_key = {"drm": "singular_matrices_drop_rate", "ties": "density"}[method]

    def drop(params):
        params["merge"]["sparsify"][drop_key] = 0.5

    _edit(project / "params.yaml", drop)
    assert _ran(_run(["dvc", "repro"], project)) == {"sparsify", "combine", "save", "evaluate", "report"}

    def tasks(params):
        params["eval"]["tasks"] = ["demo_arith"]

    _edit(project / "params.yaml", tasks)
    assert _ran(_run(["dvc", "repro"], project)) == {"evaluate", "report"}

    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"]):
        _run(cmd, project)
    experiment = _run(["dvc", "exp", "run", "-S", "eval.limit=2"], project)
    assert _ran(experiment) == {"evaluate", "report"}
    assert "eval.limit" in _run(["dvc", "exp", "show", "--md"], project)

    def models(params):
        params["models"]["inputs"] = params["models"]["inputs"][:2]

    _edit(project / "params.yaml", models)
    assert _ran(_run(["dvc", "repro"], project)) == {"fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save", "evaluate", "report"}
