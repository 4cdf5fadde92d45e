"""NodePrepareResources within the kubelet's deadline, over the real DRA socket, with an API
server on a real socket that accepts connections and never answers (or refuses them).

The claim service reads the claims of a call in parallel, at most 8 at once for the agent,
every request and retry ending by the call's deadline; a claim not read by then gets an error
that says so. Calls the checkpoint answers and unprepares do not wait behind those reads, and
the calls that may wait for the API server at once are bounded so they never take every gRPC
worker. Time bounds are loose on purpose: the machine may be loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dra_core import BackendIdentity, ContainerEdits, Device, Inventory, PreparedDevice, hookimpl
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint, ClaimRecord
from dra_core.hookspecs import NodeContext
from dra_core.kube.client import ApiError, load_client
from dra_core.kube.retry import Backoff, call_with_retries
from dra_core.kubelet import KubeletPlugin, KubeletPluginSettings
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc
from dra_core.kubelet.servicer import answer_by
from dra_core.model import AllocatedDevice, ClaimRef, PreparedClaim
from dra_core.node.lock import DriverLock
from dra_core.node.service import CALLS_WAITING_FOR_API, CLAIM_READS_IN_FLIGHT, ClaimService
from dra_core.plugins import from_objects
from dra_core.testing.kubelet import FakeKubelet

from .conftest import DRIVER, PluginFactory, TableNodeService

NODE = "node-1"
BOOT = "boot-1"


class SilentApiServer:
    """Listens on a real TCP socket, accepts every connection and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(connection)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for connection in self._connections:
                connection.close()


class Backend:
    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "deadline")

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        raise AssertionError("an API server that never answers hands out no claim")

    @hookimpl
    def dra_unprepare(self, claim: Any) -> bool:
        return True


def kubeconfig(root: Path, port: int) -> Path:
    path = root / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Node:
    """A claim service on real files behind a kubelet plugin on real sockets."""

    def __init__(self, root: Path, api_port: int, **service_options: Any) -> None:
        checkpoint = Checkpoint.open(root / "plugin" / "checkpoint.json", boot_id=BOOT)
        # A claim prepared earlier: the checkpoint answers it without the API server.
        self.ready = ClaimRef("default", "ready", str(uuid.uuid4()))
        allocation = AllocatedDevice(request="dev", pool=NODE, device="dev-0")
        device = PreparedDevice(allocation, ContainerEdits(env={"READY": "1"}))
        checkpoint.put(ClaimRecord(PreparedClaim(self.ready, (device,)), "completed", BOOT, DRIVER))
        self.service = ClaimService(
            hooks=from_objects("deadline", Backend()),
            context=NodeContext(node_name=NODE, driver_name=DRIVER),
            client=load_client(str(kubeconfig(root, api_port)), timeout=10.0),
            checkpoint=checkpoint,
            cdi=CdiSpecs(root / "cdi", Backend().dra_backend_identity()),
            lock=DriverLock(root / "plugin" / "serialize.lock"),
            inventory=lambda: Inventory(devices=(Device("dev-0"),)),
            pools={NODE},
            boot_id=BOOT,
            **service_options,
        )
        self.root = root
        self.plugin: KubeletPlugin | None = None

    def start(self, max_workers: int | None = None) -> None:
        """Serve the kubelet, with the default gRPC workers unless ``max_workers`` is given."""
        settings = KubeletPluginSettings(
            driver_name=DRIVER,
            registration_dir=self.root / "registry",
            plugin_dir=self.root / "plugins",
        )
        if max_workers is not None:
            settings = dataclasses.replace(settings, max_workers=max_workers)
        self.plugin = KubeletPlugin(settings, self.service)
        self.plugin.start()

    def stop(self) -> None:
        if self.plugin is not None:
            self.plugin.stop(grace=0)


@pytest.fixture
def silent_api() -> Iterator[SilentApiServer]:
    server = SilentApiServer()
    yield server
    server.close()


