"""Prepare and unprepare answer by the kubelet's deadline while they wait for a turn under the
client's rate limit or for the driver lock, over the real DRA socket.

The API server is a small HTTP server on a real socket that serves ResourceClaims; the lock is
held by a real second process through the same ``flock``, as a second agent instance would
during a rolling update. Time bounds are loose on purpose: the machine may be loaded.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from dra_core import Device, Inventory
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import claim_path
from dra_core.kube.client import load_client
from dra_core.kube.ratelimit import RateLimitTimeout, TokenBucket
from dra_core.kubelet import KubeletPlugin, KubeletPluginSettings
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc
from dra_core.model import ClaimRef
from dra_core.node.lock import DriverLock, DriverLockBusy
from dra_core.node.service import ClaimService
from dra_core.plugins import from_objects
from tests.node.claimservice import Backend

from .conftest import DRIVER, PluginFactory, TableNodeService

NODE = "node-1"
BOOT = "boot-1"
#: The gRPC timeout of the calls that must not wait: the answer is due 0.3 s before it.
CALL_SECONDS = 2.0

HOLDER = """
import sys
from pathlib import Path
from dra_core.node.lock import DriverLock
with DriverLock(Path(sys.argv[1])).held(purpose=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


class ClaimApiServer:
    """Serves allocated ResourceClaims on a real socket; counts the requests."""

    def __init__(self) -> None:
        self.claims: dict[str, dict[str, Any]] = {}
        self.requests = 0
        claims, outer = self.claims, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                claim = claims.get(self.path.split("?")[0])
                body = json.dumps(claim if claim is not None else {"kind": "Status"}).encode()
                self.send_response(200 if claim is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str) -> ClaimRef:
        ref = ClaimRef("default", name, str(uuid.uuid4()))
        result = {"request": "dev", "driver": DRIVER, "pool": NODE, "device": "dev-0"}
        self.claims[claim_path(ref)] = {
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
            "status": {"allocation": {"devices": {"results": [result]}}},
        }
        return ref

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Node:
    """A claim service on real files and a real API client behind a kubelet plugin."""

    def __init__(self, root: Path, api: ClaimApiServer, *, qps: float, burst: int) -> None:
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{api.port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
        )
        self.backend = Backend(DRIVER, "waits")
        self.lock_path = root / "plugin" / "serialize.lock"
        self.service = ClaimService(
            hooks=from_objects("waits", self.backend),
            context=NodeContext(node_name=NODE, driver_name=DRIVER),
            client=load_client(str(kubeconfig), timeout=5.0, qps=qps, burst=burst),
            checkpoint=Checkpoint.open(root / "plugin" / "checkpoint.json", boot_id=BOOT),
            cdi=CdiSpecs(root / "cdi", self.backend.dra_backend_identity()),
            lock=DriverLock(self.lock_path),
            inventory=lambda: Inventory(devices=(Device("dev-0"),)),
            pools={NODE},
            boot_id=BOOT,
        )
        settings = KubeletPluginSettings(
            driver_name=DRIVER, registration_dir=root / "registry", plugin_dir=root / "plugins"
        )
        self.plugin = KubeletPlugin(settings, self.service)
        self.plugin.start()
        self._channel = grpc.insecure_channel(f"unix://{self.plugin.dra_socket}")
        self.stub = dra_v1_pb2_grpc.DRAPluginStub(self._channel)

    def prepare(self, ref: ClaimRef, timeout: float = CALL_SECONDS) -> tuple[str, float]:
        """The claim's error ("" when prepared) and the seconds the call took."""
        request = dra_v1_pb2.NodePrepareResourcesRequest(claims=[_claim(ref)])
        started = time.monotonic()
        response = self.stub.NodePrepareResources(request, timeout=timeout)
        return response.claims[ref.uid].error, time.monotonic() - started

    def unprepare(self, ref: ClaimRef, timeout: float = CALL_SECONDS) -> tuple[str, float]:
        request = dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[_claim(ref)])
        started = time.monotonic()
        response = self.stub.NodeUnprepareResources(request, timeout=timeout)
        return response.claims[ref.uid].error, time.monotonic() - started

    def stop(self) -> None:
        self._channel.close()
        self.plugin.stop(grace=0)


def _claim(ref: ClaimRef) -> dra_v1_pb2.Claim:
    return dra_v1_pb2.Claim(namespace=ref.namespace, name=ref.name, uid=ref.uid)


@pytest.fixture
def api() -> Iterator[ClaimApiServer]:
    server = ClaimApiServer()
    yield server
    server.close()


