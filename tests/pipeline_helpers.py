"""Builders for pipeline tests: a params file over tiny models and the demo eval tasks."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_EVALS = REPO / "tests" / "fixtures" / "evals"  # the demo_arith / demo_antonym lm-eval tasks


def write_params(path: Path, models: dict[str, Path], artifacts: Path, method: str = "ties", **merge) -> Path:
    """params.yaml for the tiny models (base + ft_a/ft_b/ft_c), ties by default, fast eval."""
    sections = {"decompose": {}, "sparsify": {"density": 0.4}, "combine": {"lambda": 1.0}} if method == "ties" else {}
    sections.update(merge)
    params = {
        "models": {
            "base": {"name": "base", "source": str(models["base"])},
            "inputs": [
                {"name": "a", "source": str(models["ft_a"]), "task": "demo_arith"},
                {"name": "b", "source": str(models["ft_b"]), "task": "demo_antonym"},
                {"name": "c", "source": str(models["ft_c"])},
            ],
        },
        "merge": {"method": method, "seed": 0, **{k: sections.get(k, {}) for k in ("decompose", "sparsify", "combine")}},
        "pipeline": {"device": "cpu", "artifacts": str(artifacts), "out_dtype": None, "shard_size": "2GB"},
        "eval": {"tasks": ["demo_arith", "demo_antonym"], "include_path": str(DEMO_EVALS), "limit": 3, "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


MERGE_STAGES = ("fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save")


def run_merge_stages(params_file, root: Path, materialize: bool = True, overrides: dict | None = None) -> Path:
    """Run fetch .. save one stage at a time through the stage table into ``root/<stage>``
    (fused stages write markers with ``materialize=False``); returns the save artifact."""
    from merging import pipeline
    from merging.pipeline_params import load_params

    params = load_params(params_file, {"pipeline.materialize": materialize, **(overrides or {})})
    fused = not materialize
    for name in MERGE_STAGES:
        stage = pipeline.get_stage(name)
        inputs = {n: root / n for n in pipeline.stage_inputs(stage, fused)}
        pipeline.run_stage(name, params, inputs, root / name, root / "store", fused=fused)
    return root / "save"
