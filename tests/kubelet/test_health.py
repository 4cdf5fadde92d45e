"""HealthBoard semantics and the NodeWatchResources stream, v1 and v1alpha1, over a real
socket."""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from dra_core.kubelet import DeviceHealthState, HealthBoard, KubeletPlugin
from dra_core.kubelet.health import HealthServicer, HealthV1alpha1Servicer
from dra_core.kubelet.proto import (
    health_v1_pb2,
    health_v1_pb2_grpc,
    health_v1alpha1_pb2,
    health_v1alpha1_pb2_grpc,
)
from dra_core.kubelet.registration import HEALTH_SERVICES
from dra_core.testing.kubelet import FakeKubelet

from .conftest import PluginFactory

GPU0 = DeviceHealthState("node-1", "gpu-0", True)
GPU1 = DeviceHealthState("node-1", "gpu-1", None)


def test_board_version_changes_only_with_content() -> None:
    board = HealthBoard([GPU0])
    start = board.version
    board.set([GPU0])
    assert board.version == start
    board.set([GPU0, GPU1])
    assert board.version == start + 1
    assert board.snapshot() == [GPU0, GPU1]


def test_board_wait_changed() -> None:
    board = HealthBoard()
    version = board.version
    t0 = time.monotonic()
    assert board.wait_changed(version, 0.05) == version
    assert time.monotonic() - t0 >= 0.04
    assert board.wait_changed(-1, 5) == version  # differs already: no wait
    timer = threading.Timer(0.05, board.set, args=([GPU0],))
    timer.start()
    assert board.wait_changed(version, 5) == version + 1
    timer.join()


def test_stream_sends_initial_state_and_changes(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0, GPU1])
    plugin = make_plugin(health=board)
    unhealthy = DeviceHealthState("node-1", "gpu-0", False, "driver unbound" + "!" * 2000)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        stream = kubelet.watch_health(timeout=10)
        first = next(stream)
        board.set([unhealthy, GPU1])
        second = next(stream)
        stream.close()
    assert [(d.device, d.healthy) for d in first] == [("gpu-0", True), ("gpu-1", None)]
    assert all(d.timeout_seconds == 30 and d.pool == "node-1" for d in first)
    assert [(d.device, d.healthy) for d in second] == [("gpu-0", False), ("gpu-1", None)]
    assert second[0].message.startswith("driver unbound")
    assert len(second[0].message) == 1024


@pytest.mark.parametrize("api", ["v1", "v1alpha1"])
def test_fake_kubelet_reads_either_version(make_plugin: PluginFactory, api: str) -> None:
    board = HealthBoard([GPU0, GPU1])
    plugin = make_plugin(health=board)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        assert kubelet.health_version() == "v1", "the kubelet's choice when both are advertised"
        (message,) = kubelet.read_health(1, timeout=5, api=api)  # type: ignore[arg-type]
    assert [(d.device, d.healthy) for d in message] == [("gpu-0", True), ("gpu-1", None)]


def test_stream_resends_unchanged_state(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0])
    plugin = make_plugin(health=board, health_resend_interval=0.1)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        t0 = time.monotonic()
        messages = kubelet.read_health(3, timeout=5)
    assert time.monotonic() - t0 < 2
    assert all(m == messages[0] for m in messages)


def test_stream_ends_when_the_plugin_stops(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0])
    plugin = make_plugin(health=board)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        stream = kubelet.watch_health(timeout=10)
        next(stream)
        t0 = time.monotonic()
        plugin.stop(grace=1)
        rest = list(stream_until_end(stream))
    assert time.monotonic() - t0 < 3
    assert len(rest) <= 1


def stream_until_end(stream):  # type: ignore[no-untyped-def]
    import grpc

    try:
        yield from stream
    except grpc.RpcError:
        return


#: The generated message and gRPC modules of each health API version.
HEALTH_APIS: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1": (health_v1_pb2, health_v1_pb2_grpc),
    "v1alpha1": (health_v1alpha1_pb2, health_v1alpha1_pb2_grpc),
}
Device = tuple[str, str, str, str, int]  # pool, device, health name, message, timeout


class HealthClient:
    """A NodeWatchResources stream of one API version, read with that version's stub."""

    def __init__(self, plugin: KubeletPlugin, api: str, timeout: float = 10.0) -> None:
        self.messages, grpc_module = HEALTH_APIS[api]
        self.channel = grpc.insecure_channel(f"unix://{plugin.dra_socket}")
        stub = grpc_module.DRAResourceHealthStub(self.channel)
        self.call: Any = stub.NodeWatchResources(
            self.messages.NodeWatchResourcesRequest(), timeout=timeout
        )

    def __enter__(self) -> HealthClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.call.cancel()
        self.channel.close()

    def next(self) -> list[Device]:
        response = next(self.call)
        assert type(response) is self.messages.NodeWatchResourcesResponse
        return [
            (
                d.device.pool_name,
                d.device.device_name,
                self.messages.HealthStatus.Name(d.health),
                d.message,
                d.health_check_timeout_seconds,
            )
            for d in response.devices
        ]

    def until(self, predicate: Any, limit: int = 20) -> list[Device]:
        for _ in range(limit):
            message = self.next()
            if predicate(message):
                return message
        msg = f"no matching message among {limit}"
        raise AssertionError(msg)


