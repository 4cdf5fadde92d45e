"""``dra-core run --kube-api-qps/--kube-api-burst``: the flags reach the agent's API client and
pace the requests it really sends, over the environment's values.

The agent runs as a user runs it (a subprocess of the installed package) against a small API
server on a loopback port that records when each request arrives. Its watches end at once, so
the agent watches again as fast as its rate limit lets it: the pace of the requests is the
limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class ApiServer(ThreadingHTTPServer):
    """Answers the requests a node agent sends, recording when each one arrived."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.arrivals: list[float] = []
        self.lock = threading.Lock()

    def record(self) -> None:
        with self.lock:
            self.arrivals.append(time.monotonic())

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def kubeconfig(self, path: Path) -> Path:
        server = f"http://127.0.0.1:{self.server_address[1]}"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        )
        return path


class _ApiHandler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: object | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.record()
        if "watch=" in self.path:
            self._answer(200, None)  # a watch that ends at once, without events
        elif "/nodes/" in self.path:
            uid = "0d1c3f9e-5f7a-4c4e-9a43-5b0c2f2f6a11"
            self._answer(200, {"apiVersion": "v1", "kind": "Node", "metadata": {"uid": uid}})
        else:
            self._answer(200, {"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []})

    def do_POST(self) -> None:
        self.server.record()
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        body.setdefault("metadata", {}).update(resourceVersion="2", uid="u-1")
        self._answer(201, body)

    do_PUT = do_POST
    do_PATCH = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def run_agent(
    tmp_path: Path, api: ApiServer, flags: list[str], requests: int, seconds: float
) -> list[float]:
    """Run the agent until the API server has seen ``requests`` requests or ``seconds`` have
    passed since the first one; the arrival times, from the first request on."""
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    # The environment asks for no real limit: what paces the agent is the flags.
    env = {**os.environ, "DRA_KUBE_API_QPS": "1000", "DRA_KUBE_API_BURST": "1000"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--node-name", "node-a",
         "--kubeconfig", str(kubeconfig), "--http-port", "0", "--registration-dir", "reg",
         "--plugins-dir", "plugins", "--cdi-dir", "cdi", *flags],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while api.count() == 0:
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
            assert time.monotonic() < deadline, "the agent sent no API request within 30 s"
            time.sleep(0.02)
        first = api.arrivals[0]
        while api.count() < requests and time.monotonic() < first + seconds:
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
            time.sleep(0.02)
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, output
    with api.lock:
        return [t - first for t in api.arrivals]


def test_without_the_flags_the_agent_sends_at_the_environments_rate(
    tmp_path: Path, api: ApiServer
) -> None:
    """The control: 1,000 requests a second from the environment is no limit here."""
    arrivals = run_agent(tmp_path, api, [], requests=60, seconds=10)
    assert len(arrivals) >= 60, arrivals
    assert arrivals[59] < 2.0, f"60 requests took {arrivals[59]:.1f} s"


def test_kube_api_qps_and_burst_flags_pace_the_agents_requests(
    tmp_path: Path, api: ApiServer
) -> None:
    qps, burst, seconds = 5, 2, 2.5
    arrivals = run_agent(
        tmp_path,
        api,
        ["--kube-api-qps", str(qps), "--kube-api-burst", str(burst)],
        requests=1000,
        seconds=seconds,
    )
    window = [t for t in arrivals if t <= seconds]
    assert len(window) >= qps * 2, f"too few requests to see a pace: {window}"
    # A token bucket lets at most burst + qps * t requests start in t seconds (one more for
    # a request that was reserved just before the window's edge).
    for i, end in enumerate(window):
        assert i + 1 <= burst + qps * end + 1, f"request {i + 1} at {end:.2f} s: {window}"


def test_help_documents_the_flags_and_their_environment() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "dra_core", "run", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    flat = " ".join(text.split())
    for words in ("--kube-api-qps", "env DRA_KUBE_API_QPS", "default 50", "0 disables"):
        assert words in flat, words
    for words in ("--kube-api-burst", "env DRA_KUBE_API_BURST", "default 100"):
        assert words in flat, words


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--kube-api-qps", "fast"], {}, "--kube-api-qps: 'fast' is not a number"),
        (["--kube-api-qps", "inf"], {}, "--kube-api-qps: 'inf' is not a number"),
        (["--kube-api-qps", "-1"], {}, "--kube-api-qps: '-1' is not a number"),
        (["--kube-api-burst", "2.5"], {}, "--kube-api-burst: '2.5' is not a whole number"),
        ([], {"DRA_KUBE_API_BURST": "many"}, "--kube-api-burst: 'many' is not a whole number"),
        (["--kube-api-burst", "0"], {}, "--kube-api-burst must be at least 1"),
    ],
)
def test_bad_rate_values_are_refused_clearly(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", "--registration-dir", "reg", "--plugins-dir", "plugins",
         "--cdi-dir", "cdi", *args],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
