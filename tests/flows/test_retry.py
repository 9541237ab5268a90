"""Retries where failures are transient (params.yaml's ``retry``): an evaluation that fails once is
retried and succeeds while the stages before it stay untouched; a config error is not retried;
the whole flow run is retried, and cut by its timeout."""

from __future__ import annotations

import time

from tests.pipeline_helpers import write_params

UPSTREAM = ("fetch", "collect_stats", "deltas", "decompose", "sparsify", "combine", "save")
LEAN = {"eval.tasks": ["demo_arith"], "eval.evaluate_inputs": False, "eval.limit": 2,
        "retry.evaluate": {"retries": 1, "delay_seconds": 0}}


def _task_runs(state) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return found


def _flow_run(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def test_an_evaluation_that_fails_once_is_retried_and_upstream_is_untouched(prefect_harness, tiny_models, tmp_path, monkeypatch):
    from evaluation import harness
    from flows.merge_and_eval import merge_and_eval
    from merging.errors import MergeConfigError

    params = str(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    assert merge_and_eval(params, LEAN, return_state=True).is_completed()
    store = tmp_path / "art" / "store"
    upstream = {p: p.joinpath("manifest.json").stat().st_mtime_ns for p in store.iterdir() if p.name.split("-")[0] in UPSTREAM}
    assert {p.name.split("-")[0] for p in upstream} == set(UPSTREAM)

    real, calls = harness.run_lm_eval, []

    def flaky(folder, settings, base_folder=None):
        calls.append(folder)
        if len(calls) == 1:
            raise ConnectionError("the evaluation node went away")
        return real(folder, settings, base_folder)

    monkeypatch.setattr(harness, "run_lm_eval", flaky)
    state = merge_and_eval(params, {**LEAN, "eval.limit": 3}, return_state=True)  # a new eval setting: evaluate reruns
    assert state.is_completed(), state.message
    runs = _task_runs(state)
    assert [(r.state.name, r.run_count) for r in runs["evaluate"]] == [("Completed", 2)]  # failed once, retried
    assert all([r.state.name for r in runs[stage]] == ["Cached"] for stage in UPSTREAM), runs
    assert len(calls) == 3  # the merged model (failed), then the merged model and the base
    assert {p: p.joinpath("manifest.json").stat().st_mtime_ns for p in upstream} == upstream  # nothing rewritten

    def wrong(folder, settings, base_folder=None):
        calls.append(folder)
        raise MergeConfigError("eval task 'x': not retried")

    monkeypatch.setattr(harness, "run_lm_eval", wrong)
    calls.clear()
    state = merge_and_eval(params, {**LEAN, "eval.limit": 1}, return_state=True)
    assert state.is_failed() and len(calls) == 1  # the params are wrong: the same failure every time
    assert [r.run_count for r in _task_runs(state)["evaluate"]] == [1]


def test_the_flow_run_is_retried_and_timed_out_as_params_say(prefect_harness, tiny_models, tmp_path, monkeypatch):
    from flows import merge_and_eval as flow_module

    params = str(write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art"))
    real, attempts = flow_module.run_pipeline, []

    def failing_once(params, refresh=False, leases=None):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("the store's file server went away")
        return real(params, refresh, leases)

    monkeypatch.setattr(flow_module, "run_pipeline", failing_once)
    state = flow_module.merge_and_eval(params, {**LEAN, "retry.flow": {"retries": 1, "delay_seconds": 0}}, return_state=True)
    assert state.is_completed() and len(attempts) == 2 and _flow_run(state).run_count == 2

    def hanging(params, refresh=False, leases=None):
        time.sleep(30)

    monkeypatch.setattr(flow_module, "run_pipeline", hanging)
    started = time.monotonic()
    state = flow_module.merge_and_eval(params, {**LEAN, "retry.flow": {"timeout_seconds": 1}}, return_state=True)
    assert state.is_failed() and time.monotonic() - started < 15
    assert _flow_run(state).run_count == 1  # retry.flow.retries defaults to 0
