"""Liveness and readiness through the agent's real HTTP endpoint, with a hung API server.

Kubelet calls whose claims must be read from an API server that never answers wait for it,
and the DRA socket still answers (calls waiting for the API never take every worker).
``/healthz`` stays 200 while those calls are young (a restart would not bring the API back)
and turns 503 once a call has run longer than ``stuck_call_seconds``;
``/readyz`` and the ``dra_api_reachable`` gauge tell that the API server is not reachable.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_core import BackendIdentity, ClaimRef, Device, Inventory, hookimpl
from dra_core.kube.client import load_client
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet
from tests.node.apiproxy import ApiProxy

DRIVER = "liveness.dra-core.dev"


class PlainBackend:
    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "dra-core.dev", "liveness")

    @hookimpl
    def dra_discover(self, context):
        return Inventory(devices=(Device("dev-0"),))

    @hookimpl
    def dra_prepare(self, claim):
        raise AssertionError("the hung API server never hands out a claim")

    @hookimpl
    def dra_unprepare(self, claim):
        return True


def _bind_free() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-live-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hung_api(root) -> Iterator[Path]:
    with ApiProxy() as proxy:
        proxy.hang()
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{proxy.port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
        )
        yield kubeconfig


def test_slow_api_is_not_a_liveness_failure_but_a_stuck_call_is(root, hung_api):
    port = _bind_free()
    settings = AgentSettings(
        node_name="live-node",
        registration_dir=root / "registry",
        plugins_dir=root / "plugins",
        cdi_dir=root / "cdi",
        http_host="127.0.0.1",
        http_port=port,
        boot_id_file=root / "boot_id",
        publish=False,
        stuck_call_seconds=5.0,
    )
    (root / "boot_id").write_text("boot-1")
    agent = Agent(
        settings,
        from_objects("plain", PlainBackend()),
        client=load_client(str(hung_api), timeout=2.0),  # per attempt; 3 attempts a claim
    )
    agent.start()
    results: list[dict] = []
    try:
        assert _get(port, "/healthz") == (200, "ok")
        status, text = _get(port, "/readyz")
        assert status == 503 and "API server" in text

        def call() -> None:
            claims = [ClaimRef("default", f"c-{i}", str(uuid.uuid4())) for i in range(1)]
            with FakeKubelet(agent.plugin.registration_socket) as kubelet:
                kubelet.register()
                results.append(kubelet.prepare(claims))

        callers = [threading.Thread(target=call) for _ in range(10)]  # more than 8 reads at once
        started = time.monotonic()
        for thread in callers:
            thread.start()
        time.sleep(1.5)
        # Every call waits for the API server, yet the DRA socket answers; the agent is busy,
        # not broken: liveness holds, readiness does not.
        assert agent.plugin.probe() == []
        assert _get(port, "/healthz") == (200, "ok")
        status, text = _get(port, "/readyz")
        assert status == 503 and "API server" in text
        assert time.monotonic() - started < settings.stuck_call_seconds

        # A call that outlives stuck_call_seconds means a wedged agent: restart it.
        time.sleep(max(0.0, started + settings.stuck_call_seconds + 0.5 - time.monotonic()))
        status, text = _get(port, "/healthz")
        assert status == 503 and "the agent is stuck" in text, text
        status, text = _get(port, "/readyz")
        assert status == 503 and "API server not reachable" in text
        _, metrics = _get(port, "/metrics")
        assert "dra_api_reachable 0.0" in metrics

        for thread in callers:
            thread.join(60)
        assert len(results) == len(callers)
        errors = [r.error for result in results for r in result.values()]
        assert all("cannot read ResourceClaim" in e for e in errors), errors
        assert _get(port, "/healthz") == (200, "ok")
    finally:
        agent.stop()
