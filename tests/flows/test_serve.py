"""The laptop route: a real local Prefect server on loopback (started and stopped by this test,
by PID) and ``mergeflow serve``; ``prefect deployment run 'merge-and-eval/manual' --watch``
completes, and the nightly deployment carries the cron and timezone from params.yaml and its
name as the series its runs are compared in. (The server route, a work pool and a worker, is
tests/flows/test_worker.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import write_params

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read() or b"null")
    except OSError:
        return None


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
def test_served_deployment_runs_to_completion(tiny_models, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "art")
    raw = yaml.safe_load(params.read_text())
    raw["schedule"] = {"cron": "30 3 * * *", "timezone": "Europe/Berlin"}
    raw["eval"].update({"tasks": ["demo_arith"], "limit": 1, "evaluate_inputs": False})
    params.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    serve = None
    try:
        _wait(lambda: _get(f"{api}/health") is True, 120, "the Prefect server")
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--params", str(params)], env=env,
                                 stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)

        def registered() -> bool:
            try:
                found = _post(f"{api}/deployments/filter", {})
            except OSError:
                return False
            return {d["name"] for d in found} >= {"manual", "nightly"}

        _wait(registered, 120, "the deployments to register")
        nightly = next(d for d in _post(f"{api}/deployments/filter", {}) if d["name"] == "nightly")
        schedule = nightly["schedules"][0]["schedule"]
        assert schedule["cron"] == "30 3 * * *" and schedule["timezone"] == "Europe/Berlin"
        assert nightly["parameters"]["series"] == "nightly" and nightly["parameters"]["params_file"] == str(params)

        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "merge-and-eval/manual", "--watch"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + (tmp_path / "serve.log").read_text()[-3000:]
        assert (tmp_path / "art" / "report" / "metrics.json").is_file()
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
        log.close()
    assert server.poll() is not None and (serve is None or serve.poll() is not None)
