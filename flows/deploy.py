"""Deployments of the merge-and-eval flow, two ways:

* ``merge-and-eval/manual``: run on demand (``prefect deployment run 'merge-and-eval/manual'``);
* ``merge-and-eval/nightly``: cron and timezone from ``params.yaml`` (``schedule``).

On a laptop, ``mergeflow serve [--params params.yaml]`` registers both with the Prefect server at
``PREFECT_API_URL`` and executes their runs in the foreground (serving pauses the schedules when
the process stops). On a server, ``prefect.yaml`` (generated from ``params.yaml`` by
``python -m flows.deploy prefect-yaml``; a test checks the committed one) puts both on a process
work pool: ``prefect deploy --all`` from the repository root, then ``prefect worker start --pool
mergeflow`` runs whatever is due, schedules included, with no foreground process of ours.

Each deployment passes its name as the run's ``series``: a run is compared with the previous run
of its deployment, and a score drop beyond ``eval.regression_tolerance`` fails it. Default flow
parameters come from the same ``params.yaml``; ``--param overrides='{"merge.combine": {"lambda":
0.5}}'`` changes one run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from prefect import serve
from prefect.schedules import Cron

from flows.merge_and_eval import merge_and_eval, task_runner
from merging.errors import exit_on_error
from merging.pipeline_params import load_params

__all__ = ["deployments", "serve_deployments", "render_prefect_yaml", "WORK_POOL", "ENTRYPOINT", "main"]

WORK_POOL = "mergeflow"
ENTRYPOINT = "flows/merge_and_eval.py:merge_and_eval"
_DESCRIPTIONS = {"manual": "Merge and evaluate once, on demand (params.yaml; overrides per run).",
                 "nightly": "The nightly merge-and-eval: inputs on a branch are merged at their latest commit; "
                            "a score drop beyond eval.regression_tolerance fails the run."}


def _parameters(params_file: str, name: str) -> dict:
    return {"params_file": params_file, "overrides": {}, "refresh": False, "series": name}


def deployments(params_file: str = "params.yaml"):
    """The manual and nightly deployments served by one process (``mergeflow serve``)."""
    params = load_params(params_file)
    path = str(Path(params_file).resolve())
    flow = merge_and_eval.with_options(task_runner=task_runner(params_file))
    manual = flow.to_deployment(name="manual", parameters=_parameters(path, "manual"), tags=["mergeflow"],
                                description=_DESCRIPTIONS["manual"])
    nightly = flow.to_deployment(
        name="nightly", parameters=_parameters(path, "nightly"), tags=["mergeflow", "nightly"],
        description=_DESCRIPTIONS["nightly"], schedules=[Cron(params.schedule.cron, timezone=params.schedule.timezone)],
    )
    return manual, nightly


def serve_deployments(params_file: str = "params.yaml") -> None:
    """Register both deployments and run their flow runs until stopped."""
    serve(*deployments(params_file))


_HEADER = """\
# Prefect deployments of the merge-and-eval flow on a process work pool (the server route;
# `mergeflow serve` is the laptop route). Generated from params.yaml (schedule: cron and timezone)
# by `python -m flows.deploy prefect-yaml`; a test fails when this file differs. From the repo root:
#   prefect work-pool create mergeflow --type process
#   prefect deploy --all                 # flow runs start in the folder you deploy from
#   prefect worker start --pool mergeflow
"""


def render_prefect_yaml(params_file: str = "params.yaml") -> str:
    """``prefect.yaml`` for the manual and nightly deployments on the ``mergeflow`` process pool."""
    schedule = load_params(params_file).schedule

    def common() -> dict:  # the folder `prefect deploy` runs in ($PWD, resolved then) is where flow runs start
        return {"entrypoint": ENTRYPOINT, "work_pool": {"name": WORK_POOL, "job_variables": {"working_dir": "{{ $PWD }}"}}}

    spec = {
        "name": "mergeflow",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}],
        "deployments": [
            {"name": "manual", "description": _DESCRIPTIONS["manual"], "tags": ["mergeflow"],
             "parameters": _parameters(params_file, "manual"), **common()},
            {"name": "nightly", "description": _DESCRIPTIONS["nightly"], "tags": ["mergeflow", "nightly"],
             "parameters": _parameters(params_file, "nightly"), **common(), "concurrency_limit": 1,
             "schedules": [{"cron": schedule.cron, "timezone": schedule.timezone}]},
        ],
    }
    return _HEADER + yaml.safe_dump(spec, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description="Write prefect.yaml from params.yaml.")
    parser.add_argument("command", choices=["prefect-yaml"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="prefect.yaml")
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file differs from the generated one.")
    args = parser.parse_args(argv)
    with exit_on_error():
        text, out = render_prefect_yaml(args.params), Path(args.out)
        if args.check:
            if not out.is_file() or out.read_text() != text:
                raise SystemExit(f"{out} is out of date: run 'python -m flows.deploy prefect-yaml'")
            return
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
