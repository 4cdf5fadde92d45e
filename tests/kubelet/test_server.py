"""KubeletPlugin over real unix sockets, driven by the Python fake kubelet."""

from __future__ import annotations

import socket
import stat
import uuid
from pathlib import Path

import grpc
import pytest

from dra_core.kubelet import KubeletPluginError, RegistrationStatus
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc
from dra_core.testing.kubelet import FakeKubelet

from .conftest import DRIVER, PluginFactory, TableNodeService, claim


def test_registration_handshake(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    assert not plugin.registered.is_set()
    with FakeKubelet(plugin.registration_socket) as kubelet:
        info = kubelet.register()
    assert info.type == "DRAPlugin"
    assert info.name == DRIVER
    assert info.endpoint == str(plugin.dra_socket)
    assert info.supported_versions == ("v1.DRAPlugin", "v1beta1.DRAPlugin")
    assert kubelet.api == "v1"
    assert plugin.registered.wait(2)
    assert plugin.registration_status == RegistrationStatus(registered=True)


def test_registration_rejected_is_recorded(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        assert plugin.registered.wait(2)
        kubelet.register(error="driver name clash")
    assert not plugin.registered.is_set()
    assert plugin.registration_status == RegistrationStatus(False, "driver name clash")


def test_health_is_advertised_when_served(make_plugin: PluginFactory) -> None:
    from dra_core.kubelet import HealthBoard

    plugin = make_plugin(health=HealthBoard())
    with FakeKubelet(plugin.registration_socket) as kubelet:
        info = kubelet.get_info()
    assert info.supported_versions[-1] == "v1alpha1.DRAResourceHealth"


def test_sockets_have_tight_modes(make_plugin: PluginFactory, sockdir: Path) -> None:
    plugin = make_plugin()
    for path in (plugin.registration_socket, plugin.dra_socket):
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plugin.dra_socket.parent.stat().st_mode) == 0o750


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
def test_prepare_and_unprepare(
    make_plugin: PluginFactory, service: TableNodeService, api: str
) -> None:
    plugin = make_plugin()
    first, second = claim("one"), claim("two", namespace="team-a")
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register(api=api)  # type: ignore[arg-type]
        results = kubelet.prepare([first, second])
        assert set(results) == {first.uid, second.uid}
        device = results[first.uid].devices[0]
        assert results[first.uid].error == ""
        assert device.request_names == ("gpu",)
        assert device.pool_name == "node-1"
        assert device.device_name == "gpu-one"
        assert device.cdi_device_ids == (f"example.com/gpu={first.uid}",)
        assert service.prepared[second.uid] == second
        assert kubelet.unprepare([first, second]) == {first.uid: "", second.uid: ""}
    assert service.prepared == {}


@pytest.mark.parametrize(("api", "expected"), [("v1", True), ("v1beta1", False)])
def test_share_id_only_on_v1(make_plugin: PluginFactory, api: str, expected: bool) -> None:
    plugin = make_plugin()
    shared, plain = claim("shared-gpu"), claim("plain")
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register(api=api)  # type: ignore[arg-type]
        results = kubelet.prepare([shared, plain])
    share_id = results[shared.uid].devices[0].share_id
    assert share_id == (f"share-{shared.uid[:8]}" if expected else None)
    assert results[plain.uid].devices[0].share_id is None


def test_share_id_absent_on_the_wire_when_none(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    plain = claim("plain")
    with grpc.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        request = dra_v1_pb2.NodePrepareResourcesRequest(
            claims=[dra_v1_pb2.Claim(namespace=plain.namespace, name=plain.name, uid=plain.uid)]
        )
        response = stub.NodePrepareResources(request, timeout=5)
    assert not response.claims[plain.uid].devices[0].HasField("share_id")


def test_per_claim_errors_and_forgotten_claims(
    make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    good, bad, forgotten = claim("good"), claim("bad"), claim("forgotten")
    service.errors[bad.uid] = "device gpu-3 is unhealthy"
    service.forget.add(forgotten.uid)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        results = kubelet.prepare([good, bad, forgotten])
        unprepared = kubelet.unprepare([good, forgotten])
    assert results[good.uid].error == ""
    assert results[bad.uid].error == "device gpu-3 is unhealthy"
    assert results[bad.uid].devices == ()
    assert "returned no result for claim" in results[forgotten.uid].error
    assert unprepared[good.uid] == ""
    assert "returned no result for claim" in unprepared[forgotten.uid]


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
def test_node_service_exception_fails_every_claim(
    make_plugin: PluginFactory, service: TableNodeService, api: str
) -> None:
    plugin = make_plugin()
    claims = [claim("a"), claim("b")]
    service.fail = OSError("checkpoint directory is read-only")
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register(api=api)  # type: ignore[arg-type]
        results = kubelet.prepare(claims)
        unprepared = kubelet.unprepare(claims)
    for ref in claims:
        assert "OSError: checkpoint directory is read-only" in results[ref.uid].error
        assert "NodePrepareResources failed" in results[ref.uid].error
        assert "OSError: checkpoint directory is read-only" in unprepared[ref.uid]


def test_malformed_requests_get_per_claim_errors(
    make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    good = claim("good")
    with grpc.insecure_channel(f"unix://{plugin.dra_socket}") as channel:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        request = dra_v1_pb2.NodePrepareResourcesRequest(
            claims=[
                dra_v1_pb2.Claim(namespace="default", name="good", uid=good.uid),
                dra_v1_pb2.Claim(namespace="default", name="good", uid=good.uid),
                dra_v1_pb2.Claim(namespace="default", name="empty", uid=""),
                dra_v1_pb2.Claim(namespace="default", name="odd", uid="../../etc"),
                dra_v1_pb2.Claim(namespace="Bad_NS", name="x", uid=str(uuid.uuid4())),
            ]
        )
        response = stub.NodePrepareResources(request, timeout=5)
    assert len(response.claims) == 4
    assert response.claims[good.uid].error == ""
    assert "empty UID" in response.claims[""].error
    assert "is not a UUID" in response.claims["../../etc"].error
    bad_ns = next(uid for uid in response.claims if uid not in {good.uid, "", "../../etc"})
    assert "namespace" in response.claims[bad_ns].error
    # Only the well-formed claim reached the node service, once.
    assert service.calls == [("prepare", [good.uid])]


def test_empty_request_does_not_call_the_service(
    make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        assert kubelet.prepare([]) == {}
        assert kubelet.unprepare([]) == {}
    assert service.calls == []


def test_rolling_update_instances_side_by_side(make_plugin: PluginFactory) -> None:
    old = make_plugin(instance_id="11111111-1111-1111-1111-111111111111")
    new = make_plugin(instance_id="22222222-2222-2222-2222-222222222222")
    assert old.registration_socket.name == f"{DRIVER}-11111111-1111-1111-1111-111111111111-reg.sock"
    assert new.dra_socket.name == "dra-22222222-2222-2222-2222-222222222222.sock"
    for plugin in (old, new):
        with FakeKubelet(plugin.registration_socket) as kubelet:
            assert kubelet.register().endpoint == str(plugin.dra_socket)
    old.stop(grace=0)
    assert not old.registration_socket.exists() and not old.dra_socket.exists()
    assert new.registration_socket.exists() and new.dra_socket.exists()
    assert new.probe() == []


def test_stale_own_socket_removed_and_other_instance_untouched(
    make_plugin: PluginFactory, sockdir: Path
) -> None:
    mine = make_plugin(start=False, instance_id="11111111-1111-1111-1111-111111111111")
    other = make_plugin(start=False, instance_id="22222222-2222-2222-2222-222222222222")
    leftovers = []
    for path in (mine.registration_socket, mine.dra_socket, other.registration_socket):
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.close()  # a socket file nobody listens on: what a crash leaves behind
        leftovers.append(path)
    inode = other.registration_socket.stat().st_ino
    mine.start()
    with FakeKubelet(mine.registration_socket) as kubelet:
        assert kubelet.register().name == DRIVER
    assert other.registration_socket.stat().st_ino == inode
    mine.stop(grace=0)
    assert other.registration_socket.exists()


def test_stop_removes_own_sockets(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    assert plugin.running
    plugin.stop(grace=0)
    assert not plugin.running
    assert not plugin.registration_socket.exists()
    assert not plugin.dra_socket.exists()
    plugin.stop(grace=0)  # idempotent


def test_restart_after_stop(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    plugin.stop(grace=0)
    plugin.start()
    assert plugin.probe() == []


def test_double_start_is_an_error(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    with pytest.raises(KubeletPluginError, match="already started"):
        plugin.start()


def test_start_fails_clearly_on_a_non_socket(make_plugin: PluginFactory) -> None:
    plugin = make_plugin(start=False)
    plugin.registration_socket.parent.mkdir(parents=True)
    plugin.registration_socket.write_text("in the way")
    with pytest.raises(KubeletPluginError, match="is not a socket"):
        plugin.start()
    assert not plugin.dra_socket.exists()  # the DRA server was taken down again


def test_probe_live_and_dead(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    assert plugin.probe(timeout=2) == []
    plugin.stop(grace=0)
    problems = plugin.probe(timeout=0.5)
    assert len(problems) == 2
    assert str(plugin.registration_socket) in problems[0]
    assert str(plugin.dra_socket) in problems[1]


def test_probe_reports_a_dead_dra_socket(make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    # Something replaced the DRA socket with one nobody answers on.
    plugin.dra_socket.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(plugin.dra_socket))
    sock.close()
    problems = plugin.probe(timeout=0.5)
    assert len(problems) == 1
    assert problems[0].startswith(f"DRA socket {plugin.dra_socket}")


def test_too_open_socket_mode_is_refused(make_plugin: PluginFactory) -> None:
    with pytest.raises(KubeletPluginError, match="too open"):
        make_plugin(start=False, socket_mode=0o666)
