"""Deployments of the merge-and-eval flow, served by one long-running process:

* ``merge-and-eval/manual``: run on demand (``prefect deployment run 'merge-and-eval/manual'``);
* ``merge-and-eval/nightly``: cron and timezone from ``params.yaml`` (``schedule``).

``mergeflow serve [--params params.yaml]`` registers both with
the Prefect server at ``PREFECT_API_URL`` and executes their runs. Default flow parameters
come from the same ``params.yaml``; ``--param overrides='{"merge.combine": {"lambda": 0.5}}'``
changes one run. Note: serving pauses the schedules when the process stops (SIGTERM).
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from flows.merge_and_eval import merge_and_eval, task_runner
from merging.pipeline_params import load_params


def deployments(params_file: str = "params.yaml"):
    params = load_params(params_file)
    defaults = {"params_file": str(Path(params_file).resolve()), "overrides": {}, "refresh": False}
    flow = merge_and_eval.with_options(task_runner=task_runner(params_file))
    manual = flow.to_deployment(name="manual", parameters=defaults, tags=["mergeflow"])
    nightly = flow.to_deployment(
        name="nightly", parameters=defaults, tags=["mergeflow", "nightly"],
        schedules=[Cron(params.schedule.cron, timezone=params.schedule.timezone)],
    )
    return manual, nightly


def serve_deployments(params_file: str = "params.yaml") -> None:
    """Register both deployments and run their flow runs until stopped."""
    serve(*deployments(params_file))
