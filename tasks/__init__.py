"""Prefect tasks derived from the stage table (``merging.pipeline.STAGES``): one generic task
runs any stage; Prefect's cache agrees with the artifact store by construction."""

from tasks.stage import run_stage_task, stage_task

__all__ = ["run_stage_task", "stage_task"]