def _fields(descriptor: Descriptor) -> list[tuple[str, int, int, str]]:
    return [
        (f.name, f.number, f.type, f.message_type.name if f.message_type else "")
        for f in descriptor.fields
    ]


def _values(descriptor: EnumDescriptor) -> list[tuple[str, int]]:
    return [(v.name, v.number) for v in descriptor.values]


def test_v1_wire_facts_match_v1alpha1() -> None:
    """v1 is package ``v1`` with v1alpha1's messages, field for field."""
    v1, alpha = health_v1_pb2.DESCRIPTOR, health_v1alpha1_pb2.DESCRIPTOR
    assert (v1.package, alpha.package) == ("v1", "v1alpha1")
    service = v1.services_by_name["DRAResourceHealth"]
    assert service.full_name == "v1.DRAResourceHealth"
    method = service.methods_by_name["NodeWatchResources"]
    assert method.server_streaming and not method.client_streaming
    assert method.input_type.full_name == "v1.NodeWatchResourcesRequest"
    assert method.output_type.full_name == "v1.NodeWatchResourcesResponse"
    assert set(v1.message_types_by_name) == set(alpha.message_types_by_name)
    for name, message in v1.message_types_by_name.items():
        assert _fields(message) == _fields(alpha.message_types_by_name[name]), name
    assert _values(v1.enum_types_by_name["HealthStatus"]) == [
        ("UNKNOWN", 0),
        ("HEALTHY", 1),
        ("UNHEALTHY", 2),
    ]
    assert _values(v1.enum_types_by_name["HealthStatus"]) == _values(
        alpha.enum_types_by_name["HealthStatus"]
    )
    device = health_v1_pb2.DeviceHealth.DESCRIPTOR.fields_by_name
    assert [(n, device[n].number) for n in ("health_check_timeout_seconds", "message")] == [
        ("health_check_timeout_seconds", 4),
        ("message", 5),
    ]


def test_advertised_health_services_are_the_served_ones(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0])
    stop = threading.Event()
    served = (
        HealthServicer(board, stop).service_name,
        HealthV1alpha1Servicer(board, stop).service_name,
    )
    assert served == HEALTH_SERVICES == ("v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
    plugin = make_plugin(health=board)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        info = kubelet.get_info()
    assert info.supported_versions == (
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    )


def test_no_health_service_without_a_health_view(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    for api in HEALTH_APIS:
        with HealthClient(plugin, api) as client, pytest.raises(grpc.RpcError) as raised:
            client.next()
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, api


@pytest.mark.parametrize("api", list(HEALTH_APIS))
def test_each_version_streams_changes(make_plugin: PluginFactory, api: str) -> None:
    board = HealthBoard([GPU0, GPU1])
    plugin = make_plugin(health=board)
    with HealthClient(plugin, api) as client:
        first = client.next()
        board.set([DeviceHealthState("node-1", "gpu-0", False, "wedged"), GPU1])
        second = client.until(lambda m: m[0][2] == "UNHEALTHY")
        board.set([GPU0, GPU1])
        third = client.until(lambda m: m[0][2] == "HEALTHY")
    assert first == [
        ("node-1", "gpu-0", "HEALTHY", "", 30),
        ("node-1", "gpu-1", "UNKNOWN", "", 30),
    ]
    assert second == [
        ("node-1", "gpu-0", "UNHEALTHY", "wedged", 30),
        ("node-1", "gpu-1", "UNKNOWN", "", 30),
    ]
    assert third == first


def test_both_versions_serve_one_board_at_once(make_plugin: PluginFactory) -> None:
    """Two kubelet streams, one per version, open together: each sees every change."""
    board = HealthBoard([GPU0])
    plugin = make_plugin(health=board)
    with HealthClient(plugin, "v1") as v1, HealthClient(plugin, "v1alpha1") as alpha:
        assert v1.next() == alpha.next() == [("node-1", "gpu-0", "HEALTHY", "", 30)]
        board.set([DeviceHealthState("node-1", "gpu-0", False, "driver unbound"), GPU1])
        wanted = [
            ("node-1", "gpu-0", "UNHEALTHY", "driver unbound", 30),
            ("node-1", "gpu-1", "UNKNOWN", "", 30),
        ]
        assert v1.until(lambda m: m == wanted) == alpha.until(lambda m: m == wanted)
