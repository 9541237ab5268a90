"""benchmarks/gpu_check.py stays runnable where there is no GPU: a smoke run at tiny shapes on
the CPU covers every registered method, and a device whose output differs is reported as a
failure (the check can fail)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from merging.registry import METHODS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(gpu_check, monkeypatch, out: Path) -> int:
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--quick", "--device", "cpu", "--layers", "1", "--out", str(out)])
    return gpu_check.main()


def test_a_smoke_run_covers_every_method(gpu_check, monkeypatch, tmp_path):
    assert _run(gpu_check, monkeypatch, tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in report["methods"]} == set(METHODS) == set(gpu_check.SETTINGS)
    assert report["ok"] and report["gesvd_fallback"]["ok"]
    assert [(r["direction"], r["layer"]) for r in report["drm"]] == [("horizontal", 0), ("vertical", 0)]


def test_a_device_that_differs_fails_the_check(gpu_check, monkeypatch, tmp_path):
    real, calls = gpu_check.merge, []

    def merge(method, base, fine, name, device):
        out = real(method, base, fine, name, device)
        calls.append(method)
        on_device = len(calls) % 2 == 0  # compare_methods runs the CPU reference, then the device
        return out + 1e-3 * (out - base) if on_device and method == "ties" else out

    monkeypatch.setattr(gpu_check, "merge", merge)
    assert _run(gpu_check, monkeypatch, tmp_path / "r.json") == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in report["methods"] if not r["ok"]} == {"ties"}