@pytest.fixture
def node_factory(sockdir: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(api_port: int, max_workers: int | None = None, **service_options: Any) -> Node:
        node = Node(sockdir / f"n{len(nodes)}", api_port, **service_options)
        node.start(max_workers)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@contextlib.contextmanager
def dra(node: Node) -> Iterator[dra_v1_pb2_grpc.DRAPluginStub]:
    assert node.plugin is not None
    with grpc.insecure_channel(f"unix://{node.plugin.dra_socket}") as channel:
        yield dra_v1_pb2_grpc.DRAPluginStub(channel)


def new_claims(count: int, prefix: str = "new") -> list[ClaimRef]:
    return [ClaimRef("default", f"{prefix}-{i}", str(uuid.uuid4())) for i in range(count)]


def prepare_request(claims: list[ClaimRef]) -> dra_v1_pb2.NodePrepareResourcesRequest:
    return dra_v1_pb2.NodePrepareResourcesRequest(
        claims=[dra_v1_pb2.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
    )


class Call:
    """A NodePrepareResources call in the background: its answer (or RPC error) and duration."""

    def __init__(
        self, stub: dra_v1_pb2_grpc.DRAPluginStub, claims: list[ClaimRef], timeout: float
    ) -> None:
        self.claims = claims
        self.timeout = timeout
        self.response: dra_v1_pb2.NodePrepareResourcesResponse | None = None
        self.error: grpc.RpcError | None = None
        self.seconds = 0.0
        self._stub = stub
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.response = self._stub.NodePrepareResources(
                prepare_request(self.claims), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            self.error = exc
        self.seconds = time.monotonic() - started

    def errors(self) -> dict[str, str]:
        self._thread.join(self.timeout + 10)
        assert self.error is None, f"the call failed instead of answering: {self.error}"
        assert self.response is not None
        assert set(self.response.claims) == {c.uid for c in self.claims}
        return {uid: entry.error for uid, entry in self.response.claims.items()}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_late(claims: list[ClaimRef], errors: dict[str, str]) -> None:
    for claim in claims:
        error = errors[claim.uid]
        assert f"prepare of claim {claim} failed" in error
        assert f"cannot read ResourceClaim {claim.namespace}/{claim.name}" in error
        assert "the API server did not answer in time" in error
        assert "the kubelet will retry" in error


def test_new_claims_are_read_in_parallel_and_answered_before_the_deadline(
    node_factory: Callable[..., Node], silent_api: SilentApiServer
) -> None:
    node = node_factory(silent_api.port)
    claims = new_claims(3)
    with dra(node) as stub:
        call = Call(stub, claims, timeout=4.0)
        # All three reads are sent at once; one after another, the first would take the
        # whole call and the others would never be sent.
        wait_until(lambda: silent_api.accepted >= 3, 2.0, "three reads at once")
        errors = call.errors()
    assert call.seconds < call.timeout
    assert_late(claims, errors)
    # The reads end with the deadline too, so the service learns it a moment later.
    wait_until(lambda: node.service.api_reachable is False, 2.0, "the API found unreachable")


def test_reads_in_flight_are_bounded_and_queued_reads_are_never_sent(
    node_factory: Callable[..., Node], silent_api: SilentApiServer
) -> None:
    node = node_factory(silent_api.port)
    claims = new_claims(CLAIM_READS_IN_FLIGHT + 4)
    with dra(node) as stub:
        call = Call(stub, claims, timeout=3.0)
        wait_until(lambda: silent_api.accepted >= CLAIM_READS_IN_FLIGHT, 2.0, "8 reads")
        errors = call.errors()
    assert_late(claims, errors)
    time.sleep(0.3)  # a read still queued at the deadline would connect now
    assert silent_api.accepted == CLAIM_READS_IN_FLIGHT


def test_a_call_the_checkpoint_answers_does_not_wait_behind_slow_calls(
    node_factory: Callable[..., Node], silent_api: SilentApiServer
) -> None:
    node = node_factory(silent_api.port)
    slow_claims = new_claims(12, "slow")  # more calls than reads in flight (and than 8 workers)
    with dra(node) as stub:
        slow = [Call(stub, [claim], timeout=5.0) for claim in slow_claims]
        wait_until(lambda: silent_api.accepted >= CLAIM_READS_IN_FLIGHT, 2.0, "the slow reads")

        started = time.monotonic()
        ready = stub.NodePrepareResources(prepare_request([node.ready]), timeout=5.0)
        answered = time.monotonic() - started
        unprepared = stub.NodeUnprepareResources(
            dra_v1_pb2.NodeUnprepareResourcesRequest(
                claims=[dra_v1_pb2.Claim(namespace="default", name="gone", uid=str(uuid.uuid4()))]
            ),
            timeout=5.0,
        )
        both_answered = time.monotonic() - started

        assert all(call.response is None and call.error is None for call in slow), "still slow"
        for call in slow:
            assert_late(call.claims, call.errors())
            assert call.seconds < call.timeout
    # Milliseconds unloaded; a second leaves room for a busy machine and is still far below
    # the slow calls' five.
    assert answered < 1.0, f"the checkpoint answered in {answered:.3f} s"
    assert both_answered < 2.0
    entry = ready.claims[node.ready.uid]
    assert entry.error == "" and [d.device_name for d in entry.devices] == ["dev-0"]
    assert [e.error for e in unprepared.claims.values()] == [""]


def test_calls_beyond_the_waiting_limit_fail_at_once_and_leave_workers_free(
    node_factory: Callable[..., Node], silent_api: SilentApiServer
) -> None:
    node = node_factory(silent_api.port, max_workers=4, calls_waiting_for_api=2)
    with dra(node) as stub:
        waiting = [Call(stub, new_claims(1, f"wait{i}"), timeout=4.0) for i in range(2)]
        wait_until(lambda: silent_api.accepted >= 2, 2.0, "two calls waiting")

        started = time.monotonic()
        refused = Call(stub, new_claims(1, "third"), timeout=4.0)
        errors = refused.errors()
        assert refused.seconds < 1.0, f"refused after {refused.seconds:.3f} s"
        (error,) = errors.values()
        assert "2 kubelet calls already wait for it; the kubelet will retry" in error
        assert "cannot read ResourceClaim default/third-0" in error
        # Two workers wait for the API server, two are free for the checkpoint.
        ready = stub.NodePrepareResources(prepare_request([node.ready]), timeout=5.0)
        assert time.monotonic() - started < 2.0
        assert ready.claims[node.ready.uid].error == ""
        assert all(call.response is None for call in waiting), "still waiting"
        for call in waiting:
            assert_late(call.claims, call.errors())
    assert silent_api.accepted == 2, "the refused call sent nothing"


def test_a_dead_api_server_fails_the_claims_quickly(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(free_port())  # nothing listens there: connections are refused
    claims = new_claims(3)
    with dra(node) as stub:
        call = Call(stub, claims, timeout=20.0)
        errors = call.errors()
    assert_late(claims, errors)
    assert all("Connection refused" in e for e in errors.values())
    # Three attempts, half a second and a second apart, then the answer: not the whole 20 s.
    assert call.seconds < 10.0


def test_the_deadline_handed_to_the_node_service_keeps_a_margin(
    make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    claim = ClaimRef("default", "c", str(uuid.uuid4()))
    with grpc.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        before = time.monotonic()
        stub.NodePrepareResources(prepare_request([claim]), timeout=10.0)
        stub.NodePrepareResources(prepare_request([claim]))
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        kubelet.prepare([claim])  # the kubelet's 45 s
    ten, none, kubelets = service.deadlines
    assert none is None
    assert ten is not None and before + 8.0 < ten < before + 9.0  # 15 % kept for the answer
    # gRPC's deadline may come out a little later on the server than the caller set it.
    assert kubelets is not None and before + 39.0 < kubelets < time.monotonic() + 40.5


def test_answer_by_keeps_a_bounded_share_of_the_time() -> None:
    now = time.monotonic()
    assert answer_by(None) is None
    assert answer_by(2.0**62) is None  # how gRPC reports a call without a deadline
    forty_five = answer_by(45.0)
    assert forty_five is not None and now + 39.9 < forty_five < now + 41.0
    two = answer_by(2.0)
    assert two is not None and now + 1.7 < two < now + 1.8
    tiny = answer_by(0.1)
    assert tiny is not None and tiny < time.monotonic()  # nothing left: answer at once


def test_waiting_calls_stay_below_the_grpc_workers() -> None:
    workers = KubeletPluginSettings(driver_name=DRIVER).max_workers
    free = workers - CALLS_WAITING_FOR_API
    assert free >= 8, "workers must stay free for calls the checkpoint answers and unprepares"


def test_retries_stop_before_the_deadline() -> None:
    calls: list[float] = []
    slept: list[float] = []

    def unavailable() -> None:
        calls.append(time.monotonic())
        raise ApiError("GET", "/x", 503, "unavailable", retry_after=None)

    deadline = time.monotonic() + 1.2
    with pytest.raises(ApiError):
        call_with_retries(
            unavailable,
            what="get x",
            backoff=Backoff(delays=(0.5, 1.0)),
            sleep=lambda s: (slept.append(s), time.sleep(s)),
            deadline=deadline,
        )
    # 0.5 s fits before the deadline, the next 1.0 s would not: two calls, one wait.
    assert slept == [0.5] and len(calls) == 2
    assert time.monotonic() < deadline
