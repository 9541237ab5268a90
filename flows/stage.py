"""The DVC entry point: ``python -m flows.stage NAME [--params params.yaml] [--artifacts DIR]``
runs one stage of the table with fixed artifact folders ``<artifacts>/<stage>`` (DVC decides
what is stale; the runner still skips a stage whose folder holds the artifact of its key).
``python -m flows.stage show`` prints the last report's table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.progress import progress_bar
from merging import pipeline
from merging.errors import exit_on_error
from merging.pipeline_params import load_params, require_evaluation

__all__ = ["run_named_stage", "main"]


def run_named_stage(name: str, params_file: str = "params.yaml", root: str = "artifacts", quiet: bool = True) -> Path:
    """Run stage ``name`` reading and writing ``<root>/<stage>`` folders."""
    params = load_params(params_file)
    if name == pipeline.STAGES[0].name:  # dvc repro always ends in evaluate: refuse params without tasks up front
        require_evaluation(params, params_file)
    stage, artifacts = pipeline.get_stage(name), Path(root)
    fused = not params.pipeline.materialize
    inputs = {n: artifacts / n for n in pipeline.stage_inputs(stage, fused)}
    with progress_bar(name, enabled=not quiet and stage.is_merge) as update:
        return pipeline.run_stage(name, params, inputs, artifacts / name, artifacts / "store", fused=fused,
                                  progress=update)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[s.name for s in pipeline.STAGES] + ["show"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--artifacts", default="artifacts")
    args = parser.parse_args(argv)
    with exit_on_error():
        if args.name == "show":
            from evaluation.report import format_table

            print(format_table(json.loads((Path(args.artifacts) / "report" / "metrics.json").read_text())))
        else:
            print(run_named_stage(args.name, args.params, args.artifacts))


if __name__ == "__main__":
    main()
