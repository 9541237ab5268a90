"""``mergeflow zoo``: the flags override the params' ``zoo`` section, and every MergeflowError
is one line on stderr with exit code 2."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_build_reads_the_params_zoo_section_and_flags_override_it(tmp_path, monkeypatch):
    calls = []

    def fake_build(base, out, evals, **kwargs):
        calls.append((base, out, evals, kwargs))
        return {"accuracy": {"antonym": {"base": 0.25, "specialist": 1.0}}}

    monkeypatch.setattr(importlib.import_module("zoo.build"), "build", fake_build)
    params = str(REPO / "params.yaml")
    result = CliRunner().invoke(app, ["zoo", "build", "--params", params, "--steps", "7", "--full-finetune",
                                      "--evals", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert calls[-1] == (Path("demo/base"), Path("demo/zoo"), tmp_path / "e",
                         {"tasks": 4, "steps": 7, "seed": 0, "full_finetune": True, "lr": None})
    assert "antonym     0.250      1.000" in result.output

    result = CliRunner().invoke(app, ["zoo", "build", "--params", params, "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert calls[-1][2] is None and calls[-1][3] == {"tasks": 4, "steps": 120, "seed": 3, "full_finetune": False, "lr": None}


def test_errors_exit_2_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["zoo", "build", "--base", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no config.json" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["zoo", "build", "--steps", "0"])
    assert result.exit_code == 2 and "--steps: Input should be greater than or equal to 1" in result.output


def test_the_dvc_stage_command(tmp_path):
    """The DVC stages' spelling, ``mergeflow zoo ...`` (the console script of the install)."""
    mergeflow = Path(sys.executable).parent / "mergeflow"
    done = subprocess.run([str(mergeflow), "zoo", "build", "--base", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --base") and "mergeflow zoo base" in done.stderr
