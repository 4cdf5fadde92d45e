"""A stuck or hostile backend does not wedge the agent: the real agent, its sockets and HTTP.

The backend's prepare of ``dev-fifo`` reads a real FIFO that nobody writes, as a backend
reading the wrong file would. The kubelet's call fails in bounded time, the driver lock is
free for the next claim, the stuck call shows in ``/metrics``, and ``/healthz`` fails once it
has run longer than ``backend_stuck_seconds``; when the read finally returns, the claim's
partial prepare is rolled back and the agent is healthy again. The fake backend's control
file as a FIFO or ``/dev/zero`` is refused without blocking or reading without end.

The API server is a stub holding allocated claims: the claim reads are not under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dra_backend_fake.plugin
import pytest
from dra_backend_fake import DRIVER_NAME as FAKE_DRIVER
from loguru import logger

from dra_core import (
    AllocatedClaim,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    Inventory,
    PreparedClaim,
    PreparedDevice,
    hookimpl,
)
from dra_core.kube.claims import claim_path
from dra_core.kube.client import KubeClient, load_client
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.kubelet import FakeKubelet

DRIVER = "stuck.dra-core.dev"
NODE = "node-1"


class FifoBackend:
    """Prepares at once, except ``dev-fifo`` while ``blocking``: that prepare reads a FIFO."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.blocking = True
        self.unprepared: list[str] = []

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "stuck")

    @hookimpl
    def dra_discover(self) -> Inventory:
        return Inventory(devices=(Device("dev-0"), Device("dev-fifo")))

    @hookimpl
    def dra_prepare(self, claim: AllocatedClaim) -> list[PreparedDevice]:
        if self.blocking and any(d.device == "dev-fifo" for d in claim.devices):
            self.fifo.read_bytes()  # blocks until someone opens the FIFO for writing
        return [PreparedDevice(d, ContainerEdits(env={"D": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: PreparedClaim) -> bool:
        self.unprepared.append(claim.ref.uid)
        return True


class Claims:
    """An HTTP server answering as the API server does for what the agent asks here: allocated
    claims, ``/version`` and event writes. ``kubeconfig`` points a real client at it."""

    def __init__(self, driver: str, directory: Path) -> None:
        self.driver = driver
        self.objects: dict[str, bytes] = {}
        claims = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/version":
                    self._answer(200, b'{"major": "1", "minor": "37", "gitVersion": "v1.37.2"}')
                elif path in claims.objects:
                    self._answer(200, claims.objects[path])
                else:
                    self._answer(404, b'{"kind": "Status", "code": 404, "reason": "NotFound"}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(201, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.kubeconfig = directory / "kubeconfig"
        self.kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{self.server.server_port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
        )

    def client(self) -> KubeClient:
        return load_client(str(self.kubeconfig), timeout=5.0)

    def add(self, device: str) -> ClaimRef:
        ref = ClaimRef("default", f"claim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        result = {"request": "r", "driver": self.driver, "pool": NODE, "device": device}
        self.objects[claim_path(ref)] = json.dumps(
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
                "status": {"allocation": {"devices": {"results": [result]}}},
            }
        ).encode()
        return ref

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def _metric(text: str, name: str, hook: str) -> float:
    match = re.search(rf'^{name}{{hook="{hook}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _unblock(fifo: Path) -> None:
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when no reader waits
    os.write(fd, b"go\n")
    os.close(fd)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-wd-", dir="/tmp"))  # short: socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(root: Path) -> Iterator[Callable[[str], Claims]]:
    servers: list[Claims] = []

    def start(driver: str) -> Claims:
        servers.append(Claims(driver, root))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _settings(root: Path, port: int, **overrides: Any) -> AgentSettings:
    (root / "boot_id").write_text("boot-1")
    values: dict[str, Any] = {
        "node_name": NODE,
        "registration_dir": root / "registry",
        "plugins_dir": root / "plugins",
        "cdi_dir": root / "cdi",
        "http_host": "127.0.0.1",
        "http_port": port,
        "boot_id_file": root / "boot_id",
        "publish": False,
        "poll_interval": 0.5,
        **overrides,
    }
    return AgentSettings(**values)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO", format="{message}")
    yield messages
    logger.remove(sink)


def test_a_prepare_stuck_in_a_read_fails_in_bounded_time_and_frees_the_agent(root, api):
    fifo = root / "fifo"
    os.mkfifo(fifo)
    backend = FifoBackend(fifo)
    claims = api(DRIVER)
    port = _free_port()
    settings = _settings(root, port, prepare_timeout=1.0, backend_stuck_seconds=3.0)
    agent = Agent(settings, from_objects("stuck", backend), client=claims.client())
    agent.start()
    try:
        _, before = _get(port, "/metrics")
        timeouts_before = _metric(before, "dra_backend_call_timeouts_total", "dra_prepare")
        assert _get(port, "/healthz") == (200, "ok")
        stuck, other = claims.add("dev-fifo"), claims.add("dev-0")
        with FakeKubelet(agent.plugin.registration_socket) as kubelet:
            kubelet.register()

            started = time.monotonic()
            result = kubelet.prepare([stuck])[stuck.uid]
            assert time.monotonic() - started < 5.0
            assert "could not prepare the devices: no answer within 1 s" in result.error
            assert "hook '" not in result.error
            assert f"claim {stuck}" in result.error
            assert "/healthz fails" in result.error

            # The driver lock is free: another claim is prepared at once.
            started = time.monotonic()
            assert not kubelet.prepare([other])[other.uid].error
            assert time.monotonic() - started < 2.0
            # The stuck claim fails at once until its call returns, and stays recorded as
            # started (never as prepared), so that it is rolled back later.
            again = kubelet.prepare([stuck])[stuck.uid]
            assert "not called for claim" in again.error
            assert agent.service is not None
            record = agent.service.checkpoint.get(stuck.uid)
            assert record is not None and record.phase == "started"

            _, text = _get(port, "/metrics")
            assert _metric(text, "dra_backend_calls_stuck", "dra_prepare") == 1.0
            assert _metric(text, "dra_backend_call_timeouts_total", "dra_prepare") == (
                timeouts_before + 1
            )
            assert _get(port, "/healthz") == (200, "ok")  # stuck, not yet for too long

            # Past backend_stuck_seconds the agent asks to be restarted.
            time.sleep(max(0.0, started + settings.backend_stuck_seconds - time.monotonic()))
            _wait_until(lambda: _get(port, "/healthz")[0] == 503)
            _status, text = _get(port, "/healthz")
            assert "hook 'dra_prepare' of plugin 'stuck'" in text and stuck.uid in text, text
            assert "the backend is stuck" in text and "test_watchdog_agent.py" in text

            # The read returns: the late result is discarded and the claim rolled back.
            backend.blocking = False
            _unblock(fifo)
            _wait_until(lambda: agent.service.checkpoint.get(stuck.uid) is None)
            assert stuck.uid in backend.unprepared
            assert _get(port, "/healthz") == (200, "ok")
            _, text = _get(port, "/metrics")
            assert _metric(text, "dra_backend_calls_stuck", "dra_prepare") == 0.0
            assert not kubelet.prepare([stuck])[stuck.uid].error
            assert agent.service.checkpoint.get(stuck.uid).phase == "completed"
    finally:
        backend.blocking = False
        with contextlib.suppress(OSError):
            _unblock(fifo)
        agent.stop()


def _rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_fake_control_file_that_is_not_a_file_is_refused_and_the_agent_serves(
    root, api, logs, kind
):
    control = root / "control.yaml"
    if kind == "fifo":
        os.mkfifo(control)
    else:
        control.symlink_to("/dev/zero")
    claims = api(FAKE_DRIVER)
    port = _free_port()
    settings = _settings(
        root,
        port,
        backend_options={"control_file": str(control), "control_interval": "0.1"},
    )
    rss_before = _rss_kib()
    hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
    agent = Agent(settings, hooks, client=claims.client())
    started = time.monotonic()
    agent.start()
    try:
        assert time.monotonic() - started < 10.0
        ref = claims.add("dev-0")
        with FakeKubelet(agent.plugin.registration_socket) as kubelet:
            kubelet.register()
            assert not kubelet.prepare([ref])[ref.uid].error
        time.sleep(0.5)  # several polls of the control file
        assert _get(port, "/healthz") == (200, "ok")
        what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
        refused = [m for m in logs if f"is {what}, not a regular file" in m]
        assert refused and str(control) in refused[0], logs[-10:]
        assert _rss_kib() - rss_before < 100 * 1024  # nothing read without end

        # A regular file in its place is read again.
        control.unlink()
        control.write_text("unhealthy: {dev-1: broken}\n")
        _wait_until(lambda: 'dra_device_healthy{device="dev-1"} 0.0' in _get(port, "/metrics")[1])
    finally:
        agent.stop()


def test_a_stuck_discovery_keeps_the_inventory_and_does_not_pile_up_threads(root, api):
    fifo = root / "fifo"
    os.mkfifo(fifo)
    block = threading.Event()

    class SlowDiscovery(FifoBackend):
        @hookimpl
        def dra_discover(self) -> Inventory:
            if block.is_set():
                self.fifo.read_bytes()
            return Inventory(devices=(Device("dev-0"), Device("dev-fifo")))

    backend = SlowDiscovery(fifo)
    port = _free_port()
    settings = _settings(root, port, discovery_timeout=0.5, poll_interval=0.2)
    agent = Agent(settings, from_objects("slow", backend), client=api(DRIVER).client())
    agent.start()
    try:
        assert [d.name for d in agent.inventory.devices] == ["dev-0", "dev-fifo"]
        block.set()
        _wait_until(lambda: agent.hooks.watchdog.stuck_calls() != [])
        threads = threading.active_count()
        time.sleep(1.5)  # several discovery rounds while the first is stuck
        assert threading.active_count() <= threads + 1
        assert [d.name for d in agent.inventory.devices] == ["dev-0", "dev-fifo"]
        _, text = _get(port, "/metrics")
        assert _metric(text, "dra_backend_calls_stuck", "dra_discover") == 1.0
        block.clear()
        _unblock(fifo)
        _wait_until(lambda: agent.hooks.watchdog.stuck_calls() == [])
    finally:
        block.clear()
        with contextlib.suppress(OSError):
            _unblock(fifo)
        agent.stop()
