"""Offline (issue 15): with ``HF_HUB_OFFLINE=1`` and nothing else, ``mergeflow merge`` and
``mergeflow run`` open no network connection beyond loopback (Prefect's temporary server on
127.0.0.1 is loopback).

Each command runs in a subprocess whose interpreter loads an audit ``sitecustomize`` (first
on ``PYTHONPATH``, so child processes such as the temporary Prefect server load it too): it
logs every ``connect``/``connect_ex``/``sendto`` to an address outside 127.0.0.0/8 and ::1
and every name lookup of a host other than localhost. The other offline and telemetry
switches the test suite sets (``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
``DO_NOT_TRACK``, ``PREFECT_SERVER_ANALYTICS_ENABLED``) are removed from the environment. A
control process proves that the hook is loaded and logs a real outbound connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.pipeline_helpers import write_params

REPO = Path(__file__).resolve().parents[2]
MERGEFLOW = [sys.executable, "-m", "flows.cli"]
REMOVED = ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED",
           "PREFECT_API_URL", "PREFECT_HOME", "PYTHONPATH")

AUDIT_HOOK = '''
"""Network audit (tests/flows/test_offline.py): logs non-loopback connections and lookups."""
import ipaddress
import os
import socket

_LOG = os.environ.get("NETWORK_AUDIT_LOG")


def _is_local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or host in ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _note(kind, detail):
    with open(_LOG, "a") as log:
        log.write(f"{os.getpid()} {kind} {detail!r}\\n")


def _check(sock, address, kind):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _note(kind, address)


if _LOG:
    with open(_LOG + ".hooked", "a") as marker:
        marker.write(f"{os.getpid()}\\n")
    _connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    _getaddrinfo, _gethostbyname, _gethostbyname_ex = socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex

    def connect(self, address):
        _check(self, address, "connect")
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address, "connect_ex")
        return _connect_ex(self, address)

    def sendto(self, data, *args):
        _check(self, args[-1], "sendto")
        return _sendto(self, data, *args)

    def _lookup(original):
        def lookup(host, *args, **kwargs):
            if not _is_local(host):
                _note(original.__name__, host)
            return original(host, *args, **kwargs)
        return lookup

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = _lookup(_getaddrinfo)
    socket.gethostbyname, socket.gethostbyname_ex = _lookup(_gethostbyname), _lookup(_gethostbyname_ex)
'''


def _audited(cmd: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str, list[str], set[int]]:
    """Run ``cmd`` offline under the audit hook: (finished process, its output, logged
    connections, pids of the processes that loaded the hook)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "network.log"
    environment = {k: v for k, v in os.environ.items() if k not in REMOVED}
    environment.update(HF_HUB_OFFLINE="1", PYTHONPATH=f"{hook}{os.pathsep}{REPO}", NETWORK_AUDIT_LOG=str(log), **env)
    process = subprocess.Popen(cmd, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    logged = log.read_text().splitlines() if log.is_file() else []
    marker = Path(f"{log}.hooked")
    hooked = {int(line) for line in marker.read_text().split()} if marker.is_file() else set()
    return process, output, logged, hooked


CONTROL = """
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
socket.create_connection(server.getsockname(), timeout=5).close()  # loopback: not logged
for address in [("10.255.255.1", 9), ("example.invalid", 80)]:
    try:
        socket.create_connection(address, timeout=0.3).close()
    except OSError:
        pass
"""


def test_the_audit_hook_logs_outbound_connections_and_not_loopback(tmp_path):
    process, output, logged, hooked = _audited([sys.executable, "-c", CONTROL], tmp_path)
    assert process.returncode == 0, output
    assert hooked == {process.pid}
    assert any("connect ('10.255.255.1', 9)" in line for line in logged), logged
    assert any("getaddrinfo 'example.invalid'" in line for line in logged), logged
    assert not any("127.0.0.1" in line for line in logged), logged


def test_merge_opens_no_connection_beyond_loopback(tiny_models, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(tiny_models["base"]), "parameters": {"density": 0.5},
        "models": [str(tiny_models[name]) for name in ("ft_a", "ft_b", "ft_c")],
    }))
    process, output, logged, hooked = _audited([*MERGEFLOW, "merge", str(config), str(tmp_path / "merged"), "-q"], tmp_path)
    assert process.returncode == 0, output[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert process.pid in hooked
    assert logged == []


def test_run_opens_no_connection_beyond_loopback(tiny_models, tmp_path):
    """The whole flow: a temporary Prefect server, the merge stages, lm-eval on local tasks."""
    params = write_params(tmp_path / "params.yaml", tiny_models, tmp_path / "artifacts")
    cmd = [*MERGEFLOW, "run", "--params", str(params), "--set", "eval.evaluate_inputs=false", "--set", "eval.limit=1",
           "--set", "eval.tasks=[demo_arith]"]
    process, output, logged, hooked = _audited(cmd, tmp_path, PREFECT_HOME=str(tmp_path / "prefect-home"))
    assert process.returncode == 0, output[-3000:]
    assert (tmp_path / "artifacts" / "report" / "metrics.json").is_file()
    assert "127.0.0.1" in output  # it did talk to its temporary server, over loopback
    assert process.pid in hooked and len(hooked) > 1  # the server process ran under the hook too
    assert logged == []
