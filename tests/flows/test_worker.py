"""The server route: prefect.yaml's deployments on a process work pool, started by `prefect worker
start`. On a local Prefect server (started and stopped by this test, by PID), `prefect deploy`
registers the nightly deployment from a prefect.yaml rendered like the committed one (a short
interval schedule instead of the cron), and the worker runs a scheduled run to completion
without anyone asking for it. The committed prefect.yaml is the one generated from params.yaml."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import yaml

from tests.flows.test_serve import BIN, _free_port, _get, _post, _stop, _wait
from tests.pipeline_helpers import REPO, write_params


def test_committed_prefect_yaml_is_the_generated_one(monkeypatch):
    from flows.deploy import main, render_prefect_yaml

    monkeypatch.chdir(REPO)
    text = render_prefect_yaml("params.yaml")
    assert (REPO / "prefect.yaml").read_text() == text, "run `python -m flows.deploy prefect-yaml`"
    nightly = next(d for d in yaml.safe_load(text)["deployments"] if d["name"] == "nightly")
    schedule = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]
    assert nightly["schedules"] == [schedule] and nightly["parameters"]["series"] == "nightly"
    main(["prefect-yaml", "--check"])


def _stop_worker(worker: subprocess.Popen) -> None:
    """`prefect worker start` ignores the first SIGTERM (toolchain.md): a second one stops it."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _stop(worker)


@pytest.mark.slow
def test_a_worker_runs_the_scheduled_nightly_unasked(tiny_models, tmp_path):
    from flows.deploy import render_prefect_yaml

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api, "PWD": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    raw = yaml.safe_load(params.read_text())
    raw["eval"].update({"tasks": ["demo_arith"], "limit": 1, "evaluate_inputs": False})
    params.write_text(yaml.safe_dump(raw))
    spec = yaml.safe_load(render_prefect_yaml(str(params)))
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    nightly["schedules"] = [{"interval": 10}]  # due within 10 s, and every 10 s (one at a time: concurrency_limit 1)
    spec["deployments"] = [nightly]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))

    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait(lambda: _get(f"{api}/health") is True, 120, "the Prefect server")
        for command in (["work-pool", "create", "mergeflow", "--type", "process"],
                        ["--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml")]):
            done = subprocess.run([str(BIN / "prefect"), *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "mergeflow"], cwd=tmp_path, env=env,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT)

        def completed() -> list[dict]:
            runs = _post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}})
            return [r for r in runs if r["state"]["type"] == "COMPLETED"] or (runs and pytest.fail(
                f"{runs[0]['state']}\n" + (tmp_path / "worker.log").read_text()[-4000:]))

        _wait(completed, 120, "a scheduled run to complete")
        run = completed()[0]
        assert run["auto_scheduled"] and run["work_pool_name"] == "mergeflow"  # the schedule made it, the worker ran it
        assert run["parameters"]["series"] == "nightly"
        assert (tmp_path / "art" / "report" / "metrics.json").is_file()
    finally:
        if worker is not None:
            _stop_worker(worker)
        _stop(server)
    assert server.poll() is not None and (worker is None or worker.poll() is not None)
