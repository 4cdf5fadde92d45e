"""Wire compatibility: the kubelet side is a Go program built from the official k8s.io/kubelet
clients (tests/kubeletpeer), talking to a KubeletPlugin over its real unix sockets."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, NoReturn

import pytest

from dra_core.kubelet import DeviceHealthState, HealthBoard, KubeletPlugin, RegistrationServicer
from dra_core.kubelet.grpcserver import CallContext, GrpcServer
from dra_core.kubelet.health import add_health_servicers
from dra_core.kubelet.proto import dra_v1_pb2, pluginregistration_pb2

from .conftest import DRIVER, PluginFactory, TableNodeService, claim

SOME_UID = "0b5f7d7e-2a6c-4c1e-9a0e-1f2d3c4b5a69"
PEER_DIR = Path(__file__).resolve().parents[1] / "kubeletpeer"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the Go kubelet peer is required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kubeletpeer() -> Path:
    """The built peer binary (cached by tests/kubeletpeer/build.sh)."""
    try:
        result = subprocess.run(
            ["bash", str(PEER_DIR / "build.sh")],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        _unavailable(f"building the Go kubelet peer timed out: {exc}")
    if result.returncode != 0:
        _unavailable(
            f"building the Go kubelet peer failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    binary = Path(result.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        _unavailable(f"build.sh printed {binary}, which is not an executable")
    return binary


def run_peer(binary: Path, plugin: KubeletPlugin, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(binary), "--registration-socket", str(plugin.registration_socket), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubeletpeer failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def spec(*claims: Any) -> str:
    return ",".join(f"{c.namespace}/{c.name}/{c.uid}" for c in claims)


def test_registration(kubeletpeer: Path, make_plugin: PluginFactory) -> None:
    plugin = make_plugin()
    report = run_peer(kubeletpeer, plugin)
    assert report["info"] == {
        "type": "DRAPlugin",
        "name": DRIVER,
        "endpoint": str(plugin.dra_socket),
        "supported_versions": ["v1.DRAPlugin", "v1beta1.DRAPlugin"],
    }
    assert report["chosen_version"] == "v1.DRAPlugin"
    assert report["health_offered"] is False
    assert "health_version" not in report
    assert plugin.registered.wait(2)


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
def test_prepare_and_unprepare(
    kubeletpeer: Path, make_plugin: PluginFactory, service: TableNodeService, api: str
) -> None:
    plugin = make_plugin(instance_id="33333333-3333-3333-3333-333333333333")
    shared, plain, broken = claim("shared-gpu"), claim("plain", "team-a"), claim("broken")
    service.errors[broken.uid] = "device gpu-broken is unhealthy"
    report = run_peer(kubeletpeer, plugin, "--api", api, "--prepare", spec(shared, plain, broken))
    assert report["chosen_version"] == f"{api}.DRAPlugin"
    prepared = report["prepare"]
    assert set(prepared) == {shared.uid, plain.uid, broken.uid}
    assert prepared[plain.uid] == {
        "devices": [
            {
                "request_names": ["gpu"],
                "pool_name": "node-1",
                "device_name": "gpu-plain",
                "cdi_device_ids": [f"example.com/gpu={plain.uid}"],
                "share_id": None,
            }
        ],
        "error": "",
    }
    expected_share = f"share-{shared.uid[:8]}" if api == "v1" else None
    assert prepared[shared.uid]["devices"][0]["share_id"] == expected_share
    assert prepared[broken.uid] == {"devices": [], "error": "device gpu-broken is unhealthy"}
    assert service.prepared.keys() == {shared.uid, plain.uid}

    report = run_peer(kubeletpeer, plugin, "--api", api, "--unprepare", spec(shared, plain))
    assert report["unprepare"] == {shared.uid: {"error": ""}, plain.uid: {"error": ""}}
    assert service.prepared == {}


def test_node_service_exception(
    kubeletpeer: Path, make_plugin: PluginFactory, service: TableNodeService
) -> None:
    plugin = make_plugin()
    one, two = claim("one"), claim("two")
    service.fail = RuntimeError("API server unavailable")
    report = run_peer(kubeletpeer, plugin, "--prepare", spec(one, two))
    for uid in (one.uid, two.uid):
        assert "RuntimeError: API server unavailable" in report["prepare"][uid]["error"]


class _Watched(HealthBoard):
    """A HealthBoard that tells the test when a stream has taken its first snapshot."""

    def __init__(self, states: list[DeviceHealthState]) -> None:
        super().__init__(states)
        self.opened = threading.Event()

    def snapshot(self) -> list[DeviceHealthState]:
        states = super().snapshot()
        self.opened.set()
        return states


@pytest.mark.parametrize(
    ("health_api", "expected"),
    [
        (None, "v1.DRAResourceHealth"),  # the kubelet's own choice
        ("v1", "v1.DRAResourceHealth"),
        ("v1alpha1", "v1alpha1.DRAResourceHealth"),
    ],
)
def test_health_stream(
    kubeletpeer: Path, make_plugin: PluginFactory, health_api: str | None, expected: str
) -> None:
    board = _Watched(
        [DeviceHealthState("node-1", "gpu-0", True), DeviceHealthState("node-1", "gpu-1", None)]
    )
    plugin = make_plugin(health=board)

    def degrade() -> None:
        if board.opened.wait(30):
            board.set(
                [
                    DeviceHealthState("node-1", "gpu-0", False, "wedged"),
                    DeviceHealthState("node-1", "gpu-1", None),
                ]
            )

    changer = threading.Thread(target=degrade, daemon=True)
    changer.start()
    forced = ["--health-api", health_api] if health_api else []
    report = run_peer(
        kubeletpeer, plugin, "--watch-health", "2", "--health-timeout", "20s", *forced
    )
    changer.join(5)
    assert report["health_offered"] is True
    assert report["health_version"] == expected
    assert report["info"]["supported_versions"] == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    ]
    first, second = report["health"]
    assert [(d["device_name"], d["health"]) for d in first] == [
        ("gpu-0", "HEALTHY"),
        ("gpu-1", "UNKNOWN"),
    ]
    assert [(d["device_name"], d["health"], d["message"]) for d in second] == [
        ("gpu-0", "UNHEALTHY", "wedged"),
        ("gpu-1", "UNKNOWN", ""),
    ]
    assert all(d["health_check_timeout_seconds"] == 30 for d in first + second)
    assert all(d["pool_name"] == "node-1" and d["last_updated_time"] > 0 for d in first)


def _serve(sockdir: Path, versions: list[str]) -> tuple[GrpcServer, Path]:
    """A server on a registration and a DRA socket, registration advertising ``versions``;
    the caller adds the DRA-side services and starts it."""
    reg, dra = sockdir / "reg.sock", sockdir / "dra.sock"
    server = GrpcServer("test", workers=4)
    server.add_service(
        pluginregistration_pb2.DESCRIPTOR.services_by_name["Registration"],
        RegistrationServicer(DRIVER, str(dra), versions),
    )
    server.listen(reg)
    server.listen(dra)
    return server, reg


def _serve_health_plugin(sockdir: Path, versions: list[str]) -> tuple[GrpcServer, Path]:
    """A plugin serving both health versions of one device but advertising ``versions``."""
    server, reg = _serve(sockdir, versions)
    board = HealthBoard([DeviceHealthState("node-1", "gpu-0", False, "wedged")])
    add_health_servicers(server, board, threading.Event(), resend_interval=0.2)
    server.start()
    return server, reg


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (["v1alpha1.DRAResourceHealth", "v1.DRAResourceHealth"], "v1.DRAResourceHealth"),
        (["v1alpha1.DRAResourceHealth"], "v1alpha1.DRAResourceHealth"),
        (["v1.DRAResourceHealth"], "v1.DRAResourceHealth"),
    ],
)
def test_peer_picks_the_health_version_as_the_kubelet(
    kubeletpeer: Path, sockdir: Path, health: list[str], expected: str
) -> None:
    """v1 whenever it is advertised, whatever the order; v1alpha1 only when alone."""
    server, reg = _serve_health_plugin(sockdir, ["v1.DRAPlugin", *health])
    try:
        result = subprocess.run(
            [str(kubeletpeer), "--registration-socket", str(reg), "--watch-health", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.stop(None)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["health_version"] == expected
    messages = report["health"]
    assert len(messages) == 2
    for message in messages:
        assert [d.pop("last_updated_time") > 0 for d in message] == [True]
        assert message == [
            {
                "pool_name": "node-1",
                "device_name": "gpu-0",
                "health": "UNHEALTHY",
                "health_check_timeout_seconds": 30,
                "message": "wedged",
            }
        ]


class _SkippingServicer:
    """A broken plugin: answers no claim at all."""

    def NodePrepareResources(
        self, request: dra_v1_pb2.NodePrepareResourcesRequest, context: CallContext
    ) -> dra_v1_pb2.NodePrepareResourcesResponse:
        return dra_v1_pb2.NodePrepareResourcesResponse()

    def NodeUnprepareResources(
        self, request: dra_v1_pb2.NodeUnprepareResourcesRequest, context: CallContext
    ) -> dra_v1_pb2.NodeUnprepareResourcesResponse:
        return dra_v1_pb2.NodeUnprepareResourcesResponse()


@pytest.mark.parametrize(
    ("versions", "args", "error"),
    [
        (["v9.Unknown"], [], "none of the plugin's versions"),
        (["v1.DRAPlugin"], ["--api", "v1beta1"], "is not among the plugin's versions"),
        (["v1.DRAPlugin"], ["--prepare", f"ns/name/{SOME_UID}"], "skipped 1"),
        (["v1.DRAPlugin"], ["--watch-health", "1"], "advertises none of"),
        (
            ["v1.DRAPlugin", "v1.DRAResourceHealth"],
            ["--health-api", "v1alpha1"],
            "forced health API v1alpha1.DRAResourceHealth is not among",
        ),
        # Advertised but not served: the v1 client gets Unimplemented.
        (["v1.DRAPlugin", "v1.DRAResourceHealth"], ["--watch-health", "1"], "Unimplemented"),
    ],
)
def test_peer_rejects_protocol_errors(
    kubeletpeer: Path, sockdir: Path, versions: list[str], args: list[str], error: str
) -> None:
    """The peer is not vacuous: it fails where the kubelet would."""
    server, reg = _serve(sockdir, versions)
    server.add_service(dra_v1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"], _SkippingServicer())
    server.start()
    try:
        result = subprocess.run(
            [str(kubeletpeer), "--registration-socket", str(reg), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.stop(None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert error in json.loads(result.stdout)["error"]
