"""Prepare within the kubelet's deadline against the real API server, stopped and dead.

With the API server stopped (SIGSTOP, resumed with SIGCONT) or killed, a NodePrepareResources
call with three new claims answers before its deadline with an error for each claim (the
kubelet retries), while a call the checkpoint answers returns at once however many calls wait
for the API server, and an unprepare never waits for it. With the API server slowed down by a
proxy that holds every request, the claims of one call are read at the same time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from dra_core import (
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    Inventory,
    PreparedDevice,
    hookimpl,
)
from dra_core.kube.client import load_client
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc
from dra_core.manifests import device_class_manifests
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

DRIVER = "deadline.dra-core.dev"
#: The deadline of the slow calls here; the kubelet's is 45 s.
SLOW_CALL_SECONDS = 8.0


class RecordingBackend:
    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.lock = threading.Lock()

    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "dra-core.dev", "deadline")

    @hookimpl
    def dra_discover(self, context):
        return Inventory(devices=tuple(Device(f"dev-{i}") for i in range(8)))

    @hookimpl
    def dra_device_classes(self, identity):
        return [DeviceClassSpec(DRIVER, (f'device.driver == "{identity.driver_name}"',))]

    @hookimpl
    def dra_prepare(self, claim):
        with self.lock:
            self.prepared.append(claim.ref.uid)
        return [PreparedDevice(d, ContainerEdits(env={"DEADLINE": "1"})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim):
        return True


class HoldingProxy:
    """Forwards TCP to the API server, holding every chunk a client sends for ``delay``
    seconds; ``peak`` is the most chunks held at once (requests in flight together)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._held = 0
        self.peak = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self._held

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, hold: bool) -> None:
        try:
            while data := source.recv(65536):
                if hold:
                    with self._lock:
                        self._held += 1
                        self.peak = max(self.peak, self._held)
                    time.sleep(self.delay)
                    with self._lock:
                        self._held -= 1
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dra-deadline-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device_class(kube_api) -> Iterator[None]:
    hooks = from_objects("deadline", RecordingBackend())
    (body,) = device_class_manifests(hooks.device_classes(hooks.backend_identity()))
    helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
    yield
    helpers.delete_device_class(kube_api, DRIVER)


def settings(root: Path, node: str, *, publish: bool = True) -> AgentSettings:
    (root / "boot_id").write_text("boot-1\n")
    return AgentSettings.below(
        root, node, poll_interval=0.5, boot_id_file=root / "boot_id", publish=publish
    )


@contextlib.contextmanager
def running_agent(kube_api, root: Path, node: str, kubeconfig: Path) -> Iterator[Agent]:
    """An agent for ``node`` whose ResourceSlices are published through ``kube_api``; with
    ``kube_api`` None, an agent that publishes nothing."""
    publish = kube_api is not None
    if publish:
        create_ready_node(helpers.requester(kube_api), node)
    agent = Agent(
        settings(root, node, publish=publish),
        from_objects("deadline", RecordingBackend()),
        client=load_client(str(kubeconfig)),
    )
    agent.start()
    try:
        if publish:
            helpers.wait_for(
                lambda: helpers.get(
                    kube_api,
                    f"{helpers.RESOURCE_API}/resourceslices",
                    query={"fieldSelector": f"spec.nodeName={node}"},
                )["items"],
                30,
                "the agent's ResourceSlices",
            )
        yield agent
    finally:
        agent.stop()
        if publish:
            helpers.delete_node(kube_api, node)