@contextlib.contextmanager
def node(sockdir: Path, api: ClaimApiServer, *, qps: float = 0, burst: int = 0) -> Iterator[Node]:
    started = Node(sockdir, api, qps=qps, burst=burst)
    try:
        yield started
    finally:
        started.stop()


@contextlib.contextmanager
def lock_held_by_another_process(path: Path, purpose: str) -> Iterator[subprocess.Popen[str]]:
    """The driver lock held by a second process until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), purpose],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        try:
            yield holder
        finally:
            holder.stdin.close()  # the holder leaves its `with` block and exits
            holder.wait(10)


def test_a_read_whose_rate_limit_turn_comes_too_late_answers_by_the_deadline(
    sockdir: Path, api: ClaimApiServer
) -> None:
    first, second = api.add("first"), api.add("second")
    # One request at once, then one every 100 s: the second read's turn is far past the call.
    with node(sockdir, api, qps=0.01, burst=1) as agent:
        assert agent.prepare(first)[0] == ""
        error, seconds = agent.prepare(second)
        sent = api.requests
    assert seconds < CALL_SECONDS, "the call must be answered, not run into its deadline"
    assert "cannot read ResourceClaim default/second: the agent's rate limit" in error
    assert "--kube-api-qps" in error and "the kubelet will retry" in error
    assert sent == 1, "a request whose turn comes too late is not sent"
    assert agent.backend.prepared == [first.uid]


def test_a_turn_that_comes_too_late_takes_no_token() -> None:
    bucket = TokenBucket(qps=2.0, burst=1)
    assert bucket.reserve() == 0.0
    with pytest.raises(RateLimitTimeout, match=r"its turn would come in 0\.5 s, 0\.1 s were left"):
        bucket.reserve(deadline=time.monotonic() + 0.1)
    # The refused request left the queue as it was: the next one waits one turn, not two.
    assert bucket.reserve() <= 0.5


def test_prepare_answers_by_the_deadline_while_another_process_holds_the_lock(
    sockdir: Path, api: ClaimApiServer
) -> None:
    ref = api.add("c")
    with node(sockdir, api) as agent:
        purpose = "unprepare of claim default/old (1234)"
        with lock_held_by_another_process(agent.lock_path, purpose) as holder:
            error, seconds = agent.prepare(ref)
        assert seconds < CALL_SECONDS, "the call must be answered, not run into its deadline"
        assert "another prepare or unprepare of this driver holds the driver lock" in error
        assert f"another agent instance, pid {holder.pid}: {purpose}" in error
        assert "the kubelet will retry" in error
        assert agent.backend.prepared == []
        # Released: the kubelet's next call prepares the claim.
        assert agent.prepare(ref)[0] == ""
        assert agent.backend.prepared == [ref.uid]


def test_unprepare_answers_by_the_deadline_while_another_process_holds_the_lock(
    sockdir: Path, api: ClaimApiServer
) -> None:
    ref = api.add("c")
    with node(sockdir, api) as agent:
        assert agent.prepare(ref)[0] == ""
        with lock_held_by_another_process(agent.lock_path, "prepare of claim default/x (5678)"):
            error, seconds = agent.unprepare(ref)
        assert seconds < CALL_SECONDS
        assert "holds the driver lock" in error and "prepare of claim default/x (5678)" in error
        assert "the claim stays prepared and the kubelet will retry" in error
        assert agent.backend.unprepared == []
        assert agent.unprepare(ref)[0] == ""
        assert agent.backend.unprepared == [ref.uid]


def test_a_call_of_this_agent_holding_the_lock_is_named(tmp_path: Path) -> None:
    lock = DriverLock(tmp_path / "serialize.lock")
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock.held(purpose="prepare of claim default/a (1)"):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        started = time.monotonic()
        busy = pytest.raises(DriverLockBusy, match=r"\(prepare of claim default/a \(1\) in this")
        with busy, lock.held(deadline=started + 0.2):
            pass
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        holder.join(10)
    with lock.held(deadline=time.monotonic()):  # free again: taken even with no time left
        pass


def test_unprepare_is_handed_the_deadline_less_a_margin(
    make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    ref = ClaimRef("default", "c", str(uuid.uuid4()))
    request = dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[_claim(ref)])
    with grpc.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
        before = time.monotonic()
        dra_v1_pb2_grpc.DRAPluginStub(channel).NodeUnprepareResources(request, timeout=10.0)
    [deadline] = service.unprepare_deadlines
    assert deadline is not None and before + 8.0 < deadline < before + 9.0
