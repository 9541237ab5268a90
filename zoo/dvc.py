"""The demo zoo's two DVC stages (``mergeflow dvc-yaml`` puts them before the pipeline's when
``params.yaml`` has a ``zoo`` section): the base model and the specialists, both persisted
outputs (their builders keep finished work, keyed on their own inputs)."""

from __future__ import annotations

from typing import Any

from merging.fingerprint import closure_files

__all__ = ["zoo_stages"]


def zoo_stages(params_file: str = "params.yaml") -> dict[str, dict[str, Any]]:
    return {
        "base_model": {
            "cmd": "python -m zoo base ${zoo.base}",
            "deps": closure_files(["zoo.base"]),
            "outs": [{"${zoo.base}": {"persist": True}}],
        },
        "zoo": {
            "cmd": f"python -m zoo build --params {params_file}",
            "deps": ["${zoo.base}", *closure_files(["zoo.build"]), "zoo/evals/loader.py"],
            "params": ["zoo"],
            "outs": [{"${zoo.out}": {"persist": True}}],
        },
    }