def scheduled_claim(api, namespace: str, node: str, name: str) -> ClaimRef:
    """A claim the scheduler allocated for a pod pinned to ``node``."""
    claim = helpers.create_resource_claim(api, namespace, helpers.resource_claim_body(name, DRIVER))
    pod = helpers.pod_body(f"pod-{name}", [{"name": "dev", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    helpers.create_pod(api, namespace, pod)
    helpers.wait_for_claim_allocated(api, namespace, name)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def written_claim(api, namespace: str, node: str, name: str, device: str) -> ClaimRef:
    """A claim whose allocation is written directly (an API server without a scheduler)."""
    claim = helpers.create_resource_claim(api, namespace, helpers.resource_claim_body(name, DRIVER))
    result = {"request": "req", "driver": DRIVER, "pool": node, "device": device}
    claim["status"] = {"allocation": {"devices": {"results": [result]}}}
    path = f"{helpers.RESOURCE_API}/namespaces/{namespace}/resourceclaims/{name}/status"
    helpers.request(api, "PUT", path, claim)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def request_of(claims: list[ClaimRef]) -> dra_v1_pb2.NodePrepareResourcesRequest:
    return dra_v1_pb2.NodePrepareResourcesRequest(
        claims=[dra_v1_pb2.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
    )


class Call:
    """A NodePrepareResources call in the background."""

    def __init__(self, socket_path: Path, claims: list[ClaimRef], timeout: float) -> None:
        self.claims = claims
        self.timeout = timeout
        self.response: dra_v1_pb2.NodePrepareResourcesResponse | None = None
        self.error: grpc.RpcError | None = None
        self.seconds = 0.0
        self.ended_at = 0.0
        self._socket = socket_path
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        with grpc.insecure_channel(f"unix://{self._socket}") as channel:
            stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
            try:
                self.response = stub.NodePrepareResources(
                    request_of(self.claims), timeout=self.timeout
                )
            except grpc.RpcError as exc:
                self.error = exc
        self.ended_at = time.monotonic()
        self.seconds = self.ended_at - started

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def errors(self) -> dict[str, str]:
        self._thread.join(self.timeout + 15)
        assert self.error is None, f"the call failed instead of answering: {self.error}"
        assert self.response is not None
        assert set(self.response.claims) == {c.uid for c in self.claims}
        return {uid: entry.error for uid, entry in self.response.claims.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, the seconds it took and when it ended."""
    started = time.monotonic()
    result = fn()
    ended = time.monotonic()
    return result, ended - started, ended


def assert_answered_in_time(call: Call, *, because: str = "") -> None:
    errors = call.errors()
    assert call.seconds < call.timeout, f"answered after {call.seconds:.1f} s"
    for claim in call.claims:
        error = errors[claim.uid]
        assert f"cannot read ResourceClaim {claim.namespace}/{claim.name}" in error, error
        assert "the API server did not answer in time" in error
        assert "the kubelet will retry" in error
        assert because in error, error


def waiting_calls(agent: Agent, three: list[ClaimRef]) -> tuple[Call, list[Call]]:
    """The call with three new claims, and ten more one-claim calls: more calls waiting for
    the API server than reads in flight and than the gRPC workers there used to be (8)."""
    assert agent.plugin is not None
    dra = agent.plugin.dra_socket
    main = Call(dra, three, SLOW_CALL_SECONDS)
    others = [
        Call(dra, [ClaimRef("default", f"other-{i}", str(uuid.uuid4()))], SLOW_CALL_SECONDS)
        for i in range(10)
    ]
    return main, others


def checkpoint_answers_at_once(
    kubelet: FakeKubelet, ready: ClaimRef, first: Any, slow: list[Call]
) -> float:
    """Prepare ``ready`` (answered from the checkpoint) and unprepare an unknown claim while
    the ``slow`` calls wait; both must be quick and end before any slow call does."""
    result, prepared_in, prepared_at = timed(lambda: kubelet.prepare([ready])[ready.uid])
    gone = ClaimRef("default", "gone", str(uuid.uuid4()))
    errors, unprepared_in, unprepared_at = timed(lambda: kubelet.unprepare([gone]))
    assert result == first
    assert errors == {gone.uid: ""}
    for call in slow:
        call.errors()
    assert prepared_at < min(c.ended_at for c in slow), "answered while the others waited"
    assert unprepared_at < min(c.ended_at for c in slow)
    # Milliseconds on an idle machine; a second is far below the slow calls' eight.
    assert prepared_in < 1.0, f"the checkpoint's answer took {prepared_in:.3f} s"
    assert unprepared_in < 1.0, f"the unprepare took {unprepared_in:.3f} s"
    return float(prepared_in)


def test_stopped_api_server(control_plane, kube_api, namespace, device_class, root):
    node = "deadline-stopped"
    with running_agent(kube_api, root, node, control_plane.kubeconfig_path) as agent:
        assert agent.plugin is not None
        ready = scheduled_claim(kube_api, namespace, node, "ready")
        three = [scheduled_claim(kube_api, namespace, node, f"new-{i}") for i in range(3)]
        with FakeKubelet(agent.plugin.registration_socket) as kubelet:
            kubelet.register()
            first = kubelet.prepare([ready])[ready.uid]
            assert first.error == ""

            apiserver = control_plane.components["kube-apiserver"].proc
            os.kill(apiserver.pid, signal.SIGSTOP)
            try:
                main, others = waiting_calls(agent, three)
                time.sleep(0.5)
                assert not main.done
                checkpoint_answers_at_once(kubelet, ready, first, [main, *others])
                assert_answered_in_time(main)
            finally:
                os.kill(apiserver.pid, signal.SIGCONT)

            # The kubelet retries once the API server is back, and the claims are prepared.
            def prepared() -> bool:
                results = kubelet.prepare(three)
                return all(not r.error and r.devices for r in results.values())

            helpers.wait_for(prepared, 60, "the claims prepared once the API server is back")
            assert kubelet.unprepare([ready, *three]) == dict.fromkeys(
                [c.uid for c in (ready, *three)], ""
            )


def test_claims_of_a_call_are_read_at_the_same_time(
    control_plane, kube_api, namespace, device_class, root
):
    node = "deadline-parallel"
    server = urlsplit(control_plane.server)
    proxy = HoldingProxy((server.hostname, server.port), delay=0.4)
    try:
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(
            control_plane.kubeconfig_path.read_text().replace(
                control_plane.server, f"https://127.0.0.1:{proxy.port}"
            )
        )
        with running_agent(kube_api, root, node, kubeconfig) as agent:
            assert agent.plugin is not None
            claims = [scheduled_claim(kube_api, namespace, node, f"par-{i}") for i in range(4)]
            with FakeKubelet(agent.plugin.registration_socket) as kubelet:
                kubelet.register()
                time.sleep(1.0)  # the agent at rest: nothing else goes through the proxy
                proxy.reset_peak()
                results = kubelet.prepare(claims)
                peak = proxy.peak
                assert all(r.error == "" and r.devices for r in results.values()), results
                kubelet.unprepare(claims)
        # One after another, a single request would be held at a time.
        assert peak >= 3, f"at most {peak} requests were in flight together"
    finally:
        proxy.close()


def test_dead_api_server(control_plane, root):
    """A dedicated API server (the shared one keeps serving the other tests), killed."""
    node = "deadline-dead"
    dedicated = ControlPlane(
        binaries=control_plane.binaries, scheduler=False, controller_manager=False
    )
    dedicated.start()
    try:
        api = dedicated.api_client()
        namespace = helpers.create_namespace(api, "deadline")
        ready = written_claim(api, namespace, node, "ready", "dev-0")
        three = [written_claim(api, namespace, node, f"new-{i}", f"dev-{i + 1}") for i in range(3)]
        api.close()
        with (
            running_agent(None, root, node, dedicated.kubeconfig_path) as agent,
            FakeKubelet(agent.plugin.registration_socket) as kubelet,
        ):
            kubelet.register()
            first = kubelet.prepare([ready])[ready.uid]
            assert first.error == ""

            apiserver = dedicated.components["kube-apiserver"].proc
            apiserver.kill()
            apiserver.wait(10)

            main, others = waiting_calls(agent, three)
            time.sleep(0.2)
            assert not main.done
            checkpoint_answers_at_once(kubelet, ready, first, [main, *others])
            # A dead server refuses connections: three attempts, then the error.
            assert_answered_in_time(main, because="Connection refused")
            assert kubelet.unprepare([ready]) == {ready.uid: ""}
    finally:
        dedicated.stop()
